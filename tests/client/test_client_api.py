"""The public surface: `__all__` is honest, the error tree is complete, the value types behave."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import inspect
import pkgutil

import pytest

import agentpost
from agentpost import _status, errors
from agentpost.message import AgentInfo, Message, MessageKind
from agentpost.v1 import agents_pb2, envelope_pb2


def test_every_name_in_all_exists_once() -> None:
    assert len(agentpost.__all__) == len(set(agentpost.__all__))
    missing = [name for name in agentpost.__all__ if not hasattr(agentpost, name)]
    assert missing == []


def test_every_public_name_of_the_package_is_in_all() -> None:
    public = {
        name
        for name, value in vars(agentpost).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - set(agentpost.__all__) == set()


def test_every_error_class_is_exported_and_in_the_status_table() -> None:
    classes = {
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, errors.AgentpostError)
    }
    exported = {getattr(agentpost, name) for name in agentpost.__all__}
    assert classes - exported == set()
    for cls in classes - {errors.AgentpostError}:
        error = cls("x")
        assert type(_status.from_error_proto(_status.to_error_proto(error))) is cls


@pytest.mark.parametrize(
    "module", sorted(m.name for m in pkgutil.iter_modules(agentpost.__path__) if m.name != "v1")
)
def test_module_all_lists_only_real_names(module: str) -> None:
    loaded = importlib.import_module(f"agentpost.{module}")
    for name in getattr(loaded, "__all__", ()):
        assert hasattr(loaded, name), f"agentpost.{module}.__all__ names missing {name}"


def test_the_main_entry_points_are_there() -> None:
    for name in ("connect", "Agent", "Client", "Message", "MessageKind", "AgentInfo"):
        assert name in agentpost.__all__
    assert dataclasses.is_dataclass(agentpost.ConnectOptions)


def test_connect_options_are_frozen_keyword_only_and_checked() -> None:
    options = agentpost.ConnectOptions()
    assert (options.connect_timeout, options.request_timeout) == (10.0, 30.0)
    assert options.max_buffered_messages == 10_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.connect_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        agentpost.ConnectOptions(5.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="connect_timeout"):
        agentpost.ConnectOptions(connect_timeout=0)
    custom = dict(
        agentpost.ConnectOptions(
            channel_options=[("grpc.max_receive_message_length", 7)]
        ).grpc_options()
    )
    assert custom["grpc.max_receive_message_length"] == 7


def _envelope(**recipient: object) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        id="01ABC",
        sender="planner",
        kind=envelope_pb2.MESSAGE_KIND_REQUEST,
        headers={"k": "v"},
    )
    for name, value in recipient.items():
        if name == "broadcast":
            env.recipient.broadcast.SetInParent()
        else:
            setattr(env.recipient, name, value)
    env.created_at.FromNanoseconds(1_700_000_000_123_456_789)
    env.payload.json.struct_value.fields["q"].number_value = 1
    return env


def test_message_from_envelope() -> None:
    env = _envelope(agent_id="coder")
    message = Message.from_envelope(env)
    assert message.id == "01ABC"
    assert message.sender == "planner"
    assert message.kind is MessageKind.REQUEST
    assert message.is_request
    assert (message.to, message.topic, message.broadcast) == ("coder", None, False)
    assert message.created_at == datetime.datetime(
        2023, 11, 14, 22, 13, 20, 123456, tzinfo=datetime.UTC
    )
    assert message.headers == {"k": "v"}
    assert message.payload == {"q": 1}
    assert message.content_type == "application/json"
    assert message.envelope is env
    assert (message.delivery_id, message.redeliveries) == ("", 0)
    assert message.correlation_id == ""


def test_messages_are_read_only_values_identified_by_id() -> None:
    message = Message.from_envelope(_envelope(agent_id="coder"), delivery_id="d-1", redeliveries=2)
    assert (message.delivery_id, message.redeliveries) == ("d-1", 2)
    for name in ("id", "payload", "headers", "created_at", "kind", "envelope", "delivery_id"):
        with pytest.raises(AttributeError):
            setattr(message, name, 2)
    with pytest.raises(AttributeError):
        message.extra = 1  # type: ignore[attr-defined]
    again = Message.from_envelope(_envelope(topic="other"))  # a redelivery: the same id
    assert message == again and hash(message) == hash(again) == hash("01ABC")
    assert len({message, again}) == 1
    other = envelope_pb2.Envelope(id="02DEF")
    assert message != Message.from_envelope(other)
    assert message != "01ABC"


def test_message_fields_are_decoded_once() -> None:
    env = _envelope(agent_id="coder")
    message = Message.from_envelope(env)
    payload, headers, created_at = message.payload, message.headers, message.created_at
    assert message.payload is payload  # decoded on first access, then kept
    assert message.headers is headers
    assert message.created_at is created_at
    assert Message.from_envelope(envelope_pb2.Envelope(id="e")).headers == {}
    assert Message.from_envelope(envelope_pb2.Envelope(id="e")).payload is None


def test_message_repr_shows_the_addressing_and_a_shortened_payload() -> None:
    env = _envelope(topic="builds.done")
    env.payload.json.string_value = "x" * 500
    text = repr(Message.from_envelope(env, delivery_id="d-1"))
    assert text.startswith("Message(id='01ABC', sender='planner', kind='request', topic=")
    assert "delivery_id='d-1'" in text and "content_type='application/json'" in text
    assert "payload='xxx" in text and len(text) < 300
    assert "broadcast=True" in repr(Message.from_envelope(_envelope(broadcast=True)))
    assert "to='coder'" in repr(Message.from_envelope(_envelope(agent_id="coder")))


def test_message_recipients() -> None:
    topic = Message.from_envelope(_envelope(topic="builds.done"))
    assert (topic.to, topic.topic, topic.broadcast) == (None, "builds.done", False)
    everyone = Message.from_envelope(_envelope(broadcast=True))
    assert (everyone.to, everyone.topic, everyone.broadcast) == (None, None, True)


async def test_reply_needs_a_request_received_by_a_session() -> None:
    unbound = Message.from_envelope(_envelope(agent_id="coder"))
    with pytest.raises(agentpost.InvalidArgumentError, match="not received by an agent session"):
        await unbound.reply(1)
    one_way = envelope_pb2.Envelope(id="x", kind=envelope_pb2.MESSAGE_KIND_MESSAGE)
    calls: list[object] = []

    async def replier(*args: object) -> None:
        calls.append(args)

    with pytest.raises(agentpost.InvalidArgumentError, match="not a request"):
        await Message.from_envelope(one_way, replier=replier).reply(1)
    await Message.from_envelope(_envelope(), replier=replier).reply({"a": 1}, headers={"h": "1"})
    assert calls == [("01ABC", {"a": 1}, {"h": "1"}, None)]


def test_agent_info_from_proto() -> None:
    proto = agents_pb2.AgentInfo(agent_id="coder", capabilities=["code"], online=True, sessions=2)
    proto.metadata.fields["team"].string_value = "a"
    proto.last_seen.FromSeconds(1_700_000_000)
    info = AgentInfo.from_proto(proto)
    assert info.agent_id == "coder"
    assert info.capabilities == ("code",)
    assert info.metadata == {"team": "a"}
    assert (info.online, info.sessions) == (True, 2)
    assert info.last_seen == datetime.datetime.fromtimestamp(1_700_000_000, datetime.UTC)
    assert info.connected_since is None
    assert info.first_seen is None
