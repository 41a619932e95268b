"""Python value <-> Payload conversion."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Any

import pytest
from google.protobuf import struct_pb2

import agentpost
from agentpost import payload as P
from agentpost.v1 import messaging_pb2, payload_pb2


class Color(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**53,
        -(2**53),
        1.5,
        -0.25,
        "",
        "héllo ✓",
        [],
        {},
        [1, "a", None, [True, {"x": []}]],
        {"task": "x", "n": 3, "nested": {"list": [1.5, {"deep": None}]}},
    ],
)
def test_json_values_round_trip(value: Any) -> None:
    message = P.to_payload(value)
    assert message.WhichOneof("body") == "json"
    assert P.from_payload(message) == value
    assert P.content_type_of(message) == "application/json"
    # ... and survive the wire.
    again = payload_pb2.Payload.FromString(message.SerializeToString())
    assert P.from_payload(again) == value


def test_bool_stays_bool_and_int_stays_int() -> None:
    back = P.from_payload(P.to_payload({"t": True, "one": 1, "f": 1.0, "half": 0.5}))
    assert back == {"t": True, "one": 1, "f": 1, "half": 0.5}
    assert type(back["t"]) is bool
    assert type(back["one"]) is int
    assert type(back["f"]) is int  # JSON numbers are float64: integral floats come back as int
    assert type(back["half"]) is float


def test_large_integral_floats_stay_floats() -> None:
    assert P.from_payload(P.to_payload(1e300)) == 1e300
    assert type(P.from_payload(P.to_payload(1e300))) is float


def test_tuples_become_lists_and_subclasses_are_accepted() -> None:
    value = OrderedDict(a=(1, 2), c=Color.RED, lvl=Level.HIGH)
    assert P.from_payload(P.to_payload(value)) == {"a": [1, 2], "c": "red", "lvl": 3}


@pytest.mark.parametrize("blob", [b"\x00\x01\xff", bytearray(b"ab"), memoryview(b"xyz"), b""])
def test_bytes_travel_as_data(blob: bytes | bytearray | memoryview) -> None:
    message = P.to_payload(blob)
    assert message.WhichOneof("body") == "data"
    assert P.from_payload(message) == bytes(blob)
    assert type(P.from_payload(message)) is bytes
    assert P.content_type_of(message) == "application/octet-stream"


def test_content_type_can_be_chosen() -> None:
    assert P.to_payload(b"<p/>", content_type="text/html").content_type == "text/html"
    assert P.content_type_of(P.to_payload({"a": 1}, content_type="application/vnd.x+json")) == (
        "application/vnd.x+json"
    )


def test_empty_payload_is_none() -> None:
    assert P.from_payload(payload_pb2.Payload()) is None
    assert P.content_type_of(payload_pb2.Payload()) == ""


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({1: "a"}, "keys must be strings"),
        ({"a": {("t",): 1}}, "keys must be strings"),
        (object(), "not JSON-serializable"),
        ({"when": {1, 2}}, "set is not JSON-serializable"),
        (math.nan, "not a JSON number"),
        ([math.inf], "not a JSON number"),
        (2**53 + 1, "53 bits"),
        (-(2**60), "53 bits"),
    ],
)
def test_values_that_are_not_json_are_refused(value: Any, fragment: str) -> None:
    with pytest.raises(agentpost.InvalidArgumentError, match=fragment) as caught:
        P.to_payload(value)
    assert caught.value.metadata == {"field": "payload"}


def test_depth_is_limited_before_protobuf_would_refuse_to_decode() -> None:
    ok: Any = "leaf"
    for _ in range(P.MAX_DEPTH):
        ok = {"a": [ok]} if len(str(ok)) % 2 else [ok]
    nested: Any = "leaf"
    for _ in range(P.MAX_DEPTH):
        nested = {"a": nested}
    op = messaging_pb2.ClientOperation()
    P.fill_payload(op.send.payload, nested)
    # The deepest accepted value still decodes on the other side, inside a whole frame.
    frame = messaging_pb2.ConnectRequest(operations=[op]).SerializeToString()
    assert P.from_payload(messaging_pb2.ConnectRequest.FromString(frame).operations[0].send.payload)
    with pytest.raises(agentpost.InvalidArgumentError, match="nested more than"):
        P.to_payload({"a": nested})


def test_cycles_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(agentpost.InvalidArgumentError, match="nested more than"):
        P.to_payload(loop)


def test_a_failed_conversion_raises_before_the_message_is_used() -> None:
    op = messaging_pb2.ClientOperation()
    with pytest.raises(agentpost.InvalidArgumentError):
        P.fill_payload(op.send.payload, {"ok": 1, "bad": object()})


def test_struct_helpers() -> None:
    struct = struct_pb2.Struct()
    P.fill_struct(struct, {"team": "a", "size": 3, "tags": ["x"]})
    assert P.from_struct(struct) == {"team": "a", "size": 3, "tags": ["x"]}
    with pytest.raises(agentpost.InvalidArgumentError):
        P.fill_struct(struct_pb2.Struct(), {3: "x"})  # type: ignore[dict-item]


def test_headers_are_copied_and_checked() -> None:
    send = messaging_pb2.SendMessage()
    P.fill_headers(send.headers, {"a": "1"})
    P.fill_headers(send.headers, OrderedDict(b="2"))
    P.fill_headers(send.headers, [("c", "3")])
    assert dict(send.headers) == {"a": "1", "b": "2", "c": "3"}
    for bad in ({"k": 1}, {2: "v"}, {"k": "\udc80"}):
        with pytest.raises(agentpost.InvalidArgumentError, match="headers") as caught:
            P.fill_headers(messaging_pb2.SendMessage().headers, bad)  # type: ignore[dict-item]
        assert caught.value.metadata == {"field": "headers"}
