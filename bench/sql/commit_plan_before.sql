-- PRE-ISSUE-11 BASELINE, KEPT FOR COMPARISON ONLY. Never applied by `planner migrate`.
--
-- planner_engine.commit_plan as it was before issue 11 made it set-based (migrations
-- 20261128000200/000300/000700), with the helpers it calls (current_plan, check_plan,
-- replace_plan, raise_lease_lost), moved into the scratch schema `bench_before` so that
-- bench/commit_bench.py can time it beside today's function on the same database, in the same
-- run. It writes the same public tables. Text unchanged apart from the schema names and the
-- lease check, which compares the lease's digest since issue 14 (the runs table keeps only
-- planner_private.lease_digest of the lease claim_run returns).

drop schema if exists bench_before cascade;
create schema bench_before;

create function bench_before.raise_lease_lost(p_run_id uuid, p_status text)
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

create function bench_before.current_plan(p_allocation_run_id uuid, p_with_provenance boolean)
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

create function bench_before.check_plan(
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

  -- Each distinct term once (5 lookups, not one per rotation).
  select r.key into v_bad
    from (select distinct r.key
            from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r) r
   where not exists (select 1 from public.terms t
                      where t.id = r.key::uuid and t.allocation_run_id = p_allocation_run_id
                        and t.organization_id = p_organization_id)
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PL002',
      message = format('term %s is not a term of allocation run %s', v_bad, p_allocation_run_id),
      hint = 'a plan may only use the terms of its own allocation run';
  end if;

  -- Each distinct team once (a few dozen lookups, not one per rotation).
  select r.value into v_bad
    from (select distinct r.value
            from jsonb_array_elements(p_plan -> 'lines') x, jsonb_each_text(x -> 'rotations') r) r
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

create function bench_before.replace_plan(
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
  perform bench_before.check_plan(p_plan, p_allocation_run_id, p_organization_id);

  v_old := bench_before.current_plan(p_allocation_run_id, true);
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

create function bench_before.commit_plan(
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
  if not found or r.status <> 'GENERATING' or r.lease is distinct from planner_private.lease_digest(p_lease) then
    perform bench_before.raise_lease_lost(p_run_id, r.status);
  end if;
  if p_organization_id is distinct from r.organization_id then
    raise exception using errcode = 'PL002',
      message = format('planner run %s belongs to organisation %s, not %s',
                       p_run_id, r.organization_id, p_organization_id),
      hint = 'pass the organization_id of the claimed run';
  end if;

  v_snapshot := bench_before.replace_plan(
    r.allocation_run_id, r.organization_id, p_plan, r.id, null, null);

  update public.allocation_planner_runs
     set status = 'COMPLETED', finished_at = now(), lease = null, error = null,
         result_metadata = coalesce(p_result_metadata, '{}'::jsonb)
   where id = p_run_id;
  return v_snapshot;
end
$$;
