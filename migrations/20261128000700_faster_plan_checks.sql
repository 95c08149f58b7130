-- commit_plan of a 250-line plan took ~90 ms, over the listener's 100 ms overhead budget
-- together with claim and load (docs/benchmarks.md). check_plan looked up the term and the
-- team of every rotation (2 x 1,250 index probes at 250 lines); it now checks each distinct
-- term and team once. Same checks, same SQLSTATEs and messages.

create or replace function planner_private.check_plan(
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

