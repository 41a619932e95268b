"""Signed JWTs (PyJWT): HMAC (HS256) with a shared secret, or RS256/ES256/EdDSA with a public key.

Claims: `sub` (the agent id), `exp` (required), and optional `roles`, `caps` (capabilities),
`pub` (publish patterns) and `subs` (subscribe patterns); `iss`/`aud` when configured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt

from agentpost_server.auth.tokens import principal_from_claims
from agentpost_server.core.auth import Principal

HMAC = ("HS256",)
PUBLIC_KEY = ("RS256", "ES256", "EdDSA")


class JwtVerifier:
    def __init__(
        self,
        key: str | bytes,
        algorithms: Sequence[str],
        *,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self._key = key
        self._algorithms = list(algorithms)
        self._issuer = issuer
        self._audience = audience

    def verify(self, token: str) -> tuple[Principal, float]:
        """The principal and the expiry (unix seconds); ValueError for any bad token."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "sub"]},
                leeway=5,
            )
        except jwt.PyJWTError as exc:
            raise ValueError(f"invalid JWT: {exc}") from None
        principal = principal_from_claims(claims.get("sub"), claims, "JWT")
        return principal, float(claims["exp"])


def create(
    secret: str,
    principal: Principal,
    ttl: float,
    *,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token for `principal`, valid for `ttl` seconds."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": principal.agent_id,
        "iat": now,
        "exp": now + int(ttl),
        "roles": sorted(principal.roles),
        "caps": sorted(principal.capabilities),
        "pub": list(principal.publish),
        "subs": list(principal.subscribe),
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
