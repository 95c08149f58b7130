-- Schema, part 2 of 4: the invariants that need code (helpers, triggers, plans as JSON).
--
-- Custom SQLSTATEs (class "PL", no clash with PostgreSQL's own classes); docs/database.md
-- lists them with the hint each carries:
--   PL001 lease lost             PL002 organisation mismatch   PL003 illegal status transition
--   PL004 malformed plan         PL010 unknown rule-set code   PL011 n_job_lines out of range
--   PL012 not a planner/admin    PL013 an active run exists    PL014 hourly rate limit
--   PL015 engine-owned field written by a user
--   PL040 problem too large (terms, demand rows, teams)   PL041 request too large (options,
--   constraints)   PL042 solver-seconds budget   PL043 too many queued runs
--   PL045 restores per hour
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

-- -- admission of a new run (invariants 3 and 4; issue 13) ---------------------------------
-- The limits that apply to an organisation, value by value: its own row, else its tier's,
-- else the default row's (planner_engine.limits, 10_tables.sql). Every value of the result
-- is set; `tier` names the tier in force, organization_id the organisation.
create function planner_private.limits_of(p_organization_id uuid)
returns planner_engine.limits
language sql stable security definer set search_path = ''
as $$
  select jsonb_populate_record(
           null::planner_engine.limits,
           to_jsonb(d)
             || coalesce(jsonb_strip_nulls(to_jsonb(t)), '{}'::jsonb)
             || coalesce(jsonb_strip_nulls(to_jsonb(o)), '{}'::jsonb)
             || jsonb_build_object('organization_id', p_organization_id))
    from planner_engine.limits d
    left join planner_engine.limits o on o.organization_id = p_organization_id
    left join planner_engine.limits t on t.tier = o.on_tier
   where d.tier = 'default'
$$;

-- Refusal counters, one sequence per reason: a refused INSERT rolls back, nextval does not,
-- so the count survives the very rollback it reports. planner_engine.refusal_counts() reads
-- them for the listener's /metrics (docs/listener.md). The reasons and their SQLSTATEs are
-- listed in docs/database.md.
create sequence planner_private.refused_not_a_planner;
create sequence planner_private.refused_foreign_allocation_run;
create sequence planner_private.refused_options_bytes;
create sequence planner_private.refused_constraints;
create sequence planner_private.refused_unknown_rule_set;
create sequence planner_private.refused_job_lines;
create sequence planner_private.refused_terms;
create sequence planner_private.refused_demand_rows;
create sequence planner_private.refused_teams;
create sequence planner_private.refused_active_run;
create sequence planner_private.refused_queued_runs;
create sequence planner_private.refused_runs_per_hour;
create sequence planner_private.refused_solver_seconds_hour;
create sequence planner_private.refused_solver_seconds_day;
create sequence planner_private.refused_restores_per_hour;

-- Count the refusal, then raise it. Executable by its owner only: reached from the
-- SECURITY DEFINER admission functions below.
create function planner_private.refuse(
  p_errcode text, p_reason text, p_message text, p_hint text
) returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  perform nextval(format('planner_private.refused_%s', p_reason)::regclass);
  raise exception using errcode = p_errcode, message = p_message, hint = p_hint;
end
$$;

-- What a ledger entry counts against the solver-seconds budgets: a settled run what it used,
-- a queued or generating one at least what it reserved (its attempts so far may exceed it).
create function planner_private.charged_s(p_entry planner_private.usage_ledger)
returns numeric
language sql immutable set search_path = ''
as $$
  select case when p_entry.settled_at is null then greatest(p_entry.reserved_s, p_entry.used_s)
              else p_entry.used_s end
$$;

-- An organisation's usage in the window that ends now.
create function planner_private.usage_in(p_organization_id uuid, p_window interval)
returns table (runs bigint, restores bigint, solver_seconds numeric)
language sql stable security definer set search_path = ''
as $$
  select count(*) filter (where l.kind = 'run'),
         count(*) filter (where l.kind = 'restore'),
         coalesce(sum(planner_private.charged_s(l)), 0)
    from planner_private.usage_ledger l
   where l.organization_id = p_organization_id and l.at > now() - p_window
$$;

-- When a request refused now would pass, if nothing else happened: the moment enough of the
-- window's entries of `p_kind` (counted 1 each, or by their charged seconds) have left it for
-- p_more more to fit under p_limit. NULL when p_more alone is above the limit.
create function planner_private.fits_at(
  p_organization_id uuid, p_window interval, p_kind text, p_seconds boolean,
  p_more numeric, p_limit numeric
) returns timestamptz
language sql stable security definer set search_path = ''
as $$
  with w as (
    select l.id, l.at,
           case when p_seconds then planner_private.charged_s(l) else 1 end as amount
      from planner_private.usage_ledger l
     where l.organization_id = p_organization_id and l.kind = p_kind
       and l.at > now() - p_window
  ), c as (
    select w.at, sum(w.amount) over (order by w.at, w.id) as gone, sum(w.amount) over () as total
      from w
  )
  select min(c.at) + p_window from c
   where p_more <= p_limit and c.total - c.gone + p_more <= p_limit
$$;

-- "wait until 14:05:09 UTC" for a refusal's hint (NULL when waiting cannot help).
create function planner_private.wait_until(p_at timestamptz)
returns text
language sql stable set search_path = ''
as $$
  select 'wait until ' || to_char(p_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
$$;

-- A bounded count for a refusal message: the exact number up to ten times the limit, else
-- "more than" that. Counting stops there, so an oversized input costs every refused request
-- a bounded amount of work.
create function planner_private.shown_count(p_count bigint, p_limit integer)
returns text
language sql immutable set search_path = ''
as $$
  select case when p_count > 10::bigint * p_limit then 'more than ' || (10::bigint * p_limit)
              else p_count::text end
$$;

-- The checks every new run passes, whoever inserts it; returns the run with time_limit_s
-- set. Executable by nobody but its owner: the insert trigger reaches it through
-- admit_user_run or admit_privileged_run below, each of which decides on its own who is
-- asking (no argument can switch a check off). p_foreign_errcode is the SQLSTATE for an
-- allocation run of another organisation: PL012 for a user (as for a non-member), PL002 for
-- the service role.
--
-- Order: what costs nothing and leaks nothing first; the request's own size before anything
-- proportional to it (a 200,000-element constraints array used to be checked code by code);
-- the problem's size with bounded counts; then, under the organisation's lock, the queue,
-- the rates and the budgets from the ledger (which deleting runs cannot shrink).
create function planner_private.admission_checks(
  p_run public.allocation_planner_runs,
  p_foreign_errcode text
) returns public.allocation_planner_runs
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs := p_run;
  lim planner_engine.limits;
  raise_it constant text := 'an operator can raise the limit (planner limits set)';
  v_unknown text[];
  v_n bigint;
  v_requested numeric;
  v_hour record;
  v_day record;
  v_at timestamptz;
begin
  if not exists (select 1 from public.allocation_runs a
                  where a.id = r.allocation_run_id and a.organization_id = r.organization_id) then
    perform planner_private.refuse(p_foreign_errcode, 'foreign_allocation_run',
      format('allocation run %s does not belong to organisation %s',
             r.allocation_run_id, r.organization_id),
      'pick an allocation run of the same organisation');
  end if;
  lim := planner_private.limits_of(r.organization_id);

  -- the request itself
  v_n := octet_length(r.options::text);
  if v_n > lim.max_options_bytes then
    perform planner_private.refuse('PL041', 'options_bytes',
      format('options are %s bytes (limit %s bytes)', v_n, lim.max_options_bytes),
      'send only the solver''s options (docs/solver.md); ' || raise_it);
  end if;
  if cardinality(r.constraints) > lim.max_constraints then
    perform planner_private.refuse('PL041', 'constraints',
      format('constraints lists %s rule-set codes (limit %s)',
             cardinality(r.constraints), lim.max_constraints),
      'list each rule set once; ' || raise_it);
  end if;
  v_unknown := array(
    select distinct c from unnest(r.constraints) c
     where not exists (select 1 from public.planner_rule_sets rs where rs.code = c));
  if cardinality(v_unknown) > 0 then
    perform planner_private.refuse('PL010', 'unknown_rule_set',
      format('unknown rule-set code(s): %s', array_to_string(v_unknown, ', ')),
      'valid codes: ' || (select string_agg(code, ', ' order by code)
                            from public.planner_rule_sets));
  end if;
  if r.n_job_lines is null or r.n_job_lines < 1 or r.n_job_lines > lim.max_job_lines then
    perform planner_private.refuse('PL011', 'job_lines',
      format('n_job_lines must be between 1 and %s (got %s)', lim.max_job_lines, r.n_job_lines),
      format('ask for 1 to %s job lines', lim.max_job_lines));
  end if;

  -- The time cap: what the options ask for, capped (not refused: the solver may stop before
  -- its limit anyway, and clients always got the cap); what they do not say, the default.
  -- A value that is not a positive number is left to the listener's validation.
  v_requested := case when jsonb_typeof(r.options -> 'time_limit_seconds') = 'number'
                      then (r.options ->> 'time_limit_seconds')::numeric end;
  r.time_limit_s := case
    when v_requested is null or v_requested <= 0
      then least(lim.default_time_limit_s, lim.max_time_limit_s)
    else ceil(least(v_requested, lim.max_time_limit_s))::integer end;

  -- the problem the run would load (load_problem): terms, demand rows, teams
  select count(*) into v_n from (
    select 1 from public.terms t where t.allocation_run_id = r.allocation_run_id
     limit 10::bigint * lim.max_terms + 1) x;
  if v_n > lim.max_terms then
    perform planner_private.refuse('PL040', 'terms',
      format('the allocation run has %s terms (limit %s)',
             planner_private.shown_count(v_n, lim.max_terms), lim.max_terms),
      'plan fewer terms per allocation run; ' || raise_it);
  end if;
  select count(*) into v_n from (
    select 1 from public.team_demand d where d.allocation_run_id = r.allocation_run_id
     limit 10::bigint * lim.max_demand_rows + 1) x;
  if v_n > lim.max_demand_rows then
    perform planner_private.refuse('PL040', 'demand_rows',
      format('the allocation run has %s team_demand rows (limit %s)',
             planner_private.shown_count(v_n, lim.max_demand_rows), lim.max_demand_rows),
      'remove demand rows of teams the run does not need; ' || raise_it);
  end if;
  select count(*) into v_n from (
    select d.team_id from public.team_demand d where d.allocation_run_id = r.allocation_run_id
    union
    select ro.team_id from public.job_lines l join public.rotations ro on ro.job_line_id = l.id
     where l.allocation_run_id = r.allocation_run_id
    limit 10::bigint * lim.max_teams + 1) x;
  if v_n > lim.max_teams then
    perform planner_private.refuse('PL040', 'teams',
      format('the problem lists %s teams (teams with demand in the allocation run or in its '
             'plan; limit %s)', planner_private.shown_count(v_n, lim.max_teams), lim.max_teams),
      'give demand only to the teams this allocation run plans; ' || raise_it);
  end if;

  -- Serialise run requests (and restores) of one organisation for the rest of this
  -- transaction, so the checks below are exact even for simultaneous requests (each statement
  -- after the lock sees what the previous holder committed; the AFTER INSERT trigger writes
  -- the ledger entry before the lock is released). The partial unique index stays as backstop.
  perform pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtextextended('planner_run_request:' || r.organization_id::text, 0));

  if exists (select 1 from public.allocation_planner_runs x
              where x.allocation_run_id = r.allocation_run_id
                and x.status in ('PENDING', 'GENERATING')) then
    perform planner_private.refuse('PL013', 'active_run',
      'a planner run is already pending or generating for this allocation run',
      'wait for it to finish or cancel it first');
  end if;

  select count(*) into v_n from planner_private.usage_ledger l
   where l.organization_id = r.organization_id and l.settled_at is null;
  if v_n >= lim.queued_runs then
    perform planner_private.refuse('PL043', 'queued_runs',
      format('the organisation has %s planner runs pending or generating (limit %s)',
             v_n, lim.queued_runs),
      'wait for one of them to finish, or cancel one; ' || raise_it);
  end if;

  select * into v_hour from planner_private.usage_in(r.organization_id, interval '1 hour');
  if v_hour.runs >= lim.runs_per_hour then
    v_at := planner_private.fits_at(r.organization_id, interval '1 hour', 'run', false, 1,
                                    lim.runs_per_hour);
    perform planner_private.refuse('PL014', 'runs_per_hour',
      format('the organisation has requested %s planner runs in the last hour (limit %s)',
             v_hour.runs, lim.runs_per_hour),
      coalesce(planner_private.wait_until(v_at) || ', when the oldest of them leaves the hour',
               'this organisation may request no runs')
        || '; ' || raise_it);
  end if;
  if v_hour.solver_seconds + r.time_limit_s > lim.solver_seconds_per_hour then
    v_at := planner_private.fits_at(r.organization_id, interval '1 hour', 'run', true,
                                    r.time_limit_s, lim.solver_seconds_per_hour);
    perform planner_private.refuse('PL042', 'solver_seconds_hour',
      format('this run reserves %s solver-seconds and the organisation has used or reserved '
             '%s in the last hour (limit %s per hour)', r.time_limit_s,
             round(v_hour.solver_seconds), lim.solver_seconds_per_hour),
      concat_ws('; ', planner_private.wait_until(v_at),
                format('%s a time_limit_seconds of at most %s',
                       case when v_at is null then 'ask for' else 'or ask for' end,
                       floor(greatest(lim.solver_seconds_per_hour - v_hour.solver_seconds, 0))),
                raise_it));
  end if;
  select * into v_day from planner_private.usage_in(r.organization_id, interval '1 day');
  if v_day.solver_seconds + r.time_limit_s > lim.solver_seconds_per_day then
    v_at := planner_private.fits_at(r.organization_id, interval '1 day', 'run', true,
                                    r.time_limit_s, lim.solver_seconds_per_day);
    perform planner_private.refuse('PL042', 'solver_seconds_day',
      format('this run reserves %s solver-seconds and the organisation has used or reserved '
             '%s in the last 24 hours (limit %s per day)', r.time_limit_s,
             round(v_day.solver_seconds), lim.solver_seconds_per_day),
      concat_ws('; ', planner_private.wait_until(v_at),
                format('%s a time_limit_seconds of at most %s',
                       case when v_at is null then 'ask for' else 'or ask for' end,
                       floor(greatest(lim.solver_seconds_per_day - v_day.solver_seconds, 0))),
                raise_it));
  end if;

  return r;
end
$$;

-- What the insert trigger calls for a signed-in user's request (it runs as the user, so the
-- user may execute this): membership first, so a non-member learns nothing about the
-- organisation's allocation runs and never takes its request lock. Sets max_attempts.
create function planner_private.admit_user_run(p_run public.allocation_planner_runs)
returns public.allocation_planner_runs
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  if not planner_private.can_plan(p_run.organization_id) then
    perform planner_private.refuse('PL012', 'not_a_planner',
      'only planners and admins of the organisation can request a planner run',
      'ask an admin of the organisation for the planner role');
  end if;
  r := planner_private.admission_checks(p_run, 'PL012');
  select s.max_attempts into strict r.max_attempts from planner_engine.settings s where s.id;
  return r;
