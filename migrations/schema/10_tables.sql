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

-- -- engine settings -------------------------------------------------------------------------
-- One row: what is the same for every organisation (the engine's own timeouts and retries).
-- What may differ per organisation (sizes, rates, budgets, the time cap) is in
-- planner_engine.limits below. Kept in a table (not GUCs) so an operator changes a value
-- with one UPDATE, in a transaction, on hosted Supabase too, where ALTER DATABASE SET is
-- not always allowed.
create table planner_engine.settings (
  id boolean primary key default true check (id),
  max_attempts integer not null default 3 check (max_attempts between 1 and 20),
  -- When the sweeper's pg_cron job was last (re)scheduled, by the migration or by
  -- `planner migrate --cron-database`: `planner doctor` expects a run within two periods
  -- once one period has passed since then.
  sweeper_scheduled_at timestamptz,
  -- The sweeper's timeouts (planner_engine.sweep_stale_runs() reads them; the engine passes
  -- none): a GENERATING run unheartbeated for stale_run_ttl is re-queued or failed, a run
  -- PENDING for pending_run_ttl is failed.
  stale_run_ttl interval not null default '90 seconds' check (stale_run_ttl > interval '0'),
  pending_run_ttl interval not null default '30 minutes' check (pending_run_ttl > interval '0'),
  -- How long after a run was released (finished, committed, re-queued, swept) its last lease
  -- still lets planner_engine.write_logs add lines: the listener's log sink flushes in
  -- batches, so a run's last lines usually arrive after finish_run.
  log_grace interval not null default '2 minutes' check (log_grace >= interval '0')
);
insert into planner_engine.settings default values;
comment on table planner_engine.settings is
  'Singleton: engine-wide retries and timeouts. Per-organisation limits: planner_engine.limits.';

-- -- tenants -------------------------------------------------------------------------------
create table public.organizations (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(btrim(name)) > 0),
  created_at timestamptz not null default now()
);

