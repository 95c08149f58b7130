-- Schema, part 3 of 4: the engine's API (schema planner_engine) and the two functions
-- users call (public.request_cancel, public.restore_job_lines).
--
-- The engine never touches tables directly. Every write is one of these functions, and every
-- write after the claim is fenced on the claim's lease: a worker that lost its run (swept,
-- re-queued, claimed by another worker) gets PL001 and nothing is written. Without the fence a
-- worker that stalled past the sweeper's TTL would still commit its plan over the newer run's
-- (a zombie completion), and a heartbeat racing the sweeper could revive a run the sweeper
-- had already handed to someone else; docs/reliability.md lists the tests of both.

create function planner_private.raise_lease_lost(p_run_id uuid, p_status text)
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

-- -- the lease -------------------------------------------------------------------------------
-- The lease is a secret of the worker that claimed the run: claim_run returns it once and the
-- runs table keeps only this digest (the first 128 bits of its SHA-256, as a uuid so the
-- column and its constraints keep their type). Members and Realtime subscribers can read the
-- column; a digest of 122 random bits cannot be turned back into a lease, so nobody but the
-- holder can heartbeat, load, commit, finish or log for the run.
create function planner_private.lease_digest(p_lease uuid)
returns uuid
language sql immutable strict set search_path = ''
as $$
  select pg_catalog.encode(
           pg_catalog.substr(pg_catalog.sha256(pg_catalog.uuid_send(p_lease)), 1, 16),
           'hex')::uuid
$$;

-- The same for a lease that arrives as JSON text: NULL (matches nothing) when it is not a
-- uuid, so one malformed log record cannot fail a whole batch.
create function planner_private.lease_digest_text(p_lease text)
returns uuid
language sql immutable strict set search_path = ''
as $$
  select case when p_lease operator(pg_catalog.~*)
                   '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
              then planner_private.lease_digest(p_lease::uuid) end
$$;

