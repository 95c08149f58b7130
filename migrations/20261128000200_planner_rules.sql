-- Planner schema, part 2: the invariants that need code (helpers and triggers).
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

-- Rotations carry the time of the last manual edit.
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
  for each row execute function planner_private.touch_updated_at();

-- -- plans as JSON ---------------------------------------------------------------------------
-- The current plan of an allocation run in the solver's shape
-- {"lines": [{"line", "rotations": {term: team}, "pinned": [term]}]}, or NULL without lines.
-- p_with_provenance adds each line's planner_run_id (snapshots keep it; the solver's strict
-- model would refuse the extra key).
create function planner_private.current_plan(p_allocation_run_id uuid, p_with_provenance boolean)
returns jsonb
language sql stable security definer set search_path = ''
as $$
  select case when count(*) = 0 then null
              else jsonb_build_object('lines', jsonb_agg(x.line order by x.n)) end
    from (
      select l.line_number as n,
             jsonb_build_object(
               'line', l.line_number,
               'rotations', coalesce(
                 (select jsonb_object_agg(ro.term_id::text, ro.team_id::text)
                    from public.rotations ro where ro.job_line_id = l.id), '{}'::jsonb),
               'pinned', coalesce(
                 (select jsonb_agg(ro.term_id::text order by t.ordinal)
                    from public.rotations ro join public.terms t on t.id = ro.term_id
                   where ro.job_line_id = l.id and ro.pinned), '[]'::jsonb))
             || case when p_with_provenance
                     then jsonb_build_object('planner_run_id', l.planner_run_id)
                     else '{}'::jsonb end as line
        from public.job_lines l
       where l.allocation_run_id = p_allocation_run_id) x
$$;

-- Validates a plan against its allocation run: PL004 for a malformed payload, PL002 for a
-- term or team of another allocation run / organisation (the composite keys would refuse it
-- too, but with a less useful message).
create function planner_private.check_plan(
  p_plan jsonb, p_allocation_run_id uuid, p_organization_id uuid
) returns void
language plpgsql stable security definer set search_path = ''
as $$
declare
  uuid_re constant text := '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
  v_bad text;
begin
  if p_plan is null or jsonb_typeof(p_plan -> 'lines') is distinct from 'array' then
    raise exception using errcode = 'PL004', message = 'a plan must be an object with a "lines" array';
  end if;

  select format('line #%s', o) into v_bad
    from jsonb_array_elements(p_plan -> 'lines') with ordinality as e(x, o)
   where jsonb_typeof(x) <> 'object'
      or coalesce(x ->> 'line', '') !~ '^[1-9][0-9]{0,8}$'
      or jsonb_typeof(x -> 'rotations') is distinct from 'object'
      or (x ? 'pinned' and jsonb_typeof(x -> 'pinned') <> 'array')
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL004',
      message = format('malformed plan: %s needs a positive integer "line", a "rotations" '
                       'object and optionally a "pinned" array', v_bad);
  end if;

  select x ->> 'line' into v_bad
    from jsonb_array_elements(p_plan -> 'lines') x
   group by x ->> 'line' having count(*) > 1 limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL004', message = format('malformed plan: line %s appears twice', v_bad);
  end if;

  select format('line %s: %s', x ->> 'line', v) into v_bad
    from jsonb_array_elements(p_plan -> 'lines') x,
         lateral (select r.key as v from jsonb_each(x -> 'rotations') r
                   where r.key !~ uuid_re or jsonb_typeof(r.value) <> 'string'
                      or r.value #>> '{}' !~ uuid_re
                  union all
                  select p #>> '{}' from jsonb_array_elements(coalesce(x -> 'pinned', '[]')) p
                   where jsonb_typeof(p) <> 'string' or not (x -> 'rotations') ? (p #>> '{}')) bad
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL004',
      message = format('malformed plan: %s is not a term uuid mapped to a team uuid, or a pin '
                       'without a rotation', v_bad);
  end if;

  select r.key into v_bad
    from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r
   where not exists (select 1 from public.terms t
                      where t.id = r.key::uuid and t.allocation_run_id = p_allocation_run_id
                        and t.organization_id = p_organization_id)
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL002',
      message = format('term %s is not a term of allocation run %s', v_bad, p_allocation_run_id),
      hint = 'a plan may only use the terms of its own allocation run';
  end if;

  select r.value into v_bad
    from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r
   where not exists (select 1 from public.teams tm
                      where tm.id = r.value::uuid and tm.organization_id = p_organization_id)
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL002',
      message = format('team %s is not a team of organisation %s', v_bad, p_organization_id),
      hint = 'a plan may only use the teams of its own organisation';
  end if;

  -- One rotation per line per term: every line covers exactly the allocation run's terms.
  select format('line %s, term %s', x ->> 'line', t.id) into v_bad
    from jsonb_array_elements(p_plan -> 'lines') x
    cross join public.terms t
   where t.allocation_run_id = p_allocation_run_id
     and not (x -> 'rotations') ? t.id::text
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL004',
      message = format('malformed plan: no rotation for %s (every line needs one per term)', v_bad);
  end if;
end
$$;

-- Replaces an allocation run's plan: snapshot the current lines into job_lines_history,
-- delete them, insert p_plan. Returns the snapshot id (NULL when there was nothing to keep).
-- Callers (commit_plan, restore_job_lines) have already checked who may do this.
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
    delete from public.job_lines where allocation_run_id = p_allocation_run_id;
  end if;

  with l as (
    select (x ->> 'line')::integer as n,
           x -> 'rotations' as rot,
           coalesce(x -> 'pinned', '[]'::jsonb) as pins,
           -- a snapshot line keeps the run that made it, if that run still exists
           case when p_planner_run_id is not null then p_planner_run_id
                else (select r.id from public.allocation_planner_runs r
                       where r.id::text = x ->> 'planner_run_id'
                         and r.allocation_run_id = p_allocation_run_id) end as run_id
      from jsonb_array_elements(p_plan -> 'lines') x
  ), ins as (
    insert into public.job_lines (organization_id, allocation_run_id, line_number, planner_run_id)
    select p_organization_id, p_allocation_run_id, l.n, l.run_id from l
    returning id, line_number
  )
  insert into public.rotations
    (organization_id, allocation_run_id, job_line_id, term_id, team_id, pinned)
  select p_organization_id, p_allocation_run_id, ins.id, r.key::uuid, r.value::uuid,
         l.pins ? r.key
    from ins
    join l on l.n = ins.line_number
    cross join lateral jsonb_each_text(l.rot) r;

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
