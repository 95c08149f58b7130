"""Act as PostgREST would: switch to an API role with a user's JWT claims for one transaction."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg


@asynccontextmanager
async def acting_as(
    conn: asyncpg.Connection,
    role: str,
    *,
    sub: str | None = None,
    extra_claims: dict[str, Any] | None = None,
) -> AsyncIterator[asyncpg.Connection]:
    """Run the block in a transaction as `role` (anon/authenticated/service_role/...).

    The transaction is committed when the block exits normally, rolled back on error,
    exactly like one PostgREST request.
    """
    claims: dict[str, Any] = {"role": role, **(extra_claims or {})}
    if sub is not None:
        claims["sub"] = sub
    async with conn.transaction():
        await conn.execute(
            "select set_config('request.jwt.claims', $1, true), "
            "set_config('request.jwt.claim.sub', $2, true), "
            "set_config('request.jwt.claim.role', $3, true)",
            json.dumps(claims),
            sub or "",
            role,
        )
        await conn.execute(f'set local role "{role}"')
        yield conn