end
$$;

-- The same for a request of a privileged database role (the service role, an operator): no
-- membership, but the caller must really be such a role.
create function planner_private.admit_privileged_run(p_run public.allocation_planner_runs)
returns public.allocation_planner_runs
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if not planner_private.caller_is_privileged() then
    raise exception using errcode = '42501',
      message = 'only the service role may request a planner run without membership';
  end if;
  return planner_private.admission_checks(p_run, 'PL002');
end
$$;

-- BEFORE INSERT on allocation_planner_runs. SECURITY INVOKER on purpose: it needs the
-- inserting role in current_user to tell a user's request from the service role's.
-- A rule set listed twice would be refused by the solver; since the intent is unambiguous,
-- duplicate codes are dropped here (after the admission, which refuses an oversized list
-- before any work proportional to it), keeping the first position.
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
    new := planner_private.admit_user_run(new);
  else
    new := planner_private.admit_privileged_run(new);
  end if;
  -- Duplicates are dropped, first position kept: ['A','B','A'] -> ['A','B'].
  new.constraints := array(
    select c from unnest(new.constraints) with ordinality as u(c, i)
     group by c order by min(i));
  return new;
end
$$;

create trigger allocation_planner_runs_before_insert
  before insert on public.allocation_planner_runs
  for each row execute function planner_private.allocation_planner_runs_before_insert();

