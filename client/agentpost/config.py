"""Settings of the SDK: one frozen dataclass, built once by the caller and passed in."""

from __future__ import annotations

import dataclasses
import os
import pathlib
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
    defaults the SDK sets (reconnect backoff and a 64 MiB receive limit).

    Security: `token` is sent as `authorization: Bearer <token>` on every call and stream.
    `tls=True` (or any of `tls_ca`, `tls_cert`, `tls_key`) opens a TLS channel: `tls_ca` is the
    PEM bundle that verifies the server (default: the system's roots), `tls_cert` and `tls_key`
    the client certificate for mutual TLS. `credentials`, a ready `grpc.ChannelCredentials`,
    replaces all of the `tls_*` fields.
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
    #: TLS credentials built by the caller; `None`: from the `tls_*` fields (or plaintext).
    credentials: grpc.ChannelCredentials | None = None
    #: A bearer token (a tokens-file token or a JWT); `None`: none is sent.
    token: str | None = None
    #: Use TLS even without any of the files below (the server is checked with system roots).
    tls: bool = False
    #: PEM file of the CA(s) that verify the server's certificate.
    tls_ca: str | os.PathLike[str] | None = None
    #: PEM files of the client certificate and its key, for mutual TLS.
    tls_cert: str | os.PathLike[str] | None = None
    tls_key: str | os.PathLike[str] | None = None
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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ConnectOptions.tls_cert and tls_key go together")
        if self.credentials is not None and (self.tls_ca or self.tls_cert):
            raise ValueError("ConnectOptions.credentials replaces tls_ca, tls_cert and tls_key")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("ConnectOptions.token must be a non-empty single line")

    @property
    def uses_tls(self) -> bool:
        return self.credentials is not None or self.tls or bool(self.tls_ca or self.tls_cert)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """The TLS credentials of the channel (reads the `tls_*` files), or None: plaintext."""
        if self.credentials is not None or not self.uses_tls:
            return self.credentials

        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            return None if path is None else pathlib.Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca),
            private_key=read(self.tls_key),
            certificate_chain=read(self.tls_cert),
        )

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
        credentials = self.channel_credentials()
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=self.grpc_options())
        return grpc.aio.insecure_channel(target, options=self.grpc_options())
