-- Schema, part 4 of 4: who may do what. Roles, grants, RLS, Realtime, the sweeper's cron job.
--
-- Two layers: GRANTs say which statements a role may run at all (a viewer has no UPDATE on
-- runs, whatever the policies say), RLS policies say on which rows. Both are deny-by-default:
-- the scaffolding's default privileges grant everything in `public` to the API roles, so we
-- revoke first and grant back only what each role needs.

-- -- the engine's login role ---------------------------------------------------------------
-- NOLOGIN here: on a hosted project the operator gives it a password
-- (`alter role planner_engine login password '...'`); `planner dev up` does so locally.
-- Why not the service-role key: that key bypasses RLS and may write every table; a leaked
-- listener credential would then be a full-database credential. planner_engine can only call
-- the functions below, and reads tenant data only through load_problem, which first checks
-- the run's lease (docs/database.md, "Roles").
do $$
begin
  if not exists (select from pg_roles where rolname = 'planner_engine') then
    create role planner_engine nologin noinherit nobypassrls;
  end if;
end
$$;
comment on role planner_engine is
  'Login role of the planner listener: EXECUTE on planner_engine.*, SELECT on rule sets only, no direct writes.';

-- -- table privileges -------------------------------------------------------------------------
revoke all on public.organizations, public.organization_members,
  public.organization_invitations, public.planner_rule_sets,
  public.allocation_runs, public.terms, public.teams, public.team_demand,
  public.allocation_planner_runs, public.job_lines, public.rotations, public.job_lines_history,
  public.planner_execution_logs
  from public, anon, authenticated, planner_engine;
revoke all on all tables in schema planner_engine from public;
revoke all on all tables in schema planner_private from public;
revoke all on planner_private.released_leases from public, anon, authenticated, planner_engine;
revoke all on planner_private.organization_claims, planner_private.listener_heartbeats
  from public, anon, authenticated, planner_engine;

grant select on public.organizations, public.planner_rule_sets, public.job_lines,
  public.job_lines_history, public.planner_execution_logs
  to authenticated;
-- Members: admins change a member's role or remove them (RLS); nobody inserts a member
-- directly: new members come through an invitation they accept (public.invite_member,
-- public.accept_invitation). Only `role` may change: moving a row to another user id would
-- add a user without consent, and its foreign-key error would tell whether the id exists.
grant select, delete, update (role) on public.organization_members to authenticated;
-- Invitations: admins read and withdraw their organisation's, the invited user reads theirs;
-- they are written only by the two functions.
grant select, delete on public.organization_invitations to authenticated;
grant select, insert, update, delete on public.allocation_runs, public.terms, public.teams,
  public.team_demand to authenticated;
-- Runs: users insert a request and read progress; every later change goes through functions.
grant select, insert on public.allocation_planner_runs to authenticated;
-- Rotations: a manager's tweak changes the team or the pin, nothing else.
grant select, update (team_id, pinned) on public.rotations to authenticated;

-- The service role keeps full access (it bypasses RLS by design); the composite keys and the
-- triggers still hold for it.
grant all on all tables in schema public to service_role;

grant usage on schema planner_engine to planner_engine;
-- The engine reads no tenant table: the problem comes from load_problem (fenced on the lease),
-- the catch-up scan from pending_runs (ids and ages only). A stolen listener credential thus
-- reads nothing of a tenant without a lease it could only get by claiming that tenant's
-- PENDING run. Rule sets are global (no tenant's data).
grant select on public.planner_rule_sets to planner_engine;

-- -- function privileges ----------------------------------------------------------------------
revoke all on all functions in schema planner_engine from public, anon, authenticated;
revoke all on all functions in schema planner_private from public, anon, authenticated;
revoke all on function public.request_cancel(uuid), public.restore_job_lines(uuid)
  from public, anon;

grant execute on function
  planner_engine.claim_run(text, uuid),
  planner_engine.heartbeat(uuid, uuid),
  planner_engine.load_problem(uuid, uuid),
  planner_engine.commit_plan(uuid, uuid, uuid, jsonb, jsonb),
  planner_engine.finish_run(uuid, uuid, text, text, jsonb),
  planner_engine.write_logs(jsonb),
  planner_engine.pending_runs(integer),
  planner_engine.listener_heartbeat(text, boolean),
  planner_engine.queue_positions(integer),
  planner_engine.sweep_stale_runs(),
  planner_engine.self_check(text),
  planner_engine.broadcast(uuid, uuid, text, jsonb),
  planner_engine.announce_queued(uuid[]),
  planner_engine.refusal_counts()
  to planner_engine, service_role;
grant usage on schema planner_engine to service_role;

-- Policies and the run-insert trigger call these as the querying role; nothing else in
-- planner_private is executable by the API roles (admission_checks, caller_is_privileged and
-- caller_can_plan are reached only from SECURITY DEFINER functions, as their owner).
grant usage on schema planner_private to authenticated, service_role;
grant execute on function
  planner_private.has_role(uuid, text[]),
  planner_private.is_member(uuid),
  planner_private.can_plan(uuid),
  planner_private.invoker_is_privileged(),
  planner_private.can_read_run_topic(text)
  to authenticated, service_role;
grant execute on function planner_private.admit_user_run(public.allocation_planner_runs)
  to authenticated;
grant execute on function planner_private.admit_privileged_run(public.allocation_planner_runs)
  to service_role;

-- Sequences: the API roles write no table directly that needs one (log lines go through
-- planner_engine.write_logs), so none of them may move a sequence; setval to its maximum would
-- break every later insert. The scaffolding's default privileges (Supabase's: everything in
-- `public` to anon, authenticated and service_role) are revoked for what the migrations'
-- role creates from now on, so a future table, sequence or function starts closed and gets
-- exactly the grants written here (the attack matrix fails on any object without a decision).
revoke all on all sequences in schema public from public, anon, authenticated;
alter default privileges in schema public revoke all on tables from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
alter default privileges in schema public revoke all on functions from anon, authenticated;

