"""One line naming the fix for the mistakes an operator makes most when deploying.

A traceback tells an operator where the code was, not what to change in their configuration;
these helpers turn the exceptions of a failed connection or a busy port into one sentence that
names the variable (or option) to fix. Anything not recognised here is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import socket
import ssl
from urllib.parse import urlsplit

import asyncpg

#: The exceptions `asyncpg.connect` / `create_pool` raise for a configuration mistake.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ssl.SSLError,
)


class ConfigurationError(RuntimeError):
    """An expected start-up failure; its message is the one line to print (no traceback)."""


def where(dsn: str) -> str:
    """`host:port/database` of a DSN, never its password (for messages and logs)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "the database"
    return f"{host}:{port}{parts.path or '/'}"


def describe_url_problem(dsn: str) -> str | None:
    """What is wrong with the form of a database URL, or None when it looks usable."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        return "is not a postgresql:// URL (postgresql://user:password@host:5432/postgres)"
    try:
        urlsplit(dsn).port  # noqa: B018  # raises on a non-numeric port
    except ValueError:
        return "has an invalid port"
    return None


def describe_connect_error(exc: BaseException, dsn: str, variable: str) -> str | None:
    """One line for a failed connection to `dsn` (set by `variable`), or None when `exc` is
    not a configuration mistake we know."""
    at = where(dsn)
    user = urlsplit(dsn).username or "?"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return (f"the database at {at} refused the password of role {user}: "
                f"fix the password in {variable}")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return (f"the database at {at} refused role {user} ({exc}): "
                f"check the user name in {variable}")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc} at {at}: check the database name in {variable}"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return (f"the database at {at} has no free connection ({exc}): use the pooler's URL "
                f"in {variable} or raise the connection limit")
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return f"{variable} is not usable: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"unknown database host in {variable} ({at}): check the host name"
    if isinstance(exc, ssl.SSLError):
        return (f"TLS with the database at {at} failed ({exc.reason or exc}): check sslmode "
                f"and sslrootcert in {variable} (docs/deploy.md#tls)")
    if isinstance(exc, ConnectionRefusedError):
        return (f"nothing accepts connections at {at} (connection refused): check the host "
                f"and port in {variable}, and that the database is running")
    if isinstance(exc, ConnectionError) and "SSL" in str(exc):
        return (f"the database at {at} does not accept TLS ({exc}): drop sslmode=require from "
                f"{variable} or enable TLS on the server")
    if isinstance(exc, TimeoutError):
        return (f"the database at {at} did not answer in time: check the host and port in "
                f"{variable} and the network (a direct Supabase host is IPv6-only; use the "
                "pooler's host over IPv4)")
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return (f"no route to the database at {at} ({exc.strerror}): a direct Supabase host "
                f"is IPv6-only; use the pooler's host in {variable} (docs/deploy.md)")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return (f"role {user} lacks a privilege at {at} ({exc}): use the database owner's "
                f"role (postgres on Supabase) in {variable}")
    if isinstance(exc, asyncpg.PostgresError):
        return f"the database at {at} refused the connection: {exc} (check {variable})"
    if isinstance(exc, OSError):
        return f"cannot reach the database at {at}: {exc} (check {variable})"
    return None


def describe_bind_error(exc: OSError, host: str, port: int) -> str:
    """One line for a health server that could not listen."""
    if exc.errno == errno.EADDRINUSE:
        return (f"health port {port} on {host} is already in use: set PLANNER_HEALTH_PORT "
                "(or PORT) to a free port, or PLANNER_HEALTH_PORT=0 to disable the endpoint")
    return (f"cannot serve health checks on {host}:{port} ({exc.strerror or exc}): "
            "check PLANNER_HEALTH_HOST and PLANNER_HEALTH_PORT")
