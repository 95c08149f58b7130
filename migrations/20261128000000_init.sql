-- Placeholder so the runner has something to apply; replaced by the planner schema (issue 3).
create schema if not exists planner_engine;
