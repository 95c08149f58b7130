-- The engine lost SELECT on the tenant tables (migration 20261202000700: it reads them only
-- through its lease-checked functions); its `engine_reads` policies granted nothing since, and
-- are dropped so no later grant could bring the reads back unnoticed.
drop policy engine_reads on public.organizations;
drop policy engine_reads on public.allocation_runs;
drop policy engine_reads on public.terms;
drop policy engine_reads on public.teams;
drop policy engine_reads on public.team_demand;
drop policy engine_reads on public.allocation_planner_runs;
