"""What each operation on a Connect stream does. Each operation gets one answer with its operation
id: `accepted` once the message is stored or handed to the bus, or `error`. Exceptions, to save a
frame each way: a request is answered by its `reply` event (or an `error`); a reply, a keep-alive
and an acknowledgement are answered only when they fail."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agentpost._status import to_error_proto
from agentpost.errors import (
    AgentpostError,
    InternalError,
    InvalidArgumentError,
    ProtocolViolationError,
    UnavailableError,
)
from agentpost.v1 import envelope_pb2, messaging_pb2
from agentpost_server.core import names
from agentpost_server.core.hub import Hub
from agentpost_server.core.session import LocalSession

log = logging.getLogger(__name__)


async def handle(hub: Hub, session: LocalSession, op: messaging_pb2.ClientOperation) -> None:
    op_id = op.operation_id
    kind = op.WhichOneof("operation")
    sent: asyncio.Future[Any]
    try:
        if kind == "send":
            send = op.send
            envelope, sent = await hub.send(
                session.agent_id,
                send.to,
                send.payload,
                send.headers,
                send.ttl if send.HasField("ttl") else None,
                send.idempotency_key,
            )
            _answer_when_sent(session, op_id, envelope, sent)
        elif kind == "ack":
            hub.ack(session, op.ack.delivery_ids)
        elif kind == "publish":
            publish = op.publish
            target = publish.WhichOneof("target")
            if target is None:
                raise InvalidArgumentError(
                    "publish needs a topic or broadcast", metadata={"field": "target"}
                )
            envelope, sent = hub.publish(
                session.agent_id,
                publish.topic if target == "topic" else None,
                publish.payload,
                publish.headers,
                publish.include_self,
                principal=session.principal,
            )
            _answer_when_sent(session, op_id, envelope, sent)
        elif kind == "request":
            request = op.request
            envelope, sent, _ = await hub.request(
                session.agent_id,
                request.to,
                request.payload,
                request.headers,
                request.timeout,
                session=session,
                operation_id=op_id,
            )
            _answer_request_when_sent(hub, session, op_id, envelope, sent)
        elif kind == "reply":
            envelope, sent = hub.reply(session, op.reply)
            _fail_if_not_sent(session, op_id, sent)
        elif kind == "subscribe":
            patterns = [names.check_pattern(p, "patterns") for p in op.subscribe.patterns]
            if op.subscribe.durable_name:
                await hub.subscribe_durable(session, op.subscribe.durable_name, patterns)
            else:
                hub.subscribe(session, patterns)
            session.answer(op_id)
        elif kind == "unsubscribe":
            if op.unsubscribe.durable_name:
                await hub.unsubscribe_durable(session, op.unsubscribe.durable_name)
            hub.unsubscribe(session, op.unsubscribe.patterns)
            session.answer(op_id)
        elif kind == "keep_alive":
            pass
        elif kind == "introduce":
            raise ProtocolViolationError("this session has already introduced itself")
        else:
            raise ProtocolViolationError(
                "the operation is empty or of a kind this server does not know"
            )
    except AgentpostError as exc:
        session.fail(op_id, to_error_proto(exc))


def _outcome(future: asyncio.Future[Any]) -> AgentpostError | None:
    if future.cancelled():
        return UnavailableError("the server is stopping")
    exc = future.exception()
    if exc is None:
        return None
    if isinstance(exc, AgentpostError):
        return exc
    log.error("publish failed unexpectedly", exc_info=exc)
    return InternalError("internal error; see the server log")


def _answer_when_sent(
    session: LocalSession, op_id: str, envelope: envelope_pb2.Envelope, sent: asyncio.Future[Any]
) -> None:
    """Accepted once stored; the id is the future's result when it is one (a repeated
    idempotency key answers with the first message's id)."""

    def done(future: asyncio.Future[Any]) -> None:
        error = _outcome(future)
        if error is None:
            result = future.result()
            message_id = result if isinstance(result, str) else envelope.id
            session.answer(op_id, message_id, envelope.created_at)
        else:
            session.fail(op_id, to_error_proto(error))

    sent.add_done_callback(done)


def _answer_request_when_sent(
    hub: Hub,
    session: LocalSession,
    op_id: str,
    envelope: envelope_pb2.Envelope,
    sent: asyncio.Future[Any],
) -> None:
    def done(future: asyncio.Future[Any]) -> None:
        error = _outcome(future)
        if error is not None:
            hub.requests.fail(envelope.id, error)

    if sent.done():
        done(sent)
    else:
        sent.add_done_callback(done)


def _fail_if_not_sent(session: LocalSession, op_id: str, sent: asyncio.Future[Any]) -> None:
    """A reply is answered only when it could not be sent."""

    def done(future: asyncio.Future[Any]) -> None:
        error = _outcome(future)
        if error is not None:
            session.fail(op_id, to_error_proto(error))

    if sent.done():
        done(sent)
    else:
        sent.add_done_callback(done)
