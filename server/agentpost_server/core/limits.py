"""The numbers the core enforces, built once from the settings."""

from __future__ import annotations

from dataclasses import dataclass


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
