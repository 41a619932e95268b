"""Server configuration from AGENTPOST_* environment variables, built once in `app`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTPOST_", frozen=True, extra="ignore")

    listen: str = Field("127.0.0.1:50051", description="host:port the gRPC server binds")
    redis_url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL; unset: start an embedded Valkey"
    )
    data_dir: Path = Field(Path(".agentpost"), description="where the embedded Valkey keeps data")
    key_prefix: str = Field("agentpost", description="prefix of every Redis key and channel")
    worker: bool = Field(True, description="run the arq worker inside `agentpost serve`")
    max_payload_bytes: int = Field(1 << 20, gt=0, description="largest payload plus headers")
    request_timeout: float = Field(30.0, gt=0, description="default request timeout, seconds")
    max_request_timeout: float = Field(3600.0, gt=0, description="longest request timeout")
    keepalive_interval: float = Field(5.0, gt=0, description="seconds between keep-alives")
    max_buffered_events: int = Field(100_000, gt=0, description="per-session send buffer")
    max_subscriptions: int = Field(1_000, gt=0, description="topic patterns per session")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight calls get on stop")
    reap_interval: float = Field(5.0, gt=0, description="seconds between dead-server sweeps")
    mailbox_max_messages: int = Field(100_000, gt=0, description="per-mailbox count limit")
    mailbox_max_age: float = Field(7 * 86400.0, gt=0, description="per-mailbox age limit, s")
    idempotency_window: float = Field(86400.0, gt=0, description="seconds a send key is kept")
    retry_window: float = Field(120.0, gt=0, description="seconds an SDK retry key (~...) is kept")
    ack_timeout: float = Field(
        60.0, gt=0, description="seconds before an unacked delivery is redelivered"
    )
    max_unacked: int = Field(1_000, gt=0, description="default per-session delivery window")
    broadcast_retention: int = Field(100_000, gt=0, description="broadcasts kept for catch-up")
    sweep_interval: float = Field(30.0, gt=0, description="seconds between mailbox expiry sweeps")
    task_accept_timeout: float = Field(
        30.0, gt=0, description="seconds an assignee has to accept an offer"
    )
    task_max_attempts: int = Field(3, ge=1, le=100, description="default attempts per task")
    task_offline_grace: float = Field(
        30.0, gt=0, description="seconds a working assignee may be offline before reassignment"
    )
    task_retry_backoff: float = Field(1.0, gt=0, description="first retry delay, doubling, s")
    task_retry_backoff_max: float = Field(60.0, gt=0, description="longest retry delay, s")
    task_retention: float = Field(
        7 * 86400.0, gt=0, description="seconds a finished task stays readable"
    )
    max_workflow_steps: int = Field(500, gt=0, description="steps per workflow definition")
    audit_retention: int = Field(1_000_000, gt=0, description="audit records kept (about)")
    max_headers: int = Field(64, gt=0, description="headers per message")
    max_header_bytes: int = Field(16 << 10, gt=0, description="total size of a message's headers")
    max_payload_depth: int = Field(32, gt=0, le=100, description="nesting of a JSON payload")
    max_sessions_per_agent: int = Field(100, gt=0, description="sessions of one agent at once")
    max_inflight_requests: int = Field(1_000, gt=0, description="pending requests per session")
    rate_limit: float = Field(
        20_000.0, ge=0, description="messages a second per agent and server process (0: off)"
    )
    rate_burst: int = Field(40_000, gt=0, description="messages an agent may send at once")
    # ---- transport security and authentication
    plaintext: bool = Field(False, description="serve without TLS (local development only)")
    tls_cert: Path | None = Field(None, description="PEM certificate chain of the server")
    tls_key: Path | None = Field(None, description="PEM private key of the server")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    tokens_file: Path | None = Field(None, description="JSON or TOML file of token hashes")
    jwt_secret: SecretStr | None = Field(None, description="HMAC secret of signed JWTs (HS256)")
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key of signed JWTs (RS256, ES256, EdDSA)"
    )
    jwt_issuer: str | None = Field(None, description="required `iss` claim of JWTs")
    jwt_audience: str | None = Field(None, description="required `aud` claim of JWTs")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field("text", description="log line format")

    @field_validator("jwt_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("AGENTPOST_JWT_SECRET must be at least 32 characters")
        return value or None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_key is not None

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("AGENTPOST_REDIS_URL must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("AGENTPOST_LISTEN must look like host:port, e.g. 127.0.0.1:50051")
        return value