grant execute on function public.request_cancel(uuid), public.restore_job_lines(uuid)
  to authenticated, service_role;
-- The queue position of a run: members of its organisation (the function checks), the UI.
revoke all on function public.planner_run_queue_position(uuid) from public, anon;
grant execute on function public.planner_run_queue_position(uuid) to authenticated, service_role;

-- -- row-level security -------------------------------------------------------------------------
alter table planner_engine.settings enable row level security;  -- no policy: owner only
-- Limits and the ledger (issue 13): the operator's, no grant and no policy. A member must not
-- raise their own budget, nor learn another organisation's tier or usage; the refusals tell
-- a member the limit and the value that were hit.
alter table planner_engine.limits enable row level security;
alter table planner_private.usage_ledger enable row level security;
alter table public.organizations enable row level security;
alter table public.organization_members enable row level security;
alter table public.planner_rule_sets enable row level security;
alter table public.allocation_runs enable row level security;
alter table public.terms enable row level security;
alter table public.teams enable row level security;
alter table public.team_demand enable row level security;
alter table public.allocation_planner_runs enable row level security;
alter table public.job_lines enable row level security;
alter table public.rotations enable row level security;
alter table public.job_lines_history enable row level security;
alter table public.planner_execution_logs enable row level security;

create policy members_read on public.organizations
  for select to authenticated using (planner_private.is_member(id));

create policy members_read on public.organization_members
  for select to authenticated using (planner_private.is_member(organization_id));
create policy admins_update on public.organization_members
  for update to authenticated
  using (planner_private.has_role(organization_id, array['admin']))
  with check (planner_private.has_role(organization_id, array['admin']));
create policy admins_delete on public.organization_members
  for delete to authenticated using (planner_private.has_role(organization_id, array['admin']));

create policy everyone_signed_in_reads on public.planner_rule_sets
  for select to authenticated, planner_engine using (true);

-- Planning inputs: members read, planners and admins edit. The engine reads none of them
-- directly: only through its lease-checked functions (30_engine.sql).
do $$
declare
  t text;
