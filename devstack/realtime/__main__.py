"""`python -m devstack.realtime --host H --port P --database-url DSN --jwt-secret S`.

Started by `planner dev up` (devstack/stack.py RealtimeProcess) and by the test helper
`tests/support/realtime.py`. SIGTERM/SIGINT close every socket with 1001 and drop the
temporary replication slot before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from loguru import logger

from devstack.keys import LOCAL_PUBLISHABLE_KEY, LOCAL_SECRET_KEY
from devstack.realtime.app import Server, serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devstack.realtime", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=54330)
    p.add_argument("--database-url", required=True, help="superuser DSN of the one database")
    p.add_argument("--jwt-secret", required=True)
    p.add_argument("--log-file", default=None, help="also log to this file")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--connect-error-backoff-ms", type=int, default=2000,
        help="delay before refusing a connection (Supabase: CONNECT_ERROR_BACKOFF_MS, 2000)",
    )
    p.add_argument(
        "--channel-error-backoff-ms", type=int, default=5000,
        help="delay before a failed join reply (Supabase: CHANNEL_ERROR_BACKOFF_MS, 5000)",
    )
    p.add_argument(
        "--publishable-key", default=LOCAL_PUBLISHABLE_KEY,
        help="opaque sb_publishable_ key accepted as role anon (default: the stack's)",
    )
    p.add_argument(
        "--secret-key", default=LOCAL_SECRET_KEY,
        help="opaque sb_secret_ key accepted as role service_role (default: the stack's)",
    )
    p.add_argument(
        "--idle-timeout-ms", type=int, default=60_000,
        help="close a socket that sent nothing for this long (Phoenix: 60000); 0 = never",
    )
    p.add_argument(
        "--max-events-per-second", type=float, default=100,
        help="tenant rate limit (Supabase: TENANT_MAX_EVENTS_PER_SECOND, 100)",
    )
    p.add_argument(
        "--rate-counter-tick-ms", type=int, default=5000,
        help="rate counter period; the limit applies to the average of 12 (Supabase: 5000)",
    )
    p.add_argument(
        "--private-only", action="store_true",
        help="refuse joins of public channels, like a project with public access disabled",
    )
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(
        args.database_url,
        args.jwt_secret,
        connect_error_backoff_s=args.connect_error_backoff_ms / 1000,
        channel_error_backoff_s=args.channel_error_backoff_ms / 1000,
        opaque_keys={args.publishable_key: "anon", args.secret_key: "service_role"},
        idle_timeout_s=args.idle_timeout_ms / 1000,
        max_events_per_second=args.max_events_per_second,
        rate_tick_s=args.rate_counter_tick_ms / 1000,
        private_only=args.private_only,
    )
    await serve(server, args.host, args.port, stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper(), enqueue=False)
    if args.log_file:
        logger.add(args.log_file, level=args.log_level.upper(), rotation="20 MB", retention=3)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
