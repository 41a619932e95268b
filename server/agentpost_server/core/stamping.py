"""Envelopes as the server stamps them (id, time, sender), checked against the limits on the
way in: size of payload and headers, header count, JSON nesting; and request timeouts."""

from __future__ import annotations

import time
from collections.abc import Mapping

from google.protobuf import duration_pb2

from agentpost.errors import InvalidArgumentError, PayloadTooLargeError
from agentpost.v1 import envelope_pb2, payload_pb2
from agentpost_server.core import nesting
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.limits import Limits, check_headers


def envelope(
    ids: UlidFactory,
    limits: Limits,
    sender: str,
    kind: int,
    payload: payload_pb2.Payload | None,
    headers: Mapping[str, str],
    *,
    agent: str = "",
    topic: str = "",
    correlation_id: str = "",
) -> envelope_pb2.Envelope:
    """A new envelope to `agent`, `topic` or (neither) everyone."""
    stamped = envelope_pb2.Envelope(id=ids.new(), sender=sender, kind=kind)  # type: ignore[arg-type]
    if correlation_id:
        stamped.correlation_id = correlation_id
    if payload is not None:
        stamped.payload.CopyFrom(payload)
    if agent:
        stamped.recipient.agent_id = agent
    elif topic:
        stamped.recipient.topic = topic
    else:
        stamped.recipient.broadcast.SetInParent()
    stamp = stamped.created_at
    stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)
    size = stamped.payload.ByteSize()
    if headers:
        size += check_headers(limits, headers)
        stamped.headers.update(headers)
    if stamped.payload.HasField("json"):
        nesting.check(stamped.payload.json, limits.max_payload_depth)
    if size > limits.max_payload_bytes:
        raise PayloadTooLargeError(
            f"the message is {size} bytes (payload and headers); the limit is"
            f" {limits.max_payload_bytes}",
            metadata={"limit_bytes": str(limits.max_payload_bytes)},
        )
    return stamped


def request_timeout(limits: Limits, timeout: duration_pb2.Duration | float | None) -> float:
    """Seconds to wait for a reply: the default for 0/unset, capped by the maximum."""
    if isinstance(timeout, duration_pb2.Duration):
        seconds = timeout.ToNanoseconds() / 1e9 if timeout.ByteSize() else 0.0
    else:
        seconds = timeout or 0.0
    if seconds < 0:
        raise InvalidArgumentError("timeout must not be negative", metadata={"field": "timeout"})
    if seconds == 0:
        return limits.default_request_timeout
    return min(seconds, limits.max_request_timeout)
