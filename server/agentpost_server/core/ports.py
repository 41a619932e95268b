"""The ports the core needs from storage and transport. Adapters live in `agentpost_server.store`;
they raise only agentpost errors (UnavailableError when Redis cannot be reached)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agentpost.v1 import agents_pb2
from agentpost_server.bus.v1 import bus_pb2


class Lane(enum.Enum):
    """The bus lanes between server processes."""

    SERVER = "server"  # addressed to one server process (direct messages, requests, replies)
    TOPICS = "topics"  # topic publishes, seen by every server
    BROADCAST = "broadcast"  # broadcasts, seen by every server


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A session appeared or went away somewhere in the cluster."""

    agent_id: str
    session_id: str
    server_id: str
    added: bool


class Bus(Protocol):
    """Fan-out between server processes (Redis pub/sub)."""

    def publish(
        self, lane: Lane, item: bus_pb2.Routed, server_id: str = ""
    ) -> asyncio.Future[None]:
        """Queue `item`; items are sent in call order. The future resolves once the bus took it."""
        ...

    async def announce(self, change: PresenceChange) -> None:
        """Tell every server process about a presence change."""
        ...


class Inbound(Protocol):
    """What the bus delivers to (implemented by the hub)."""

    def on_routed(self, lane: Lane, batch: bus_pb2.BusBatch) -> None: ...

    def on_presence(self, change: PresenceChange) -> None: ...

    def on_bus_reset(self) -> None:
        """The bus reconnected: anything learned from it may be stale."""
        ...


@dataclass(frozen=True, slots=True)
class AgentRecord:
    agent_id: str
    capabilities: Sequence[str]
    metadata: Mapping[str, Any]


class PresenceStore(Protocol):
    """The registry of agents and their live sessions."""

    async def add_session(self, agent: AgentRecord, session_id: str, server_id: str) -> bool:
        """Register a session; True when the agent just came online."""
        ...

    async def remove_session(self, agent_id: str, session_id: str, server_id: str) -> bool:
        """Unregister a session; True when the agent just went offline."""
        ...

    async def sessions_of(self, agent_id: str) -> dict[str, str]:
        """session id -> server id of the agent's live sessions."""
        ...

    async def get_agent(self, agent_id: str) -> agents_pb2.AgentInfo | None: ...

    async def list_agents(
        self, capability: str, online: bool | None
    ) -> list[agents_pb2.AgentInfo]: ...

    async def heartbeat(self, server_id: str, agent_ids: Sequence[str], ttl_seconds: float) -> bool:
        """Keep this server (and the last-seen time of its agents) alive. True when the server
        was not registered: new, or reaped as dead while it was alive."""
        ...

    async def ping(self) -> None:
        """Raise UnavailableError unless storage answers."""
        ...
