"""Token checks for connections, channel joins, token refreshes and REST calls.

Supabase Realtime accepts a JWT only if it verifies with the project's JWT secret and carries
`role` and `exp` with `exp` in the future. Locally the secret is the stack's HS256 secret
(`devstack.keys` signs the anon/service_role keys and user tokens with it).

Opaque API keys (`sb_publishable_…`, `sb_secret_…`) never reach hosted Realtime as such: the
API gateway in front of it swaps a valid one for a JWT of role `anon` / `service_role`. This
server plays both parts: it knows the stack's two opaque keys and treats them as those roles.

Refusals carry the texts hosted Realtime uses, which differ by where the token was refused
(supabase/realtime `user_socket.ex` `error_response/1` for connections, `realtime_channel.ex`
join/`access_token` clauses for channels), so `AuthError` holds all three forms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHMS = ["HS256", "HS384", "HS512"]
OPAQUE_PREFIX = "sb_"
# What the gateway answers for an unknown opaque key (Kong's key-auth, as clients report it).
INVALID_API_KEY_BODY = {
    "message": "Invalid API key",
    "hint": "Double check your Supabase `anon` or `service_role` API key.",
}
OPAQUE_KEY_LIFETIME_S = 10 * 365 * 24 * 3600


class AuthError(Exception):
    """A refused token.

    `reason` is the failed join reply's `<Code>: <message>`, `http_status`/`http_message`
    the refused WebSocket upgrade (`{"error": http_message}`), `refresh_message` the `system`
    error when an `access_token` push carries this token.
    """

    def __init__(
        self,
        message: str,
        code: str = "InvalidJWTToken",
        *,
        http_status: int = 401,
        http_message: str | None = None,
        refresh_message: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.http_message = message if http_message is None else http_message
        self.refresh_message = message if refresh_message is None else refresh_message
        self._reason = reason

    @property
    def reason(self) -> str:
        """The `reason` of a failed join reply: `<Code>: <message>`."""
        return self._reason if self._reason is not None else f"{self.code}: {self.message}"


class InvalidApiKey(AuthError):
    """An `sb_…` key that is not one of this stack's: refused as the gateway refuses it."""

    def __init__(self) -> None:
        super().__init__("Invalid API key", code="InvalidApiKey")


def _missing() -> AuthError:
    return AuthError("API key is missing or not a valid string", code="MissingAPIKey",
                     http_message="API key is missing")


def _malformed() -> AuthError:
    return AuthError("The token provided is not a valid JWT", code="MalformedJWT")


def _signature() -> AuthError:
    # A refreshed token with a bad signature falls into the channel's catch-all clause,
    # which shuts the channel down with `inspect(error)`.
    return AuthError("Failed to validate JWT signature", code="JwtSignatureError",
                     refresh_message=":signature_error")


def _missing_claims() -> AuthError:
    return AuthError("Fields `role` and `exp` are required in JWT")


def _expired(seconds_ago: int) -> AuthError:
    return AuthError(f"Token has expired {seconds_ago} seconds ago",
                     http_message="Token has expired")


def _unknown(detail: str) -> AuthError:
    return AuthError(detail, code="UnknownErrorOnChannel", http_status=500,
                     http_message="Error connecting to Realtime",
                     reason="Unknown Error on Channel", refresh_message=detail)


def _signer() -> AuthError:
    return AuthError(
        "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
        code="JwtSignerError",
    )


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
    """Verifies JWTs against the local secret and maps the stack's opaque keys to roles."""

    def __init__(self, secret: str, opaque_keys: dict[str, str] | None = None) -> None:
        self._secret = secret
        self._opaque = dict(opaque_keys or {})  # key -> role

    def verify(self, token: str | None) -> Identity:
        """The identity behind `token`, or AuthError with Supabase's wording."""
        if not isinstance(token, str):
            raise _missing()
        # Supabase strips whitespace and newlines that copy-paste leaves in tokens.
        token = "".join(token.split())
        if token.startswith(OPAQUE_PREFIX):
            return self._opaque_identity(token)
        try:
            header = jwt.get_unverified_header(token)
            jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _malformed() from exc
        if header.get("alg") not in ALGORITHMS:
            raise _signer()
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False,
                         "verify_nbf": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise _signature() from exc
        except jwt.PyJWTError as exc:
            raise _malformed() from exc
        if not isinstance(claims, dict):
            raise _malformed()
        return Identity(token=token, claims=self._check_claims(claims))

    @staticmethod
    def _check_claims(claims: dict[str, Any]) -> dict[str, Any]:
        """Joken's order: `exp` (when present) and `iat` validators, then required claims."""
        now = int(time.time())
        exp = claims.get("exp")
        if exp is not None:
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                raise _unknown(f"invalid exp claim: {exp!r}")
            if exp <= now:
                raise _expired(int(now - exp))
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, int | float) or isinstance(iat, bool)):
            raise _unknown(f"invalid iat claim: {iat!r}")
        if "role" not in claims or "exp" not in claims:
            raise _missing_claims()
        return claims

    def _opaque_identity(self, key: str) -> Identity:
        role = self._opaque.get(key)
        if role is None:
            raise InvalidApiKey()
        now = int(time.time())
        claims = {"iss": "supabase", "role": role, "iat": now,
                  "exp": now + OPAQUE_KEY_LIFETIME_S}
        return Identity(token=key, claims=claims)
