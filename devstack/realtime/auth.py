"""JWT checks for connections, channel joins, token refreshes and REST calls.

Supabase Realtime accepts a token only if it verifies with the project's JWT secret and
carries `role` and `exp` with `exp` in the future. Locally the secret is the stack's HS256
secret (`devstack.keys` signs the anon/service_role keys and user tokens with it). The error
texts follow the real server's so that clients and humans see familiar messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHMS = ["HS256", "HS384", "HS512"]


class AuthError(Exception):
    """A refused token; `message` is what the real server says, `code` its error code."""

    def __init__(self, message: str, code: str = "InvalidJWTToken") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def reason(self) -> str:
        """The `reason` of a failed join reply: `<Code>: <message>`."""
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Identity:
    """Who is behind a token: the verified claims and the raw token."""

    token: str
    claims: dict[str, Any]

    @property
    def role(self) -> str:
        return str(self.claims.get("role", ""))

    @property
    def sub(self) -> str | None:
        sub = self.claims.get("sub")
        return None if sub is None else str(sub)

    @property
    def exp(self) -> float:
        return float(self.claims.get("exp", 0))

    def seconds_left(self) -> float:
        return self.exp - time.time()


class TokenVerifier:
    """Verifies tokens against the local JWT secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def verify(self, token: str | None) -> Identity:
        """The identity behind `token`, or AuthError with Supabase's wording."""
        if token is None or not str(token).strip():
            raise AuthError("No api key provided", code="MissingApiKey")
        # Supabase strips whitespace and newlines that copy-paste leaves in tokens.
        token = "".join(str(token).split())
        if token.startswith("sb_"):
            raise AuthError(
                "Opaque sb_ keys are not supported by the local Realtime server; use a JWT key"
            )
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise AuthError("Failed to validate JWT: signature error") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"Failed to validate JWT: {exc}") from exc
        if not isinstance(claims, dict) or "role" not in claims or "exp" not in claims:
            raise AuthError("Fields `role` and `exp` are required in JWT")
        try:
            exp = float(claims["exp"])
        except (TypeError, ValueError) as exc:
            raise AuthError("Fields `role` and `exp` are required in JWT") from exc
        if "iat" in claims and not isinstance(claims["iat"], int | float):
            raise AuthError("Failed to validate JWT: iat must be a number")
        now = time.time()
        if exp <= now:
            raise AuthError(f"Token has expired {int(now - exp)} seconds ago")
        return Identity(token=token, claims=claims)
