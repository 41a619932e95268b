"""The numbers the core enforces, built once from the settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentpost.errors import LimitExceededError


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    max_payload_bytes: int = 1 << 20
    default_request_timeout: float = 30.0
    max_request_timeout: float = 3600.0
    keepalive_interval: float = 5.0
    max_buffered_events: int = 100_000
    max_subscriptions: int = 1_000
    max_metadata_bytes: int = 16 << 10
    default_window: int = 1_000
    max_window: int = 10_000
    ack_timeout: float = 60.0
    max_ttl: float = 30 * 86400.0
    max_headers: int = 64
    max_header_bytes: int = 16 << 10
    max_payload_depth: int = 32
    max_sessions_per_agent: int = 100
    max_inflight_requests: int = 1_000


def check_headers(limits: Limits, headers: Mapping[str, str]) -> int:
    """The headers' size in bytes (keys and values); `LimitExceededError` past a limit."""
    if len(headers) > limits.max_headers:
        raise LimitExceededError(
            f"the message has {len(headers)} headers; the limit is {limits.max_headers}",
            metadata={"limit": "max_headers", "max": str(limits.max_headers)},
        )
    size = sum(len(k) + len(v) for k, v in headers.items())
    if size > limits.max_header_bytes:
        raise LimitExceededError(
            f"the headers are {size} bytes; the limit is {limits.max_header_bytes}",
            metadata={"limit": "max_header_bytes", "max": str(limits.max_header_bytes)},
        )
    return size
