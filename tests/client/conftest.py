"""Fixtures of the SDK tests: a scriptable in-process fake of the AgentMessaging service on
port 0, used only to inject what a real server rarely does on demand (dropped streams, going-away
notices, keep-alives, refusals, redeliveries), and envelopes as a server would deliver them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from agentpost import _status
from agentpost.errors import AgentpostError, HandlerError, NoResponderError
from agentpost.v1 import envelope_pb2, messaging_pb2, messaging_pb2_grpc


@dataclass(eq=False)
class FakeSession:
    """One Connect stream as the fake sees it; push events or end it from a test."""

    introduce: messaging_pb2.Introduce
    session_id: str
    out: asyncio.Queue[messaging_pb2.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    operations: list[messaging_pb2.ClientOperation] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # operations per received frame
    half_closed: bool = False  # the client said goodbye (done_writing)

    def push(self, *events: messaging_pb2.ServerEvent) -> None:
        """Send these events, in one frame."""
        self.out.put_nowait(messaging_pb2.ConnectResponse(events=list(events)))

    def deliver(
        self, envelope: envelope_pb2.Envelope, delivery_id: str = "", redeliveries: int = 0
    ) -> None:
        self.push(delivery(envelope, delivery_id, redeliveries))

    def end(self) -> None:
        self.out.put_nowait(None)

    def of_kind(self, kind: str) -> list[messaging_pb2.ClientOperation]:
        return [op for op in self.operations if op.WhichOneof("operation") == kind]

    def acked(self) -> list[str]:
        """Every delivery id acknowledged on this stream, in order."""
        return [i for op in self.of_kind("ack") for i in op.ack.delivery_ids]


def delivery(
    envelope: envelope_pb2.Envelope, delivery_id: str = "", redeliveries: int = 0
) -> messaging_pb2.ServerEvent:
    return messaging_pb2.ServerEvent(
        delivery=envelope, delivery_id=delivery_id, redeliveries=redeliveries
    )


class FakeBus(messaging_pb2_grpc.AgentMessagingServicer):
    """Answers operations like a well-behaved server, with hooks to misbehave.

    * send/publish/subscribe/unsubscribe: accepted (sends to "blackhole" get no answer).
      Sends are stored once per idempotency key (`stored`); a repeated key gets the first id.
      `drop_sends`: that many sends are stored, then the stream ends before the answer.
    * request: the payload echoed back as the reply (no `accepted`); to "silent": no answer;
      to "failing": a reply carrying a handler error; to "nobody": an error event.
    * reply: no answer, unless `refuse_replies` (then that error).
    * `legacy_accepts`: also answer requests and replies with `accepted`, as older servers did.
    * ack: no answer. A stream the client half-closes is ended.
    * Welcome echoes the instance id (or names one) and the window (`window` by default).
    """

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.refusal: AgentpostError | None = None
        self.unary_error: AgentpostError | None = None
        self.keepalive_seconds = 5.0
        self.attempts = 0  # introductions received
        self.gate: asyncio.Event | None = None  # when set: welcome only once the event is set
        self.hold_subscribes = False  # keep subscribe operations unanswered until release()
        self.legacy_accepts = False  # answer requests and replies with `accepted` too
        self.refuse_replies: AgentpostError | None = None
        self.held: list[tuple[FakeSession, messaging_pb2.ClientOperation]] = []
        self.window = 100
        self.drop_sends = 0
        self.stored: dict[str, str] = {}  # idempotency key -> message id
        self.unavailable_sends = 0  # unary Send: fail that many calls with UNAVAILABLE
        self.unary_sends: list[messaging_pb2.SendRequest] = []
        self.unary_requests: list[Any] = []  # RegisterAgent, GetMailbox, ListDeadLetters
        self._ids = itertools.count(1)
        self.target = ""

    @property
    def last(self) -> FakeSession:
        return self.sessions[-1]

    async def Connect(
        self,
        request_iterator: AsyncIterator[messaging_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[messaging_pb2.ConnectResponse]:
        first = await anext(request_iterator)
        intro = first.operations[0]
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.refusal is not None:
            error = messaging_pb2.ServerEvent(operation_id=intro.operation_id)
            error.error.CopyFrom(_status.to_error_proto(self.refusal))
            yield messaging_pb2.ConnectResponse(events=[error])
            return
        session = FakeSession(introduce=intro.introduce, session_id=f"s-{next(self._ids)}")
        self.sessions.append(session)
        welcome = messaging_pb2.ServerEvent(operation_id=intro.operation_id)
        welcome.welcome.session_id = session.session_id
        welcome.welcome.server_id = "fake"
        welcome.welcome.max_payload_bytes = 1000
        welcome.welcome.keepalive_interval.FromNanoseconds(int(self.keepalive_seconds * 1e9))
        welcome.welcome.instance_id = intro.introduce.instance_id or f"i-{next(self._ids)}"
        welcome.welcome.max_unacked = intro.introduce.max_unacked or self.window
        yield messaging_pb2.ConnectResponse(events=[welcome])
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            while (frame := await session.out.get()) is not None:
                yield frame
        finally:
            reader.cancel()

    async def _read(
        self, session: FakeSession, request_iterator: AsyncIterator[messaging_pb2.ConnectRequest]
    ) -> None:
        async for frame in request_iterator:
            session.frames.append(len(frame.operations))
            for op in frame.operations:
                session.operations.append(op)
                self._answer(session, op)
        session.half_closed = True
        session.end()

    def _answer(self, session: FakeSession, op: messaging_pb2.ClientOperation) -> None:
        kind = op.WhichOneof("operation")
        if kind in ("keep_alive", "ack"):
            return
        if kind == "subscribe" and self.hold_subscribes:
            self.held.append((session, op))
            return
        answer = messaging_pb2.ServerEvent(operation_id=op.operation_id)
        target = op.request.to if kind == "request" else op.send.to if kind == "send" else ""
        if target in ("blackhole", "silent") or (kind == "request" and target == "nobody"):
            if target == "nobody":
                answer.error.CopyFrom(_status.to_error_proto(NoResponderError("no one there")))
                session.push(answer)
            return
        if kind == "reply" and self.refuse_replies is not None:
            answer.error.CopyFrom(_status.to_error_proto(self.refuse_replies))
            session.push(answer)
            return
        if kind == "send":
            key = op.send.idempotency_key
            answer.accepted.message_id = self.stored.setdefault(key, f"m-{next(self._ids)}")
            if self.drop_sends > 0:
                self.drop_sends -= 1
                session.end()
                return
        else:
            answer.accepted.message_id = f"m-{next(self._ids)}"
        if kind not in ("request", "reply") or self.legacy_accepts:
            session.push(answer)
        if kind == "request":
            reply = messaging_pb2.ServerEvent(operation_id=op.operation_id)
            reply.reply.id = f"m-{next(self._ids)}"
            reply.reply.sender = target
            reply.reply.kind = envelope_pb2.MESSAGE_KIND_REPLY
            reply.reply.correlation_id = answer.accepted.message_id
            if target == "failing":
                reply.reply.error.CopyFrom(_status.to_error_proto(HandlerError("KeyError: 'x'")))
            else:
                reply.reply.payload.CopyFrom(op.request.payload)
            session.push(reply)

    def release(self) -> None:
        """Answer the held subscribe operations (on the streams they came from)."""
        for session, op in self.held:
            answer = messaging_pb2.ServerEvent(operation_id=op.operation_id)
            answer.accepted.SetInParent()
            session.push(answer)
        self.held.clear()

    async def Send(
        self, request: messaging_pb2.SendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> messaging_pb2.SendResponse:
        self.unary_sends.append(request)
        if self.unavailable_sends > 0:
            self.unavailable_sends -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        await self._maybe_fail(context)
        sender = dict(context.invocation_metadata() or ()).get("agentpost-agent-id", "anonymous")
        return messaging_pb2.SendResponse(message_id=f"{sender}:{request.to}")

    async def RegisterAgent(
        self,
        request: messaging_pb2.RegisterAgentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> messaging_pb2.RegisterAgentResponse:
        self.unary_requests.append(request)
        await self._maybe_fail(context)
        response = messaging_pb2.RegisterAgentResponse()
        agent = response.agent
        agent.agent_id = request.agent_id
        agent.capabilities.extend(request.capabilities)
        agent.metadata.CopyFrom(request.metadata)
        agent.first_seen.FromSeconds(1_700_000_000)
        return response

    async def GetMailbox(
        self, request: messaging_pb2.GetMailboxRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> messaging_pb2.GetMailboxResponse:
        self.unary_requests.append(request)
        await self._maybe_fail(context)
        response = messaging_pb2.GetMailboxResponse(
            agent_id=request.agent_id, depth=3, unacknowledged=1, dead_lettered=2
        )
        if request.agent_id != "empty":
            response.oldest_at.FromSeconds(1_700_000_000)
        else:
            response.depth = response.unacknowledged = 0
        return response

    async def ListDeadLetters(
        self,
        request: messaging_pb2.ListDeadLettersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> messaging_pb2.ListDeadLettersResponse:
        self.unary_requests.append(request)
        await self._maybe_fail(context)
        response = messaging_pb2.ListDeadLettersResponse()
        letter = response.dead_letters.add(reason="ttl expired")
        letter.envelope.CopyFrom(envelope(payload={"late": True}, id="d-1", to="coder"))
        letter.dead_at.FromSeconds(1_700_000_100)
        return response

    async def _maybe_fail(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.unary_error is not None:
            code, details, trailers = _status.to_status(self.unary_error)
            await context.abort(code, details, trailers)


@pytest.fixture
async def fake_bus() -> AsyncIterator[FakeBus]:
    bus = FakeBus()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    server = grpc.aio.server()
    messaging_pb2_grpc.add_AgentMessagingServicer_to_server(bus, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bus.target = f"127.0.0.1:{port}"
    try:
        yield bus
    finally:
        await server.stop(None)


def envelope(
    kind: int = envelope_pb2.MESSAGE_KIND_MESSAGE, payload: Any = None, **fields: Any
) -> envelope_pb2.Envelope:
    """An Envelope as a server would deliver it."""
    from agentpost.payload import fill_payload

    env = envelope_pb2.Envelope(id=fields.pop("id", "m-1"), sender="peer", kind=kind)  # type: ignore[arg-type]
    topic = fields.pop("topic", None)
    if topic is not None:
        env.recipient.topic = topic
    else:
        env.recipient.agent_id = fields.pop("to", "me")
    env.created_at.FromSeconds(1_700_000_000)
    if payload is not None:
        fill_payload(env.payload, payload)
    for name, value in fields.items():
        setattr(env, name, value)
    return env


@pytest.fixture
def make_envelope() -> Callable[..., envelope_pb2.Envelope]:
    return envelope
