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
