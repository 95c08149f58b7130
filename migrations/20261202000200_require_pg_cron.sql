-- pg_cron is required (issue 15): the sweeper used to be scheduled only where the extension
-- already existed, so a project that had not enabled pg_cron migrated without a word and never
-- rescued an orphaned run. Now the migration enables pg_cron where it can run and always
-- schedules the job, or stops naming the fix (migrations/schema/40_access.sql says why).

alter table planner_engine.settings add column sweeper_scheduled_at timestamptz;

-- -- the sweeper's schedule --------------------------------------------------------------------
-- pg_cron is required: without the sweeper a run whose listener died stays GENERATING for
-- ever. Where pg_cron can run in this database (hosted Supabase: the `postgres` database; the
-- local stack's own database) it is enabled the way hosted projects accept and the job is
-- scheduled; cron.schedule with a job name replaces an existing job of that name, so
-- re-running this is harmless. Where it cannot, the migration stops with one line (SQLSTATE
-- PL020) naming the fix, before anything of it is applied.
--
-- The one exception is explicit: `planner migrate --cron-database NAME`
-- (PLANNER_CRON_DATABASE) sets planner.sweeper_cron_database for its session and schedules
-- the job itself from database NAME with cron.schedule_in_database, for a database of a
-- server whose pg_cron lives in another database (the test suite's cloned databases).
do $$
declare
  v_cron_db text := current_setting('cron.database_name', true);
  v_elsewhere text := coalesce(current_setting('planner.sweeper_cron_database', true), '');
begin
  if v_elsewhere not in ('', current_database()) then
    return;
  end if;
  if not exists (select from pg_available_extensions where name = 'pg_cron') then
    raise exception using errcode = 'PL020', message =
      'pg_cron is not installed on this PostgreSQL server and the sweeper needs it: on hosted '
      'Supabase enable it under Database > Extensions (or run `create extension pg_cron with '
      'schema pg_catalog`), elsewhere install the pg_cron package and preload it';
  end if;
  if v_cron_db is null then
    raise exception using errcode = 'PL020', message =
      'pg_cron is installed but not loaded: add pg_cron to shared_preload_libraries and '
      'restart PostgreSQL, then migrate again';
  end if;
  if v_cron_db <> current_database() then
    raise exception using errcode = 'PL020', message = format(
      'pg_cron runs only in database %s (cron.database_name), not %s: migrate that database, '
      'or schedule the sweeper from there with `planner migrate --cron-database %s` '
      '(docs/database.md)', v_cron_db, current_database(), v_cron_db);
  end if;
  create extension if not exists pg_cron with schema pg_catalog;
  perform cron.schedule('planner-sweep-stale-runs', '* * * * *',
                        'select planner_engine.sweep_stale_runs()');
  update planner_engine.settings set sweeper_scheduled_at = now();
end
$$;
