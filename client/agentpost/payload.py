"""Python values <-> the `Payload` proto.

* `bytes`, `bytearray` and `memoryview` travel as `data`, with a content type
  ("application/octet-stream" unless told otherwise).
* Anything JSON-shaped travels as `json`, a `google.protobuf.Value`: `None`, `bool`, `int`, `float`,
  `str`, `list`/`tuple` and `dict` with `str` keys, nested at most `MAX_DEPTH` arrays/objects deep
  (each level costs up to three protobuf message levels, and decoders stop at 100).
* JSON numbers are float64, so an `int` must fit in 53 bits to be sent (larger ones are refused,
  send them as strings) and a number without a fractional part comes back as an `int`:
  `1.0` is sent and received as `1`. NaN and infinities are refused.

Everything else raises `InvalidArgumentError` before anything is sent. The converters write into
the target message in place (no JSON text in between, no copies of sub-messages).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from google.protobuf import struct_pb2

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import payload_pb2

__all__ = [
    "JSON_CONTENT_TYPE",
    "MAX_DEPTH",
    "OCTET_STREAM",
    "content_type_of",
    "fill_headers",
    "fill_payload",
    "fill_struct",
    "from_payload",
    "from_struct",
    "from_value",
    "to_payload",
]

JSON_CONTENT_TYPE = "application/json"
OCTET_STREAM = "application/octet-stream"
MAX_DEPTH = 24
_MAX_SAFE_INT = 2**53
_NULL = struct_pb2.NULL_VALUE


def to_payload(value: Any, *, content_type: str | None = None) -> payload_pb2.Payload:
    """A new `Payload` holding `value`."""
    payload = payload_pb2.Payload()
    fill_payload(payload, value, content_type=content_type)
    return payload


def fill_payload(
    payload: payload_pb2.Payload, value: Any, *, content_type: str | None = None
) -> None:
    """Write `value` into `payload` (a field of a message being built)."""
    if isinstance(value, bytes | bytearray | memoryview):
        payload.data = bytes(value)
        payload.content_type = content_type or OCTET_STREAM
        return
    _fill_value(payload.json, value, 0)
    if content_type:
        payload.content_type = content_type


def fill_headers(
    target: MutableMapping[str, str], headers: Mapping[str, str] | Iterable[tuple[str, str]]
) -> None:
    """Copy `headers` (strings to strings) into the headers map of a message being built.

    A loop of item assignments: a proto map's `update()` is the slow generic one.
    """
    items = headers.items() if type(headers) is dict else dict(headers).items()
    try:
        for key, value in items:
            target[key] = value
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"headers map strings to strings ({exc})", metadata={"field": "headers"}
        ) from None


def from_payload(payload: payload_pb2.Payload) -> Any:
    """The Python value of a `Payload`: JSON data, `bytes`, or `None` when the body is empty."""
    body = payload.WhichOneof("body")
    if body == "json":
        return from_value(payload.json)
    if body == "data":
        return payload.data
    return None


def content_type_of(payload: payload_pb2.Payload) -> str:
    """The effective content type: the explicit one, else the default of the body's kind."""
    if payload.content_type:
        return payload.content_type
    body = payload.WhichOneof("body")
    if body == "json":
        return JSON_CONTENT_TYPE
    if body == "data":
        return OCTET_STREAM
    return ""


def fill_struct(struct: struct_pb2.Struct, value: Mapping[str, Any]) -> None:
    """Write a JSON object (for example an agent's metadata) into a `Struct`."""
    fields = struct.fields
    for key, item in value.items():
        if not isinstance(key, str):
            raise _invalid(f"object keys must be strings, not {type(key).__name__}")
        _fill_value(fields[key], item, 1)


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The `dict` of a `Struct`."""
    fields = struct.fields
    return {key: from_value(fields[key]) for key in fields}


def from_value(value: struct_pb2.Value) -> Any:
    """The Python value of a `google.protobuf.Value`."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -_MAX_SAFE_INT <= number <= _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "struct_value":
        fields = value.struct_value.fields
        return {key: from_value(fields[key]) for key in fields}
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or unset


def _fill_value(target: struct_pb2.Value, value: Any, depth: int) -> None:
    kind = type(value)
    # Exact-type checks first (the common case), isinstance() for subclasses (enums, ...).
    if kind is str:
        target.string_value = value
    elif kind is dict:
        _fill_object(target, value, depth)
    elif kind is int:
        _fill_int(target, value)
    elif kind is float:
        _fill_float(target, value)
    elif kind is bool:
        target.bool_value = value
    elif value is None:
        target.null_value = _NULL
    elif kind is list or kind is tuple:
        _fill_array(target, value, depth)
    elif isinstance(value, bool):
        target.bool_value = bool(value)
    elif isinstance(value, str):
        target.string_value = str(value)
    elif isinstance(value, int):
        _fill_int(target, int(value))
    elif isinstance(value, float):
        _fill_float(target, float(value))
    elif isinstance(value, Mapping):
        _fill_object(target, value, depth)
    elif isinstance(value, list | tuple):
        _fill_array(target, value, depth)
    else:
        raise _invalid(f"{type(value).__name__} is not JSON-serializable (and not bytes)")


def _fill_object(target: struct_pb2.Value, value: Mapping[Any, Any], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise _invalid(f"the value is nested more than {MAX_DEPTH} levels deep (or is cyclic)")
    struct = target.struct_value
    struct.SetInParent()
    fields = struct.fields
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            raise _invalid(f"object keys must be strings, not {type(key).__name__}")
        _fill_value(fields[key], item, depth + 1)


def _fill_array(target: struct_pb2.Value, value: list[Any] | tuple[Any, ...], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise _invalid(f"the value is nested more than {MAX_DEPTH} levels deep (or is cyclic)")
    values = target.list_value
    values.SetInParent()
    add = values.values.add
    for item in value:
        _fill_value(add(), item, depth + 1)


def _fill_int(target: struct_pb2.Value, value: int) -> None:
    if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
        target.number_value = value
        return
    raise _invalid(
        f"the integer {value} does not fit in a JSON number (53 bits); send it as a string"
    )


def _fill_float(target: struct_pb2.Value, value: float) -> None:
    if math.isfinite(value):
        target.number_value = value
        return
    raise _invalid(f"{value} is not a JSON number")


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"payload: {message}", metadata={"field": "payload"})
