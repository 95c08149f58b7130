-- Issue 13, fair share and liveness (helper h-fair):
-- * claim_run without a run id takes the next run in a round robin across organisations
--   (least recently claimed organisation first, its oldest run), remembered in
--   planner_private.organization_claims, so every listener replica follows one order;
-- * planner_private.listener_heartbeats + planner_engine.listener_heartbeat: listener liveness;
--   the sweeper fails a PENDING run by timeout only when no listener was alive for the TTL;
-- * queue positions and an estimated start: planner_engine.queue_positions for the listener's
--   announcements, public.planner_run_queue_position for members of the run's organisation.
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

create index allocation_planner_runs_finished_idx
  on public.allocation_planner_runs (finished_at) where finished_at is not null;

revoke all on planner_private.organization_claims, planner_private.listener_heartbeats
  from public, anon, authenticated, planner_engine;

create or replace function planner_engine.claim_run(p_worker_id text, p_run_id uuid default null)
returns setof public.allocation_planner_runs
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v public.allocation_planner_runs;
  v_lease uuid;
begin
  if p_worker_id is null or length(btrim(p_worker_id)) = 0 then
    raise exception using errcode = '22023', message = 'claim_run needs a worker id';
  end if;
  loop
    -- SKIP LOCKED: concurrent claimers each get a different run (or none) without waiting.
    -- Concurrent claimers that pick the same organisation get its next runs, one each.
    select r.* into v
      from public.allocation_planner_runs r
      left join planner_private.organization_claims c on c.organization_id = r.organization_id
     where r.status = 'PENDING' and (p_run_id is null or r.id = p_run_id)
     order by c.last_claimed_at nulls first, r.created_at, r.id
     limit 1
       for update of r skip locked;
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

    v_lease := gen_random_uuid();
    update public.allocation_planner_runs r
       set status = 'GENERATING',
           attempts = r.attempts + 1,
           worker_id = p_worker_id,
           lease = planner_private.lease_digest(v_lease),
           claimed_at = now(),
           heartbeat_at = now(),
           error = null
     where r.id = v.id
    returning r.* into v;
    -- clock_timestamp(): two claims in one transaction (a test's) still get distinct times.
    insert into planner_private.organization_claims as oc (organization_id, last_claimed_at)
    values (v.organization_id, clock_timestamp())
    on conflict (organization_id) do update set last_claimed_at = excluded.last_claimed_at;
    v.lease := v_lease;
    return next v;
    return;
  end loop;
end
$$;

create function planner_engine.listener_heartbeat(p_worker_id text, p_stopping boolean default false)
returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if p_worker_id is null or length(btrim(p_worker_id)) = 0 or length(p_worker_id) > 200 then
    raise exception using errcode = '22023',
      message = 'listener_heartbeat needs a worker id of 1 to 200 characters';
  end if;
  if coalesce(p_stopping, false) then
    delete from planner_private.listener_heartbeats where worker_id = p_worker_id;
    return;
  end if;
  insert into planner_private.listener_heartbeats (worker_id, beat_at)
  values (p_worker_id, now())
  on conflict (worker_id) do update set beat_at = excluded.beat_at;
end
$$;

create function planner_private.queue_positions()
returns table (run_id uuid, organization_id uuid, runs_ahead integer)
language sql stable set search_path = ''
as $$
  with p as (
    select r.id, r.organization_id,
           row_number() over (partition by r.organization_id order by r.created_at, r.id) as k
      from public.allocation_planner_runs r
     where r.status = 'PENDING'
  ), o as (
    select r.organization_id, count(*) as n, min(r.created_at) as oldest
      from public.allocation_planner_runs r
     where r.status = 'PENDING'
     group by r.organization_id
  ), ranked as (
    select o.organization_id, o.n,
           row_number() over (order by c.last_claimed_at nulls first, o.oldest,
                              o.organization_id) as rank
      from o
      left join planner_private.organization_claims c on c.organization_id = o.organization_id
  )
  select p.id, p.organization_id,
         ((p.k - 1) + coalesce((
            select sum(least(x.n, case when x.rank < me.rank then p.k else p.k - 1 end))
              from ranked x
             where x.organization_id <> p.organization_id), 0))::integer
    from p
    join ranked me on me.organization_id = p.organization_id
$$;

-- Listeners that beat within the stale-run TTL: those that could take a run now.
create function planner_private.live_listeners()
returns integer
language sql stable set search_path = ''
as $$
  select count(*)::integer
    from planner_private.listener_heartbeats h, planner_engine.settings s
   where s.id and h.beat_at > now() - s.stale_run_ttl
$$;

create function planner_private.estimated_start(p_runs_ahead integer)
returns timestamptz
language sql stable set search_path = ''
as $$
  with l as (
    select planner_private.live_listeners() as live
  ), d as (
    select coalesce(avg(extract(epoch from x.finished_at - x.claimed_at)), 60) as avg_s
      from (select r.finished_at, r.claimed_at
              from public.allocation_planner_runs r
             where r.finished_at > now() - interval '1 day' and r.claimed_at is not null
               and r.status in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')
             order by r.finished_at desc
             limit 50) x
  ), b as (
    select count(*)::integer as busy
      from public.allocation_planner_runs r where r.status = 'GENERATING'
  )
  select case when l.live = 0 then null
              else now() + pg_catalog.make_interval(secs => d.avg_s * pg_catalog.ceil(
                     greatest(p_runs_ahead + b.busy + 1 - l.live, 0)::numeric / l.live))
         end
    from l, d, b
$$;

create function planner_engine.queue_positions(p_limit integer)
returns table (id uuid, runs_ahead integer, estimated_start timestamptz)
language sql stable security definer set search_path = ''
as $$
  select q.run_id, q.runs_ahead, planner_private.estimated_start(q.runs_ahead)
    from planner_private.queue_positions() q
   order by q.runs_ahead, q.run_id
   limit least(greatest(coalesce(p_limit, 0), 0), 1000)
$$;

create function public.planner_run_queue_position(p_run_id uuid)
returns table (status text, runs_ahead integer, estimated_start timestamptz,
               live_listeners integer)
language plpgsql stable security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id;
  if not found or not (planner_private.is_member(r.organization_id)
                       or planner_private.caller_is_privileged()) then
    raise exception using errcode = 'PL012',
      message = format('planner run %s not found, or you are not a member of its organisation',
                       p_run_id),
      hint = 'members of the run''s organisation can follow its place in the queue';
  end if;
  status := r.status;
  live_listeners := planner_private.live_listeners();
  if r.status = 'PENDING' then
    select q.runs_ahead into runs_ahead from planner_private.queue_positions() q
     where q.run_id = r.id;
    estimated_start := planner_private.estimated_start(runs_ahead);
  elsif r.status = 'GENERATING' then
    runs_ahead := 0;
    estimated_start := r.claimed_at;
  end if;
  return next;
end
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
    'planner_engine.listener_heartbeat(text, boolean)',
    'planner_engine.queue_positions(integer)'
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

create or replace function planner_private.sweep_stale_runs(
  p_ttl interval default null,
  p_pending_ttl interval default null
) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  n_stale integer;
  n_pending integer;
begin
  select coalesce(p_ttl, s.stale_run_ttl), coalesce(p_pending_ttl, s.pending_run_ttl)
    into strict p_ttl, p_pending_ttl
    from planner_engine.settings s where s.id;
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
  -- Only while no listener is alive (no listener heartbeat within the pending TTL): a run
  -- that waits because live listeners are busy with other organisations' runs keeps waiting
  -- for its turn in claim_run's round robin instead of failing unsolved.
  with failed as (
    update public.allocation_planner_runs r
       set status = 'FAILED', finished_at = now(),
           error = format('no planner picked this run up within %s, and no listener was '
                          'alive during that time', p_pending_ttl)
     where r.status = 'PENDING'
       and greatest(r.created_at, r.heartbeat_at) < now() - p_pending_ttl
       and not exists (select 1 from planner_private.listener_heartbeats h
                        where h.beat_at >= now() - p_pending_ttl)
    returning r.id, r.organization_id, r.created_at, r.heartbeat_at
  )
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, level, message, context)
  select f.id, f.organization_id, 'ERROR',
         format('Timeout: no planner picked this run up within %s and no listener was alive '
                '(queued since %s, last heartbeat %s); run failed', p_pending_ttl,
                greatest(f.created_at, f.heartbeat_at), coalesce(f.heartbeat_at::text, 'never')),
         jsonb_build_object('event', 'sweep_pending', 'new_status', 'FAILED',
                            'created_at', f.created_at, 'last_heartbeat_at', f.heartbeat_at,
                            'pending_ttl_seconds', extract(epoch from p_pending_ttl))
    from failed f;
  get diagnostics n_pending = row_count;

  -- Listeners gone for a day are forgotten (each beat re-creates its row).
  delete from planner_private.listener_heartbeats h where h.beat_at < now() - interval '1 day';

  return n_stale + n_pending;
end
$$;

revoke all on function planner_engine.listener_heartbeat(text, boolean),
  planner_engine.queue_positions(integer)
  from public, anon, authenticated;
revoke all on function planner_private.queue_positions(), planner_private.estimated_start(integer),
  planner_private.live_listeners()
  from public, anon, authenticated;
grant execute on function planner_engine.listener_heartbeat(text, boolean),
  planner_engine.queue_positions(integer)
  to planner_engine, service_role;
-- (service_role revoked and granted again: the same ACL order as the schema files build)
revoke all on function public.planner_run_queue_position(uuid) from public, anon, service_role;
grant execute on function public.planner_run_queue_position(uuid) to authenticated;
grant execute on function public.planner_run_queue_position(uuid) to service_role;
