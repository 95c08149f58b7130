-- Private helpers and privileges (issue 14, findings 4 and 5): no private function with a
-- switch that turns its checks off, role checks from the database role instead of the JWT
-- claims, no sequence the API roles can move, and the scaffolding's default privileges in
-- `public` revoked for what the migrations create from now on.
--
-- * planner_private.admit_run(..., p_check_membership) was executable by every signed-in user,
--   who could pass false: an existence oracle for other organisations' allocation runs and a
--   hold on their request lock. It is replaced by admission_checks (owner only) behind
--   admit_user_run (membership first) and admit_privileged_run (the caller must be a
--   privileged database role).
-- * caller_can_plan (request_cancel, restore_job_lines) trusted auth.role() = 'service_role',
--   i.e. the claims any session can set; it now asks caller_is_privileged().
-- * planner_execution_logs_id_seq was writable by anon and authenticated.
-- The definitions are those of migrations/schema/20_rules.sql and 40_access.sql.

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
create or replace function planner_private.caller_can_plan(p_organization_id uuid)
returns boolean
language sql stable security definer set search_path = ''
as $$
  select planner_private.can_plan(p_organization_id)
      or planner_private.caller_is_privileged()
$$;

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
create or replace function planner_private.allocation_planner_runs_before_insert()
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

drop function planner_private.admit_run(uuid, uuid, integer, text[], boolean);

revoke all on function
  planner_private.caller_is_privileged(),
  planner_private.admission_checks(uuid, uuid, integer, text[], text),
  planner_private.admit_user_run(uuid, uuid, integer, text[]),
  planner_private.admit_privileged_run(uuid, uuid, integer, text[])
  from public, anon, authenticated;
grant execute on function planner_private.admit_user_run(uuid, uuid, integer, text[])
  to authenticated;
grant execute on function planner_private.admit_privileged_run(uuid, uuid, integer, text[])
  to service_role;

revoke all on all sequences in schema public from public, anon, authenticated;
alter default privileges in schema public revoke all on tables from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
alter default privileges in schema public revoke all on functions from anon, authenticated;
