-- Issue 13, limits and ledger. Mirrors migrations/schema/10_tables.sql, 20_rules.sql,
-- 30_engine.sql and 40_access.sql:
-- * ONE limits table, planner_engine.limits (a default row, named tiers, organisations' own
--   rows); settings.max_job_lines, settings.max_runs_per_hour and
--   organizations.max_runs_per_hour move into it (their values with them);
-- * a ledger, planner_private.usage_ledger, that deleting runs or allocation runs cannot
--   shrink: run rate, queued runs, solver-seconds per hour and per day, restores per hour;
-- * runs.time_limit_s: the per-run time cap, decided at insert, read by the listener;
-- * every refusal at insert with a SQLSTATE, the limit and the value, counted in a sequence per
--   reason that planner_engine.refusal_counts() reads for /metrics.

-- -- the limits table, with the values of before --------------------------------------------
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

update planner_engine.limits l
   set max_job_lines = s.max_job_lines, runs_per_hour = s.max_runs_per_hour
  from planner_engine.settings s
 where l.tier = 'default' and s.id;
insert into planner_engine.limits (organization_id, runs_per_hour)
select o.id, o.max_runs_per_hour from public.organizations o where o.max_runs_per_hour is not null;
alter table public.organizations drop column max_runs_per_hour;
alter table planner_engine.settings drop column max_job_lines, drop column max_runs_per_hour;
comment on table planner_engine.settings is
  'Singleton: engine-wide retries and timeouts. Per-organisation limits: planner_engine.limits.';

-- -- the runs' time cap ---------------------------------------------------------------------
-- Runs of before: what their options asked for, capped at the listener's former default cap
-- (120 s); without a number, the solver's default (30 s).
alter table public.allocation_planner_runs add column time_limit_s integer check (time_limit_s >= 1);
update public.allocation_planner_runs r
   set time_limit_s = case
     when jsonb_typeof(r.options -> 'time_limit_seconds') = 'number'
          and (r.options ->> 'time_limit_seconds')::numeric > 0
       then ceil(least((r.options ->> 'time_limit_seconds')::numeric, 120))::integer
     else 30 end;
alter table public.allocation_planner_runs alter column time_limit_s set not null;

-- The ledger starts with the runs still queued and those of the last day, so the windows and
-- the queue count are right from the first request after the migration.
insert into planner_private.usage_ledger
  (organization_id, kind, run_id, allocation_run_id, at, reserved_s, used_s, settled_at, outcome)
select r.organization_id, 'run', r.id, r.allocation_run_id, r.created_at, r.time_limit_s,
       case when r.finished_at is not null and r.claimed_at is not null
            then least(greatest(extract(epoch from r.finished_at - r.claimed_at), 0), r.time_limit_s)
            else 0 end,
       r.finished_at, case when r.finished_at is not null then r.status end
  from public.allocation_planner_runs r
 where r.status in ('PENDING', 'GENERATING') or r.created_at > now() - interval '1 day';

-- -- admission -------------------------------------------------------------------------------
drop function planner_private.admit_user_run(uuid, uuid, integer, text[]);
drop function planner_private.admit_privileged_run(uuid, uuid, integer, text[]);
drop function planner_private.admission_checks(uuid, uuid, integer, text[], text);

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

create or replace function public.restore_job_lines(p_snapshot_id uuid)
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
  -- restores_per_hour (PL045), and the restore's ledger entry (20_rules.sql).
  perform planner_private.admit_restore(h.organization_id, h.allocation_run_id);
  -- The plan being replaced is snapshotted first, so the restore itself can be undone.
  return planner_private.replace_plan(
    h.allocation_run_id, h.organization_id, h.plan, null, h.id, auth.uid());
end
$$;

create function planner_engine.refusal_counts()
returns table (reason text, refusals bigint)
language sql stable security definer set search_path = ''
as $$
  select substr(s.sequencename, length('refused_') + 1), coalesce(s.last_value, 0)
    from pg_catalog.pg_sequences s
   where s.schemaname = 'planner_private' and s.sequencename like 'refused\_%'
   order by 1
$$;

create or replace function planner_engine.self_check(p_expected_version text default null)
returns table (check_name text, ok boolean, severity text, detail text)
language plpgsql stable security definer set search_path = ''
as $$
declare
  v_login name := session_user;
  v_applied text;
  v_fn text;
  v_super boolean;
  v_bypass boolean;
