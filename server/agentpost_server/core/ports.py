"""The ports the core needs from storage and transport. Adapters live in `agentpost_server.store`;
they raise only agentpost errors (UnavailableError when Redis cannot be reached)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agentpost.v1 import agents_pb2, envelope_pb2
from agentpost_server.bus.v1 import bus_pb2

if TYPE_CHECKING:
    from agentpost.v1 import tasks_pb2
    from agentpost_server.core.tasks.model import Change, Committed, TaskRecord


class Lane(enum.Enum):
    """The bus lanes between server processes."""

    SERVER = "server"  # addressed to one server process (requests, replies)
    TOPICS = "topics"  # topic publishes, seen by every server
    BROADCAST = "broadcast"  # broadcasts, seen by every server
    WAKE = "wake"  # "these mailboxes grew", seen by every server


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A session appeared or went away somewhere in the cluster."""

    agent_id: str
    session_id: str
    server_id: str
    added: bool


class Bus(Protocol):
    """Fan-out between server processes (Redis pub/sub)."""

    def publish(self, lane: Lane, item: bus_pb2.Routed, server_id: str = "") -> asyncio.Future[Any]:
        """Queue `item`; items are sent in call order. The future resolves once the bus took it."""
        ...

    def wake(self, agent_id: str) -> None:
        """Tell every server process (after the writes queued so far) that the agent's mailbox
        has new messages."""
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

    def on_task_event(self, task_id: str) -> None:
        """A task has new events (in its history)."""
        ...

    def on_workflow_event(self, run_id: str) -> None:
        """A workflow run has new events."""
        ...


@dataclass(frozen=True, slots=True)
class AgentRecord:
    agent_id: str
    capabilities: Sequence[str]
    metadata: Mapping[str, Any]
    max_tasks: int = 0  # tasks held at once; 0: no limit


class PresenceStore(Protocol):
    """The registry of agents and their live sessions."""

    async def add_session(
        self, agent: AgentRecord, session_id: str, server_id: str, instance_id: str
    ) -> bool:
        """Register a session (and make the agent known); True when the agent came online."""
        ...

    async def register(self, agent: AgentRecord) -> None:
        """Make an agent known before it connects."""
        ...

    async def live_instances(self, agent_id: str) -> set[str]:
        """The instance ids of the agent's live sessions."""
        ...

    async def remove_session(self, agent_id: str, session_id: str, server_id: str) -> bool:
        """Unregister a session; True when the agent just went offline."""
        ...

    async def sessions_of(self, agent_id: str) -> dict[str, str]:
        """session id -> server id of the agent's live sessions."""
        ...

    async def get_agent(self, agent_id: str) -> agents_pb2.AgentInfo | None: ...

    async def online(self, agent_id: str) -> bool | None:
        """Whether the agent has a live session; None when it is not known at all."""
        ...

    async def capable(self, capability: str) -> list[tuple[str, bool]]:
        """(agent id, online) of every agent advertising the capability."""
        ...

    async def task_limits(self, agent_ids: Sequence[str]) -> list[int]:
        """Each agent's `max_tasks` (0: no limit)."""
        ...

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


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message: its stream id (what a delivery id names), expiry and envelope bytes."""

    stream_id: str
    expires_ms: int
    envelope: bytes


class Mailboxes(Protocol):
    """Durable per-agent mailboxes, read by the agent's instances as competing consumers."""

    def append(
        self,
        sender: str,
        agent_id: str,
        envelope: envelope_pb2.Envelope,
        expires_ms: int,
        idempotency_key: str,
    ) -> asyncio.Future[Any]:
        """Queue the append; resolves with the message id (an earlier one for a repeated
        idempotency key), or None when the agent is unknown."""
        ...

    async def read(
        self, agent_id: str, consumer: str, count: int, *, pending: bool
    ) -> list[Entry]: ...

    async def adopt(self, agent_id: str, consumer: str, live: set[str]) -> int: ...

    async def claim_stale(self, agent_id: str, consumer: str, idle_ms: int, count: int) -> int: ...

    async def ack(self, agent_id: str, stream_ids: Sequence[str]) -> None: ...

    async def dead_letter(self, agent_id: str, entries: Sequence[Entry], reason: str) -> None: ...

    async def describe(self, agent_id: str) -> tuple[int, int, int | None, int]:
        """(depth, unacknowledged, oldest accepted unix ms or None, dead-lettered so far)."""
        ...

    async def dead_letters(self, agent_id: str, limit: int) -> list[tuple[bytes, str, int]]:
        """(envelope, reason, dead-at unix ms), newest first."""
        ...


class Logs(Protocol):
    """The broadcast and topic logs, and each agent's positions in them ("" names the broadcast
    position; any other name a durable topic subscription)."""

    async def latest(self, log: str) -> str:
        """The id of the newest entry ("0-0" when there is none)."""
        ...

    async def since(self, log: str, log_id: str, count: int) -> list[Entry]: ...

    async def position(self, agent_id: str, name: str) -> str: ...

    def advance(self, agent_id: str, name: str, log_id: str) -> asyncio.Future[Any]:
        """Queue moving a position forward (never back)."""
        ...

    async def durable_subscriptions(self, agent_id: str) -> dict[str, list[str]]: ...

    async def save_durable(self, agent_id: str, name: str, patterns: list[str]) -> None: ...

    async def delete_durable(self, agent_id: str, name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Who did what to what, and when (unix ms)."""

    id: str
    time_ms: int
    actor: str
    action: str
    subject: str
    details: Mapping[str, str]


class Audit(Protocol):
    """The audit stream: an append-only, count-trimmed record of handoffs, task transitions and
    refused actions."""

    async def append(
        self, actor: str, action: str, subject: str, details: Mapping[str, str] | None = None
    ) -> None: ...

    async def list(self, subject: str, limit: int) -> list[AuditRecord]:
        """Newest first; `subject` "" for all."""
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """A background job to run at `run_at_ms` (unix ms) on the task queue, at least once.
    A job id names one run: scheduling an id that is already queued does nothing."""

    job_id: str
    function: str
    args: Sequence[str]
    run_at_ms: int


class TaskStore(Protocol):
    """Tasks, their histories, waiting queues and load (`store.tasks`)."""

    async def load(self, task_id: str) -> TaskRecord | None: ...

    async def load_many(self, task_ids: Sequence[str]) -> list[TaskRecord]: ...

    async def commit(
        self,
        task_id: str,
        version: int,
        change: Change,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> Committed | str | None:
        """Committed, None on a version conflict, or the earlier task id for a used key."""
        ...

    async def schedule(self, job: Job) -> None: ...

    async def by_key(self, sender: str, key: str) -> str | None: ...

    async def history(
        self, task_id: str, after_seq: int, limit: int
    ) -> list[tasks_pb2.TaskEvent]: ...

    async def waiting(self, queue: str, limit: int) -> list[str]: ...

    async def queues(self) -> list[str]: ...

    async def loads(self, agent_ids: Sequence[str]) -> list[int]: ...

    async def ids(self, which: str, limit: int, offset: int = 0) -> list[str]: ...

    async def trim(self, before_ms: int) -> None: ...
