"""Prometheus metrics of the listener (served on /metrics by the health server)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

QUEUE_DEPTH = Gauge(
    "planner_queue_depth",
    "PENDING runs of every organisation at the last queue-position announcement.")
SOLVING = Gauge("planner_solving", "1 while a solve is running in this listener.")
RUNS = Counter("planner_runs_total", "Runs finished by this listener, by outcome.", ["outcome"])
SOLVE_SECONDS = Histogram(
    "planner_solve_seconds", "Wall time of solves (child process start to plan).",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
RUN_OVERHEAD_SECONDS = Histogram(
    "planner_run_overhead_seconds", "Claim, load and write time outside the solve.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REALTIME_RECONNECTS = Counter(
    "planner_realtime_reconnects_total", "Times the Realtime client was recreated."
)
REALTIME_CONNECTED = Gauge("planner_realtime_subscribed", "1 while subscribed to run changes.")
LOG_RECORDS_DROPPED = Counter(
    "planner_log_records_dropped_total", "Run log records dropped because the buffer was full."
)
LOG_RECORDS_WRITTEN = Counter(
    "planner_log_records_written_total", "Run log records written to planner_execution_logs."
)
BROADCASTS = Counter("planner_broadcasts_total", "Progress broadcasts sent.", ["event"])
BROADCAST_FAILURES = Counter("planner_broadcast_failures_total", "Broadcasts that failed.")


class RefusalCounts(Collector):
    """`planner_refusals_total{reason}`: run requests and restores the database refused, by
    reason, over all organisations.

    A refused INSERT rolls back, so the database counts refusals outside the transaction (a
    sequence per reason, read by planner_engine.refusal_counts). These are the database's
    totals, the same on every listener replica; the listener only re-reads them when /metrics
    is scraped (`update`). Until the first read, and while the database cannot be read, the
    last values are served.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def update(self, counts: Mapping[str, int]) -> None:
        self._counts = dict(counts)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "planner_refusals", "Requests the database refused at admission, by reason "
            "(docs/database.md, SQLSTATEs).", labels=["reason"])
        for reason, n in sorted(self._counts.items()):
            family.add_metric([reason], n)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


REFUSALS = RefusalCounts()
REGISTRY.register(REFUSALS)

CATCHUP_RUNS = Counter(
    "planner_catchup_runs_total", "PENDING runs found by the catch-up scan, not by an event."
)