begin
  -- Schema version: the newest migration recorded (by `planner migrate` or the Supabase CLI).
  if pg_catalog.to_regclass('supabase_migrations.schema_migrations') is null then
    v_applied := null;
  else
    execute 'select max(version) from supabase_migrations.schema_migrations' into v_applied;
  end if;
  check_name := 'schema_version';
  severity := 'error';
  ok := v_applied is not null and (p_expected_version is null or v_applied >= p_expected_version);
  detail := case
    when v_applied is null then 'no migrations are recorded in this database'
    when ok then format('database at migration %s', v_applied)
    else format('database at migration %s, this listener needs %s', v_applied, p_expected_version)
  end;
  return next;

  -- Every function the listener calls, executable by the login role.
  foreach v_fn in array array[
    'planner_engine.claim_run(text, uuid)',
    'planner_engine.heartbeat(uuid, uuid)',
    'planner_engine.load_problem(uuid, uuid)',
    'planner_engine.commit_plan(uuid, uuid, uuid, jsonb, jsonb)',
    'planner_engine.finish_run(uuid, uuid, text, text, jsonb)',
    'planner_engine.write_logs(jsonb)',
    'planner_engine.pending_runs(integer)',
    'planner_engine.refusal_counts()'
  ] loop
    check_name := 'execute ' || v_fn;
    severity := 'error';
    if pg_catalog.to_regprocedure(v_fn) is null then
      ok := false;
      detail := 'function missing';
    else
      ok := pg_catalog.has_function_privilege(v_login, v_fn, 'execute');
      detail := case when ok then 'granted' else format('role %s may not execute it', v_login) end;
    end if;
    return next;
  end loop;

  -- A superuser (or BYPASSRLS) login works, but a leaked listener credential would then be a
  -- full-database credential.
  select r.rolsuper, r.rolbypassrls into v_super, v_bypass
    from pg_catalog.pg_roles r where r.rolname = v_login;
  check_name := 'least_privilege';
  severity := 'warning';
  ok := not coalesce(v_super or v_bypass, false);
  detail := case when ok then format('role %s is not a superuser', v_login)
                 else format('role %s is a superuser or bypasses RLS', v_login) end;
  return next;

  -- Without the table in the publication no insert wakes the listener: runs are found only by
  -- the catch-up scan.
  check_name := 'realtime_publication';
  severity := 'warning';
  ok := exists (select from pg_catalog.pg_publication_tables p
                 where p.pubname = 'supabase_realtime' and p.schemaname = 'public'
                   and p.tablename = 'allocation_planner_runs');
  detail := case when ok then 'allocation_planner_runs is in supabase_realtime'
                 else 'allocation_planner_runs is not in the supabase_realtime publication' end;
  return next;
end
$$;

-- -- privileges ------------------------------------------------------------------------------
revoke all on planner_engine.limits, planner_private.usage_ledger
  from public, anon, authenticated, planner_engine;
alter table planner_engine.limits enable row level security;
alter table planner_private.usage_ledger enable row level security;
revoke all on function
  planner_private.limits_of(uuid),
  planner_private.refuse(text, text, text, text),
  planner_private.charged_s(planner_private.usage_ledger),
  planner_private.usage_in(uuid, interval),
  planner_private.fits_at(uuid, interval, text, boolean, numeric, numeric),
  planner_private.wait_until(timestamptz),
  planner_private.shown_count(bigint, integer),
  planner_private.admission_checks(public.allocation_planner_runs, text),
  planner_private.admit_user_run(public.allocation_planner_runs),
  planner_private.admit_privileged_run(public.allocation_planner_runs),
  planner_private.allocation_planner_runs_charge(),
  planner_private.allocation_planner_runs_settle(),
  planner_private.allocation_planner_runs_settle_deleted(),
  planner_private.admit_restore(uuid, uuid),
  planner_engine.refusal_counts()
  from public, anon, authenticated;
grant execute on function planner_engine.refusal_counts() to planner_engine, service_role;
grant execute on function planner_private.admit_user_run(public.allocation_planner_runs)
  to authenticated;
grant execute on function planner_private.admit_privileged_run(public.allocation_planner_runs)
  to service_role;
