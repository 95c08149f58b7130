-- Planner schema, part 5: make load_problem's output always acceptable to the solver's strict
-- problem model (solver/problem.py), found by validating real output against it.
--
-- 1. previous_plan may only name teams listed in "teams". A manager can move a rotation to a
--    team that has no demand row in this allocation run, so "teams" is now the teams with
--    demand PLUS the teams the current plan uses.
-- 2. previous_plan may not contain lines beyond n_job_lines. When a planner asks for fewer
--    lines than the current plan has, the surplus lines (and their pins) are left out of the
--    problem: the new plan has no such lines, and the old ones stay in job_lines_history.
-- 3. A rule set listed twice is refused by the solver; the run-insert trigger now drops
--    duplicate codes (keeping the first position), since the intent is unambiguous.

create or replace function planner_engine.load_problem(p_run_id uuid, p_lease uuid)
returns jsonb
language plpgsql stable security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
  v_prev jsonb;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id;
  if not found or r.status <> 'GENERATING' or r.lease is distinct from p_lease then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;

  v_prev := planner_private.current_plan(r.allocation_run_id, false);
  if v_prev is not null then
    select case when count(*) = 0 then null
                else jsonb_build_object('lines', jsonb_agg(x order by (x ->> 'line')::integer)) end
      into v_prev
      from jsonb_array_elements(v_prev -> 'lines') x
     where (x ->> 'line')::integer <= r.n_job_lines;
  end if;

  -- Strings are never JSON null (the solver's models are strict): '' stands for "none".
  return jsonb_build_object(
    'terms', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', t.id::text, 'name', t.name, 'weeks', t.weeks) order by t.ordinal), '[]')
        from public.terms t where t.allocation_run_id = r.allocation_run_id),
    'teams', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', tm.id::text, 'name', tm.name, 'specialty', tm.specialty,
               'subspecialty', coalesce(tm.subspecialty, ''), 'kind', tm.kind,
               'experiences', to_jsonb(tm.experiences), 'site', coalesce(tm.site, ''),
               'rural', tm.rural, 'tags', to_jsonb(tm.tags)) order by tm.name, tm.id), '[]')
        from public.teams tm
       where tm.organization_id = r.organization_id
         and (exists (select 1 from public.team_demand d
                       where d.allocation_run_id = r.allocation_run_id and d.team_id = tm.id)
              or exists (select 1 from public.rotations ro
                          where ro.allocation_run_id = r.allocation_run_id
                            and ro.team_id = tm.id))),
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
    'previous_plan', v_prev,
    'options', coalesce(r.options, '{}'::jsonb));
end
$$;

create or replace function planner_private.allocation_planner_runs_before_insert()
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
