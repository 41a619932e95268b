"""What an agent receives (`Message`) and what the presence registry knows (`AgentInfo`)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import reprlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

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
_REQUEST = envelope_pb2.MESSAGE_KIND_REQUEST
# Shows a payload in a message's repr, cut short: a repr ends up in logs and tracebacks.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3

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

_MESSAGE = MessageKind.MESSAGE


class _Unset(enum.Enum):
    """Marks a field of a `Message` that is not decoded yet."""

    UNSET = 0


_UNSET: Final = _Unset.UNSET


class Message:
    """One delivered message. Build it with `Message.from_envelope`; the raw proto is `envelope`.

    Exactly one of `to`, `topic` and `broadcast` describes where the message was addressed.
    `payload` is the decoded body: JSON data, `bytes` (see `content_type`) or `None` when empty.
    `delivery_id` is set when the server wants an acknowledgement (mailbox messages, broadcasts,
    durable subscriptions: see `ack()`), and `redeliveries` counts earlier deliveries of it.

    A message is a read-only view of its `envelope` (treat that proto as read-only too): the
    fields are read from it on access, and `payload`, `headers` and `created_at` are decoded
    on first access and then kept, so a message costs little until it is looked at. Its
    attributes cannot be assigned. Messages are equal, and hash, by `id`: a message delivered
    again is the same message.
    """

    __slots__ = (
        "_acker",
        "_created_at",
        "_delivery_id",
        "_envelope",
        "_headers",
        "_id",
        "_payload",
        "_redeliveries",
        "_replier",
    )

    _id: str
    _envelope: envelope_pb2.Envelope
    _delivery_id: str
    _redeliveries: int
    _replier: Replier | None
    _acker: Acker | None
    _payload: Any
    _headers: dict[str, str] | _Unset
    _created_at: datetime.datetime | _Unset

    def __init__(
        self,
        envelope: envelope_pb2.Envelope,
        *,
        replier: Replier | None = None,
        delivery_id: str = "",
        redeliveries: int = 0,
        acker: Acker | None = None,
    ) -> None:
        """The message of an `Envelope` (see `from_envelope`)."""
        self._id = envelope.id
        self._envelope = envelope
        self._delivery_id = delivery_id
        self._redeliveries = redeliveries
        self._replier = replier
        self._acker = acker if delivery_id else None
        self._payload = self._headers = self._created_at = _UNSET

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
        return cls(
            envelope,
            replier=replier,
            delivery_id=delivery_id,
            redeliveries=redeliveries,
            acker=acker,
        )

    # ----------------------------------------------------------------- fields

    @property
    def id(self) -> str:
        """The message id, given by the server."""
        return self._id

    @property
    def sender(self) -> str:
        """The agent id of the sender."""
        return self._envelope.sender

    @property
    def kind(self) -> MessageKind:
        """What the message is: one-way, request, reply or system event."""
        return _KINDS.get(self._envelope.kind, _MESSAGE)

    @property
    def to(self) -> str | None:
        """The agent the message was sent to (None for topic messages and broadcasts)."""
        recipient = self._envelope.recipient
        return recipient.agent_id if recipient.WhichOneof("target") == "agent_id" else None

    @property
    def topic(self) -> str | None:
        """The topic the message was published on (None otherwise)."""
        recipient = self._envelope.recipient
        return recipient.topic if recipient.WhichOneof("target") == "topic" else None

    @property
    def broadcast(self) -> bool:
        """True for a broadcast."""
        return self._envelope.recipient.WhichOneof("target") == "broadcast"

    @property
    def correlation_id(self) -> str:
        """For a reply, the id of its request ("" otherwise)."""
        return self._envelope.correlation_id

    @property
    def created_at(self) -> datetime.datetime:
        """When the server accepted the message (aware UTC)."""
        created_at = self._created_at
        if created_at is _UNSET:
            stamp = self._envelope.created_at
            # timedelta(days, seconds, microseconds): positional is the fast way to build it.
            created_at = self._created_at = _EPOCH + _timedelta(
                0, stamp.seconds, stamp.nanos // 1000
            )
        return created_at

    @property
    def headers(self) -> dict[str, str]:
        """The sender's headers (decoded on first access)."""
        headers = self._headers
        if headers is _UNSET:
            fields = self._envelope.headers  # dict() of a proto map is slower than this
            headers = self._headers = {key: fields[key] for key in fields} if fields else {}
        return headers

    @property
    def payload(self) -> Any:
        """The decoded body: JSON data, `bytes` or `None` (decoded on first access)."""
        payload = self._payload
        if payload is _UNSET:
            payload = self._payload = _payload.from_payload(self._envelope.payload)
        return payload

    @property
    def content_type(self) -> str:
        """The body's content type (the default of its kind when the sender named none)."""
        return _payload.content_type_of(self._envelope.payload)

    @property
    def delivery_id(self) -> str:
        """Set when the server wants an acknowledgement ("" otherwise): see `ack()`."""
        return self._delivery_id

    @property
    def redeliveries(self) -> int:
        """How many times the server delivered this message before."""
        return self._redeliveries

    @property
    def envelope(self) -> envelope_pb2.Envelope:
        """The raw proto (read-only: the message reads its fields from it)."""
        return self._envelope

    @property
    def is_request(self) -> bool:
        """True for a request that expects a reply."""
        return self._envelope.kind == _REQUEST

    # ----------------------------------------------------------------- value behaviour

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self._id == other._id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        parts = [f"id={self._id!r}", f"sender={self.sender!r}", f"kind={self.kind.value!r}"]
        if (topic := self.topic) is not None:
            parts.append(f"topic={topic!r}")
        elif self.broadcast:
            parts.append("broadcast=True")
        else:
            parts.append(f"to={self.to!r}")
        if correlation_id := self.correlation_id:
            parts.append(f"correlation_id={correlation_id!r}")
        if self._delivery_id:
            parts.append(f"delivery_id={self._delivery_id!r}")
        if self._redeliveries:
            parts.append(f"redeliveries={self._redeliveries}")
        parts.append(f"content_type={self.content_type!r}")
        parts.append(f"payload={_REPR.repr(self.payload)}")
        return f"Message({', '.join(parts)})"

    # ----------------------------------------------------------------- actions

    async def reply(
        self,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer this request with `payload`.

        Returns once the reply is queued on the stream the request came from: the server
        answers a reply only when it refuses it (for example once the requester gave up), and
        that is logged as a warning, not raised. Raises `InvalidArgumentError` if this is not a
        request or it was not received by an `Agent` session (only the session that received a
        request can answer it), `PayloadTooLargeError`, and `ConnectionLostError` if the stream
        the request came from is gone.
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
