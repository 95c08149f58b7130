-- Named queries of the listener. The invariants live in the planner_engine functions
-- (migrations/); these are thin calls to them, one per name.

-- name: claim_run
-- Claim the next PENDING run in the database's order ($2 NULL: the listener never chooses), or
-- the given one when $2 is a run id; nothing when there is none. Returns the run with its fresh lease, the only
-- time the lease is seen: the database keeps its digest.
select id, organization_id, allocation_run_id, n_job_lines, attempts, max_attempts, lease,
       created_at, time_limit_s
  from planner_engine.claim_run($1::text, $2::uuid);

-- name: heartbeat
select lease_held, cancel_requested from planner_engine.heartbeat($1::uuid, $2::uuid);

-- name: load_problem
select planner_engine.load_problem($1::uuid, $2::uuid);

-- name: commit_plan
select planner_engine.commit_plan($1::uuid, $2::uuid, $3::uuid, $4::jsonb, $5::jsonb);

-- name: finish_run
select planner_engine.finish_run($1::uuid, $2::uuid, $3::text, $4::text, $5::jsonb);

-- name: write_logs
select planner_engine.write_logs($1::jsonb);

-- name: pending_runs
-- Catch-up: the runs nobody announced (Realtime is at-most-once), oldest first. The engine
-- role reads no table; the function returns ids and ages only.
select id, created_at from planner_engine.pending_runs($1::integer);

-- name: refusal_counts
-- /metrics: requests refused at admission, by reason (counted outside the refused
-- transaction, docs/database.md).
select reason, refusals from planner_engine.refusal_counts();

-- name: listener_heartbeat
-- This listener can take runs ($2 true: it is stopping). The sweeper's pending timeout applies
-- only when no listener beat within it.
select planner_engine.listener_heartbeat($1::text, $2::boolean);

-- name: queue_positions
-- Every PENDING run with the runs claim_run hands out before it and an estimated start: what
-- the listener broadcasts as `position` (runs_ahead + 1).
select id, runs_ahead, estimated_start from planner_engine.queue_positions($1::integer);

-- name: ping
select 1;

-- name: self_check
-- What the engine role cannot see for itself (planner_engine.self_check, one row per check).
select check_name, ok, severity, detail from planner_engine.self_check($1::text);

-- name: broadcast
-- One UI event on the run's private topic, sent by the database (realtime.send) and fenced on
-- the lease: PL001 and nothing sent when this listener does not hold the run.
select planner_engine.broadcast($1::uuid, $2::uuid, $3::text, $4::jsonb);

-- name: announce_queued
-- The queued status (the database's position and estimated start) of runs still PENDING (no
-- lease before the claim); returns how many were sent.
select planner_engine.announce_queued($1::uuid[]);
