-- planner_engine.self_check(expected_version): what `planner listen` checks at start and then
-- periodically, for what its login role cannot read directly (the recorded migrations, its own
-- function grants). Mirrors migrations/schema/30_engine.sql and 40_access.sql (issue 15).

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
    'planner_engine.write_logs(jsonb)'
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

  -- The catch-up scan reads the runs table directly.
  check_name := 'select public.allocation_planner_runs';
  severity := 'error';
  ok := pg_catalog.has_table_privilege(v_login, 'public.allocation_planner_runs', 'select');
  detail := case when ok then 'granted' else format('role %s may not read it', v_login) end;
  return next;

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

revoke all on function planner_engine.self_check(text) from public, anon, authenticated;
grant execute on function planner_engine.self_check(text) to planner_engine, service_role;