-- -- limits and the ledger (issue 13) ----------------------------------------------------------
-- ONE table of per-organisation limits. Three kinds of row:
-- * the row with tier = 'default': every value set, what applies when nothing else does;
-- * a tier (a plan an operator names, e.g. 'large'): tier set, any value may be NULL (= the
--   default's);
-- * an organisation's own row: organization_id set, optionally on_tier (its plan), any value
--   may be NULL (= its tier's, else the default's).
-- planner_private.limits_of(org) resolves them, value by value: organisation, tier, default.
-- Only the operator reads or writes it (`planner limits ...`, listener/ops.py): no API role and
-- not the engine (Denial of Wallet: a member must not raise their own budget).
-- docs/database.md, "Limits", says why each default is what it is.
create table planner_engine.limits (
  tier text unique check (tier ~ '^[a-z][a-z0-9_-]{0,39}$'),
  organization_id uuid unique references public.organizations (id) on delete cascade,
  on_tier text references planner_engine.limits (tier) on update cascade,
  -- the size of one request
  max_job_lines integer check (max_job_lines >= 1),               -- n_job_lines per run
  max_teams integer check (max_teams >= 1),                       -- teams a run's problem lists
  max_terms integer check (max_terms >= 1),                       -- terms per allocation run
  max_demand_rows integer check (max_demand_rows >= 1),           -- team_demand rows per allocation run
  max_options_bytes integer check (max_options_bytes >= 2),       -- octet_length(options::text)
  max_constraints integer check (max_constraints >= 0),           -- codes in `constraints`
  -- the per-run time cap (contract with the listener: it solves for the run's time_limit_s)
  default_time_limit_s integer check (default_time_limit_s >= 1), -- when options have none
  max_time_limit_s integer check (max_time_limit_s >= 1),         -- options above it are capped
  -- rates and budgets, counted in planner_private.usage_ledger
  runs_per_hour integer check (runs_per_hour >= 0),
  queued_runs integer check (queued_runs >= 0),                   -- PENDING + GENERATING at once
  solver_seconds_per_hour integer check (solver_seconds_per_hour >= 0),
  solver_seconds_per_day integer check (solver_seconds_per_day >= 0),
  restores_per_hour integer check (restores_per_hour >= 0),
  updated_at timestamptz not null default now(),
  constraint tier_or_organization check ((tier is null) <> (organization_id is null)),
  constraint only_organizations_are_on_a_tier check (on_tier is null or organization_id is not null),
  constraint default_is_complete check (tier is distinct from 'default' or (
    max_job_lines is not null and max_teams is not null and max_terms is not null
    and max_demand_rows is not null and max_options_bytes is not null
    and max_constraints is not null and default_time_limit_s is not null
    and max_time_limit_s is not null and runs_per_hour is not null and queued_runs is not null
    and solver_seconds_per_hour is not null and solver_seconds_per_day is not null
    and restores_per_hour is not null))
);
insert into planner_engine.limits
  (tier, max_job_lines, max_teams, max_terms, max_demand_rows, max_options_bytes,
   max_constraints, default_time_limit_s, max_time_limit_s, runs_per_hour, queued_runs,
   solver_seconds_per_hour, solver_seconds_per_day, restores_per_hour)
values ('default', 500, 1000, 52, 20000, 8192, 32, 30, 120, 30, 10, 1800, 14400, 30);
comment on table planner_engine.limits is
  'Per-organisation limits: the default row, named tiers, organisations'' overrides (NULL = inherit).';

-- What each organisation has used: one row per admitted run (its reserved and used solver
-- seconds) and per restore. No key to the runs or allocation runs, on purpose: deleting them
-- (which cascades the runs) must not give a budget back (issue 13, finding 1). Written only by
-- triggers and restore_job_lines (20_rules.sql, 30_engine.sql); read by the admission checks
-- and the operator. Deleting the organisation (an operator's act) takes its ledger along.
create table planner_private.usage_ledger (
  id bigint generated always as identity primary key,
  organization_id uuid not null references public.organizations (id) on delete cascade,
  kind text not null check (kind in ('run', 'restore')),
  run_id uuid,                    -- the planner run (kind 'run'); it may be deleted since
  allocation_run_id uuid not null,
  at timestamptz not null default now(),  -- admitted at; the hourly and daily windows count from here
  reserved_s integer not null default 0 check (reserved_s >= 0),  -- the run's time_limit_s
  used_s numeric not null default 0 check (used_s >= 0),          -- settled attempts' seconds
  settled_at timestamptz,         -- NULL while the run is PENDING or GENERATING (queued)
  outcome text,                   -- the final status, or DELETED
  constraint a_run_names_its_run check ((kind = 'run') = (run_id is not null)),
  constraint a_restore_is_settled check (kind = 'run' or settled_at is not null)
);
create index usage_ledger_org_at_idx on planner_private.usage_ledger (organization_id, at);
create index usage_ledger_queued_idx on planner_private.usage_ledger (organization_id)
  where settled_at is null;
create index usage_ledger_run_idx on planner_private.usage_ledger (run_id) where run_id is not null;

create table public.organization_members (
  organization_id uuid not null references public.organizations (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,  -- the JWT's `sub`
  role text not null check (role in ('admin', 'planner', 'viewer')),
  created_at timestamptz not null default now(),
  primary key (organization_id, user_id)
);
create index organization_members_user_idx on public.organization_members (user_id);

-- Invitations (issue 14): the only way a user becomes a member of an organisation they are
-- not in yet. An admin invites an e-mail address (public.invite_member), the user holding
-- that address accepts (public.accept_invitation). Nobody learns from it whether an address
-- or a user id has an account: invite_member never looks at auth.users.
create table public.organization_invitations (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id) on delete cascade,
  email text not null check (email = lower(btrim(email)) and email ~ '^[^@[:space:]]+@[^@[:space:]]+$'),
  role text not null check (role in ('admin', 'planner', 'viewer')),
  invited_by uuid references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null default now() + interval '14 days',
  accepted_at timestamptz,
  accepted_by uuid references auth.users (id) on delete set null,
  constraint accepted_together check ((accepted_at is null) = (accepted_by is null))
);
-- One open invitation per address and organisation (inviting again updates it).
create unique index organization_invitations_open_idx
  on public.organization_invitations (organization_id, email) where accepted_at is null;
create index organization_invitations_email_idx on public.organization_invitations (email);

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
  -- Digest of the fencing token of the current claim (planner_private.lease_digest); NULL
  -- whenever nobody holds the run. The token itself is returned once, by claim_run, and is
  -- stored nowhere: whoever can read this column (members, Realtime subscribers) cannot
  -- present it to the fenced functions.
  lease uuid,
  cancel_requested_at timestamptz,
  result_metadata jsonb,
  error text,
  -- The run's time cap in seconds, set by the insert trigger from options.time_limit_seconds
  -- (default and cap: planner_engine.limits). The listener solves for this long at most and
  -- the ledger reserves it: both sides read the same number (issue 13).
  time_limit_s integer not null check (time_limit_s >= 1),
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
-- The recent run durations behind a queued run's estimated start (estimated_start).
create index allocation_planner_runs_finished_idx
  on public.allocation_planner_runs (finished_at) where finished_at is not null;
-- An organisation's runs by time (listings; the hourly limits count planner_private.usage_ledger,
-- which deleting runs cannot shrink).
create index allocation_planner_runs_org_created_idx
  on public.allocation_planner_runs (organization_id, created_at);

-- The last lease (its digest) of each run that was released, and when: what
-- planner_engine.write_logs accepts for settings.log_grace after the run left GENERATING.
-- Written only by the trigger planner_private.allocation_planner_runs_remember_lease; no API
-- role or the engine can read it. Kept out of the runs row, which every UI subscriber reads.
create table planner_private.released_leases (
  run_id uuid primary key references public.allocation_planner_runs (id) on delete cascade,
  lease uuid not null,
  released_at timestamptz not null
);

-- -- fair share and liveness (planner_engine.claim_run, planner_engine.listener_heartbeat) ----
-- When each organisation last had a run claimed: claim_run serves the organisation claimed
-- longest ago first (round robin), so N listeners agree on the order without talking to each
-- other. One narrow row per organisation, written by claim_run only.
create table planner_private.organization_claims (
  organization_id uuid primary key references public.organizations (id) on delete cascade,
  last_claimed_at timestamptz not null
);

-- One row per listener (its worker id), touched on the listener's heartbeat interval while it
-- can claim runs. The sweeper fails a PENDING run by timeout only when no listener has beaten
-- within the pending TTL: a run that waits because the listeners are busy with other
-- organisations' runs is not failed. Kept apart from the runs table, so a liveness beat is a
-- write of a few dozen bytes that no Realtime subscriber receives.
create table planner_private.listener_heartbeats (
  worker_id text primary key check (length(worker_id) between 1 and 200),
  started_at timestamptz not null default now(),
  beat_at timestamptz not null
);

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
  -- History outlives its allocation run (issue 14): no key to allocation_runs or to the runs,
  -- so deleting them cascades nothing here and allocation_run_id / planner_run_id keep their
  -- ids. The tenant check those keys made is a trigger (planner_private.
  -- history_belongs_to_its_run, 20_rules.sql) on insert and on any change of the ids; the
  -- organisation stays a real key (deleting a whole organisation, an operator's act, takes
  -- its history with it). Only `planner history purge` removes a deleted run's history.
  foreign key (organization_id) references public.organizations (id) on delete cascade,
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
  -- Filled in by the insert trigger from the run (never trusted from the writer): the key
  -- by which `planner history purge --allocation-run` finds a deleted run's log lines.
  allocation_run_id uuid not null,
  -- Like the history: no key to the run, so the lines survive its deletion with their ids;
  -- planner_private.log_belongs_to_its_run (20_rules.sql) checks run and organisation.
  foreign key (organization_id) references public.organizations (id) on delete cascade
);
create index planner_execution_logs_run_idx
  on public.planner_execution_logs (planner_run_id, logged_at);
create index planner_execution_logs_org_idx on public.planner_execution_logs (organization_id);
create index planner_execution_logs_alloc_idx
  on public.planner_execution_logs (allocation_run_id);
