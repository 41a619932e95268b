"""Sessions of a server process that died without saying goodbye are removed from presence once
its heartbeat expires, and their agents are announced offline."""

from __future__ import annotations

import logging
from typing import Protocol

from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core import events
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.ports import Bus, Lane, PresenceChange

log = logging.getLogger(__name__)


class ReapableStore(Protocol):
    async def reap_dead_servers(self) -> list[tuple[PresenceChange, bool]]: ...


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
