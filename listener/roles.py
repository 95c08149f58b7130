"""Run SQL as a Supabase role, the way PostgREST runs an API request.

PostgREST runs every API request in a transaction that switches to the JWT's role and exposes
the claims as `request.jwt.claims` (plus the legacy per-claim settings), which is what RLS
policies, `auth.uid()` and the planner's insert trigger read. The operator commands
(`planner runs cancel`, `planner history restore`) act as `service_role` this way, so an
operator goes through exactly the functions and checks the UI does; the demo and the tests act
as a manager (`authenticated`) the same way. Engine code: it needs nothing of the local stack.
"""

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

    Committed when the block exits normally, rolled back on error: one PostgREST request.
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
