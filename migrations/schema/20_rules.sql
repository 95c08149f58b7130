-- Schema, part 2 of 4: the invariants that need code (helpers, triggers, plans as JSON).
--
-- Custom SQLSTATEs (class "PL", no clash with PostgreSQL's own classes); docs/database.md
-- lists them with the hint each carries:
--   PL001 lease lost             PL002 organisation mismatch   PL003 illegal status transition
--   PL004 malformed plan         PL010 unknown rule-set code   PL011 n_job_lines out of range
--   PL012 not a planner/admin    PL013 an active run exists    PL014 hourly rate limit
--   PL015 engine-owned field written by a user
--   PL030 last admin of an organisation   PL031 only admins invite   PL032 no such invitation
--   PL033 purge of a live allocation run's history
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

-- The same question asked from inside a SECURITY DEFINER function, where current_user is the
-- function's owner: the caller's database role is the one it SET ROLE to (what PostgREST does
-- for each request: authenticated, service_role) or else the role it logged in as. Never the
-- JWT claims: any session can set `request.jwt.claims` to say "service_role", while SET ROLE
-- needs membership in the role.
create function planner_private.caller_is_privileged()
returns boolean
language sql stable set search_path = ''
as $$
  select coalesce(
    (select r.rolsuper or r.rolbypassrls from pg_catalog.pg_roles r
      where r.rolname = coalesce(nullif(pg_catalog.current_setting('role'), 'none'),
                                 session_user)),
    false)
$$;

-- For the public functions (request_cancel, restore_job_lines), which run as their owner:
-- planners/admins of the organisation, or a privileged database role (the service role).
create function planner_private.caller_can_plan(p_organization_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select planner_private.can_plan(p_organization_id)
      or planner_private.caller_is_privileged()
$$;

-- -- admission of a new run (invariants 3 and 4) -------------------------------------------
-- The checks every new run passes, whoever inserts it. Returns the max_attempts a
-- user-requested run gets. Executable by nobody but its owner: the insert trigger reaches it
-- through admit_user_run or admit_privileged_run below, each of which decides on its own who
-- is asking (no argument can switch a check off). p_foreign_errcode is the SQLSTATE for an
-- allocation run of another organisation: PL012 for a user (as for a non-member), PL002 for
-- the service role.
create function planner_private.admission_checks(
  p_organization_id uuid,
  p_allocation_run_id uuid,
  p_n_job_lines integer,
  p_constraints text[],
  p_foreign_errcode text
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

  if not exists (select 1 from public.allocation_runs a
                  where a.id = p_allocation_run_id and a.organization_id = p_organization_id) then
    raise exception using
      errcode = p_foreign_errcode,
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

-- What the insert trigger calls for a signed-in user's request (it runs as the user, so the
-- user may execute this): membership first, so a non-member learns nothing about the
-- organisation's allocation runs and never takes its request lock.
create function planner_private.admit_user_run(
  p_organization_id uuid,
  p_allocation_run_id uuid,
  p_n_job_lines integer,
  p_constraints text[]
) returns integer
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if not planner_private.can_plan(p_organization_id) then
    raise exception using errcode = 'PL012',
      message = 'only planners and admins of the organisation can request a planner run',
      hint = 'ask an admin of the organisation for the planner role';
  end if;
  return planner_private.admission_checks(p_organization_id, p_allocation_run_id,
                                          p_n_job_lines, p_constraints, 'PL012');
end
$$;

-- The same for a request of a privileged database role (the service role, an operator): no
-- membership, but the caller must really be such a role.
create function planner_private.admit_privileged_run(
  p_organization_id uuid,
  p_allocation_run_id uuid,
  p_n_job_lines integer,
  p_constraints text[]
) returns integer
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if not planner_private.caller_is_privileged() then
    raise exception using errcode = '42501',
      message = 'only the service role may request a planner run without membership';
  end if;
  return planner_private.admission_checks(p_organization_id, p_allocation_run_id,
                                          p_n_job_lines, p_constraints, 'PL002');
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
  if v_user then
    new.max_attempts := planner_private.admit_user_run(
      new.organization_id, new.allocation_run_id, new.n_job_lines, new.constraints);
  else
    perform planner_private.admit_privileged_run(
      new.organization_id, new.allocation_run_id, new.n_job_lines, new.constraints);
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

-- -- history is append-only (issue 14) --------------------------------------------------------
-- job_lines_history and planner_execution_logs keep no foreign key to the allocation run or
-- the planner run (10_tables.sql), so deleting those removes neither and their ids stay. What
-- the composite keys checked, these triggers check: a snapshot names an allocation run (and a
-- run) of its own organisation, a log line a run of its own organisation. SECURITY DEFINER:
-- the writer (the engine's functions, the service role) need not read the parents itself.
create function planner_private.history_belongs_to_its_run()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if not exists (select 1 from public.allocation_runs a
                  where a.id = new.allocation_run_id and a.organization_id = new.organization_id)
     or (new.planner_run_id is not null and not exists (
           select 1 from public.allocation_planner_runs r
            where r.id = new.planner_run_id and r.allocation_run_id = new.allocation_run_id
              and r.organization_id = new.organization_id)) then
    raise exception using errcode = 'PL002',
      message = format('snapshot of allocation run %s / planner run %s does not belong to '
                       'organisation %s', new.allocation_run_id, new.planner_run_id,
                       new.organization_id),
      hint = 'a snapshot names an existing allocation run (and run) of its own organisation';
  end if;
  return new;
end
$$;

create trigger job_lines_history_belongs_to_its_run
  before insert or update of organization_id, allocation_run_id, planner_run_id
  on public.job_lines_history
  for each row execute function planner_private.history_belongs_to_its_run();

-- Also fills allocation_run_id from the run, so the writers (write_log, write_logs,
-- claim_run, the sweeper) need not know it and cannot get it wrong.
create function planner_private.log_belongs_to_its_run()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_allocation_run_id uuid;
begin
  select r.allocation_run_id into v_allocation_run_id
    from public.allocation_planner_runs r
   where r.id = new.planner_run_id and r.organization_id = new.organization_id;
  if not found then
    raise exception using errcode = 'PL002',
      message = format('planner run %s does not belong to organisation %s',
                       new.planner_run_id, new.organization_id);
  end if;
  new.allocation_run_id := v_allocation_run_id;
  return new;
end
$$;

create trigger planner_execution_logs_belongs_to_its_run
  before insert or update of planner_run_id, organization_id, allocation_run_id
  on public.planner_execution_logs
  for each row execute function planner_private.log_belongs_to_its_run();

-- Any change that removes rotations of a plan snapshots the plan first: deleting an
-- allocation run (its lines go) or a term (its rotations go). A row-level BEFORE DELETE
-- trigger, because the cascades run after the deleted row is gone and a BEFORE statement
-- trigger does not know the rows. Deleting several terms of one allocation run in one
-- transaction keeps one snapshot, of the plan before the first deletion: later ones see a
-- plan already missing the deleted terms and are skipped while a delete snapshot of this
-- allocation run written by this transaction exists (xmin) and no commit or restore of this
-- transaction came after it. Deleting a whole organisation (an operator's act) keeps nothing:
-- its history goes with it.
create function planner_private.snapshot_before_delete()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_allocation_run_id uuid;
  v_old jsonb;
  v_xid xid := pg_catalog.pg_current_xact_id()::xid;
begin
  if tg_table_name = 'allocation_runs' then
    v_allocation_run_id := old.id;
  else
    v_allocation_run_id := old.allocation_run_id;
  end if;
  if not exists (select 1 from public.organizations o where o.id = old.organization_id) then
    return old;
  end if;
  if exists (select 1 from public.job_lines_history h
              where h.allocation_run_id = v_allocation_run_id and h.xmin = v_xid
                and h.planner_run_id is null and h.restored_snapshot_id is null)
     and not exists (select 1 from public.job_lines_history h
                      where h.allocation_run_id = v_allocation_run_id and h.xmin = v_xid
                        and (h.planner_run_id is not null or h.restored_snapshot_id is not null))
  then
    return old;
  end if;
  v_old := planner_private.current_plan(v_allocation_run_id, true);
  if v_old is not null then
    insert into public.job_lines_history
      (organization_id, allocation_run_id, taken_by, n_lines, plan)
    values (old.organization_id, v_allocation_run_id, auth.uid(),
            jsonb_array_length(v_old -> 'lines'), v_old);
  end if;
  return old;
end
$$;

create trigger allocation_runs_snapshot_before_delete
  before delete on public.allocation_runs
  for each row execute function planner_private.snapshot_before_delete();
create trigger terms_snapshot_before_delete
  before delete on public.terms
  for each row execute function planner_private.snapshot_before_delete();

-- The operator's explicit purge (`planner history purge --allocation-run ID`, listener/ops.py):
-- the snapshots and log lines of an allocation run that has been deleted. Executable by the
-- service role only (40_access.sql), and it checks the database role again itself. A live
-- allocation run's history is refused (PL033): delete the allocation run first.
create function planner_private.purge_history(p_allocation_run_id uuid)
returns jsonb
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_snapshots bigint;
  v_logs bigint;
begin
  if not planner_private.caller_is_privileged() then
    raise exception using errcode = '42501',
      message = 'only the service role may purge history';
  end if;
  if exists (select 1 from public.allocation_runs a where a.id = p_allocation_run_id) then
    raise exception using errcode = 'PL033',
      message = format('allocation run %s still exists; its history is kept while it does',
                       p_allocation_run_id),
      hint = 'delete the allocation run first (as an admin of its organisation), then purge';
  end if;
  delete from public.planner_execution_logs l where l.allocation_run_id = p_allocation_run_id;
  get diagnostics v_logs = row_count;
  delete from public.job_lines_history h where h.allocation_run_id = p_allocation_run_id;
  get diagnostics v_snapshots = row_count;
  return jsonb_build_object('snapshots', v_snapshots, 'logs', v_logs);
end
$$;

-- -- membership (issue 14) --------------------------------------------------------------------
-- An organisation always keeps an admin: after a member's change or removal the organisation
-- must still have one, or PL030. The organisation row is locked first, so two admins demoting
-- each other at the same time cannot both succeed (the second sees the first's commit).
-- Removing the members together with their organisation (an operator deleting it) passes.
-- Deleting the auth user of a last admin is refused too: appoint another admin first.
create function planner_private.keep_one_admin()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  perform 1 from public.organizations o where o.id = old.organization_id for no key update;
  if not found then
    return null;
  end if;
  if not exists (select 1 from public.organization_members m
                  where m.organization_id = old.organization_id and m.role = 'admin') then
    raise exception using errcode = 'PL030',
      message = format('organisation %s would be left without an admin', old.organization_id),
      hint = 'make another member an admin first (invite one if needed), then change or '
             'remove this one';
  end if;
  return null;
end
$$;

create trigger organization_members_keep_one_admin
  after update or delete on public.organization_members
  for each row when (old.role = 'admin')
  execute function planner_private.keep_one_admin();

-- The caller's own e-mail address (lower case), for the invitations' read policy: the
-- invited user sees their invitations. Returns nothing about anybody else.
create function planner_private.caller_email()
returns text
language sql stable security definer set search_path = ''
as $$
  select lower(u.email) from auth.users u where u.id = (select auth.uid())
$$;

-- An admin (or the service role) invites an address with a role; inviting the same address
-- again while the invitation is open updates it. The answer is an invitation id whether or
-- not the address has an account: nothing here reads auth.users.
create function public.invite_member(p_organization_id uuid, p_email text, p_role text)
returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_email text := lower(btrim(coalesce(p_email, '')));
  v_id uuid;
begin
  if not (planner_private.has_role(p_organization_id, array['admin'])
          or planner_private.caller_is_privileged()) then
    raise exception using errcode = 'PL031',
      message = 'only admins of the organisation can invite members',
      hint = 'ask an admin of the organisation to invite them';
  end if;
  if p_role is null or p_role not in ('admin', 'planner', 'viewer') then
    raise exception using errcode = '22023',
      message = format('unknown role %s', coalesce(p_role, 'NULL')),
      hint = 'admin, planner or viewer';
  end if;
  if v_email !~ '^[^@[:space:]]+@[^@[:space:]]+$' then
    raise exception using errcode = '22023',
      message = format('%s is not an e-mail address', p_email);
  end if;
  insert into public.organization_invitations (organization_id, email, role, invited_by)
  values (p_organization_id, v_email, p_role, auth.uid())
  on conflict (organization_id, email) where accepted_at is null
  do update set role = excluded.role, invited_by = excluded.invited_by,
                created_at = now(), expires_at = excluded.expires_at
  returning id into v_id;
  return v_id;
end
$$;

-- The invited user accepts: the invitation must be open, unexpired and addressed to the
-- caller's own (confirmed, where auth.users records confirmation) e-mail address. One error
-- for every failure, so an invitation id of somebody else is not confirmed. A user who is
-- already a member keeps their role (an admin changes roles with UPDATE).
create function public.accept_invitation(p_invitation_id uuid)
returns uuid
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_uid uuid := auth.uid();
  v_inv public.organization_invitations;
begin
  select i.* into v_inv
    from public.organization_invitations i
    join auth.users u on u.id = v_uid and lower(u.email) = i.email
   where i.id = p_invitation_id and i.accepted_at is null and i.expires_at > now()
     and (not (to_jsonb(u) ? 'email_confirmed_at')
          or to_jsonb(u) ->> 'email_confirmed_at' is not null)
     for update of i;
  if not found then
    raise exception using errcode = 'PL032',
      message = format('invitation %s not found, expired, already accepted or not addressed '
                       'to you', p_invitation_id),
      hint = 'ask an admin of the organisation for a new invitation to your e-mail address';
  end if;
  insert into public.organization_members (organization_id, user_id, role)
  values (v_inv.organization_id, v_uid, v_inv.role)
  on conflict (organization_id, user_id) do nothing;
  update public.organization_invitations
     set accepted_at = now(), accepted_by = v_uid
   where id = v_inv.id;
  return v_inv.organization_id;
end
$$;
