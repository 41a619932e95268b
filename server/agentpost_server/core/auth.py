"""Who a caller is and what it may do: the policy, with neither grpc nor redis.

A `Principal` comes from a credential (a bearer token, a JWT or a client certificate; see
`agentpost_server.auth`) or, with authentication off, from the caller's own word (`open`). Every
refusal goes through `Guard.deny`, which logs it at WARNING, appends an `auth.denied` record to
the audit stream and raises `PermissionDeniedError`.

The rules, for a principal whose permissions are enforced (`enforced`):

- it is the agent its credential names: a session introduces itself as that agent, a unary call
  names no other one;
- it reads only its own mailbox and dead letters, and registers only itself (role `admin`: any);
- it advertises only the capabilities it is allowed (`*` allows any);
- it publishes on a topic only if one of its `publish` patterns matches the topic, and it
  subscribes to a pattern only if one of its `subscribe` patterns covers every topic the pattern
  can match;
- it broadcasts only with role `broadcast` (or `admin`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agentpost.errors import AgentpostError, PermissionDeniedError
from agentpost_server.core.ports import Audit
from agentpost_server.core.topics import SYSTEM_TOKEN, pattern_matches

log = logging.getLogger(__name__)

ADMIN = "admin"
BROADCAST = "broadcast"
ANY = "*"
DENIED = "auth.denied"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The caller of an RPC. `agent_id` is "" when nobody is named (auth off, no agent id)."""

    agent_id: str
    roles: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    #: False when authentication is off: the caller's word is taken and everything is allowed.
    enforced: bool = True
    _publish_parts: tuple[list[str], ...] = field(default=(), repr=False, compare=False)
    _subscribe_parts: tuple[list[str], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_publish_parts", tuple(p.split(".") for p in self.publish))
        object.__setattr__(self, "_subscribe_parts", tuple(p.split(".") for p in self.subscribe))

    @classmethod
    def open(cls, agent_id: str) -> Principal:
        """Authentication off: whoever the caller says it is, allowed everything."""
        return cls(agent_id=agent_id, roles=frozenset({ADMIN}), enforced=False)

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    def may_act_as(self, agent_id: str) -> bool:
        return not self.enforced or agent_id == self.agent_id

    def may_read(self, agent_id: str) -> bool:
        """Its own mailbox, dead letters (and tasks); an admin's: anyone's."""
        return not self.enforced or self.is_admin or agent_id == self.agent_id

    def may_advertise(self, capabilities: Iterable[str]) -> bool:
        if not self.enforced or ANY in self.capabilities:
            return True
        return all(c in self.capabilities for c in capabilities)

    def may_publish(self, topic: str) -> bool:
        if not self.enforced:
            return True
        tokens = topic.split(".")
        return any(pattern_matches(allowed, tokens) for allowed in self._publish_parts)

    def may_broadcast(self) -> bool:
        return not self.enforced or BROADCAST in self.roles or self.is_admin

    def may_subscribe(self, pattern: str) -> bool:
        if not self.enforced:
            return True
        wanted = pattern.split(".")
        return any(covers(allowed, wanted) for allowed in self._subscribe_parts)


def covers(allowed: list[str], wanted: list[str]) -> bool:
    """True if every topic that `wanted` matches is matched by `allowed` (both split patterns;
    `*` is one token, a final `>` one or more; a leading wildcard does not reach system topics)."""
    if wanted[0] == SYSTEM_TOKEN and allowed[0] != SYSTEM_TOKEN:
        return False
    for index, part in enumerate(allowed):
        if index >= len(wanted):
            return False
        if part == ">":
            return True
        mine = wanted[index]
        if mine == ">":
            return False
        if part != "*" and part != mine:
            return False
    return len(allowed) == len(wanted)


class Guard:
    """Refuses what a principal may not do, loudly: a WARNING, an audit record, an exception."""

    def __init__(self, audit: Audit | None) -> None:
        self._audit = audit
        self._pending: set[asyncio.Task[None]] = set()

    def deny(
        self, principal: Principal, action: str, subject: str, details: Mapping[str, str]
    ) -> PermissionDeniedError:
        """Record the refusal and return the exception to raise."""
        actor = principal.agent_id or "anonymous"
        log.warning(
            "denied: %s tried %s on %s %s",
            actor,
            action,
            subject,
            dict(details),
            extra={"actor": actor, "attempt": action, "subject": subject},
        )
        if self._audit is not None:
            record = {"attempt": action, **details}
            task = asyncio.get_running_loop().create_task(self._record(actor, subject, record))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return PermissionDeniedError(
            f"{actor!r} is not allowed to {action.replace('_', ' ')} {subject!r}",
            metadata={"action": action},
        )

    async def _record(self, actor: str, subject: str, details: Mapping[str, str]) -> None:
        assert self._audit is not None
        try:
            await self._audit.append(actor, DENIED, subject, details)
        except AgentpostError as exc:
            log.warning("could not audit a refusal of %s: %s", actor, exc.message)

    async def flush(self) -> None:
        """Wait for the audit records being written (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # ---- the checks; each raises PermissionDeniedError through deny() -----------------------

    def act_as(self, principal: Principal, agent_id: str, action: str) -> None:
        if not principal.may_act_as(agent_id):
            raise self.deny(principal, action, agent_id, {"as": agent_id})

    def read(self, principal: Principal, agent_id: str, action: str) -> None:
        if not principal.may_read(agent_id):
            raise self.deny(principal, action, agent_id, {})

    def advertise(self, principal: Principal, agent_id: str, capabilities: Iterable[str]) -> None:
        capabilities = list(capabilities)
        if not principal.may_advertise(capabilities):
            refused = [c for c in capabilities if c not in principal.capabilities]
            raise self.deny(
                principal, "advertise", agent_id, {"capabilities": ",".join(refused)[:512]}
            )

    def publish(self, principal: Principal, topic: str | None) -> None:
        if topic is None:
            if not principal.may_broadcast():
                raise self.deny(principal, "broadcast", "*", {})
        elif not principal.may_publish(topic):
            raise self.deny(principal, "publish", topic, {"topic": topic})

    def subscribe(self, principal: Principal, patterns: Iterable[str]) -> None:
        if not principal.enforced:
            return
        for pattern in patterns:
            if not principal.may_subscribe(pattern):
                raise self.deny(principal, "subscribe", pattern, {"pattern": pattern})
