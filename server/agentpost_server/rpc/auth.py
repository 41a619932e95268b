"""Who is calling: every RPC of the servicer is authenticated by its wrapper (`rpc.errors`) before
the method runs, and the method asks `caller(context)` for the result. Health and reflection are
other services: they stay reachable without a credential.

With authentication off (no tokens file, no JWT key, no client CA), the caller is whoever its
`agentpost-agent-id` metadata says ("anonymous" without one), allowed everything, as before.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Protocol

import grpc

from agentpost.errors import UnauthenticatedError
from agentpost_server.auth.authenticator import MESSAGE, Authenticator
from agentpost_server.core import names
from agentpost_server.core.auth import Guard, Principal

IDENTITY_METADATA = "agentpost-agent-id"
AUTHORIZATION = "authorization"
ANONYMOUS = "anonymous"
#: The client certificate field that names the agent under mutual TLS.
CERTIFICATE_NAME = "x509_common_name"

Ctx = grpc.aio.ServicerContext[Any, Any]

_CALLER: ContextVar[Principal] = ContextVar("agentpost_caller")
_OPEN_CACHE = 10_000


def caller(context: Ctx) -> Principal:
    """The principal of the current call (set by the servicer's wrappers): the one function
    every servicer method asks who is calling."""
    try:
        return _CALLER.get()
    except LookupError:  # a method outside the wrappers: a bug, never an open door
        raise UnauthenticatedError(MESSAGE) from None


class CallAuth:
    """Turns a call's metadata and TLS peer into its `Principal` (see `caller`)."""

    def __init__(self, authenticator: Authenticator, guard: Guard, *, mtls: bool) -> None:
        self.authenticator = authenticator
        self.guard = guard
        self.mtls = mtls
        self.enforced = authenticator.enabled or mtls
        self._open: dict[str, Principal] = {}

    def enter(self, context: Ctx) -> None:
        """Authenticate the call and make its principal what `caller` returns."""
        _CALLER.set(self.authenticate(context))

    def authenticate(self, context: Ctx) -> Principal:
        authorization: str | None = None
        claimed: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                authorization = value.decode() if isinstance(value, bytes) else value
            elif key == IDENTITY_METADATA:
                claimed = value.decode() if isinstance(value, bytes) else value
        if not self.enforced:
            return self._open_principal(claimed or ANONYMOUS)
        certificate = _certificate_name(context) if self.mtls else None
        principal = self.authenticator.authenticate(authorization, certificate)
        assert principal is not None  # enforced: a credential or an exception
        if claimed is not None and claimed != principal.agent_id:
            names.check_agent_id(claimed, IDENTITY_METADATA)
            self.guard.act_as(principal, claimed, "act_as")
        return principal

    def _open_principal(self, agent_id: str) -> Principal:
        principal = self._open.get(agent_id)
        if principal is None:
            names.check_agent_id(agent_id, IDENTITY_METADATA)
            if len(self._open) >= _OPEN_CACHE:
                self._open.clear()
            principal = self._open[agent_id] = Principal.open(agent_id)
        return principal


def _certificate_name(context: Ctx) -> str:
    values = list(context.auth_context().get(CERTIFICATE_NAME) or ())
    if not values:  # grpc verified the chain; a certificate without a CN names nobody
        raise UnauthenticatedError(MESSAGE)
    name = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    try:
        return names.check_agent_id(name, "client certificate CN")
    except Exception:
        raise UnauthenticatedError(MESSAGE) from None


class Authenticated(Protocol):
    """A servicer whose methods the wrappers authenticate."""

    call_auth: CallAuth