-- -- the ledger (issue 13) -----------------------------------------------------------------
-- AFTER INSERT: the admitted run's entry, reserving its time_limit_s. Still under the
-- organisation's request lock taken by the admission, so the next request sees it. A trigger
-- function, so nobody can call it to write an entry without a run.
create function planner_private.allocation_planner_runs_charge()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_final boolean := new.status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED');
begin
  insert into planner_private.usage_ledger
    (organization_id, kind, run_id, allocation_run_id, reserved_s, settled_at, outcome)
  values (new.organization_id, 'run', new.id, new.allocation_run_id, new.time_limit_s,
          case when v_final then now() end, case when v_final then new.status end);
  return null;
end
$$;

create trigger allocation_planner_runs_charge
  after insert on public.allocation_planner_runs
  for each row execute function planner_private.allocation_planner_runs_charge();

-- Settling: when an attempt ends (GENERATING -> anything) its wall time since the claim,
-- capped at the run's time_limit_s (the cap is what the organisation asked for; a listener's
-- own delays are not its bill), is added to used_s; when the run ends (a terminal status) the
-- entry is settled and from then on counts what was used instead of what was reserved. A
-- trigger on the runs table, so every path (commit_plan, finish_run, the sweeper, claim_run
-- at max_attempts, request_cancel, an operator's UPDATE) settles alike.
create function planner_private.allocation_planner_runs_settle()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_used numeric := 0;
  v_final boolean := new.status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED');
begin
  if old.status = 'GENERATING' then
    v_used := least(greatest(extract(epoch from now() - coalesce(old.claimed_at, now())), 0),
                    old.time_limit_s);
  end if;
  update planner_private.usage_ledger l
     set used_s = l.used_s + v_used,
         settled_at = case when v_final then now() end,
         outcome = case when v_final then new.status end
   where l.run_id = new.id and l.organization_id = new.organization_id
     and l.settled_at is null;
  return null;
end
$$;

create trigger allocation_planner_runs_settle
  after update of status on public.allocation_planner_runs
  for each row
  when (old.status is distinct from new.status
        and (old.status = 'GENERATING'
             or new.status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')))
  execute function planner_private.allocation_planner_runs_settle();

-- Deleting a queued or generating run (directly, or by deleting its allocation run) settles
-- its entry: it stays in the windows (runs per hour, seconds), so deleting gives nothing
-- back. A GENERATING run is charged its whole time_limit_s: its listener only notices at its
-- next heartbeat, and a refund would make "delete and ask again" cheaper than waiting.
create function planner_private.allocation_planner_runs_settle_deleted()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  update planner_private.usage_ledger l
     set used_s = l.used_s + case when old.status = 'GENERATING' then old.time_limit_s else 0 end,
         settled_at = now(),
         outcome = 'DELETED'
   where l.run_id = old.id and l.organization_id = old.organization_id
     and l.settled_at is null;
  return null;
end
$$;

create trigger allocation_planner_runs_settle_deleted
  after delete on public.allocation_planner_runs
  for each row when (old.status in ('PENDING', 'GENERATING'))
  execute function planner_private.allocation_planner_runs_settle_deleted();

-- A restore (public.restore_job_lines) passes restores_per_hour and is recorded; each restore
-- writes a snapshot, and 200 calls made 201 snapshots (issue 13, finding 4). Under the same
-- per-organisation lock as run requests.
create function planner_private.admit_restore(p_organization_id uuid, p_allocation_run_id uuid)
returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  lim planner_engine.limits := planner_private.limits_of(p_organization_id);
  v_hour record;
begin
  perform pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtextextended('planner_run_request:' || p_organization_id::text, 0));
  select * into v_hour from planner_private.usage_in(p_organization_id, interval '1 hour');
  if v_hour.restores >= lim.restores_per_hour then
    perform planner_private.refuse('PL045', 'restores_per_hour',
      format('the organisation has restored %s plans in the last hour (limit %s)',
             v_hour.restores, lim.restores_per_hour),
      coalesce(planner_private.wait_until(planner_private.fits_at(
                 p_organization_id, interval '1 hour', 'restore', false, 1,
                 lim.restores_per_hour)) || ', when the oldest of them leaves the hour',
               'this organisation may not restore plans')
        || '; an operator can raise the limit (planner limits set)');
  end if;
  insert into planner_private.usage_ledger
    (organization_id, kind, allocation_run_id, settled_at, outcome)
  values (p_organization_id, 'restore', p_allocation_run_id, now(), 'RESTORED');
end
$$;

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
