-- Baseline: the whole planner schema in one migration.
--
-- Squashed on 2026-12-01 (issue 11) from the migrations 20261128000000 to 20261128000700,
-- before anything was deployed. It is the concatenation of migrations/schema/*.sql as they
-- were that day. From now on a change is a NEW migration here PLUS the same change in the
-- schema files (which hold each definition once, as it currently is);
-- tests/db/test_schema_files.py checks that both build the same database (pg_dump
-- --schema-only). Never edit this file: `planner migrate` refuses an applied file that changed.
-- A local database migrated before the squash is told to run `planner dev reset`.

-- ============================================================================================
-- schema/10_tables.sql
-- ============================================================================================

-- Schema, part 1 of 4: the tables and the constraints that need no code.
--
-- The files in migrations/schema/ hold the CURRENT definition of every table, function, policy
-- and grant, each exactly once (docs/database.md, "Where the schema lives"). They are the
-- truth a reader opens; the migrations beside them are how a database gets there, and a test
-- (tests/db/test_schema_files.py) checks that both give the same `pg_dump --schema-only`.
--
-- Tenant boundary (invariant 1). Every row carries organization_id, and every reference to a
-- parent row is a *composite* foreign key that includes organization_id (and, where the parent
-- lives inside an allocation run, allocation_run_id too). A row therefore cannot point at a
-- parent of another organisation, whoever writes it: RLS does not apply to the service role or
-- to table owners, foreign keys apply to everybody. The extra `unique (id, organization_id)`
-- constraints exist only to be the targets of those keys.
--
-- The functions and triggers that complete the picture are in 20_rules.sql and 30_engine.sql,
-- the roles, grants and policies in 40_access.sql.

create schema planner_engine;   -- engine functions + settings; never exposed by PostgREST
create schema planner_private;  -- RLS/trigger helpers; not exposed either
comment on schema planner_engine is
  'Functions the planner engine (listener) calls, fenced on a per-claim lease. Not exposed by PostgREST.';
comment on schema planner_private is
  'Helpers for RLS policies and triggers. Not exposed by PostgREST; callers get no table access.';

-- -- limits --------------------------------------------------------------------------------
-- One row. Kept in a table (not GUCs) so an operator changes a limit with one UPDATE, in a
-- transaction, on hosted Supabase too, where ALTER DATABASE SET is not always allowed.
create table planner_engine.settings (
  id boolean primary key default true check (id),
  max_job_lines integer not null default 500 check (max_job_lines >= 1),
  max_runs_per_hour integer not null default 30 check (max_runs_per_hour >= 0),
  max_attempts integer not null default 3 check (max_attempts between 1 and 20)
);
insert into planner_engine.settings default values;
comment on table planner_engine.settings is
  'Singleton: global limits. organizations.max_runs_per_hour overrides max_runs_per_hour.';

-- -- tenants -------------------------------------------------------------------------------
create table public.organizations (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(btrim(name)) > 0),
  -- NULL = planner_engine.settings.max_runs_per_hour. Only the service role / operator may
  -- change it: members have no UPDATE grant on this table (Denial of Wallet protection).
  max_runs_per_hour integer check (max_runs_per_hour >= 0),
  created_at timestamptz not null default now()
);

create table public.organization_members (
  organization_id uuid not null references public.organizations (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,  -- the JWT's `sub`
  role text not null check (role in ('admin', 'planner', 'viewer')),
  created_at timestamptz not null default now(),
  primary key (organization_id, user_id)
);
create index organization_members_user_idx on public.organization_members (user_id);

-- -- rule-set catalogue --------------------------------------------------------------------
-- Mirrors solver.rules.RULE_SETS; constraints arrays on runs are checked against it.
create table public.planner_rule_sets (
  code text primary key check (code ~ '^[A-Z][A-Z0-9_]*$'),
  description text not null,
  created_at timestamptz not null default now()
);
insert into public.planner_rule_sets (code, description) values
  ('AMC_PGY1', 'AMC PGY1: subspecialty ≤25 %, specialty ≤50 %, service ≤20 %, clinical ≥50 %, experiences A-D, ≥4 terms of ≥10 weeks'),
  ('AMC_PGY2', 'AMC PGY2: subspecialty ≤25 %, service ≤25 %, clinical ≥50 %, ≤1 non-clinical term, experiences A-C, ≥3 terms of ≥10 weeks'),
  ('VIC_PGY1', 'Victorian PGY1: AMC_PGY1 for a 5-term year'),
  ('VIC_PGY2', 'Victorian PGY2: AMC_PGY2 for a 4-term year'),
  ('LEGACY_INTERN', 'Pre-2024 intern: ≥8 weeks emergency, ≥10 weeks medicine, ≥10 weeks surgery'),
  ('NO_NIGHTS', 'No term in a team tagged NIGHTS'),
  ('MAX_ONE_RURAL', 'At most one term at a rural team'),
  ('NO_CONSECUTIVE_SERVICE', 'No two service terms in consecutive terms');

-- -- planning inputs -----------------------------------------------------------------------
create table public.allocation_runs (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id) on delete cascade,
  name text not null check (length(btrim(name)) > 0),
  description text,
  created_at timestamptz not null default now(),
  unique (id, organization_id)
);
create index allocation_runs_org_idx on public.allocation_runs (organization_id);

create table public.terms (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null,
  allocation_run_id uuid not null,
  ordinal integer not null check (ordinal >= 1),
  name text not null check (length(btrim(name)) > 0),
  weeks integer not null check (weeks between 1 and 52),
  starts_on date,
  unique (allocation_run_id, ordinal),
  unique (id, allocation_run_id, organization_id),
  foreign key (allocation_run_id, organization_id)
    references public.allocation_runs (id, organization_id) on delete cascade
);
create index terms_org_idx on public.terms (organization_id);

create table public.teams (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id) on delete cascade,
  name text not null check (length(btrim(name)) > 0),
  specialty text not null check (length(btrim(specialty)) > 0),
  -- NOT NULL: the solver groups the 25 % rule by subspecialty; a team without one would be
  -- its own silent bucket. Use the specialty again when there is no finer grouping.
  subspecialty text not null check (length(btrim(subspecialty)) > 0),
  kind text not null default 'clinical' check (kind in ('clinical', 'service', 'non_clinical')),
  experiences text[] not null default '{}'
    check (experiences <@ array['A', 'B', 'C', 'D'] and array_position(experiences, null) is null),
  site text,
  rural boolean not null default false,
  tags text[] not null default '{}' check (array_position(tags, null) is null),
  created_at timestamptz not null default now(),
  unique (organization_id, name),
  unique (id, organization_id)
);

create table public.team_demand (
  organization_id uuid not null,
  allocation_run_id uuid not null,
  team_id uuid not null,
  term_id uuid not null,
  min_lines integer not null default 0 check (min_lines >= 0),
  max_lines integer not null check (max_lines >= min_lines),
  primary key (allocation_run_id, team_id, term_id),
  foreign key (allocation_run_id, organization_id)
    references public.allocation_runs (id, organization_id) on delete cascade,
  foreign key (team_id, organization_id)
    references public.teams (id, organization_id) on delete cascade,
  foreign key (term_id, allocation_run_id, organization_id)
    references public.terms (id, allocation_run_id, organization_id) on delete cascade
);
create index team_demand_org_idx on public.team_demand (organization_id);
create index team_demand_team_idx on public.team_demand (team_id);
create index team_demand_term_idx on public.team_demand (term_id);

-- -- planner runs --------------------------------------------------------------------------
create table public.allocation_planner_runs (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null,
  allocation_run_id uuid not null,
  status text not null default 'PENDING'
    check (status in ('PENDING', 'GENERATING', 'COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')),
  n_job_lines integer not null check (n_job_lines >= 1),  -- upper bound: settings, in the trigger
  constraints text[] not null default '{}' check (array_position(constraints, null) is null),
  options jsonb not null default '{}' check (jsonb_typeof(options) = 'object'),
  requested_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  claimed_at timestamptz,
  heartbeat_at timestamptz,
  finished_at timestamptz,
  attempts integer not null default 0 check (attempts >= 0),
  max_attempts integer not null default 3 check (max_attempts between 1 and 20),
  worker_id text,
  lease uuid,  -- fencing token of the current claim; NULL whenever nobody holds the run
  cancel_requested_at timestamptz,
  result_metadata jsonb,
  error text,
  unique (id, organization_id),
  unique (id, allocation_run_id, organization_id),
  foreign key (allocation_run_id, organization_id)
    references public.allocation_runs (id, organization_id) on delete cascade,
  -- A lease exists exactly while the run is GENERATING: a terminal or re-queued run can never
  -- be completed by a zombie worker that still remembers its old lease.
  constraint lease_iff_generating check ((status = 'GENERATING') = (lease is not null)),
  -- The sweeper measures staleness from heartbeat_at, so a claimed run always has one.
  constraint generating_has_heartbeat check (status <> 'GENERATING' or heartbeat_at is not null),
  constraint finished_iff_terminal
    check ((status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')) = (finished_at is not null))
);
-- Invariant 4a: one active run per allocation run, race-free (the index is the arbiter).
create unique index allocation_planner_runs_one_active_idx
  on public.allocation_planner_runs (allocation_run_id)
  where status in ('PENDING', 'GENERATING');
-- Claim order and the sweeper's scans.
create index allocation_planner_runs_pending_idx
  on public.allocation_planner_runs (created_at, id) where status = 'PENDING';
create index allocation_planner_runs_generating_idx
  on public.allocation_planner_runs (heartbeat_at) where status = 'GENERATING';
-- Invariant 4b: the rolling-hour count per organisation.
create index allocation_planner_runs_org_created_idx
  on public.allocation_planner_runs (organization_id, created_at);

-- -- the plan ------------------------------------------------------------------------------
-- Every commit rewrites each line it keeps (planner_run_id, created_at: the run and the time
-- that produced it). Neither column is indexed and half of each page is left free, so that
-- rewrite is a HOT update: the new row version stays on its page and needs no index entries.
-- (The only look-up by planner_run_id is the foreign key's ON DELETE SET NULL when a run row
-- is deleted, and the (allocation_run_id, line_number) key narrows that to one allocation
-- run's lines.)
create table public.job_lines (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null,
  allocation_run_id uuid not null,
  line_number integer not null check (line_number >= 1),
  planner_run_id uuid,  -- the run that produced the line; NULL for hand-made/restored orphans
  created_at timestamptz not null default now(),  -- when that run (or restore) wrote it
  unique (allocation_run_id, line_number),
  unique (id, allocation_run_id, organization_id),
  foreign key (allocation_run_id, organization_id)
    references public.allocation_runs (id, organization_id) on delete cascade,
  foreign key (planner_run_id, allocation_run_id, organization_id)
    references public.allocation_planner_runs (id, allocation_run_id, organization_id)
    on delete set null (planner_run_id)
) with (fillfactor = 50);
create index job_lines_org_idx on public.job_lines (organization_id);

create table public.rotations (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null,
  allocation_run_id uuid not null,  -- lets the keys below tie line and term to ONE allocation run
  job_line_id uuid not null,
  term_id uuid not null,
  team_id uuid not null,
  pinned boolean not null default false,  -- a manager's edit to keep on the next regeneration
  updated_at timestamptz not null default now(),
  unique (job_line_id, term_id),  -- one rotation per line per term
  foreign key (job_line_id, allocation_run_id, organization_id)
    references public.job_lines (id, allocation_run_id, organization_id) on delete cascade,
  foreign key (term_id, allocation_run_id, organization_id)
    references public.terms (id, allocation_run_id, organization_id) on delete cascade,
  foreign key (team_id, organization_id)
    references public.teams (id, organization_id)
) with (fillfactor = 50);
create index rotations_org_idx on public.rotations (organization_id);
create index rotations_term_idx on public.rotations (term_id);
-- No index on team_id, on purpose: a commit moves cells from team to team, and with team_id
-- in no index (and half of each page free) that UPDATE is a HOT update, which writes no index
-- entries; with one, each moved cell wrote a new entry in all five indexes (a 250-line commit
-- in which every cell moves: 35 against 22 ms of server CPU). Costs of the trade: deleting a
-- team checks the rotations of its organisation (rotations_org_idx) rather than its own, and
-- "which teams does this plan use" goes through the allocation run's job_lines (load_problem).

-- One snapshot per overwrite of an allocation run's plan (commit_plan or restore_job_lines).
-- `plan` holds the complete previous plan in the same shape commit_plan accepts, plus each
-- line's planner_run_id, so restoring is "commit this plan again".
create table public.job_lines_history (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null,
  allocation_run_id uuid not null,
  planner_run_id uuid,           -- the run whose commit replaced this plan (NULL: a restore did)
  restored_snapshot_id uuid,     -- the snapshot a restore put in its place (NULL: a commit did)
  taken_at timestamptz not null default now(),
  taken_by uuid,                 -- auth.uid() of a restore; NULL for the engine
  n_lines integer not null check (n_lines >= 0),
  -- lz4: each commit compresses the previous plan (about 100 kB of JSON at 250 lines) into
  -- this column; lz4 does that several times faster than the default pglz.
  plan jsonb compression lz4 not null check (jsonb_typeof(plan -> 'lines') = 'array'),
  unique (id, allocation_run_id, organization_id),
  foreign key (allocation_run_id, organization_id)
    references public.allocation_runs (id, organization_id) on delete cascade,
  foreign key (planner_run_id, allocation_run_id, organization_id)
    references public.allocation_planner_runs (id, allocation_run_id, organization_id)
    on delete set null (planner_run_id),
  foreign key (restored_snapshot_id, allocation_run_id, organization_id)
    references public.job_lines_history (id, allocation_run_id, organization_id)
    on delete set null (restored_snapshot_id)
);
create index job_lines_history_alloc_idx on public.job_lines_history (allocation_run_id, taken_at);
create index job_lines_history_org_idx on public.job_lines_history (organization_id);

create table public.planner_execution_logs (
  id bigint generated always as identity primary key,
  planner_run_id uuid not null,
  organization_id uuid not null,
  logged_at timestamptz not null default now(),
  level text not null
    check (level in ('TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL')),
  message text not null,
  context jsonb not null default '{}',
  traceback text,
  foreign key (planner_run_id, organization_id)
    references public.allocation_planner_runs (id, organization_id) on delete cascade
);
create index planner_execution_logs_run_idx
  on public.planner_execution_logs (planner_run_id, logged_at);
create index planner_execution_logs_org_idx on public.planner_execution_logs (organization_id);

-- ============================================================================================
-- schema/20_rules.sql
-- ============================================================================================

-- Schema, part 2 of 4: the invariants that need code (helpers, triggers, plans as JSON).
--
-- Custom SQLSTATEs (class "PL", no clash with PostgreSQL's own classes); docs/database.md
-- lists them with the hint each carries:
--   PL001 lease lost             PL002 organisation mismatch   PL003 illegal status transition
--   PL004 malformed plan         PL010 unknown rule-set code   PL011 n_job_lines out of range
--   PL012 not a planner/admin    PL013 an active run exists    PL014 hourly rate limit
--   PL015 engine-owned field written by a user
--
-- Every SECURITY DEFINER function sets `search_path = ''` and names objects schema-qualified,
-- so a caller cannot shadow a table or operator with one of its own.

-- -- who is calling ------------------------------------------------------------------------
-- SECURITY DEFINER so that policies on organization_members can call them without recursing
-- into their own policy; STABLE so the planner evaluates them once per statement.
create function planner_private.has_role(p_organization_id uuid, p_roles text[])
returns boolean
language sql stable security definer set search_path = ''
as $$
  select exists (
    select 1 from public.organization_members m
     where m.organization_id = p_organization_id
       and m.user_id = (select auth.uid())
       and m.role = any (p_roles))
$$;

create function planner_private.is_member(p_organization_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select planner_private.has_role(p_organization_id, array['admin', 'planner', 'viewer'])
$$;

create function planner_private.can_plan(p_organization_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select planner_private.has_role(p_organization_id, array['admin', 'planner'])
$$;

-- True for roles that RLS does not restrict (superusers, service_role). Deliberately NOT
-- security definer: it must see the *invoking* role in current_user.
create function planner_private.invoker_is_privileged()
returns boolean
language sql stable set search_path = ''
as $$
  select coalesce(
    (select r.rolsuper or r.rolbypassrls from pg_catalog.pg_roles r
      where r.rolname = current_user),
    false)
$$;

-- For the public functions (request_cancel, restore_job_lines), which run as their owner:
-- planners/admins of the organisation, or a request made with the service-role key.
create function planner_private.caller_can_plan(p_organization_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select planner_private.can_plan(p_organization_id)
      or coalesce((select auth.role()) = 'service_role', false)
$$;

-- -- admission of a new run (invariants 3 and 4) -------------------------------------------
-- Called by the insert trigger. Returns the max_attempts a user-requested run gets.
-- Harmless if a user calls it directly: it writes nothing and only answers or raises.
create function planner_private.admit_run(
  p_organization_id uuid,
  p_allocation_run_id uuid,
  p_n_job_lines integer,
  p_constraints text[],
  p_check_membership boolean
) returns integer
language plpgsql volatile security definer set search_path = ''
as $$
declare
  s planner_engine.settings;
  v_unknown text[];
  v_limit integer;
  v_recent integer;
begin
  select * into strict s from planner_engine.settings where id;

  if p_check_membership then
    if not planner_private.can_plan(p_organization_id) then
      raise exception using errcode = 'PL012',
        message = 'only planners and admins of the organisation can request a planner run',
        hint = 'ask an admin of the organisation for the planner role';
    end if;
  end if;
  if not exists (select 1 from public.allocation_runs a
                  where a.id = p_allocation_run_id and a.organization_id = p_organization_id) then
    raise exception using
      errcode = case when p_check_membership then 'PL012' else 'PL002' end,
      message = format('allocation run %s does not belong to organisation %s',
                       p_allocation_run_id, p_organization_id),
      hint = 'pick an allocation run of the same organisation';
  end if;

  v_unknown := array(
    select c from unnest(p_constraints) c
     where not exists (select 1 from public.planner_rule_sets r where r.code = c));
  if cardinality(v_unknown) > 0 then
    raise exception using errcode = 'PL010',
      message = format('unknown rule-set code(s): %s', array_to_string(v_unknown, ', ')),
      hint = 'valid codes: ' || (select string_agg(code, ', ' order by code)
                                   from public.planner_rule_sets);
  end if;

  if p_n_job_lines is null or p_n_job_lines < 1 or p_n_job_lines > s.max_job_lines then
    raise exception using errcode = 'PL011',
      message = format('n_job_lines must be between 1 and %s (got %s)',
                       s.max_job_lines, p_n_job_lines),
      hint = format('ask for 1 to %s job lines', s.max_job_lines);
  end if;

  -- Serialise run requests of one organisation for the rest of this transaction, so the two
  -- checks below are exact even for simultaneous requests (each statement after the lock
  -- sees what the previous holder committed). The partial unique index stays as backstop.
  perform pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtextextended('planner_run_request:' || p_organization_id::text, 0));

  if exists (select 1 from public.allocation_planner_runs r
              where r.allocation_run_id = p_allocation_run_id
                and r.status in ('PENDING', 'GENERATING')) then
    raise exception using errcode = 'PL013',
      message = 'a planner run is already pending or generating for this allocation run',
      hint = 'wait for it to finish or cancel it first';
  end if;

  select coalesce(o.max_runs_per_hour, s.max_runs_per_hour) into v_limit
    from public.organizations o where o.id = p_organization_id;
  select count(*) into v_recent
    from public.allocation_planner_runs r
   where r.organization_id = p_organization_id
     and r.created_at > now() - interval '1 hour';
  if v_recent >= v_limit then
    raise exception using errcode = 'PL014',
      message = format('the organisation has requested %s planner runs in the last hour '
                       '(limit %s)', v_recent, v_limit),
      hint = 'try again later; an operator can raise organizations.max_runs_per_hour';
  end if;

  return s.max_attempts;
end
$$;

-- BEFORE INSERT on allocation_planner_runs. SECURITY INVOKER on purpose: it needs the
-- inserting role in current_user to tell a user's request from the service role's.
-- A rule set listed twice would be refused by the solver; since the intent is unambiguous,
-- duplicate codes are dropped here, keeping the first position.
create function planner_private.allocation_planner_runs_before_insert()
returns trigger
language plpgsql set search_path = ''
as $$
declare
  v_user boolean := not planner_private.invoker_is_privileged();
  v_max_attempts integer;
begin
  if v_user then
    -- A user only says *what* to plan. Refuse (rather than silently drop) anything else so a
    -- buggy or malicious client learns at once that it cannot fake engine state.
    if new.status is distinct from 'PENDING' or new.attempts <> 0
       or new.worker_id is not null or new.lease is not null
       or new.claimed_at is not null or new.heartbeat_at is not null
       or new.finished_at is not null or new.cancel_requested_at is not null
       or new.result_metadata is not null or new.error is not null then
      raise exception using errcode = 'PL015',
        message = 'status, lease, heartbeat, attempts, worker and result fields belong to the '
                  'planner engine',
        hint = 'insert only organization_id, allocation_run_id, n_job_lines, constraints '
               'and options';
    end if;
    new.requested_by := auth.uid();
    new.created_at := now();  -- no back-dating around the hourly limit
  end if;
  -- Duplicates are dropped, first position kept: ['A','B','A'] -> ['A','B'].
  new.constraints := array(
    select c from unnest(new.constraints) with ordinality as u(c, i)
     group by c order by min(i));
  v_max_attempts := planner_private.admit_run(
    new.organization_id, new.allocation_run_id, new.n_job_lines, new.constraints, v_user);
  if v_user then
    new.max_attempts := v_max_attempts;
  end if;
  return new;
end
$$;

create trigger allocation_planner_runs_before_insert
  before insert on public.allocation_planner_runs
  for each row execute function planner_private.allocation_planner_runs_before_insert();

-- -- run lifecycle (invariant 2), for every role including superusers ---------------------
create function planner_private.allocation_planner_runs_before_update()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  if new.organization_id <> old.organization_id
     or new.allocation_run_id <> old.allocation_run_id then
    raise exception using errcode = 'PL002',
      message = 'a planner run cannot move to another organisation or allocation run',
      hint = 'request a new run instead';
  end if;
  if new.status <> old.status and (old.status, new.status) not in (
       ('PENDING', 'GENERATING'),
       ('GENERATING', 'PENDING'),
       ('GENERATING', 'COMPLETED'), ('GENERATING', 'INFEASIBLE'),
       ('GENERATING', 'FAILED'), ('GENERATING', 'CANCELLED'),
       ('PENDING', 'CANCELLED'), ('PENDING', 'FAILED')) then
    raise exception using errcode = 'PL003',
      message = format('illegal status transition %s -> %s for planner run %s',
                       old.status, new.status, old.id),
      hint = case when old.status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')
                  then 'terminal states are final; request a new run'
                  else 'legal: PENDING->GENERATING|CANCELLED|FAILED, '
                       'GENERATING->PENDING|COMPLETED|INFEASIBLE|FAILED|CANCELLED' end;
  end if;
  return new;
end
$$;

create trigger allocation_planner_runs_before_update
  before update on public.allocation_planner_runs
  for each row execute function planner_private.allocation_planner_runs_before_update();

-- Rotations carry the time of the last edit. The WHEN clause keeps the plpgsql call off the
-- rows whose writer already moved updated_at (replace_plan sets it in its upsert; calling a
-- plpgsql function per row was ~2 ms of a 250-line commit). Users cannot set it themselves:
-- their UPDATE grant on rotations covers team_id and pinned only (40_access.sql).
create function planner_private.touch_updated_at()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger rotations_touch_updated_at
  before update on public.rotations
  for each row when (new.updated_at is not distinct from old.updated_at)
  execute function planner_private.touch_updated_at();


-- -- plans as JSON ---------------------------------------------------------------------------
-- A plan travels as {"lines": [{"line", "rotations": {term: team}, "pinned": [term]}]}: the
-- solver's shape, what commit_plan accepts and what job_lines_history keeps. Everything below
-- is set-based: one statement per step over the whole plan, never a loop over lines or cells
-- (a 250-line plan is 1,250 rotations; per-row work was what made commit_plan slow).

-- The current plan of an allocation run in that shape, or NULL without lines. "pinned" is in
-- term order. p_with_provenance adds each line's planner_run_id (snapshots keep it; the
-- solver's strict model would refuse the extra key). Built with the json functions and cast
-- once at the end: for a plan of a few thousand cells that is markedly cheaper than building
-- each jsonb object on the way.
create function planner_private.current_plan(p_allocation_run_id uuid, p_with_provenance boolean)
returns jsonb
language sql stable security definer set search_path = ''
as $$
  select json_build_object('lines', json_agg(x.line order by x.n))::jsonb
    from (
      select l.line_number as n,
             case when p_with_provenance
                  then json_build_object('line', l.line_number, 'rotations', g.rotations,
                                         'pinned', g.pinned, 'planner_run_id', l.planner_run_id)
                  else json_build_object('line', l.line_number, 'rotations', g.rotations,
                                         'pinned', g.pinned) end as line
        from public.job_lines l
        cross join lateral (
          select coalesce(json_object_agg(ro.term_id, ro.team_id)
                            filter (where ro.term_id is not null), '{}'::json) as rotations,
                 coalesce(json_agg(ro.term_id order by t.ordinal) filter (where ro.pinned),
                          '[]'::json) as pinned
            from public.rotations ro
            join public.terms t on t.id = ro.term_id
           where ro.job_line_id = l.id) g
       where l.allocation_run_id = p_allocation_run_id) x
  having count(*) > 0
$$;

-- Validates a plan against its allocation run: PL004 for a malformed payload, PL002 for a
-- term or team of another allocation run / organisation (the composite keys would refuse it
-- too, but with a less useful message). The first failure is reported, in this order: shape of
-- each line, duplicate line numbers, uuids, pins, terms, teams, coverage.
--
-- Two passes over the plan, whatever its size: one over the lines (shape, duplicates, pins,
-- coverage against the allocation run's terms), one over the cells that keeps the distinct
-- (term, team) pairs. The uuid format and the catalogue look-ups then run on the DISTINCT
-- terms and teams (a few dozen), not on each of the 1,250 cells of a 250-line plan, and the
-- offending line is looked up only when there is an error to report.
create function planner_private.check_plan(
  p_plan jsonb, p_allocation_run_id uuid, p_organization_id uuid
) returns void
language plpgsql stable security definer set search_path = ''
as $$
declare
  uuid_re constant text := '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
  v_bad text;
  v_bad_ordinal bigint;
  v_lines bigint;
  v_distinct_lines bigint;
  v_bad_pin_ordinal bigint;
  v_uncovered_ordinal bigint;
  v_run_terms text[];     -- the allocation run's terms, as text (coverage)
  v_own_terms uuid[];     -- ... that belong to the organisation too (membership)
  v_terms text[];         -- the distinct terms the plan names
  v_teams text[];         -- the distinct teams it names
  v_team_ids uuid[];
  v_bad_terms text[];
  v_bad_teams text[];
begin
  if p_plan is null or jsonb_typeof(p_plan -> 'lines') is distinct from 'array' then
    raise exception using errcode = 'PL004', message = 'a plan must be an object with a "lines" array';
  end if;

  select coalesce(array_agg(t.id::text), '{}'),
         coalesce(array_agg(t.id) filter (where t.organization_id = p_organization_id), '{}')
    into v_run_terms, v_own_terms
    from public.terms t where t.allocation_run_id = p_allocation_run_id;

  -- Pass 1, the lines. A malformed line is left out of the pin and coverage checks (CASE
  -- keeps their expressions away from it), it is reported first anyway.
  select min(e.o) filter (where s.malformed),
         count(*), count(distinct e.x ->> 'line'),
         min(e.o) filter (where case when s.malformed then false
                                     when jsonb_array_length(coalesce(e.x -> 'pinned', '[]')) = 0
                                       then false
                                     else exists (
                                       select 1 from jsonb_array_elements(e.x -> 'pinned') p
                                        where jsonb_typeof(p) <> 'string'
                                           or not (e.x -> 'rotations') ? (p #>> '{}')) end),
         min(e.o) filter (where case when s.malformed then false
                                     else not (e.x -> 'rotations') ?& v_run_terms end)
    into v_bad_ordinal, v_lines, v_distinct_lines, v_bad_pin_ordinal, v_uncovered_ordinal
    from jsonb_array_elements(p_plan -> 'lines') with ordinality as e(x, o)
    cross join lateral (
      select jsonb_typeof(e.x) <> 'object'
          or coalesce(e.x ->> 'line', '') !~ '^[1-9][0-9]{0,8}$'
          or jsonb_typeof(e.x -> 'rotations') is distinct from 'object'
          or (e.x ? 'pinned' and jsonb_typeof(e.x -> 'pinned') <> 'array') as malformed) s;
  if v_bad_ordinal is not null then
    raise exception using errcode = 'PL004',
      message = format('malformed plan: line #%s needs a positive integer "line", a '
                       '"rotations" object and optionally a "pinned" array', v_bad_ordinal);
  end if;
  if v_distinct_lines <> v_lines then
    select x ->> 'line' into v_bad
      from jsonb_array_elements(p_plan -> 'lines') x
     group by x ->> 'line' having count(*) > 1 order by min((x ->> 'line')::bigint) limit 1;
    raise exception using errcode = 'PL004', message = format('malformed plan: line %s appears twice', v_bad);
  end if;

  -- Pass 2, the cells: the distinct terms (keys) and teams (values), through the distinct
  -- (term, team) pairs (a few hundred, hashed).
  -- A value that is not a JSON string comes out as its JSON text (or NULL for null), which
  -- the uuid pattern below refuses just as it refuses a string that is not a uuid.
  with pairs as materialized (
    select r.key, r.value
      from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r
     group by r.key, r.value
  )
  select array(select distinct pr.key from pairs pr),
         array(select distinct pr.value from pairs pr)
    into v_terms, v_teams;

  -- uuids, then pins that name a term of their own line.
  v_bad_terms := array(select k from unnest(v_terms) k where k !~ uuid_re);
  v_bad_teams := array(select v from unnest(v_teams) v where v is null or v !~ uuid_re);
  if cardinality(v_bad_terms) > 0 or cardinality(v_bad_teams) > 0 then
    select format('line %s: %s', x ->> 'line', r.key) into v_bad
      from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r
     where r.key = any (v_bad_terms) or r.value = any (v_bad_teams)
        or (r.value is null and array_position(v_bad_teams, null) is not null)
     order by (x ->> 'line')::bigint
     limit 1;
  elsif v_bad_pin_ordinal is not null then
    select format('line %s: %s', l.x ->> 'line', p #>> '{}') into v_bad
      from (select p_plan -> 'lines' -> (v_bad_pin_ordinal::integer - 1) as x) l,
           jsonb_array_elements(l.x -> 'pinned') p
     where jsonb_typeof(p) <> 'string' or not (l.x -> 'rotations') ? (p #>> '{}')
     limit 1;
  end if;
  if v_bad is not null then
    raise exception using errcode = 'PL004',
      message = format('malformed plan: %s is not a term uuid mapped to a team uuid, or a pin '
                       'without a rotation', v_bad);
  end if;

  select k into v_bad from unnest(v_terms) k where k::uuid <> all (v_own_terms) limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL002',
      message = format('term %s is not a term of allocation run %s', v_bad, p_allocation_run_id),
      hint = 'a plan may only use the terms of its own allocation run';
  end if;

  -- One index scan for all the teams; the missing one is looked for only if there is one.
  v_team_ids := array(select distinct v::uuid from unnest(v_teams) v);
  if (select count(*) from public.teams tm
       where tm.id = any (v_team_ids) and tm.organization_id = p_organization_id)
     < cardinality(v_team_ids) then
    select v into v_bad
      from unnest(v_teams) v
     where not exists (select 1 from public.teams tm
                        where tm.id = v::uuid and tm.organization_id = p_organization_id)
     limit 1;
    raise exception using errcode = 'PL002',
      message = format('team %s is not a team of organisation %s', v_bad, p_organization_id),
      hint = 'a plan may only use the teams of its own organisation';
  end if;

  -- One rotation per line per term: every line covers exactly the allocation run's terms
  -- (no other terms can be left after the check above).
  if v_uncovered_ordinal is not null then
    select format('line %s, term %s', x ->> 'line', t) into v_bad
      from (select p_plan -> 'lines' -> (v_uncovered_ordinal::integer - 1) as x) l,
           unnest(v_run_terms) t
     where not (x -> 'rotations') ? t
     limit 1;
    raise exception using errcode = 'PL004',
      message = format('malformed plan: no rotation for %s (every line needs one per term)', v_bad);
  end if;
end
$$;

-- Replaces an allocation run's plan with p_plan, after a snapshot of the current one into
-- job_lines_history. Returns the snapshot id (NULL when there was nothing to keep). Callers
-- (commit_plan, restore_job_lines) have already checked who may do this.
--
-- Set-based, and it writes only what changes: one INSERT of the snapshot, then one statement
-- that deletes the lines the new plan no longer has (their rotations go with them, by the
-- cascade), updates the lines it keeps and inserts the ones it adds (each now carries the
-- committing run), and upserts the rotations whose team or pin differs. A re-plan
-- keeps most cells (the solver prefers the previous plan), so most of the 1,250 rotations of
-- a 250-line plan are left as they are instead of being deleted and inserted again with their
-- index entries and foreign-key checks. The plan afterwards is p_plan exactly; a kept row
-- keeps its id, and a rotation's updated_at moves only when the rotation changes.
create function planner_private.replace_plan(
  p_allocation_run_id uuid,
  p_organization_id uuid,
  p_plan jsonb,
  p_planner_run_id uuid,        -- the committing run (NULL for a restore)
  p_restored_snapshot_id uuid,  -- the snapshot being restored (NULL for a commit)
  p_taken_by uuid
) returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_old jsonb;
  v_snapshot uuid;
begin
  -- One replacement at a time per allocation run (a commit racing a restore).
  perform 1 from public.allocation_runs a
   where a.id = p_allocation_run_id and a.organization_id = p_organization_id
     for no key update;
  if not found then
    raise exception using errcode = 'PL002',
      message = format('allocation run %s does not belong to organisation %s',
                       p_allocation_run_id, p_organization_id);
  end if;
  perform planner_private.check_plan(p_plan, p_allocation_run_id, p_organization_id);

  v_old := planner_private.current_plan(p_allocation_run_id, true);
  if v_old is not null then
    insert into public.job_lines_history
      (organization_id, allocation_run_id, planner_run_id, restored_snapshot_id, taken_by,
       n_lines, plan)
    values
      (p_organization_id, p_allocation_run_id, p_planner_run_id, p_restored_snapshot_id,
       p_taken_by, jsonb_array_length(v_old -> 'lines'), v_old)
    returning id into v_snapshot;
  end if;

  -- The CTEs touch disjoint rows (a line is either dropped or in the plan), and the foreign
  -- keys are checked at the end of the statement, when the new lines are in place. Which cells
  -- changed is read off the snapshot just taken (v_old), so the unchanged ones cost no table
  -- access at all; ON CONFLICT still compares each written cell with its latest row version.
  with new_lines as materialized (
    select (x ->> 'line')::integer as n,
           x -> 'rotations' as rot,
           coalesce(x -> 'pinned', '[]'::jsonb) as pins,
           -- a snapshot line keeps the run that made it, if that run still exists
           case when p_planner_run_id is not null then p_planner_run_id
                else (select r.id from public.allocation_planner_runs r
                       where r.id::text = x ->> 'planner_run_id'
                         and r.allocation_run_id = p_allocation_run_id) end as run_id
      from jsonb_array_elements(p_plan -> 'lines') x
  ), old_lines as materialized (
    select (o ->> 'line')::integer as n, o -> 'rotations' as rot, o -> 'pinned' as pins
      from jsonb_array_elements(v_old -> 'lines') o
  ), dropped as (
    delete from public.job_lines j
     where j.allocation_run_id = p_allocation_run_id
       and not exists (select 1 from new_lines nl where nl.n = j.line_number)
  ), updated as (
    update public.job_lines j
       set planner_run_id = nl.run_id, created_at = now()
      from new_lines nl
     where j.allocation_run_id = p_allocation_run_id and j.line_number = nl.n
    returning j.id, j.line_number
  ), added as (
    insert into public.job_lines
      (organization_id, allocation_run_id, line_number, planner_run_id)
    select p_organization_id, p_allocation_run_id, nl.n, nl.run_id
      from new_lines nl
     where not exists (select 1 from public.job_lines j
                        where j.allocation_run_id = p_allocation_run_id and j.line_number = nl.n)
    returning id, line_number
  ), added_rotations as (
    -- the rotations of the lines just added: nothing to compare with, a plain insert
    insert into public.rotations
      (organization_id, allocation_run_id, job_line_id, term_id, team_id, pinned)
    select p_organization_id, p_allocation_run_id, a.id, r.key::uuid, r.value::uuid,
           nl.pins ? r.key
      from added a
      join new_lines nl on nl.n = a.line_number
      cross join lateral jsonb_each_text(nl.rot) r
  )
  -- the rotations of the kept lines that differ from the snapshot (a term added since the
  -- last commit has no row yet: inserted). An UPDATE ... FROM of the changed cells measured
  -- no faster (1,250 changed cells: 29.3 against 29.9 ms), and under the default row
  -- estimates of the jsonb functions its hash join read the whole rotations table; the
  -- conflict arbiter always probes the (job_line_id, term_id) index. updated_at is set here,
  -- so the touch trigger's WHEN clause skips its plpgsql call.
  insert into public.rotations as ro
    (organization_id, allocation_run_id, job_line_id, term_id, team_id, pinned)
  select p_organization_id, p_allocation_run_id, u.id, r.key::uuid, r.value::uuid,
         nl.pins ? r.key
    from updated u
    join new_lines nl on nl.n = u.line_number
    join old_lines ol on ol.n = nl.n
    cross join lateral jsonb_each_text(nl.rot) r
   where (ol.rot <> nl.rot or ol.pins <> nl.pins)                  -- the line changed
     and (ol.rot ->> r.key is distinct from r.value                 -- and so did this cell
          or (ol.pins ? r.key) <> (nl.pins ? r.key))
  on conflict (job_line_id, term_id) do update
     set team_id = excluded.team_id, pinned = excluded.pinned, updated_at = now()
   where (ro.team_id, ro.pinned) is distinct from (excluded.team_id, excluded.pinned);

  return v_snapshot;
end
$$;

-- realtime.messages policy helper: may the caller read topic `planner_run:<run uuid>`?
create function planner_private.can_read_run_topic(p_topic text)
returns boolean
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_run_id uuid;
begin
  if p_topic is null or p_topic !~ '^planner_run:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' then
    return false;
  end if;
  v_run_id := substr(p_topic, length('planner_run:') + 1)::uuid;
  return exists (select 1 from public.allocation_planner_runs r
                  where r.id = v_run_id and planner_private.is_member(r.organization_id));
end
$$;

-- ============================================================================================
-- schema/30_engine.sql
-- ============================================================================================

-- Schema, part 3 of 4: the engine's API (schema planner_engine) and the two functions
-- users call (public.request_cancel, public.restore_job_lines).
--
-- The engine never touches tables directly. Every write is one of these functions, and every
-- write after the claim is fenced on the claim's lease: a worker that lost its run (swept,
-- re-queued, claimed by another worker) gets PL001 and nothing is written. Without the fence a
-- worker that stalled past the sweeper's TTL would still commit its plan over the newer run's
-- (a zombie completion), and a heartbeat racing the sweeper could revive a run the sweeper
-- had already handed to someone else; docs/reliability.md lists the tests of both.

create function planner_private.raise_lease_lost(p_run_id uuid, p_status text)
returns void
language plpgsql set search_path = ''
as $$
begin
  raise exception using errcode = 'PL001',
    message = format('lease lost: planner run %s is %s and no longer held with this lease; '
                     'nothing was written', p_run_id, coalesce(p_status, 'missing')),
    hint = 'the sweeper re-queued or failed the run, or it was cancelled or claimed by another '
           'worker; stop working on it and discard the result';
end
$$;

-- -- claim -----------------------------------------------------------------------------------
create function planner_engine.claim_run(p_worker_id text, p_run_id uuid default null)
returns setof public.allocation_planner_runs
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v public.allocation_planner_runs;
begin
  if p_worker_id is null or length(btrim(p_worker_id)) = 0 then
    raise exception using errcode = '22023', message = 'claim_run needs a worker id';
  end if;
  loop
    -- SKIP LOCKED: concurrent claimers each get a different run (or none) without waiting.
    select * into v
      from public.allocation_planner_runs r
     where r.status = 'PENDING' and (p_run_id is null or r.id = p_run_id)
     order by r.created_at, r.id
     limit 1
       for update skip locked;
    if not found then
      return;
    end if;

    if v.attempts >= v.max_attempts then
      -- A poison run (killed its workers max_attempts times) ends here, not in a loop.
      update public.allocation_planner_runs
         set status = 'FAILED', finished_at = now(),
             error = format('gave up after %s attempts', v.attempts)
       where id = v.id;
      insert into public.planner_execution_logs
        (planner_run_id, organization_id, level, message, context)
      values (v.id, v.organization_id, 'ERROR',
              format('Gave up: the run was claimed %s times (max_attempts %s) without finishing',
                     v.attempts, v.max_attempts),
              jsonb_build_object('event', 'max_attempts', 'attempts', v.attempts,
                                 'max_attempts', v.max_attempts, 'worker_id', p_worker_id));
      if p_run_id is not null then
        return;
      end if;
      continue;
    end if;

    return query
      update public.allocation_planner_runs r
         set status = 'GENERATING',
             attempts = r.attempts + 1,
             worker_id = p_worker_id,
             lease = gen_random_uuid(),
             claimed_at = now(),
             heartbeat_at = now(),
             error = null
       where r.id = v.id
      returning r.*;
    return;
  end loop;
end
$$;

-- -- heartbeat ------------------------------------------------------------------------------
-- Exactly one row. lease_held = false means: stop solving, the run is not yours any more.
create function planner_engine.heartbeat(p_run_id uuid, p_lease uuid)
returns table (lease_held boolean, cancel_requested boolean)
language sql volatile security definer set search_path = ''
as $$
  with hb as (
    -- Fenced like every engine write: the WHERE is re-checked against the row version a
    -- concurrent sweeper committed, so a heartbeat can never revive a swept run.
    update public.allocation_planner_runs r
       set heartbeat_at = now()
     where r.id = p_run_id and r.status = 'GENERATING' and r.lease = p_lease
    returning r.cancel_requested_at
  )
  select exists (select 1 from hb),
         coalesce((select hb.cancel_requested_at is not null from hb),
                  (select r.cancel_requested_at is not null
                     from public.allocation_planner_runs r where r.id = p_run_id),
                  false)
$$;

-- -- the problem -----------------------------------------------------------------------------
-- Returns exactly the solver's Problem JSON (solver/problem.py: Problem, Team, PreviousPlan,
-- Options; those models refuse unknown keys), so the listener validates it as is:
-- * "teams" are the teams with demand in this allocation run PLUS the teams the current plan
--   uses: a manager can move a rotation to a team without demand, and previous_plan may only
--   name listed teams;
-- * a team without a site has "site": null ('' in the column means none as well); subspecialty
--   needs no default, the column is NOT NULL and non-blank (the 25 % rule groups by it);
-- * "previous_plan" leaves out lines beyond n_job_lines: asking for fewer lines than the
--   current plan has is a normal request; the surplus lines (and their pins) are not part of
--   the problem, the new plan has no such lines and the old ones stay in job_lines_history.
--   JSON null when no line is left;
-- * the UI's column `constraints` becomes "rule_sets" here, and only here;
-- * "options" is the column as stored (NOT NULL, an object; '{}' by default).
create function planner_engine.load_problem(p_run_id uuid, p_lease uuid)
returns jsonb
language plpgsql stable security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id;
  if not found or r.status <> 'GENERATING' or r.lease is distinct from p_lease then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;

  return jsonb_build_object(
    'terms', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', t.id::text, 'name', t.name, 'weeks', t.weeks) order by t.ordinal), '[]')
        from public.terms t where t.allocation_run_id = r.allocation_run_id),
    'teams', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', tm.id::text, 'name', tm.name, 'specialty', tm.specialty,
               'subspecialty', tm.subspecialty, 'kind', tm.kind,
               'experiences', to_jsonb(tm.experiences), 'site', nullif(tm.site, ''),
               'rural', tm.rural, 'tags', to_jsonb(tm.tags)) order by tm.name, tm.id), '[]')
        from public.teams tm
       where tm.organization_id = r.organization_id
         and (exists (select 1 from public.team_demand d
                       where d.allocation_run_id = r.allocation_run_id and d.team_id = tm.id)
              -- through the lines: rotations has no index on team_id (10_tables.sql)
              or tm.id in (select ro.team_id
                             from public.job_lines l
                             join public.rotations ro on ro.job_line_id = l.id
                            where l.allocation_run_id = r.allocation_run_id))),
    'demand', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'team', d.team_id::text, 'term', d.term_id::text,
               'min', d.min_lines, 'max', d.max_lines) order by tm.name, t.ordinal), '[]')
        from public.team_demand d
        join public.teams tm on tm.id = d.team_id
        join public.terms t on t.id = d.term_id
       where d.allocation_run_id = r.allocation_run_id),
    'n_job_lines', r.n_job_lines,
    'rule_sets', to_jsonb(r.constraints),
    'previous_plan', (
      select jsonb_build_object('lines', jsonb_agg(x order by (x ->> 'line')::integer))
        from jsonb_array_elements(
               planner_private.current_plan(r.allocation_run_id, false) -> 'lines') x
       where (x ->> 'line')::integer <= r.n_job_lines
      having count(*) > 0),
    'options', r.options);
end
$$;

-- -- results ---------------------------------------------------------------------------------
-- The listener's one write of a solved plan, p_plan in the shape of planner_private.check_plan
-- ({"lines": [{line, rotations: {term: team}, pinned: [term]}]}): fenced on the lease (PL001),
-- checked (PL002, PL004), the old plan snapshotted and replaced set-based (replace_plan), the
-- run COMPLETED, all in the caller's one transaction. Returns the snapshot id (NULL when the
-- allocation run had no lines yet).
create function planner_engine.commit_plan(
  p_run_id uuid,
  p_lease uuid,
  p_organization_id uuid,
  p_plan jsonb,
  p_result_metadata jsonb
) returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
  v_snapshot uuid;
begin
  -- Lock the run first: a sweeper or cancel arriving now waits for this transaction, and
  -- one that already committed has cleared the lease, which the check below sees.
  select * into r from public.allocation_planner_runs where id = p_run_id for update;
  if not found or r.status <> 'GENERATING' or r.lease is distinct from p_lease then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;
  if p_organization_id is distinct from r.organization_id then
    raise exception using errcode = 'PL002',
      message = format('planner run %s belongs to organisation %s, not %s',
                       p_run_id, r.organization_id, p_organization_id),
      hint = 'pass the organization_id of the claimed run';
  end if;

  v_snapshot := planner_private.replace_plan(
    r.allocation_run_id, r.organization_id, p_plan, r.id, null, null);

  update public.allocation_planner_runs
     set status = 'COMPLETED', finished_at = now(), lease = null, error = null,
         result_metadata = coalesce(p_result_metadata, '{}'::jsonb)
   where id = p_run_id;
  return v_snapshot;
end
$$;

create function planner_engine.finish_run(
  p_run_id uuid,
  p_lease uuid,
  p_status text,
  p_error text default null,
  p_result_metadata jsonb default null
) returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
  v_status text := p_status;
begin
  if p_status is null or p_status not in ('FAILED', 'INFEASIBLE', 'CANCELLED', 'PENDING') then
    raise exception using errcode = '22023',
      message = format('finish_run: status must be FAILED, INFEASIBLE, CANCELLED or PENDING, '
                       'not %s', coalesce(p_status, 'NULL')),
      hint = 'use commit_plan to complete a run';
  end if;
  select * into r from public.allocation_planner_runs where id = p_run_id for update;
  if not found or r.status <> 'GENERATING' or r.lease is distinct from p_lease then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;
  -- Re-queueing a run the user asked to stop would only restart it: cancel it instead.
  if v_status = 'PENDING' and r.cancel_requested_at is not null then
    v_status := 'CANCELLED';
  end if;
  update public.allocation_planner_runs
     set status = v_status,
         lease = null,
         -- A graceful re-queue (SIGTERM, deploy) is not the run's fault: give the attempt back
         -- so rolling deploys cannot push a healthy run to max_attempts. Crashes are still
         -- counted, because only the sweeper re-queues those.
         attempts = case when v_status = 'PENDING' then greatest(r.attempts - 1, 0)
                         else r.attempts end,
         worker_id = case when v_status = 'PENDING' then null else r.worker_id end,
         finished_at = case when v_status = 'PENDING' then null else now() end,
         error = p_error,
         result_metadata = coalesce(p_result_metadata, r.result_metadata)
   where id = p_run_id;
end
$$;

-- -- logs --------------------------------------------------------------------------------------
create function planner_engine.write_log(
  p_planner_run_id uuid,
  p_organization_id uuid,
  p_level text,
  p_message text,
  p_context jsonb default '{}',
  p_traceback text default null,
  p_logged_at timestamptz default now()
) returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if not exists (select 1 from public.allocation_planner_runs r
                  where r.id = p_planner_run_id and r.organization_id = p_organization_id) then
    raise exception using errcode = 'PL002',
      message = format('planner run %s does not belong to organisation %s',
                       p_planner_run_id, p_organization_id);
  end if;
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, logged_at, level, message, context, traceback)
  values (p_planner_run_id, p_organization_id, coalesce(p_logged_at, now()),
          upper(coalesce(p_level, 'INFO')), coalesce(p_message, ''),
          coalesce(p_context, '{}'::jsonb), p_traceback);
end
$$;

-- The listener's batching sink. A record whose run does not exist or belongs to another
-- organisation is skipped (not written, not an error) so one bad record cannot lose a whole
-- batch; the return value is the number of rows written. An unknown level is stored as INFO
-- with the original level kept in context.level.
create function planner_engine.write_logs(p_records jsonb)
returns integer
language plpgsql volatile security definer set search_path = ''
as $$
declare
  n integer;
begin
  if p_records is null or jsonb_typeof(p_records) <> 'array' then
    raise exception using errcode = '22023', message = 'write_logs expects a JSON array of records';
  end if;
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, logged_at, level, message, context, traceback)
  select r.id, r.organization_id,
         coalesce((x ->> 'logged_at')::timestamptz, now()),
         case when lv.level in ('TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL')
              then lv.level else 'INFO' end,
         coalesce(x ->> 'message', ''),
         case when jsonb_typeof(x -> 'context') = 'object' then x -> 'context' else '{}'::jsonb end
           || case when lv.level in ('TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL')
                   then '{}'::jsonb else jsonb_build_object('level', x ->> 'level') end,
         x ->> 'traceback'
    from jsonb_array_elements(p_records) x
    cross join lateral (select upper(coalesce(x ->> 'level', 'INFO')) as level) lv
    join public.allocation_planner_runs r
      on r.id::text = lower(x ->> 'planner_run_id')
     and r.organization_id::text = lower(x ->> 'organization_id')
   where jsonb_typeof(x) = 'object';
  get diagnostics n = row_count;
  return n;
end
$$;

-- -- the sweeper -----------------------------------------------------------------------------
create function planner_engine.sweep_stale_runs(
  p_ttl interval default '90 seconds',
  p_pending_ttl interval default '30 minutes'
) returns integer
language plpgsql volatile security definer set search_path = ''
as $$
declare
  n_stale integer;
  n_pending integer;
begin
  -- Single runner: an overlapping cron tick or a manual call just returns 0.
  if not pg_catalog.pg_try_advisory_xact_lock(
           pg_catalog.hashtextextended('planner_engine.sweep_stale_runs', 0)) then
    return 0;
  end if;

  -- Stale GENERATING runs. The condition sits in the UPDATE's own WHERE, so it is re-checked
  -- on the latest row version: a heartbeat that commits first makes the row not stale any
  -- more and it is skipped (READ COMMITTED re-evaluation), never a select-then-update race.
  with old as (
    select s.id, s.worker_id
      from public.allocation_planner_runs s
     where s.status = 'GENERATING' and s.heartbeat_at < now() - p_ttl
  ), swept as (
    update public.allocation_planner_runs r
       set status = case when r.cancel_requested_at is not null then 'CANCELLED'
                         when r.attempts >= r.max_attempts then 'FAILED'
                         else 'PENDING' end,
           finished_at = case when r.cancel_requested_at is not null
                                or r.attempts >= r.max_attempts then now() end,
           lease = null,
           worker_id = null,
           error = format('heartbeat lost: last heartbeat at %s from worker %s',
                          r.heartbeat_at, coalesce(r.worker_id, '?'))
      from old
     where r.id = old.id
       and r.status = 'GENERATING'
       and r.heartbeat_at < now() - p_ttl
    returning r.id, r.organization_id, r.status, r.attempts, r.max_attempts, r.heartbeat_at,
              old.worker_id
  )
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, level, message, context)
  select sw.id, sw.organization_id,
         case sw.status when 'FAILED' then 'ERROR' when 'PENDING' then 'WARNING' else 'INFO' end,
         format('Timeout: no heartbeat from worker %s since %s (more than %s ago); %s',
                coalesce(sw.worker_id, '?'), sw.heartbeat_at, p_ttl,
                case sw.status
                  when 'PENDING' then format('run re-queued after attempt %s of %s',
                                             sw.attempts, sw.max_attempts)
                  when 'FAILED' then format('run failed: all %s attempts used', sw.max_attempts)
                  else 'run cancelled as the user had asked' end),
         jsonb_build_object('event', 'sweep_stale', 'new_status', sw.status,
                            'last_heartbeat_at', sw.heartbeat_at, 'worker_id', sw.worker_id,
                            'attempts', sw.attempts, 'max_attempts', sw.max_attempts,
                            'ttl_seconds', extract(epoch from p_ttl))
    from swept sw;
  get diagnostics n_stale = row_count;

  -- PENDING runs nobody claimed. A re-queued run waits since its last heartbeat, not since
  -- it was created, so a run re-queued late is not failed straight away.
  with failed as (
    update public.allocation_planner_runs r
       set status = 'FAILED', finished_at = now(),
           error = format('no planner picked this run up within %s', p_pending_ttl)
     where r.status = 'PENDING'
       and greatest(r.created_at, r.heartbeat_at) < now() - p_pending_ttl
    returning r.id, r.organization_id, r.created_at, r.heartbeat_at
  )
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, level, message, context)
  select f.id, f.organization_id, 'ERROR',
         format('Timeout: no planner picked this run up within %s (queued since %s, last '
                'heartbeat %s); run failed', p_pending_ttl,
                greatest(f.created_at, f.heartbeat_at), coalesce(f.heartbeat_at::text, 'never')),
         jsonb_build_object('event', 'sweep_pending', 'new_status', 'FAILED',
                            'created_at', f.created_at, 'last_heartbeat_at', f.heartbeat_at,
                            'pending_ttl_seconds', extract(epoch from p_pending_ttl))
    from failed f;
  get diagnostics n_pending = row_count;

  return n_stale + n_pending;
end
$$;

-- -- what users call ---------------------------------------------------------------------------
create function public.request_cancel(p_run_id uuid)
returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id for update;
  -- One message for "no such run" and "not yours": existence of other tenants' runs is private.
  if not found or not planner_private.caller_can_plan(r.organization_id) then
    raise exception using errcode = 'PL012',
      message = format('planner run %s not found, or you are not a planner or admin of its '
                       'organisation', p_run_id),
      hint = 'only planners and admins can cancel runs';
  end if;
  if r.status = 'PENDING' then
    -- Nobody is working on it: cancel now (the sweeper would otherwise fail it later).
    update public.allocation_planner_runs
       set status = 'CANCELLED', finished_at = now(), cancel_requested_at = now(),
           error = 'cancelled before a planner picked it up'
     where id = p_run_id;
  elsif r.status = 'GENERATING' then
    -- The engine sees this on its next heartbeat and stops (finish_run CANCELLED).
    update public.allocation_planner_runs
       set cancel_requested_at = coalesce(cancel_requested_at, now())
     where id = p_run_id;
  else
    return;  -- already finished: nothing to cancel, not an error (double clicks)
  end if;
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, level, message, context)
  values (r.id, r.organization_id, 'INFO',
          case r.status when 'PENDING' then 'Cancelled by user before a planner picked it up'
                        else 'Cancellation requested by user' end,
          jsonb_build_object('event', 'cancel_requested', 'by', auth.uid(),
                             'status_at_request', r.status));
end
$$;

create function public.restore_job_lines(p_snapshot_id uuid)
returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  h public.job_lines_history;
begin
  select * into h from public.job_lines_history where id = p_snapshot_id;
  if not found or not planner_private.caller_can_plan(h.organization_id) then
    raise exception using errcode = 'PL012',
      message = format('snapshot %s not found, or you are not a planner or admin of its '
                       'organisation', p_snapshot_id),
      hint = 'only planners and admins can restore a plan';
  end if;
  -- A run about to commit would silently replace the restored plan; make the user choose.
  if exists (select 1 from public.allocation_planner_runs r
              where r.allocation_run_id = h.allocation_run_id
                and r.status in ('PENDING', 'GENERATING')) then
    raise exception using errcode = 'PL013',
      message = 'a planner run is pending or generating for this allocation run',
      hint = 'wait for it to finish or cancel it before restoring';
  end if;
  -- The plan being replaced is snapshotted first, so the restore itself can be undone.
  return planner_private.replace_plan(
    h.allocation_run_id, h.organization_id, h.plan, null, h.id, auth.uid());
end
$$;

-- ============================================================================================
-- schema/40_access.sql
-- ============================================================================================

-- Schema, part 4 of 4: who may do what. Roles, grants, RLS, Realtime, the sweeper's cron job.
--
-- Two layers: GRANTs say which statements a role may run at all (a viewer has no UPDATE on
-- runs, whatever the policies say), RLS policies say on which rows. Both are deny-by-default:
-- the scaffolding's default privileges grant everything in `public` to the API roles, so we
-- revoke first and grant back only what each role needs.

-- -- the engine's login role ---------------------------------------------------------------
-- NOLOGIN here: on a hosted project the operator gives it a password
-- (`alter role planner_engine login password '...'`); `planner dev up` does so locally.
-- Why not the service-role key: that key bypasses RLS and may write every table; a leaked
-- listener credential would then be a full-database credential. planner_engine can only call
-- the fenced functions below and read planning inputs (docs/database.md).
do $$
begin
  if not exists (select from pg_roles where rolname = 'planner_engine') then
    create role planner_engine nologin noinherit nobypassrls;
  end if;
end
$$;
comment on role planner_engine is
  'Login role of the planner listener: EXECUTE on planner_engine.*, SELECT on inputs, no direct writes.';

-- -- table privileges -------------------------------------------------------------------------
revoke all on public.organizations, public.organization_members, public.planner_rule_sets,
  public.allocation_runs, public.terms, public.teams, public.team_demand,
  public.allocation_planner_runs, public.job_lines, public.rotations, public.job_lines_history,
  public.planner_execution_logs
  from public, anon, authenticated, planner_engine;
revoke all on all tables in schema planner_engine from public;
revoke all on all tables in schema planner_private from public;

grant select on public.organizations, public.planner_rule_sets, public.job_lines,
  public.job_lines_history, public.planner_execution_logs
  to authenticated;
grant select, insert, update, delete on public.organization_members to authenticated;
grant select, insert, update, delete on public.allocation_runs, public.terms, public.teams,
  public.team_demand to authenticated;
-- Runs: users insert a request and read progress; every later change goes through functions.
grant select, insert on public.allocation_planner_runs to authenticated;
-- Rotations: a manager's tweak changes the team or the pin, nothing else.
grant select, update (team_id, pinned) on public.rotations to authenticated;

-- The service role keeps full access (it bypasses RLS by design); the composite keys and the
-- triggers still hold for it.
grant all on all tables in schema public to service_role;

grant usage on schema planner_engine to planner_engine;
-- PostgreSQL 15 grants USAGE on `public` to PUBLIC by default, but a hosted project may have
-- tightened that; say it explicitly so the listener's catch-up query
-- (`select ... from public.allocation_planner_runs`) never depends on a default.
grant usage on schema public to planner_engine;
grant select on public.organizations, public.planner_rule_sets, public.allocation_runs,
  public.terms, public.teams, public.team_demand, public.allocation_planner_runs
  to planner_engine;

-- -- function privileges ----------------------------------------------------------------------
revoke all on all functions in schema planner_engine from public, anon, authenticated;
revoke all on all functions in schema planner_private from public, anon, authenticated;
revoke all on function public.request_cancel(uuid), public.restore_job_lines(uuid)
  from public, anon;

grant execute on function
  planner_engine.claim_run(text, uuid),
  planner_engine.heartbeat(uuid, uuid),
  planner_engine.load_problem(uuid, uuid),
  planner_engine.commit_plan(uuid, uuid, uuid, jsonb, jsonb),
  planner_engine.finish_run(uuid, uuid, text, text, jsonb),
  planner_engine.write_log(uuid, uuid, text, text, jsonb, text, timestamptz),
  planner_engine.write_logs(jsonb),
  planner_engine.sweep_stale_runs(interval, interval)
  to planner_engine, service_role;
grant usage on schema planner_engine to service_role;

-- Policies and the run-insert trigger call these as the querying role.
grant usage on schema planner_private to authenticated, service_role;
grant execute on function
  planner_private.has_role(uuid, text[]),
  planner_private.is_member(uuid),
  planner_private.can_plan(uuid),
  planner_private.invoker_is_privileged(),
  planner_private.admit_run(uuid, uuid, integer, text[], boolean),
  planner_private.can_read_run_topic(text)
  to authenticated, service_role;

grant execute on function public.request_cancel(uuid), public.restore_job_lines(uuid)
  to authenticated, service_role;

-- -- row-level security -------------------------------------------------------------------------
alter table planner_engine.settings enable row level security;  -- no policy: owner only
alter table public.organizations enable row level security;
alter table public.organization_members enable row level security;
alter table public.planner_rule_sets enable row level security;
alter table public.allocation_runs enable row level security;
alter table public.terms enable row level security;
alter table public.teams enable row level security;
alter table public.team_demand enable row level security;
alter table public.allocation_planner_runs enable row level security;
alter table public.job_lines enable row level security;
alter table public.rotations enable row level security;
alter table public.job_lines_history enable row level security;
alter table public.planner_execution_logs enable row level security;

create policy members_read on public.organizations
  for select to authenticated using (planner_private.is_member(id));

create policy members_read on public.organization_members
  for select to authenticated using (planner_private.is_member(organization_id));
create policy admins_insert on public.organization_members
  for insert to authenticated with check (planner_private.has_role(organization_id, array['admin']));
create policy admins_update on public.organization_members
  for update to authenticated
  using (planner_private.has_role(organization_id, array['admin']))
  with check (planner_private.has_role(organization_id, array['admin']));
create policy admins_delete on public.organization_members
  for delete to authenticated using (planner_private.has_role(organization_id, array['admin']));

create policy everyone_signed_in_reads on public.planner_rule_sets
  for select to authenticated, planner_engine using (true);

-- Planning inputs: members read, planners and admins edit, the engine reads everything.
do $$
declare
  t text;
begin
  foreach t in array array['allocation_runs', 'terms', 'teams', 'team_demand'] loop
    execute format('create policy members_read on public.%I for select to authenticated '
                   'using (planner_private.is_member(organization_id))', t);
    execute format('create policy planners_insert on public.%I for insert to authenticated '
                   'with check (planner_private.can_plan(organization_id))', t);
    execute format('create policy planners_update on public.%I for update to authenticated '
                   'using (planner_private.can_plan(organization_id)) '
                   'with check (planner_private.can_plan(organization_id))', t);
    execute format('create policy planners_delete on public.%I for delete to authenticated '
                   'using (planner_private.can_plan(organization_id))', t);
    execute format('create policy engine_reads on public.%I for select to planner_engine '
                   'using (true)', t);
  end loop;
end
$$;
create policy engine_reads on public.organizations
  for select to planner_engine using (true);

create policy members_read on public.allocation_planner_runs
  for select to authenticated using (planner_private.is_member(organization_id));
-- The trigger adds the finer checks (PL010-PL015) with readable messages; this policy is the
-- coarse backstop.
create policy planners_insert on public.allocation_planner_runs
  for insert to authenticated with check (planner_private.can_plan(organization_id));
create policy engine_reads on public.allocation_planner_runs
  for select to planner_engine using (true);

create policy members_read on public.job_lines
  for select to authenticated using (planner_private.is_member(organization_id));

create policy members_read on public.rotations
  for select to authenticated using (planner_private.is_member(organization_id));
create policy planners_update on public.rotations
  for update to authenticated
  using (planner_private.can_plan(organization_id))
  with check (planner_private.can_plan(organization_id));

create policy members_read on public.job_lines_history
  for select to authenticated using (planner_private.is_member(organization_id));

create policy members_read on public.planner_execution_logs
  for select to authenticated using (planner_private.is_member(organization_id));

-- -- Realtime ---------------------------------------------------------------------------------
-- Private channel `planner_run:<run id>`: members of the run's organisation may join and read
-- (broadcast and presence). No INSERT policy: users cannot send on it; the listener
-- broadcasts with the service-role key, which bypasses RLS.
drop policy if exists planner_run_members_read on realtime.messages;
create policy planner_run_members_read on realtime.messages
  for select to authenticated
  using (extension in ('broadcast', 'presence')
         and planner_private.can_read_run_topic((select realtime.topic())));

-- postgres_changes for the UI's run status. FULL: UPDATE events carry the old row too, so the
-- UI sees which status a run came from and Realtime can apply RLS to every column it sends.
alter table public.allocation_planner_runs replica identity full;
do $$
begin
  if not exists (select 1 from pg_publication_tables
                  where pubname = 'supabase_realtime' and schemaname = 'public'
                    and tablename = 'allocation_planner_runs') then
    alter publication supabase_realtime add table public.allocation_planner_runs;
  end if;
end
$$;

-- -- the sweeper's schedule --------------------------------------------------------------------
-- pg_cron exists only in its own database (`postgres`, as on Supabase). Elsewhere (test
-- clones, a project that has not enabled pg_cron) the migration still applies and the
-- function can be called by hand or by an external scheduler. cron.schedule with a job name
-- replaces an existing job of that name, so re-running this is harmless.
do $$
begin
  if exists (select 1 from pg_extension where extname = 'pg_cron') then
    perform cron.schedule('planner-sweep-stale-runs', '* * * * *',
                          'select planner_engine.sweep_stale_runs()');
  end if;
end
$$;