begin
  foreach t in array array['allocation_runs', 'terms', 'teams', 'team_demand'] loop
    execute format('create policy members_read on public.%I for select to authenticated '
                   'using (planner_private.is_member(organization_id))', t);
    execute format('create policy planners_insert on public.%I for insert to authenticated '
                   'with check (planner_private.can_plan(organization_id))', t);
    execute format('create policy planners_update on public.%I for update to authenticated '
                   'using (planner_private.can_plan(organization_id)) '
                   'with check (planner_private.can_plan(organization_id))', t);
    -- Deleting an allocation run or a term removes rotations of a plan (snapshotted first,
    -- 20_rules.sql) and ends the run's life: admins only (issue 14). Teams and demand
    -- remove no rotation (a team in use cannot be deleted: rotations' key).
    if t in ('allocation_runs', 'terms') then
      execute format('create policy admins_delete on public.%I for delete to authenticated '
                     'using (planner_private.has_role(organization_id, array[''admin'']))', t);
    else
      execute format('create policy planners_delete on public.%I for delete to authenticated '
                     'using (planner_private.can_plan(organization_id))', t);
    end if;
  end loop;
end
$$;

create policy members_read on public.allocation_planner_runs
  for select to authenticated using (planner_private.is_member(organization_id));
-- The trigger adds the finer checks (PL010-PL015) with readable messages; this policy is the
-- coarse backstop.
create policy planners_insert on public.allocation_planner_runs
  for insert to authenticated with check (planner_private.can_plan(organization_id));

create policy members_read on public.job_lines
  for select to authenticated using (planner_private.is_member(organization_id));

create policy members_read on public.rotations
  for select to authenticated using (planner_private.is_member(organization_id));
create policy planners_update on public.rotations
  for update to authenticated
  using (planner_private.can_plan(organization_id))
  with check (planner_private.can_plan(organization_id));

create policy members_read on public.job_lines_history
  for select to authenticated using (planner_private.is_member(organization_id));

create policy members_read on public.planner_execution_logs
  for select to authenticated using (planner_private.is_member(organization_id));

-- -- membership and history (issue 14) ------------------------------------------------------
alter table public.organization_invitations enable row level security;
create policy admins_and_invitee_read on public.organization_invitations
  for select to authenticated
  using (planner_private.has_role(organization_id, array['admin'])
         or email = (select planner_private.caller_email()));
create policy admins_delete on public.organization_invitations
  for delete to authenticated
  using (planner_private.has_role(organization_id, array['admin']));

revoke all on function public.invite_member(uuid, text, text),
  public.accept_invitation(uuid)
  from public, anon, authenticated;
grant execute on function public.invite_member(uuid, text, text) to authenticated, service_role;
grant execute on function public.accept_invitation(uuid) to authenticated;
-- The invitations' read policy asks for the caller's own address.
grant execute on function planner_private.caller_email() to authenticated;
-- `planner history purge` (listener/ops.py), as the service role; nobody else.
grant execute on function planner_private.purge_history(uuid) to service_role;

-- -- Realtime ---------------------------------------------------------------------------------
-- Private channel `planner_run:<run id>`: members of the run's organisation may join and read
-- (broadcast and presence). Users cannot send on it (no INSERT policy for them); the engine's
-- events come from the database (planner_run_engine_send below), so realtime.messages keeps
-- them (hosted: for days): the row's own topic must be the channel's too, or a member who sets
-- `realtime.topic` to a run of their own could read every organisation's stored messages.
drop policy if exists planner_run_members_read on realtime.messages;
create policy planner_run_members_read on realtime.messages
  for select to authenticated
  using (extension in ('broadcast', 'presence')
         and topic = (select realtime.topic())
         and planner_private.can_read_run_topic((select realtime.topic())));

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

-- Private channel `planner-engine-runs`: the listener's wake-ups (postgres_changes on
-- allocation_planner_runs). It joins privately because a project with public channels
-- disabled refuses public joins ("PrivateOnly"). A private join is authorised like every
-- private channel: Realtime inserts probe rows into realtime.messages and SELECTs them as the
-- token's role. The listener's token is the service-role key, and service_role bypasses RLS,
-- so this policy grants it nothing new: it states who the channel is for, and it is what
-- admits the listener if its key ever carries a role without BYPASSRLS. Nobody else may join
-- (no policy for anon or authenticated), which costs nothing: the channel carries no
-- broadcasts, and postgres_changes are filtered per subscriber by the table's RLS anyway.
drop policy if exists planner_engine_runs_listener_read on realtime.messages;
create policy planner_engine_runs_listener_read on realtime.messages
  for select to service_role
  using (extension = 'broadcast' and (select realtime.topic()) = 'planner-engine-runs');

-- postgres_changes for the UI's run status, with the DEFAULT replica identity (old rows are
-- the primary key only). Realtime applies no RLS to DELETE changes and matches filters against
-- the old row: with FULL, any signed-in user subscribed with a filter such as
-- `n_job_lines=gt.300` or `organization_id=eq.<uuid>` learnt size, status and requester of
-- another organisation's runs whenever they were deleted. DEFAULT also keeps every lease,
-- heartbeat and finish UPDATE from writing the whole old row to the WAL. The UI reads a run's
-- new state from `record` (docs/listener.md); nothing needs the old one.
alter table public.allocation_planner_runs replica identity default;
do $$
begin
  if not exists (select 1 from pg_publication_tables
                  where pubname = 'supabase_realtime' and schemaname = 'public'
                    and tablename = 'allocation_planner_runs') then
    alter publication supabase_realtime add table public.allocation_planner_runs;
  end if;
end
$$;

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
