"""From what a call carried (a bearer token, a client certificate's name, the agent id it claims)
to a `Principal`. Every failure is the same `UnauthenticatedError`: unknown, malformed and
expired credentials are not told apart to the caller (the server log says which, at DEBUG)."""

from __future__ import annotations

import logging
import time

from agentpost.errors import AgentpostError, UnauthenticatedError
from agentpost_server.auth.jwts import JwtVerifier
from agentpost_server.auth.tokens import TokensFile, expired
from agentpost_server.core.auth import ANY, BROADCAST, Principal

log = logging.getLogger(__name__)

MESSAGE = "missing or invalid credentials"
_CACHE_SIZE = 10_000


def certificate_principal(agent_id: str) -> Principal:
    """A client certificate alone: its agent, any capability, any non-system topic, the agent
    presence topics, broadcasts; not admin."""
    return Principal(
        agent_id=agent_id,
        roles=frozenset({BROADCAST}),
        capabilities=frozenset({ANY}),
        publish=(">",),
        subscribe=(">", "_agentpost.agents.*"),
    )


class Authenticator:
    def __init__(
        self,
        *,
        tokens: TokensFile | None = None,
        jwt: JwtVerifier | None = None,
    ) -> None:
        self._tokens = tokens
        self._jwt = jwt
        self._cache: dict[str, tuple[Principal, float]] = {}  # token -> principal, expiry

    @property
    def enabled(self) -> bool:
        """Bearer tokens are required (a tokens file or a JWT key is configured)."""
        return self._tokens is not None or self._jwt is not None

    def authenticate(self, authorization: str | None, certificate: str | None) -> Principal | None:
        """The principal of a call, or None when authentication is off and no client certificate
        names one (the caller's word is taken then). Raises `UnauthenticatedError`."""
        if not self.enabled:
            return certificate_principal(certificate) if certificate else None
        if not authorization:
            raise self._refuse("no bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._refuse("the authorization metadata is not `Bearer <token>`")
        principal = self._verify(token)
        if certificate is not None and principal.agent_id != certificate:
            raise self._refuse(
                f"the token names {principal.agent_id!r}, the client certificate {certificate!r}"
            )
        return principal

    def _verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if cached[1] > now:
                return cached[0]
            del self._cache[token]
            raise self._refuse("expired token")
        principal, expires = self._check(token, now)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = (principal, expires)
        return principal

    def _check(self, token: str, now: float) -> tuple[Principal, float]:
        if self._tokens is not None:
            entry = self._tokens.lookup(token)
            if entry is not None:
                if expired(entry.expires_at, now):
                    raise self._refuse("expired token")
                return entry.principal, entry.expires_at or float("inf")
        if self._jwt is not None and token.count(".") == 2:
            try:
                return self._jwt.verify(token)
            except (ValueError, AgentpostError) as exc:
                raise self._refuse(str(exc)) from None
        raise self._refuse("unknown token")

    def _refuse(self, why: str) -> UnauthenticatedError:
        log.debug("unauthenticated call: %s", why)
        return UnauthenticatedError(MESSAGE)
