"""Requests this server process waits on: each gets its reply, its timeout, or its cancellation,
exactly once. A reply that arrives after that is dropped, never delivered as a stray message."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from agentpost._status import to_error_proto
from agentpost.errors import AgentpostError, RequestTimeoutError
from agentpost.v1 import envelope_pb2, messaging_pb2
from agentpost_server.core.session import LocalSession

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Waiting:
    future: asyncio.Future[envelope_pb2.Envelope] | None
    timer: asyncio.TimerHandle
    session: LocalSession | None
    operation_id: str
    target: str
    seconds: float


class PendingRequests:
    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(
        self,
        message_id: str,
        seconds: float,
        target: str,
        session: LocalSession | None,
        operation_id: str,
    ) -> asyncio.Future[envelope_pb2.Envelope] | None:
        """Start waiting for the reply to `message_id`. A session gets it as a `reply` event;
        otherwise the returned future resolves with it (or RequestTimeoutError)."""
        loop = asyncio.get_running_loop()
        future = None if session is not None else loop.create_future()
        timer = loop.call_later(seconds, self._expire, message_id)
        self._waiting[message_id] = _Waiting(future, timer, session, operation_id, target, seconds)
        if session is not None:
            session.outgoing_requests.add(message_id)
        return future

    def resolve(self, reply: envelope_pb2.Envelope, operation_id: str) -> None:
        waiting = self._pop(reply.correlation_id)
        if waiting is None:
            log.debug("late reply to %s dropped", reply.correlation_id)
            return
        if waiting.future is not None:
            if not waiting.future.done():
                waiting.future.set_result(reply)
        elif waiting.session is not None:
            waiting.session.push(
                messaging_pb2.ServerEvent(operation_id=waiting.operation_id, reply=reply)
            )

    def fail(self, message_id: str, error: AgentpostError) -> None:
        waiting = self._pop(message_id)
        if waiting is None:
            return
        if waiting.future is not None:
            if not waiting.future.done():
                waiting.future.set_exception(error)
        elif waiting.session is not None:
            waiting.session.fail(waiting.operation_id, to_error_proto(error))

    def cancel(self, message_id: str) -> None:
        waiting = self._pop(message_id)
        if waiting is not None and waiting.future is not None:
            waiting.future.cancel()

    def _expire(self, message_id: str) -> None:
        waiting = self._waiting.get(message_id)
        if waiting is not None:
            self.fail(
                message_id,
                RequestTimeoutError(
                    f"no reply from {waiting.target!r} within {waiting.seconds:g}s",
                    metadata={"timeout_seconds": f"{waiting.seconds:g}"},
                ),
            )

    def _pop(self, message_id: str) -> _Waiting | None:
        waiting = self._waiting.pop(message_id, None)
        if waiting is not None:
            waiting.timer.cancel()
            if waiting.session is not None:
                waiting.session.outgoing_requests.discard(message_id)
        return waiting
