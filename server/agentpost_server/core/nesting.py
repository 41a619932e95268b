"""How deeply a JSON payload nests: `{"a": 1}` is 1 deep, `{"a": [1]}` 2. Refused past the limit
(AGENTPOST_MAX_PAYLOAD_DEPTH) with INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import struct_pb2

from agentpost.errors import InvalidArgumentError


def check(value: struct_pb2.Value, limit: int) -> None:
    stack: list[tuple[struct_pb2.Value, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = item.WhichOneof("kind")
        children: Iterable[struct_pb2.Value]
        if kind == "struct_value":
            children = item.struct_value.fields.values()
        elif kind == "list_value":
            children = item.list_value.values
        else:
            continue
        if depth > limit:
            raise InvalidArgumentError(
                f"the payload nests deeper than {limit} levels",
                metadata={"field": "payload", "limit": "max_payload_depth", "max": str(limit)},
            )
        stack.extend((child, depth + 1) for child in children)
