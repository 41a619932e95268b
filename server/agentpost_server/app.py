"""Composition root: settings -> logging -> Redis (or an embedded Valkey) -> bus, presence, hub ->
gRPC server (+ health, reflection) -> arq worker; signals and a graceful drain.

`App` is what tests start in-process; `serve_main` and `worker_main` are the CLI's entry points.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from agentpost.errors import AgentpostError
from agentpost.v1 import messaging_pb2
from agentpost_server import compose
from agentpost_server.auth.setup import ConfigurationError, authenticator
from agentpost_server.core.auth import Guard
from agentpost_server.core.hub import Hub
from agentpost_server.core.ids import new_server_id
from agentpost_server.core.limits import Limits
from agentpost_server.core.ratelimit import RateLimiter
from agentpost_server.logs import configure_logging
from agentpost_server.rpc.auth import CallAuth
from agentpost_server.rpc.handlers import add_to_server
from agentpost_server.rpc.servicer import AgentMessagingServicer
from agentpost_server.rpc.tls import add_port, check_transport
from agentpost_server.settings import Settings
from agentpost_server.store.audit import RedisAudit
from agentpost_server.store.bus import RedisBus
from agentpost_server.store.embedded import EmbeddedRedis
from agentpost_server.store.keys import Keys
from agentpost_server.store.logs import RedisLogs
from agentpost_server.store.mailbox import RedisMailboxes
from agentpost_server.store.presence import RedisPresence
from agentpost_server.store.writer import PipelineWriter

log = logging.getLogger(__name__)

SERVICE_NAME = messaging_pb2.DESCRIPTOR.services_by_name["AgentMessaging"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class App:
    """One server process: start() brings everything up, stop() drains and tears it down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server_id = new_server_id()
        self.port = 0
        self.redis_url = settings.redis_url or ""
        self._embedded: EmbeddedRedis | None = None
        self._redis: Redis | None = None
        self._bus: RedisBus | None = None
        self._writer: PipelineWriter | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._tasks: list[asyncio.Task[Any]] = []
        self.hub: Hub | None = None
        self.guard: Guard | None = None

    async def start(self) -> None:
        """Raises `ConfigurationError` (before touching anything) when the settings cannot work."""
        s = self.settings
        checker = authenticator(s)  # the credential files are read (and checked) first
        check_transport(s)
        if not self.redis_url:
            self._embedded = EmbeddedRedis(s.data_dir)
            self.redis_url = await self._embedded.start()
        self._redis = Redis.from_url(self.redis_url, health_check_interval=10)
        await self._wait_for_redis()
        keys = Keys(s.key_prefix)
        self.guard = guard = Guard(RedisAudit(self._redis, keys, retention=s.audit_retention))
        self._writer = writer = PipelineWriter(self._redis)
        writer.start()
        self._bus = RedisBus(
            self._redis, keys, self.server_id, writer, broadcast_retention=s.broadcast_retention
        )
        presence = RedisPresence(self._redis, keys)
        self.hub = hub = Hub(
            server_id=self.server_id,
            bus=self._bus,
            presence=presence,
            mailboxes=RedisMailboxes(
                self._redis,
                keys,
                writer,
                max_len=s.mailbox_max_messages,
                idempotency_ms=int(s.idempotency_window * 1000),
                retry_ms=int(s.retry_window * 1000),
            ),
            logs=RedisLogs(self._redis, keys, writer),
            limits=_limits(s),
            guard=guard,
            rate=RateLimiter(s.rate_limit, s.rate_burst),
        )
        hub.tasks = tasks = compose.tasks(s, self._redis, keys, presence, self._bus.wake)
        hub.workflows = workflows = compose.workflows(s, self._redis, keys, tasks)
        await self._bus.start(hub)
        await hub.heartbeat()

        self._server = server = grpc.aio.server(options=_grpc_options(s))
        mtls = s.tls_client_ca is not None
        call_auth = CallAuth(checker, guard, mtls=mtls)
        servicer = AgentMessagingServicer(
            hub, call_auth, tasks, workflows, compose.audit(s, self._redis, keys)
        )
        add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server
        )
        self.port = add_port(server, s)
        await server.start()
        host = s.listen.rpartition(":")[0]
        log.info(
            "agentpost %s serving on %s:%d (%s)",
            self.server_id,
            host,
            self.port,
            "mutual TLS" if mtls else "TLS" if s.tls else "plaintext",
        )
        if not call_auth.enforced:
            log.warning(
                "authentication is OFF: callers are who they say they are; set"
                " AGENTPOST_TOKENS_FILE or AGENTPOST_JWT_SECRET (or a client CA) to require"
                " credentials"
            )
        await self._set_health(True)
        self._tasks = [
            asyncio.create_task(self._upkeep(), name="upkeep"),
            asyncio.create_task(self._watch_redis(), name="health"),
        ]
        if s.worker:
            self._tasks.append(asyncio.create_task(self._run_worker(), name="arq-worker"))

    async def stop(self) -> None:
        """Health NOT_SERVING, sessions told to go away, calls given the grace period."""
        grace = self.settings.shutdown_grace
        log.info("shutting down (grace %.1fs)", grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._health.enter_graceful_shutdown()
        if self.hub is not None:
            await self.hub.shutdown("the server is shutting down; reconnect to another one")
        if self._server is not None:
            await self._server.stop(grace)
        if self.hub is not None:
            await self.hub.wait_closed()
            if self.hub.workflows is not None:
                await self.hub.workflows.close()
            if self.hub.tasks is not None:
                await self.hub.tasks.close()
        if self.guard is not None:  # audit records of the last refusals
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.guard.flush()
        if self._bus is not None:
            await self._bus.close()
        if self._writer is not None:
            await self._writer.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self._embedded is not None:
            await self._embedded.stop()
        log.info("stopped")

    async def _wait_for_redis(self) -> None:
        assert self._redis is not None
        delay = 0.1
        while True:
            try:
                await self._redis.ping()
                return
            except Exception as exc:
                log.warning("waiting for Redis at %s: %s", _safe_url(self.redis_url), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _set_health(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _watch_redis(self) -> None:
        assert self._redis is not None
        serving = True
        while True:
            await asyncio.sleep(1.0)
            try:
                async with asyncio.timeout(2.0):
                    await self._redis.ping()
                ok = True
            except Exception:
                ok = False
            if ok != serving:
                serving = ok
                log.warning(
                    "Redis is %s: health %s",
                    "back" if ok else "unreachable",
                    "SERVING" if ok else "NOT_SERVING",
                )
                await self._set_health(ok)

    async def _upkeep(self) -> None:
        assert self.hub is not None
        while True:
            await asyncio.sleep(self.settings.keepalive_interval)
            try:
                await self.hub.tick()
            except AgentpostError as exc:
                log.warning("upkeep: %s", exc)

    async def _run_worker(self) -> None:
        from agentpost_server.jobs.worker import build_workers, run_workers

        await run_workers(build_workers(self.settings, self.redis_url))


def _limits(s: Settings) -> Limits:
    return Limits(
        max_payload_bytes=s.max_payload_bytes,
        default_request_timeout=s.request_timeout,
        max_request_timeout=s.max_request_timeout,
        keepalive_interval=s.keepalive_interval,
        max_buffered_events=s.max_buffered_events,
        max_subscriptions=s.max_subscriptions,
        default_window=s.max_unacked,
        ack_timeout=s.ack_timeout,
        max_headers=s.max_headers,
        max_header_bytes=s.max_header_bytes,
        max_payload_depth=s.max_payload_depth,
        max_sessions_per_agent=s.max_sessions_per_agent,
        max_inflight_requests=s.max_inflight_requests,
    )


def _grpc_options(s: Settings) -> list[tuple[str, Any]]:
    keepalive_ms = int(s.keepalive_interval * 1000)
    return [
        # Room for a frame of several operations; single payloads are checked by the hub.
        ("grpc.max_receive_message_length", max(4 << 20, 4 * s.max_payload_bytes)),
        ("grpc.max_send_message_length", -1),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


async def _serve(settings: Settings) -> int:
    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    return 0


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def serve_main(
    *,
    listen: str | None = None,
    redis_url: str | None = None,
    worker: bool | None = None,
    plaintext: bool | None = None,
) -> int:
    """`agentpost serve`: the gRPC server and (unless disabled) the arq worker, until SIGTERM."""
    settings = _settings(listen=listen, redis_url=redis_url, worker=worker, plaintext=plaintext)
    configure_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(_serve(settings))
    except ConfigurationError as exc:
        print(f"agentpost serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except RuntimeError as exc:  # grpc: the port is taken or cannot be bound
        log.error("cannot start: %s", exc)
        return 1


def worker_main(*, redis_url: str | None = None) -> int:
    """`agentpost worker`: only the arq worker (the server processes run with --no-worker)."""
    settings = _settings(redis_url=redis_url)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.redis_url:
        log.error("agentpost worker needs AGENTPOST_REDIS_URL (the embedded Valkey lives in serve)")
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(settings, settings.redis_url))
    return 0


async def _work(settings: Settings, redis_url: str) -> None:
    from agentpost_server.jobs.worker import build_workers, run_workers

    work = asyncio.create_task(run_workers(build_workers(settings, redis_url)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, work.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await work
    log.info("worker stopped")
