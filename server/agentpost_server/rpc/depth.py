"""Refuses input nested so deeply that the server could not pass it on.

Protobuf decoders stop at 100 nested messages. A JSON payload of a unary call sits two levels
higher than in the frame that delivers it (`ConnectResponse` > `ServerEvent` > `Envelope` >
`Payload`), and an agent's metadata sits deepest in the `agent.online` event: either could be
accepted and then fail every attempt to deliver it. So each is decoded once where it will be
deepest, and refused if that fails. (A Connect operation is as deep as its delivery: that it
decoded proves it fits.)
"""

from __future__ import annotations

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import envelope_pb2, messaging_pb2, payload_pb2, tasks_pb2
from agentpost_server.core import wire


def _number(message: type[Message], name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


# ConnectResponse.events > ServerEvent.delivery > Envelope.payload
_DELIVERY = (
    _number(messaging_pb2.ConnectResponse, "events"),
    _number(messaging_pb2.ServerEvent, "delivery"),
    _number(envelope_pb2.Envelope, "payload"),
)
_JSON = _number(payload_pb2.Payload, "json")
_STRUCT_VALUE = _number(struct_pb2.Value, "struct_value")
_FIELDS = _number(struct_pb2.Struct, "fields")


# ... > Envelope.task > TaskNotice.task > Task.spec (an offer)
_OFFER = (
    *_DELIVERY[:2],
    _number(envelope_pb2.Envelope, "task"),
    _number(tasks_pb2.TaskNotice, "task"),
    _number(tasks_pb2.Task, "spec"),
)
# ... > Envelope.task > TaskNotice.event > TaskEvent.payload (an answer, a result)
_NOTICE = (
    *_DELIVERY[:2],
    _number(envelope_pb2.Envelope, "task"),
    _number(tasks_pb2.TaskNotice, "event"),
    _number(tasks_pb2.TaskEvent, "payload"),
)


def check_payload(payload: payload_pb2.Payload) -> None:
    _check(payload.SerializeToString(), "payload")


def check_task_spec(spec: tasks_pb2.TaskSpec) -> None:
    """As it appears in an offer delivered to the assignee."""
    _check(spec.SerializeToString(), "spec", _OFFER)


def check_task_payload(payload: payload_pb2.Payload, name: str) -> None:
    """A result, question or answer, as it appears in a task notice."""
    _check(payload.SerializeToString(), name, _NOTICE)


def check_metadata(metadata: struct_pb2.Struct) -> None:
    """As it appears in the `agent.online` event: `{"metadata": <metadata>, ...}`."""
    entry = wire.field(1, b"metadata") + wire.field(
        2, wire.field(_STRUCT_VALUE, metadata.SerializeToString())
    )
    _check(wire.field(_JSON, wire.field(_STRUCT_VALUE, wire.field(_FIELDS, entry))), "metadata")


def _check(payload: bytes, name: str, path: tuple[int, ...] = _DELIVERY) -> None:
    frame = payload
    for number in reversed(path):
        frame = wire.field(number, frame)
    try:
        messaging_pb2.ConnectResponse.FromString(frame)
    except DecodeError:
        raise InvalidArgumentError(
            f"the {name} is nested too deeply to be delivered", metadata={"field": name}
        ) from None
