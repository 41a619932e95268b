"""Settings of the SDK: one frozen dataclass, built once by the caller and passed in."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal

import grpc

__all__ = ["ACK_MODES", "AckMode", "ConnectOptions"]

#: When a delivery that needs an acknowledgement is acknowledged (see `ConnectOptions.ack_mode`).
AckMode = Literal["after_handling", "on_receipt", "manual"]
ACK_MODES: tuple[AckMode, ...] = ("after_handling", "on_receipt", "manual")

_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ConnectOptions:
    """How an `Agent` or a `Client` talks to the server.

    Durations are in seconds. `channel_options` are passed to gRPC as they are and win over the
    defaults the SDK sets (reconnect backoff and a 64 MiB receive limit); `credentials` switches
    to a TLS channel.
    """

    #: How long `connect()` (and an operation issued while reconnecting) waits for a session.
    connect_timeout: float = 10.0
    #: Default timeout of `request()`, and the deadline of every unary call.
    request_timeout: float = 30.0
    #: First delay before reconnecting a lost session; doubled (with jitter) on every failure.
    reconnect_initial_backoff: float = 0.05
    #: Upper bound of the reconnect delay.
    reconnect_max_backoff: float = 5.0
    #: Deliveries buffered for `messages()`; when full, the server is slowed down (backpressure).
    max_buffered_messages: int = 10_000
    #: Request handlers running at once; further requests wait (backpressure).
    max_concurrent_handlers: int = 64
    #: Extra gRPC channel arguments, e.g. `(("grpc.primary_user_agent", "me/1.0"),)`.
    channel_options: Sequence[tuple[str, Any]] = ()
    #: TLS credentials; `None` for a plaintext channel.
    credentials: grpc.ChannelCredentials | None = None
    #: When `messages()` acknowledges a delivery: "after_handling" (when the loop asks for the
    #: next message, or the loop is left), "on_receipt" (as soon as it is queued for the
    #: application) or "manual" (`await message.ack()`).
    ack_mode: AckMode = "after_handling"
    #: The flow-control window: unacknowledged deliveries the server lets this session hold
    #: (0: the server's default). At most `max_buffered_messages`. With "manual" acks, ack
    #: before waiting for more messages than this, or the server stops delivering.
    max_unacked: int = 0
    #: Names the agent instance across reconnects (and, with `state_path`, restarts); a new
    #: instance takes over the deliveries its predecessor had not acknowledged. `None`: a random
    #: one per agent (or the one kept in `state_path`). Replicas need different ones.
    instance_id: str | None = None
    #: A small JSON file keeping the instance id and the ids of recently handled messages, so a
    #: restarted agent resumes as the same instance and drops what it had already handled. One
    #: file per agent instance (it is locked while the agent runs). `None`: nothing is kept.
    state_path: str | os.PathLike[str] | None = None
    #: How many recently delivered message ids are remembered to drop duplicates.
    dedupe_memory: int = 100_000
    #: Message ids the application recorded as handled itself, in the same write as its own
    #: side effects: they are never shown again. This is the airtight way to exactly-once
    #: across crashes; `state_path` alone may show a message again whose handler finished in
    #: the last moments before a crash.
    handled_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "request_timeout", "reconnect_initial_backoff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ConnectOptions.{name} must be positive")
        if self.reconnect_max_backoff < self.reconnect_initial_backoff:
            raise ValueError("ConnectOptions.reconnect_max_backoff is below the initial backoff")
        if self.max_buffered_messages < 1 or self.max_concurrent_handlers < 1:
            raise ValueError("ConnectOptions buffer and handler limits must be at least 1")
        if self.ack_mode not in ACK_MODES:
            raise ValueError(f"ConnectOptions.ack_mode must be one of {', '.join(ACK_MODES)}")
        if not 0 <= self.max_unacked <= self.max_buffered_messages:
            # A larger window could fill the local buffer with deliveries waiting for an ack,
            # and a full buffer stops the reader (answers to operations queue behind it).
            raise ValueError(
                "ConnectOptions.max_unacked must be between 0 and max_buffered_messages"
            )
        if self.instance_id is not None and not self.instance_id:
            raise ValueError("ConnectOptions.instance_id must not be empty (None: a random one)")
        if self.dedupe_memory < 1:
            raise ValueError("ConnectOptions.dedupe_memory must be at least 1")

    def grpc_options(self) -> list[tuple[str, Any]]:
        """The channel arguments: the SDK's defaults, overridden by `channel_options`."""
        backoff_ms = max(1, int(self.reconnect_initial_backoff * 1000))
        merged: dict[str, Any] = {
            "grpc.max_receive_message_length": 64 * _MIB,
            "grpc.initial_reconnect_backoff_ms": backoff_ms,
            "grpc.min_reconnect_backoff_ms": backoff_ms,
            "grpc.max_reconnect_backoff_ms": max(
                backoff_ms, int(self.reconnect_max_backoff * 1000)
            ),
        }
        merged.update(dict(self.channel_options))
        return list(merged.items())

    def open_channel(self, target: str) -> grpc.aio.Channel:
        """A new `grpc.aio` channel to `target` (call from inside the event loop)."""
        if self.credentials is not None:
            return grpc.aio.secure_channel(target, self.credentials, options=self.grpc_options())
        return grpc.aio.insecure_channel(target, options=self.grpc_options())
