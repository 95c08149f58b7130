-- The listener joins its wake-up channel `planner-engine-runs` as a private channel (issue 16):
-- a project with public channels disabled refuses public joins ("PrivateOnly: This project only
-- allows private channels"). Realtime authorises a private join by reading probe rows of
-- realtime.messages as the token's role; this policy names the listener's role (service_role)
-- and topic. service_role bypasses RLS on Supabase and locally, so the policy is explicit
-- rather than required for the service-role key (see migrations/schema/40_access.sql).
drop policy if exists planner_engine_runs_listener_read on realtime.messages;
create policy planner_engine_runs_listener_read on realtime.messages
  for select to service_role
  using (extension = 'broadcast' and (select realtime.topic()) = 'planner-engine-runs');
