"""A session held by this server process: an agent's Connect stream, or a receive-only Subscribe.

The servicer reads operations into the hub and drains `next_batch()` onto the wire; the hub pushes
events from anywhere without awaiting. The outbound buffer is bounded: a consumer that falls that
far behind is disconnected (a slow consumer must not make the server buffer without bound).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agentpost.errors import AgentpostError, SlowConsumerError
from agentpost.v1 import envelope_pb2, messaging_pb2


@dataclass(slots=True)
class InboundRequest:
    """A request delivered to this session and not answered yet: where its reply must go."""

    requester: str
    reply_server: str
    reply_session: str
    reply_operation: str
    deadline_ms: int


@dataclass(eq=False)
class LocalSession:
    id: str
    agent_id: str
    registered: bool  # an agent session (in presence) rather than a receive-only subscription
    instance_id: str = ""
    capabilities: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    max_tasks: int = 0  # tasks the agent takes at once (0: no limit), as introduced
    broadcasts: bool = True
    max_buffered: int = 100_000
    subscriptions: set[str] = field(default_factory=set)
    durable: dict[str, list[str]] = field(default_factory=dict)  # durable name -> patterns
    inbound_requests: dict[str, InboundRequest] = field(default_factory=dict)
    outgoing_requests: set[str] = field(default_factory=set)
    last_heard: float = field(default_factory=time.monotonic)
    closed: bool = False
    pump: Any = None  # the MailboxPump of an agent session
    principal: Any = None  # the core.auth.Principal that opened it
    close_error: AgentpostError | None = None
    _events: deque[messaging_pb2.ServerEvent | bytes] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, event: messaging_pb2.ServerEvent | bytes) -> None:
        """Queue an event (or a serialized ServerEvent, see `core.wire`)."""
        if self.closed:
            return
        if len(self._events) >= self.max_buffered:
            self.close(
                SlowConsumerError(
                    f"slow consumer: more than {self.max_buffered} events waited for this"
                    " session; it is closed, reconnect and read faster",
                    metadata={"limit": str(self.max_buffered)},
                )
            )
            return
        self._events.append(event)
        self._ready.set()

    def deliver(self, envelope: envelope_pb2.Envelope) -> None:
        self.push(messaging_pb2.ServerEvent(delivery=envelope))

    def answer(self, operation_id: str, message_id: str = "", created_at: object = None) -> None:
        event = messaging_pb2.ServerEvent(operation_id=operation_id)
        event.accepted.message_id = message_id
        if created_at is not None:
            event.accepted.created_at.CopyFrom(created_at)  # type: ignore[arg-type]
        self.push(event)

    def fail(self, operation_id: str, error: object) -> None:
        event = messaging_pb2.ServerEvent(operation_id=operation_id)
        event.error.CopyFrom(error)  # type: ignore[arg-type]
        self.push(event)

    def close(self, error: AgentpostError | None = None) -> None:
        """Stop accepting events; the writer drains what is buffered, then ends the stream."""
        if self.closed:
            return
        self.close_error = error
        self.closed = True
        if error is not None:
            self._events.clear()  # an error ends the session now; what waited is dropped
        self._ready.set()

    async def next_batch(
        self, max_events: int = 512, max_bytes: int = 1 << 20
    ) -> list[messaging_pb2.ServerEvent | bytes] | None:
        """The events buffered now (at least one), or None once closed and drained."""
        while not self._events:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        events = self._events
        if len(events) == 1:
            return [events.popleft()]
        batch: list[messaging_pb2.ServerEvent | bytes] = []
        size = 0
        while events and len(batch) < max_events and size < max_bytes:
            event = events.popleft()
            size += len(event) if isinstance(event, bytes) else event.ByteSize()
            batch.append(event)
        return batch
