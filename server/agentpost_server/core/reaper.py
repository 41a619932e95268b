"""Sessions of a server process that died without saying goodbye are removed from presence once
its heartbeat expires, and their agents are announced offline."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core import events
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.ports import Bus, Entry, Lane, PresenceChange

log = logging.getLogger(__name__)


class ReapableStore(Protocol):
    async def reap_dead_servers(self) -> list[tuple[PresenceChange, bool]]: ...

    async def list_agents(self, capability: str, online: bool | None) -> list[Any]: ...


class SweepableMailboxes(Protocol):
    async def expired(
        self, agent_id: str, now_ms: int, oldest_ms: int
    ) -> tuple[list[Entry], list[Entry]]: ...

    async def dead_letter(self, agent_id: str, entries: list[Entry], reason: str) -> None: ...


async def reap(store: ReapableStore, bus: Bus, ids: UlidFactory) -> int:
    """One sweep; returns how many sessions were removed."""
    removed = await store.reap_dead_servers()
    for change, went_offline in removed:
        await bus.announce(change)
        if went_offline:
            envelope = events.system_envelope(ids.new(), *events.agent_offline(change.agent_id))
            await bus.publish(Lane.TOPICS, bus_pb2.Routed(envelope=envelope))
    if removed:
        log.info("removed %d sessions of dead servers", len(removed))
    return len(removed)


async def sweep(store: ReapableStore, mailboxes: SweepableMailboxes, *, max_age_ms: int) -> int:
    """Move messages past their TTL, or older than the retention age, to the dead letters.
    Returns how many moved."""
    now_ms = time.time_ns() // 1_000_000
    moved = 0
    for agent in await store.list_agents("", None):
        if not agent.pending:
            continue
        expired, aged = await mailboxes.expired(agent.agent_id, now_ms, now_ms - max_age_ms)
        if expired:
            await mailboxes.dead_letter(agent.agent_id, expired, "ttl expired")
        if aged:
            await mailboxes.dead_letter(agent.agent_id, aged, "retention: older than the age limit")
        moved += len(expired) + len(aged)
    if moved:
        log.info("moved %d expired messages to the dead letters", moved)
    return moved
