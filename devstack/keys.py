"""HS256 API keys and user tokens shaped like Supabase's.

Supabase's `anon` and `service_role` keys are JWTs carrying `role`, `iss` and `exp`; a signed-in
user's access token adds `sub` (the user id), `aud` and `email`. The local stack signs the same
claims with the local secret so the official clients and RLS see what they would in production.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

TEN_YEARS = 10 * 365 * 24 * 3600


def sign(claims: dict[str, Any], secret: str) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def api_key(role: str, secret: str, *, lifetime_s: int = TEN_YEARS) -> str:
    """An `anon` or `service_role` key, as the Supabase dashboard shows them."""
    now = int(time.time())
    return sign({"iss": "supabase-demo", "role": role, "iat": now, "exp": now + lifetime_s}, secret)


def user_token(
    user_id: str, secret: str, *, email: str | None = None, lifetime_s: int = 3600
) -> str:
    """A signed-in user's access token (role `authenticated`, `sub` = user id)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "supabase-demo",
        "aud": "authenticated",
        "role": "authenticated",
        "sub": user_id,
        "iat": now,
        "exp": now + lifetime_s,
    }
    if email:
        claims["email"] = email
    return sign(claims, secret)


# Supabase's opaque API keys (`sb_publishable_…` acts as `anon`, `sb_secret_…` as
# `service_role`). Hosted projects generate random ones; the Supabase CLI's local stack uses
# these fixed values, and so does ours, so snippets written for `supabase start` work
# unchanged. The local Realtime server accepts exactly these (flags `--publishable-key` and
# `--secret-key`); the listener and `planner dev env` read the same constants.
LOCAL_PUBLISHABLE_KEY = "sb_publishable_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaH"
LOCAL_SECRET_KEY = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"
