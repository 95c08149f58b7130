"""Which kind of Supabase API key the listener was given.

Supabase has two generations of keys. The legacy ones are JWTs whose `role` claim says what
they may do (`anon` or `service_role`); the new ones are opaque strings whose prefix says it
(`sb_publishable_...` like anon, `sb_secret_...` like service_role). The listener uses its key
for one thing, its Realtime subscription to the runs table (its progress events are sent by
the database: listener.broadcast), and that needs the service-role kind: Realtime applies the
token's role to every change (RLS and column privileges, as that role), and only a role that
bypasses RLS hears the runs of every organisation. With the anon key it still connects and
subscribes, but hears nothing. That mistake looked healthy (issue 15), so the key is
classified at start, without a network call: a JWT's payload is read (not verified: the
server verifies it, we only want the claimed role). docs/database.md ("The service-role key")
says why no narrower token can do, and what a stolen listener environment can still do.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SECRET_PREFIX = "sb_secret_"
PUBLISHABLE_PREFIX = "sb_publishable_"

Kind = Literal["secret", "publishable", "jwt", "unknown"]
#: The variables the listener reads its key from, the first set one winning (settings.py).
KEY_VARIABLES = ("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY")


@dataclass(frozen=True)
class KeyInfo:
    kind: Kind
    role: str | None  # the JWT's role claim, or the role an sb_ key stands for

    @property
    def is_service(self) -> bool:
        """Does its subscription hear every organisation's runs (a role bypassing RLS)?"""
        return self.role == "service_role"

    def describe(self) -> str:
        if self.kind == "secret":
            return "a secret key (sb_secret_...)"
        if self.kind == "publishable":
            return "a publishable key (sb_publishable_...)"
        if self.kind == "jwt":
            return f"a JWT with role {self.role or '(none)'}"
        return "neither an sb_secret_ key nor a JWT"


def _jwt_role(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a JWT") from exc
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")
    role = claims.get("role")
    return role if isinstance(role, str) else None


def classify(key: str) -> KeyInfo:
    if key.startswith(SECRET_PREFIX):
        return KeyInfo("secret", "service_role")
    if key.startswith(PUBLISHABLE_PREFIX):
        return KeyInfo("publishable", "anon")
    try:
        return KeyInfo("jwt", _jwt_role(key))
    except ValueError:
        return KeyInfo("unknown", None)


def key_variable(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, key) of the key the listener uses, or None when neither is set."""
    return next(((v, env[v]) for v in KEY_VARIABLES if env.get(v)), None)


def key_problem(key: str, variable: str) -> str | None:
    """One line saying why `key` (from `variable`) cannot serve the listener, or None."""
    info = classify(key)
    if info.is_service:
        return None
    return (f"{variable} holds {info.describe()}, but the listener needs the service-role "
            "kind: the secret key (sb_secret_...) or the legacy service_role JWT, from the "
            "dashboard's Project Settings > API Keys (docs/deploy.md#keys)")
