-- allocation_planner_runs back to the DEFAULT replica identity (issue 14, finding 1): with
-- FULL, DELETE changes carried, and were filtered on, the whole old row, which Realtime sends
-- without an RLS check, so a filtered subscription leaked other organisations' runs. See
-- migrations/schema/40_access.sql.
alter table public.allocation_planner_runs replica identity default;
