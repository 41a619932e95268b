"""What an agent receives (`Message`) and what the presence registry knows (`AgentInfo`)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import message as _message
from google.protobuf import timestamp_pb2

from agentpost import payload as _payload
from agentpost.errors import InvalidArgumentError
from agentpost.v1 import agents_pb2, envelope_pb2

__all__ = [
    "Acker",
    "AgentInfo",
    "Message",
    "MessageKind",
    "Replier",
    "agent_info_from_proto",
    "timestamp_or_none",
]

_UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)
_timedelta = datetime.timedelta

#: Sends the reply to a request: (request id, payload, headers, content type).
Replier = Callable[[str, Any, Mapping[str, str] | None, str | None], Awaitable[None]]
#: Acknowledges one delivered message, by its id (queued for the session's next frame).
Acker = Callable[[str], None]


class MessageKind(enum.StrEnum):
    """What a message is."""

    MESSAGE = "message"
    """A one-way message: direct, topic or broadcast."""
    REQUEST = "request"
    """A request that expects exactly one reply (answer it with `Message.reply`)."""
    REPLY = "reply"
    """The reply to a request; `correlation_id` is the request's id."""
    EVENT = "event"
    """A system event published by the server (an agent joining or leaving...)."""


_KINDS = {
    envelope_pb2.MESSAGE_KIND_MESSAGE: MessageKind.MESSAGE,
    envelope_pb2.MESSAGE_KIND_REQUEST: MessageKind.REQUEST,
    envelope_pb2.MESSAGE_KIND_REPLY: MessageKind.REPLY,
    envelope_pb2.MESSAGE_KIND_EVENT: MessageKind.EVENT,
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """One delivered message. Build it with `Message.from_envelope`; the raw proto is `envelope`.

    Exactly one of `to`, `topic` and `broadcast` describes where the message was addressed.
    `payload` is the decoded body: JSON data, `bytes` (see `content_type`) or `None` when empty.
    `delivery_id` is set when the server wants an acknowledgement (mailbox messages, broadcasts,
    durable subscriptions: see `ack()`), and `redeliveries` counts earlier deliveries of it.
    """

    id: str
    sender: str
    kind: MessageKind
    to: str | None
    topic: str | None
    broadcast: bool
    correlation_id: str
    created_at: datetime.datetime
    headers: dict[str, str]
    payload: Any
    content_type: str
    delivery_id: str = dataclasses.field(default="", compare=False)
    redeliveries: int = dataclasses.field(default=0, compare=False)
    envelope: envelope_pb2.Envelope = dataclasses.field(repr=False, compare=False)
    _replier: Replier | None = dataclasses.field(default=None, repr=False, compare=False)
    _acker: Acker | None = dataclasses.field(default=None, repr=False, compare=False)

    def __hash__(self) -> int:
        return hash(self.id)

    @classmethod
    def from_envelope(
        cls,
        envelope: envelope_pb2.Envelope,
        *,
        replier: Replier | None = None,
        delivery_id: str = "",
        redeliveries: int = 0,
        acker: Acker | None = None,
    ) -> Message:
        """The message of an `Envelope`; `replier` makes `reply()` work for requests, `acker`
        makes `ack()` acknowledge a delivery that has a `delivery_id`."""
        recipient = envelope.recipient
        target = recipient.WhichOneof("target")
        body = envelope.payload
        headers = envelope.headers
        stamp = envelope.created_at
        return cls(
            id=envelope.id,
            sender=envelope.sender,
            kind=_KINDS.get(envelope.kind, MessageKind.MESSAGE),
            to=recipient.agent_id if target == "agent_id" else None,
            topic=recipient.topic if target == "topic" else None,
            broadcast=target == "broadcast",
            correlation_id=envelope.correlation_id,
            created_at=_EPOCH + _timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000),
            headers={key: headers[key] for key in headers} if headers else {},
            payload=_payload.from_payload(body),
            content_type=_payload.content_type_of(body),
            delivery_id=delivery_id,
            redeliveries=redeliveries,
            envelope=envelope,
            _replier=replier,
            _acker=acker if delivery_id else None,
        )

    @property
    def is_request(self) -> bool:
        """True for a request that expects a reply."""
        return self.kind is MessageKind.REQUEST

    async def reply(
        self,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer this request with `payload`.

        Raises `InvalidArgumentError` if this is not a request or it was not received by an
        `Agent` session (only the session that received a request can answer it), and the
        server's error (e.g. `UnknownRequestError` once the requester gave up) if it refuses.
        """
        if self.kind is not MessageKind.REQUEST:
            raise InvalidArgumentError(f"message {self.id} is a {self.kind}, not a request")
        if self._replier is None:
            raise InvalidArgumentError(
                f"request {self.id} was not received by an agent session, so it cannot be answered"
            )
        await self._replier(self.id, payload, headers, content_type)

    async def ack(self) -> None:
        """Acknowledge this delivery: the server will not deliver it again.

        Only needed with `ConnectOptions(ack_mode="manual")`; the other modes acknowledge on
        their own. Idempotent, and a no-op for messages without a `delivery_id`. The ack goes
        out with the session's next frame (the server does not answer it); one made while the
        session reconnects goes out on the new stream. Raises `ConnectionLostError` if the
        agent is closed before the message was acknowledged (it will be delivered again).
        """
        if self._acker is not None:
            self._acker(self.id)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AgentInfo:
    """What the presence registry knows of one agent (times are aware UTC datetimes)."""

    agent_id: str
    capabilities: tuple[str, ...]
    metadata: dict[str, Any]
    online: bool
    sessions: int
    connected_since: datetime.datetime | None
    last_seen: datetime.datetime | None
    first_seen: datetime.datetime | None
    #: Messages waiting in the agent's mailbox (stored and not yet acknowledged).
    pending: int = 0

    @classmethod
    def from_proto(cls, info: agents_pb2.AgentInfo) -> AgentInfo:
        """The `AgentInfo` of its proto."""
        return agent_info_from_proto(info)


def agent_info_from_proto(info: agents_pb2.AgentInfo) -> AgentInfo:
    """The `AgentInfo` of its proto."""
    return AgentInfo(
        agent_id=info.agent_id,
        capabilities=tuple(info.capabilities),
        metadata=_payload.from_struct(info.metadata),
        online=info.online,
        sessions=info.sessions,
        connected_since=timestamp_or_none(info, "connected_since"),
        last_seen=timestamp_or_none(info, "last_seen"),
        first_seen=timestamp_or_none(info, "first_seen"),
        pending=info.pending,
    )


def timestamp_or_none(message: _message.Message, name: str) -> datetime.datetime | None:
    """The aware UTC datetime of the Timestamp field `name` of `message`; `None` when unset."""
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=_UTC)