-- AFTER UPDATE OF lease on allocation_planner_runs: remember the lease a run just gave up
-- (commit, finish, re-queue, sweep, or an operator's UPDATE), for write_logs' grace period,
-- and forget it when the run is claimed again (only the run's last lease has a grace). A
-- trigger rather than a line in each function, so no release or claim path can forget it.
create function planner_private.allocation_planner_runs_remember_lease()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if old.lease is null then
    delete from planner_private.released_leases where run_id = new.id;
  else
    insert into planner_private.released_leases (run_id, lease, released_at)
    values (old.id, old.lease, now())
    on conflict (run_id) do update set lease = excluded.lease, released_at = excluded.released_at;
  end if;
  return null;
end
$$;
create trigger remember_released_lease
  after update of lease on public.allocation_planner_runs
  for each row when (new.lease is distinct from old.lease)
  execute function planner_private.allocation_planner_runs_remember_lease();

-- -- claim -----------------------------------------------------------------------------------
-- Returns the claimed run with `lease` set to the token itself (the row stores its digest).
--
-- Without a run id it claims "the next run", and the database alone decides which: round
-- robin across the organisations with PENDING runs, the organisation whose last claim is the
-- oldest (never claimed: first) going first, and within it its oldest run. The last claim of
-- each organisation is kept in planner_private.organization_claims, so every listener replica
-- follows the same order, and a flood of one organisation's runs makes any other
-- organisation's run wait for at most one of the flood's runs per listener (the one each
-- listener took just before). Round robin rather than "least solver time used recently": it
-- needs no accounting (that is the ledger's job, which refuses at insert) and its bound does
-- not depend on how long runs take. With a run id it claims that run only if it is PENDING
-- (an operator's or a test's explicit choice); the listener never passes one.
create function planner_engine.claim_run(p_worker_id text, p_run_id uuid default null)
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

-- -- heartbeat ------------------------------------------------------------------------------
-- Exactly one row. lease_held = false means: stop solving, the run is not yours any more.
create function planner_engine.heartbeat(p_run_id uuid, p_lease uuid)
returns table (lease_held boolean, cancel_requested boolean)
language sql volatile security definer set search_path = ''
as $$
  with hb as (
    -- Fenced like every engine write: the WHERE is re-checked against the row version a
    -- concurrent sweeper committed, so a heartbeat can never revive a swept run.
    update public.allocation_planner_runs r
       set heartbeat_at = now()
     where r.id = p_run_id and r.status = 'GENERATING'
       and r.lease = planner_private.lease_digest(p_lease)
    returning r.cancel_requested_at
  )
  select exists (select 1 from hb),
         coalesce((select hb.cancel_requested_at is not null from hb),
                  (select r.cancel_requested_at is not null
                     from public.allocation_planner_runs r where r.id = p_run_id),
                  false)
$$;

-- -- listener liveness --------------------------------------------------------------------------
-- The listener calls this on its heartbeat interval while it is able to claim runs (its
-- self-check passes and it is not draining), whether or not it is solving; p_stopping = true
-- when it shuts down. The sweeper reads these rows: a PENDING run is failed by timeout only
-- when no listener has beaten within the pending TTL. A narrow row of its own, never the runs
-- table: nothing a tenant inserts makes this write bigger, and no Realtime subscriber gets it.
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

-- -- queue positions ------------------------------------------------------------------------------
-- How many runs claim_run will hand out before each PENDING run, replaying its round robin on
-- the current state: organisations in claim order (last claim oldest first, never claimed
-- first, ties by their oldest pending run), each giving one run per round. The k-th pending
-- run of organisation O comes after its own k-1 older runs, after min(n, k) runs of every
-- organisation ordered before O and min(n, k-1) of every one ordered after O (n = that
-- organisation's pending runs). A snapshot: a run inserted by a never-claimed organisation
-- later goes ahead of organisations already served, by design.
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

-- When a run with p_runs_ahead runs before it should start: the live listeners (a beat within
-- the stale-run TTL) as servers, the average claim-to-finish time of the last 50 runs
-- finished in the past day (60 s when there is none) as the service time, and the runs being
-- solved now as occupying their listeners. NULL when no listener is alive: then nobody can
-- say. A rough figure for a progress line, built only from totals over every organisation.
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

-- The listener's queue announcements: every PENDING run's id, the runs ahead of it and its
-- estimated start (ids it already sees through pending_runs; no organisation, no size).
create function planner_engine.queue_positions(p_limit integer)
returns table (id uuid, runs_ahead integer, estimated_start timestamptz)
language sql stable security definer set search_path = ''
as $$
  select q.run_id, q.runs_ahead, planner_private.estimated_start(q.runs_ahead)
    from planner_private.queue_positions() q
   order by q.runs_ahead, q.run_id
   limit least(greatest(coalesce(p_limit, 0), 0), 1000)
$$;

-- -- the problem -----------------------------------------------------------------------------
-- Returns exactly the solver's Problem JSON (solver/problem.py: Problem, Team, PreviousPlan,
-- Options; those models refuse unknown keys), so the listener validates it as is:
-- * "teams" are the teams with demand in this allocation run PLUS the teams the current plan
--   uses: a manager can move a rotation to a team without demand, and previous_plan may only
--   name listed teams;
-- * a team without a site has "site": null ('' in the column means none as well); subspecialty
--   needs no default, the column is NOT NULL and non-blank (the 25 % rule groups by it);
-- * "previous_plan" leaves out lines beyond n_job_lines: asking for fewer lines than the
--   current plan has is a normal request; the surplus lines (and their pins) are not part of
--   the problem, the new plan has no such lines and the old ones stay in job_lines_history.
--   JSON null when no line is left;
-- * the UI's column `constraints` becomes "rule_sets" here, and only here;
-- * "options" is the column as stored (NOT NULL, an object; '{}' by default).
create function planner_engine.load_problem(p_run_id uuid, p_lease uuid)
returns jsonb
language plpgsql stable security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id;
  if not found or r.status <> 'GENERATING'
     or r.lease is distinct from planner_private.lease_digest(p_lease) then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;

  return jsonb_build_object(
    'terms', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', t.id::text, 'name', t.name, 'weeks', t.weeks) order by t.ordinal), '[]')
        from public.terms t where t.allocation_run_id = r.allocation_run_id),
    'teams', (
      select coalesce(jsonb_agg(jsonb_build_object(
               'id', tm.id::text, 'name', tm.name, 'specialty', tm.specialty,
               'subspecialty', tm.subspecialty, 'kind', tm.kind,
               'experiences', to_jsonb(tm.experiences), 'site', nullif(tm.site, ''),
               'rural', tm.rural, 'tags', to_jsonb(tm.tags)) order by tm.name, tm.id), '[]')
        from public.teams tm
       where tm.organization_id = r.organization_id
         and (exists (select 1 from public.team_demand d
                       where d.allocation_run_id = r.allocation_run_id and d.team_id = tm.id)
              -- through the lines: rotations has no index on team_id (10_tables.sql)
              or tm.id in (select ro.team_id
                             from public.job_lines l
                             join public.rotations ro on ro.job_line_id = l.id
                            where l.allocation_run_id = r.allocation_run_id))),
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
    'previous_plan', (
      select jsonb_build_object('lines', jsonb_agg(x order by (x ->> 'line')::integer))
        from jsonb_array_elements(
               planner_private.current_plan(r.allocation_run_id, false) -> 'lines') x
       where (x ->> 'line')::integer <= r.n_job_lines
      having count(*) > 0),
    'options', r.options);
end
$$;

-- -- results ---------------------------------------------------------------------------------
-- The listener's one write of a solved plan, p_plan in the shape of planner_private.check_plan
-- ({"lines": [{line, rotations: {term: team}, pinned: [term]}]}): fenced on the lease (PL001),
-- checked (PL002, PL004), the old plan snapshotted and replaced set-based (replace_plan), the
-- run COMPLETED, all in the caller's one transaction. Returns the snapshot id (NULL when the
-- allocation run had no lines yet).
create function planner_engine.commit_plan(
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
  if not found or r.status <> 'GENERATING'
     or r.lease is distinct from planner_private.lease_digest(p_lease) then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;
  if p_organization_id is distinct from r.organization_id then
    raise exception using errcode = 'PL002',
      message = format('planner run %s belongs to organisation %s, not %s',
                       p_run_id, r.organization_id, p_organization_id),
      hint = 'pass the organization_id of the claimed run';
  end if;

  v_snapshot := planner_private.replace_plan(
    r.allocation_run_id, r.organization_id, p_plan, r.id, null, null);

  update public.allocation_planner_runs
     set status = 'COMPLETED', finished_at = now(), lease = null, error = null,
         result_metadata = coalesce(p_result_metadata, '{}'::jsonb)
   where id = p_run_id;
  return v_snapshot;
end
$$;

create function planner_engine.finish_run(
  p_run_id uuid,
  p_lease uuid,
  p_status text,
  p_error text default null,
  p_result_metadata jsonb default null
) returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
  v_status text := p_status;
begin
  if p_status is null or p_status not in ('FAILED', 'INFEASIBLE', 'CANCELLED', 'PENDING') then
    raise exception using errcode = '22023',
      message = format('finish_run: status must be FAILED, INFEASIBLE, CANCELLED or PENDING, '
                       'not %s', coalesce(p_status, 'NULL')),
      hint = 'use commit_plan to complete a run';
  end if;
  select * into r from public.allocation_planner_runs where id = p_run_id for update;
  if not found or r.status <> 'GENERATING'
     or r.lease is distinct from planner_private.lease_digest(p_lease) then
    perform planner_private.raise_lease_lost(p_run_id, r.status);
  end if;
  -- Re-queueing a run the user asked to stop would only restart it: cancel it instead.
  if v_status = 'PENDING' and r.cancel_requested_at is not null then
    v_status := 'CANCELLED';
  end if;
  update public.allocation_planner_runs
     set status = v_status,
         lease = null,
         -- A graceful re-queue (SIGTERM, deploy) is not the run's fault: give the attempt back
         -- so rolling deploys cannot push a healthy run to max_attempts. Crashes are still
         -- counted, because only the sweeper re-queues those.
         attempts = case when v_status = 'PENDING' then greatest(r.attempts - 1, 0)
                         else r.attempts end,
         worker_id = case when v_status = 'PENDING' then null else r.worker_id end,
         finished_at = case when v_status = 'PENDING' then null else now() end,
         error = p_error,
         result_metadata = coalesce(p_result_metadata, r.result_metadata)
   where id = p_run_id;
end
$$;

-- -- logs --------------------------------------------------------------------------------------
-- The listener's batching sink, fenced on the lease like every other engine write. Each record
-- is {"planner_run_id", "lease", "level", "message", "context", "traceback"}; it is written
-- when its lease is the run's current one, or the run's last lease released less than
-- settings.log_grace ago (the sink flushes in batches, so a run's last lines usually arrive
-- after finish_run). Any other record (unknown run, forged or stale lease, not an object) is
-- skipped, not an error, so one bad record cannot lose a whole batch; the return value is the
-- number of rows written. The organisation is the run's, and logged_at is the database's
-- now(): caller-supplied organisation ids and timestamps are ignored, so nobody can back-date
-- a line. An unknown level is stored as INFO with the original level kept in context.level.
create function planner_engine.write_logs(p_records jsonb)
returns integer
language plpgsql volatile security definer set search_path = ''
as $$
declare
  n integer;
  v_grace interval;
begin
  if p_records is null or jsonb_typeof(p_records) <> 'array' then
    raise exception using errcode = '22023', message = 'write_logs expects a JSON array of records';
  end if;
  select s.log_grace into strict v_grace from planner_engine.settings s where s.id;
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, logged_at, level, message, context, traceback)
  select r.id, r.organization_id, now(),
         case when lv.level in ('TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL')
              then lv.level else 'INFO' end,
         coalesce(x ->> 'message', ''),
         case when jsonb_typeof(x -> 'context') = 'object' then x -> 'context' else '{}'::jsonb end
           || case when lv.level in ('TRACE', 'DEBUG', 'INFO', 'SUCCESS', 'WARNING', 'ERROR', 'CRITICAL')
                   then '{}'::jsonb else jsonb_build_object('level', x ->> 'level') end,
         x ->> 'traceback'
    from jsonb_array_elements(p_records) with ordinality as xs(x, i)
    cross join lateral (select upper(coalesce(x ->> 'level', 'INFO')) as level,
                               planner_private.lease_digest_text(x ->> 'lease') as digest) lv
    join public.allocation_planner_runs r
      on r.id::text = lower(x ->> 'planner_run_id')
    left join planner_private.released_leases rl on rl.run_id = r.id
   where jsonb_typeof(x) = 'object'
     and ((r.status = 'GENERATING' and r.lease = lv.digest)
          or (rl.lease = lv.digest and rl.released_at > now() - v_grace))
   order by xs.i;
  get diagnostics n = row_count;
  return n;
end
$$;

-- The listener's catch-up scan (Realtime is at-most-once): the oldest PENDING runs, their id
-- and age only. The engine role reads no table; this is all it needs to find missed runs.
create function planner_engine.pending_runs(p_limit integer)
returns table (id uuid, created_at timestamptz)
language sql stable security definer set search_path = ''
as $$
  select r.id, r.created_at
    from public.allocation_planner_runs r
   where r.status = 'PENDING'
   order by r.created_at, r.id
   limit least(greatest(coalesce(p_limit, 0), 0), 1000)
$$;

-- -- refusal counters (issue 13) ----------------------------------------------------------------
-- How many requests each admission check refused since the database was created, for the
-- listener's /metrics (planner_refusals_total{reason}). Read from the sequences that
-- planner_private.refuse moves (20_rules.sql): a refused INSERT rolls back, the sequence does
-- not. Counts only, by reason: nothing about who was refused. After a crash of the database a
-- counter may start again lower (a nextval whose transaction never committed need not survive
-- it); Prometheus reads that as a counter reset.
create function planner_engine.refusal_counts()
returns table (reason text, refusals bigint)
language sql stable security definer set search_path = ''
as $$
  select substr(s.sequencename, length('refused_') + 1), coalesce(s.last_value, 0)
    from pg_catalog.pg_sequences s
   where s.schemaname = 'planner_private' and s.sequencename like 'refused\_%'
   order by 1
$$;

-- -- the listener's self-check ---------------------------------------------------------------
-- `planner listen` calls this at start and then periodically (listener/app.py). It reports,
-- one row per check, what the login role cannot read for itself: the migrations recorded in
-- supabase_migrations (not granted to it) and whether it may execute every function it calls.
-- Problems come back as rows rather than exceptions so the listener can name each one and
-- the fix in one line, and a 'warning' row (a superuser login, a table missing from the
-- Realtime publication) lets it start while saying what is wrong. Checks are made for
-- `session_user`, the role the listener logged in as: inside this SECURITY DEFINER function
-- `current_user` is the owner.
create function planner_engine.self_check(p_expected_version text default null)
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
    'planner_engine.broadcast(uuid, uuid, text, jsonb)',
    'planner_engine.announce_queued(uuid[])',
    'planner_engine.refusal_counts()',
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

-- -- the sweeper -----------------------------------------------------------------------------
-- The sweep itself, for the owner (and superusers: tests, an operator's one-off sweep with
-- other timeouts). NULL timeouts are the settings'.
create function planner_private.sweep_stale_runs(
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

-- What the pg_cron job and the engine call: no arguments, the timeouts are the operator's
-- (planner_engine.settings). With arguments, a stolen engine credential could fail every
-- PENDING run at once (`sweep_stale_runs('0 seconds', '0 seconds')`).
create function planner_engine.sweep_stale_runs()
returns integer
language sql volatile security definer set search_path = ''
as $$
  select planner_private.sweep_stale_runs(s.stale_run_ttl, s.pending_run_ttl)
    from planner_engine.settings s where s.id
$$;

-- -- progress for the UI: broadcast from the database (issue 14) -------------------------------
-- The UI follows a run on the private Realtime topic `planner_run:<run id>` (members only:
-- policy planner_run_members_read). The listener used to send these events through
-- Realtime's REST API with the service-role key; the database sends them now, with
-- realtime.send (a row in realtime.messages that Realtime streams to the topic), so the key
-- is needed for the listener's own subscription only (docs/database.md, "The service-role
-- key"). The engine role reaches realtime.send only through these two functions.
--
-- broadcast: one event of a run the caller holds, fenced like write_logs: the run's current
-- lease (GENERATING), or its last lease for settings.log_grace after it was released, so the
-- attempt's last event (`done`, or the hand-back `status`), sent just after commit_plan /
-- finish_run, still goes out. Anything else raises PL001 and sends nothing. The event is one
-- of the UI's three (listener/events.py); the payload must be a JSON object of at most 64 kB
-- and its `run_id` is always the run's. realtime.send adds an `id` (the message's) to the
-- payload, on hosted Supabase as locally; UIs ignore fields they do not know.
create function planner_engine.broadcast(
  p_run_id uuid, p_lease uuid, p_event text, p_payload jsonb
) returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_grace interval;
  v_digest uuid := planner_private.lease_digest(p_lease);
  v_status text;
begin
  if p_event is null or p_event not in ('status', 'progress', 'done') then
    raise exception using errcode = '22023',
      message = format('broadcast: unknown event %L (status, progress or done)', p_event);
  end if;
  if p_payload is null or jsonb_typeof(p_payload) <> 'object'
     or pg_catalog.octet_length(p_payload::text) > 65536 then
    raise exception using errcode = '22023',
      message = 'broadcast: the payload must be a JSON object of at most 64 kB';
  end if;
  select s.log_grace into strict v_grace from planner_engine.settings s where s.id;
  select r.status into v_status from public.allocation_planner_runs r where r.id = p_run_id;
  if not exists (
    select 1
      from public.allocation_planner_runs r
      left join planner_private.released_leases rl on rl.run_id = r.id
     where r.id = p_run_id
       and ((r.status = 'GENERATING' and r.lease = v_digest)
            or (rl.lease = v_digest and rl.released_at > now() - v_grace))) then
    perform planner_private.raise_lease_lost(p_run_id, v_status);
  end if;
  perform realtime.send(p_payload || jsonb_build_object('run_id', p_run_id), p_event,
                        'planner_run:' || p_run_id::text, true);
end
$$;

-- announce_queued: the `status` event of PENDING runs with their place in the database's
-- queue (planner_private.queue_positions: the order claim_run follows, 1 = next) and the
-- estimated start. No lease exists before the claim, so this one is not fenced; the caller
-- names runs only, and the database computes what is sent: one fixed shape
-- (listener.events.StatusEvent with status PENDING, phase queued), only for runs that are
-- PENDING now (the others are skipped). Returns how many were sent. A stolen engine
-- credential can thus repeat a true queue position to a run's watchers; nothing else.
create function planner_engine.announce_queued(p_run_ids uuid[])
returns integer
language plpgsql volatile security definer set search_path = ''
as $$
declare
  n integer := 0;
  v record;
begin
  if p_run_ids is null or cardinality(p_run_ids) > 1000 then
    raise exception using errcode = '22023',
      message = 'announce_queued: an array of at most 1000 run ids';
  end if;
  for v in
    select q.run_id, q.runs_ahead
      from planner_private.queue_positions() q
     where q.run_id = any (p_run_ids)
  loop
    perform realtime.send(
      jsonb_build_object('version', 1, 'run_id', v.run_id, 'status', 'PENDING',
                         'phase', 'queued', 'position', v.runs_ahead + 1,
                         'estimated_start', planner_private.estimated_start(v.runs_ahead)),
      'status', 'planner_run:' || v.run_id::text, true);
    n := n + 1;
  end loop;
  return n;
end
$$;

-- -- what users call ---------------------------------------------------------------------------
create function public.request_cancel(p_run_id uuid)
returns void
language plpgsql volatile security definer set search_path = ''
as $$
declare
  r public.allocation_planner_runs;
begin
  select * into r from public.allocation_planner_runs where id = p_run_id for update;
  -- One message for "no such run" and "not yours": existence of other tenants' runs is private.
  if not found or not planner_private.caller_can_plan(r.organization_id) then
    raise exception using errcode = 'PL012',
      message = format('planner run %s not found, or you are not a planner or admin of its '
                       'organisation', p_run_id),
      hint = 'only planners and admins can cancel runs';
  end if;
  if r.status = 'PENDING' then
    -- Nobody is working on it: cancel now (the sweeper would otherwise fail it later).
    update public.allocation_planner_runs
       set status = 'CANCELLED', finished_at = now(), cancel_requested_at = now(),
           error = 'cancelled before a planner picked it up'
     where id = p_run_id;
  elsif r.status = 'GENERATING' then
    -- The engine sees this on its next heartbeat and stops (finish_run CANCELLED).
    update public.allocation_planner_runs
       set cancel_requested_at = coalesce(cancel_requested_at, now())
     where id = p_run_id;
  else
    return;  -- already finished: nothing to cancel, not an error (double clicks)
  end if;
  insert into public.planner_execution_logs
    (planner_run_id, organization_id, level, message, context)
  values (r.id, r.organization_id, 'INFO',
          case r.status when 'PENDING' then 'Cancelled by user before a planner picked it up'
                        else 'Cancellation requested by user' end,
          jsonb_build_object('event', 'cancel_requested', 'by', auth.uid(),
                             'status_at_request', r.status));
end
$$;

-- What the UI shows while a run waits: the runs claim_run will hand out before it and an
-- estimated start (planner_private.queue_positions, planner_private.estimated_start). For
-- members (any role) of the run's organisation; anyone else gets the one message for "no
-- such run" and "not yours". Only totals come back: never another organisation's ids, names
-- or sizes. A GENERATING run has 0 ahead and its claim time as start; a finished one NULLs.
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

create function public.restore_job_lines(p_snapshot_id uuid)
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
