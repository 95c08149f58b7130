-- The engine role reads planning inputs in `public`. PostgreSQL 15 grants USAGE on `public` to
-- PUBLIC by default, but a hosted project may have tightened that; say it explicitly so the
-- listener's catch-up query (`select ... from public.allocation_planner_runs`) never depends
-- on a default.
grant usage on schema public to planner_engine;
