"""The AgentMessaging servicer: decode, call the hub, encode. No messaging logic lives here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError

from agentpost._status import from_error_proto, to_error_proto
from agentpost.errors import (
    AgentpostError,
    HandlerError,
    InvalidArgumentError,
    ProtocolViolationError,
)
from agentpost.v1 import agents_pb2, errors_pb2, messaging_pb2
from agentpost_server.core import events, names, operations, wire
from agentpost_server.core.auth import Principal
from agentpost_server.core.hub import Hub
from agentpost_server.core.ports import AgentRecord, Audit
from agentpost_server.core.session import LocalSession
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.core.workflows.driver import WorkflowService
from agentpost_server.rpc import depth
from agentpost_server.rpc.auth import CallAuth, caller
from agentpost_server.rpc.errors import streaming, unary
from agentpost_server.rpc.tasks import TaskRpcs
from agentpost_server.rpc.workflows import WorkflowRpcs

log = logging.getLogger(__name__)

INTRODUCTION_TIMEOUT = 10.0
_PRESENCE = {
    agents_pb2.PRESENCE_FILTER_UNSPECIFIED: None,
    agents_pb2.PRESENCE_FILTER_ONLINE: True,
    agents_pb2.PRESENCE_FILTER_OFFLINE: False,
}

_KNOWN_REASONS = frozenset(errors_pb2.ErrorReason.values()) - {errors_pb2.ERROR_REASON_UNSPECIFIED}

Ctx = grpc.aio.ServicerContext[Any, Any]


def _reply_error(error: errors_pb2.Error) -> AgentpostError:
    """The responder's failure, as its reason says; with a reason this server does not know, a
    HANDLER_FAILED (never an INTERNAL that the server did not have)."""
    if error.reason not in _KNOWN_REASONS:
        return HandlerError(error.message or "unknown error", metadata=dict(error.metadata))
    return from_error_proto(error)


async def _frames(raw_frames: AsyncIterator[bytes]) -> AsyncIterator[messaging_pb2.ConnectRequest]:
    async for raw in raw_frames:
        try:
            yield messaging_pb2.ConnectRequest.FromString(raw)
        except DecodeError:
            raise ProtocolViolationError(
                "a Connect frame is not a valid agentpost.v1.ConnectRequest message"
            ) from None


class AgentMessagingServicer(TaskRpcs, WorkflowRpcs):
    """Every method is wrapped (`rpc.errors`): authenticated first, then `caller(context)` is
    the principal; what it may do is checked by the hub's `Guard` (messaging) and by the task
    and workflow services (originator, assignee or admin)."""

    def __init__(
        self,
        hub: Hub,
        call_auth: CallAuth,
        tasks: TaskService,
        workflows: WorkflowService,
        audit: Audit,
    ) -> None:
        self._hub = hub
        self.call_auth = call_auth
        self._tasks = tasks
        self._workflows = workflows
        self._audit = audit

    @streaming(None)
    async def Connect(
        self, raw_frames: AsyncIterator[bytes], context: Ctx
    ) -> AsyncIterator[messaging_pb2.ConnectResponse]:
        request_iterator = _frames(raw_frames)
        session, first = await self._introduce(request_iterator, caller(context))
        limits = self._hub.limits
        welcome = messaging_pb2.ServerEvent(operation_id=first.operation_id)
        welcome.welcome.session_id = session.id
        welcome.welcome.server_id = self._hub.server_id
        welcome.welcome.keepalive_interval.FromNanoseconds(int(limits.keepalive_interval * 1e9))
        welcome.welcome.max_payload_bytes = limits.max_payload_bytes
        welcome.welcome.instance_id = session.instance_id
        welcome.welcome.max_unacked = session.pump.window if session.pump is not None else 0
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            yield messaging_pb2.ConnectResponse(events=[welcome])
            self._hub.start_delivery(session)
            while (batch := await session.next_batch()) is not None:
                yield wire.connect_response(  # type: ignore[misc]
                    [e if isinstance(e, bytes) else e.SerializeToString() for e in batch]
                )
            if session.close_error is not None:
                final = messaging_pb2.ServerEvent(error=to_error_proto(session.close_error))
                yield messaging_pb2.ConnectResponse(events=[final])
        finally:
            reader.cancel()
            await asyncio.shield(self._hub.close_session_soon(session))

    async def _introduce(
        self, request_iterator: AsyncIterator[messaging_pb2.ConnectRequest], principal: Principal
    ) -> tuple[LocalSession, messaging_pb2.ClientOperation]:
        try:
            async with asyncio.timeout(INTRODUCTION_TIMEOUT):
                frame = await anext(request_iterator)
        except StopAsyncIteration:
            raise ProtocolViolationError("the stream ended before the introduction") from None
        except TimeoutError:
            raise ProtocolViolationError(
                f"no introduction within {INTRODUCTION_TIMEOUT:g}s of opening Connect"
            ) from None
        ops = frame.operations
        if len(ops) != 1 or ops[0].WhichOneof("operation") != "introduce":
            raise ProtocolViolationError(
                "the first frame of Connect must hold exactly one operation, an `introduce`"
            )
        depth.check_metadata(ops[0].introduce.metadata)
        principal = principal if principal.enforced else Principal.open(ops[0].introduce.agent_id)
        return await self._hub.open_session(ops[0].introduce, principal), ops[0]

    async def _read(
        self, session: LocalSession, request_iterator: AsyncIterator[messaging_pb2.ConnectRequest]
    ) -> None:
        hub = self._hub
        try:
            async for frame in request_iterator:
                session.last_heard = time.monotonic()
                for op in frame.operations:
                    await operations.handle(hub, session, op)
        except asyncio.CancelledError:
            raise
        except AgentpostError as exc:  # a malformed frame
            session.close(exc)
        except Exception as exc:  # the peer vanished mid-read, or a bug: the session ends
            if not isinstance(exc, grpc.RpcError):
                log.exception("reading session %s failed", session.id)
        finally:
            session.close()

    @unary(messaging_pb2.SendRequest)
    async def Send(
        self, request: messaging_pb2.SendRequest, context: Ctx
    ) -> messaging_pb2.SendResponse:
        depth.check_payload(request.payload)
        envelope, stored = await self._hub.send(
            caller(context).agent_id,
            request.to,
            request.payload,
            request.headers,
            request.ttl if request.HasField("ttl") else None,
            request.idempotency_key,
        )
        message_id = await stored
        return messaging_pb2.SendResponse(message_id=message_id, created_at=envelope.created_at)

    @unary(messaging_pb2.PublishRequest)
    async def Publish(
        self, request: messaging_pb2.PublishRequest, context: Ctx
    ) -> messaging_pb2.PublishResponse:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidArgumentError(
                "publish needs a topic or broadcast", metadata={"field": "target"}
            )
        depth.check_payload(request.payload)
        principal = caller(context)
        envelope, sent = self._hub.publish(
            principal.agent_id,
            request.topic if target == "topic" else None,
            request.payload,
            request.headers,
            request.include_self,
            principal=principal,
        )
        await sent
        return messaging_pb2.PublishResponse(message_id=envelope.id, created_at=envelope.created_at)

    @unary(messaging_pb2.RequestRequest)
    async def Request(
        self, request: messaging_pb2.RequestRequest, context: Ctx
    ) -> messaging_pb2.RequestResponse:
        depth.check_payload(request.payload)
        timeout: duration_pb2.Duration | float | None = request.timeout
        remaining = context.time_remaining()
        if remaining is not None:
            asked = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else 0.0
            if asked < 0:
                raise InvalidArgumentError(
                    "timeout must not be negative", metadata={"field": "timeout"}
                )
            default = self._hub.limits.default_request_timeout
            timeout = max(0.001, min(asked or default, remaining - 0.05))
        envelope, sent, reply = await self._hub.request(
            caller(context).agent_id, request.to, request.payload, request.headers, timeout
        )
        assert reply is not None
        try:
            await sent
            answer = await reply
        finally:
            self._hub.requests.cancel(envelope.id)
        if answer.HasField("error"):
            raise _reply_error(answer.error)
        return messaging_pb2.RequestResponse(reply=answer)

    @unary(messaging_pb2.ListAgentsRequest)
    async def ListAgents(
        self, request: messaging_pb2.ListAgentsRequest, context: Ctx
    ) -> messaging_pb2.ListAgentsResponse:
        if request.capability:
            names.check_capabilities([request.capability])
        online = _PRESENCE.get(request.presence)
        if request.presence not in _PRESENCE:
            raise InvalidArgumentError("unknown presence filter", metadata={"field": "presence"})
        agents = await self._hub.list_agents(request.capability, online)
        return messaging_pb2.ListAgentsResponse(agents=agents)

    @unary(messaging_pb2.GetAgentRequest)
    async def GetAgent(
        self, request: messaging_pb2.GetAgentRequest, context: Ctx
    ) -> messaging_pb2.GetAgentResponse:
        return messaging_pb2.GetAgentResponse(agent=await self._hub.get_agent(request.agent_id))

    @streaming(messaging_pb2.SubscribeRequest)
    async def Subscribe(
        self, request: messaging_pb2.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[messaging_pb2.SubscribeResponse]:
        session = self._hub.open_subscriber(caller(context), request.topics, request.broadcasts)
        try:
            while (batch := await session.next_batch()) is not None:
                messages = [
                    event.delivery
                    for event in batch
                    if not isinstance(event, bytes) and event.HasField("delivery")
                ]
                if messages:
                    yield messaging_pb2.SubscribeResponse(messages=messages)
            if session.close_error is not None:
                raise session.close_error
        finally:
            await asyncio.shield(self._hub.close_session_soon(session))

    @unary(messaging_pb2.RegisterAgentRequest)
    async def RegisterAgent(
        self, request: messaging_pb2.RegisterAgentRequest, context: Ctx
    ) -> messaging_pb2.RegisterAgentResponse:
        depth.check_metadata(request.metadata)
        record = AgentRecord(
            request.agent_id, list(request.capabilities), events.struct_to_dict(request.metadata)
        )
        agent = await self._hub.register_agent(record, caller(context))
        return messaging_pb2.RegisterAgentResponse(agent=agent)

    @unary(messaging_pb2.GetMailboxRequest)
    async def GetMailbox(
        self, request: messaging_pb2.GetMailboxRequest, context: Ctx
    ) -> messaging_pb2.GetMailboxResponse:
        names.check_agent_id(request.agent_id)
        self._hub.guard.read(caller(context), request.agent_id, "read_mailbox")
        await self._hub.get_agent(request.agent_id)  # NOT_FOUND for an unknown agent
        depth, unacked, oldest_ms, dead = await self._hub.mailboxes.describe(request.agent_id)
        response = messaging_pb2.GetMailboxResponse(
            agent_id=request.agent_id, depth=depth, unacknowledged=unacked, dead_lettered=dead
        )
        if oldest_ms is not None:
            response.oldest_at.FromMilliseconds(oldest_ms)
        return response

    @unary(messaging_pb2.ListDeadLettersRequest)
    async def ListDeadLetters(
        self, request: messaging_pb2.ListDeadLettersRequest, context: Ctx
    ) -> messaging_pb2.ListDeadLettersResponse:
        principal = caller(context)
        agent_id = request.agent_id
        if agent_id:
            names.check_agent_id(agent_id)
        elif principal.enforced and not principal.is_admin:
            agent_id = principal.agent_id  # all agents' dead letters: admins only
        self._hub.guard.read(principal, agent_id or "*", "read_dead_letters")
        if request.limit < 0:
            raise InvalidArgumentError("limit must not be negative", metadata={"field": "limit"})
        limit = min(request.limit or 100, 1000)
        response = messaging_pb2.ListDeadLettersResponse()
        for raw, reason, dead_ms in await self._hub.mailboxes.dead_letters(agent_id, limit):
            letter = response.dead_letters.add(reason=reason)
            try:
                letter.envelope.ParseFromString(raw)
            except DecodeError:  # stored malformed: shown with its reason, without an envelope
                letter.envelope.Clear()
            letter.dead_at.FromMilliseconds(dead_ms)
        return response
