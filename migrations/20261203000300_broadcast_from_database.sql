-- The service-role key (issue 14): the UI's progress events are broadcast from the database.
-- planner_engine.broadcast (fenced on the lease) and planner_engine.announce_queued (the queue
-- positions of PENDING runs) call realtime.send, so the listener needs its Supabase key for
-- its own postgres_changes subscription only (docs/database.md, "The service-role key").
-- Mirrors migrations/schema/30_engine.sql and 40_access.sql.

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

revoke all on function planner_engine.broadcast(uuid, uuid, text, jsonb),
  planner_engine.announce_queued(uuid[])
  from public, anon, authenticated;
grant execute on function planner_engine.broadcast(uuid, uuid, text, jsonb),
  planner_engine.announce_queued(uuid[])
  to planner_engine, service_role;

-- The UI's events are sent by the database (planner_engine.broadcast / announce_queued call
-- realtime.send as their owner, the migration runner: `postgres` on hosted Supabase). On
-- hosted that role owns no realtime table; should it not bypass RLS, this policy is what lets
-- those functions write the message rows, and only on run topics. Nobody else gets an INSERT
-- policy on them: users and the API roles cannot send on a run's topic.
drop policy if exists planner_run_engine_send on realtime.messages;
create policy planner_run_engine_send on realtime.messages
  for insert to postgres
  with check (extension = 'broadcast' and private
              and topic ~ '^planner_run:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$');

-- The messages are now stored in realtime.messages: a member's read policy compares the row's
-- own topic with the channel's, so nobody reads other organisations' stored messages by
-- setting `realtime.topic` to a run of their own.
drop policy if exists planner_run_members_read on realtime.messages;
create policy planner_run_members_read on realtime.messages
  for select to authenticated
  using (extension in ('broadcast', 'presence')
         and topic = (select realtime.topic())
         and planner_private.can_read_run_topic((select realtime.topic())));

-- The self-check also reports EXECUTE on the two new functions.
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
