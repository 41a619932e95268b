"""Redis outage: the server stays up, health says NOT_SERVING, operations that need Redis fail
fast with UNAVAILABLE (never accepted and then dropped), and everything resumes by itself when
Redis is back, without losing a message that was accepted.

The test stops a dedicated redis-server of its own (the session one is shared) and starts it
again on the same port and data directory; the append-only file keeps the data across.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

import agentpost
from agentpost.v1 import messaging_pb2
from tests.conftest import StartServer
from tests.helpers import assert_eventually, free_port

pytestmark = pytest.mark.timeout(90)

OUTAGE = 3.0  # seconds Redis stays down
SEND_EVERY = 0.02
SEND_WATCHDOG = 8.0  # a send still running after this long hangs: the test fails
_SEND = "/agentpost.v1.AgentMessaging/Send"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RedisProcess:
    """A redis-server this test may stop and start again, on one port and one data directory,
    with an append-only file fsynced on every write (so what Redis answered survives a kill)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"redis-server did not start on {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop at once (SIGKILL): clients see their connections reset mid-flight."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `apt-get install redis-server`", pytrace=False)
    workdir = tmp_path / "redis"
    workdir.mkdir()
    process = RedisProcess(binary, workdir)
    process.start()
    yield process
    process.kill()


@dataclass
class Sender:
    """Sends one message every SEND_EVERY seconds until stopped; records what happened."""

    agent: agentpost.Agent
    to: str
    accepted: list[str] = field(default_factory=list)
    failed: list[BaseException] = field(default_factory=list)
    accepted_during_outage: int = 0
    outage: bool = False
    longest: float = 0.0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(SEND_WATCHDOG):
                    message_id = await self.agent.send(self.to, {"n": n})
            except TimeoutError:
                raise AssertionError(f"send {n} hung for {SEND_WATCHDOG}s") from None
            except (agentpost.UnavailableError, agentpost.ConnectionLostError) as exc:
                self.failed.append(exc)
            else:
                self.accepted.append(message_id)
                if self.outage:
                    self.accepted_during_outage += 1
            self.longest = max(self.longest, time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SEND_EVERY):
                    await self._stop.wait()


@dataclass
class HealthWatch:
    """Polls grpc.health.v1 Check and keeps the sequence of distinct answers."""

    stub: health_pb2_grpc.HealthStub
    seen: list[int] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    @property
    def now(self) -> int | None:
        return self.seen[-1] if self.seen else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            reply = await self.stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status != self.now:
                self.seen.append(reply.status)
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def health_watch(target: str) -> AsyncIterator[HealthWatch]:
    async with grpc.aio.insecure_channel(target) as channel:
        watch = HealthWatch(health_pb2_grpc.HealthStub(channel))
        watch.start()
        try:
            yield watch
        finally:
            await watch.stop()


async def unary_send(channel: grpc.aio.Channel, to: str) -> grpc.StatusCode:
    """A plain unary Send (no SDK retries in the way): its status code."""
    call = channel.unary_unary(_SEND, None, messaging_pb2.SendResponse.FromString)
    request = messaging_pb2.SendRequest(to=to)
    request.payload.json.string_value = "unary"
    try:
        await call(request.SerializeToString(), timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_redis_outage_fails_fast_and_recovers_without_losing_accepted_messages(
    own_redis: RedisProcess, start_server: StartServer
) -> None:
    # Keep-alive ticks (which also nudge every mailbox pump) far apart: delivery after the
    # outage must not depend on them.
    app = await start_server(redis_url=own_redis.url, keepalive_interval=60.0)
    target = f"127.0.0.1:{app.port}"
    patient_options = agentpost.ConnectOptions(reconnect_max_backoff=0.5)
    hasty_options = agentpost.ConnectOptions(connect_timeout=0.5, reconnect_max_backoff=0.2)
    received: list[agentpost.Message] = []

    async def collect(agent: agentpost.Agent) -> None:
        async for message in agent.messages():
            received.append(message)

    def all_received(ids: set[str]) -> bool:
        return ids <= {m.id for m in received}

    async with (
        agentpost.connect(target, agent_id="receiver") as receiver,
        agentpost.connect(target, agent_id="patient", options=patient_options) as patient_agent,
        agentpost.connect(target, agent_id="hasty", options=hasty_options) as hasty_agent,
        grpc.aio.insecure_channel(target) as channel,
        health_watch(target) as health,
    ):
        collector = asyncio.create_task(collect(receiver))
        sessions = {a.session_id for a in (receiver, patient_agent, hasty_agent)}
        # The SDK sends a send refused as UNAVAILABLE again until connect_timeout: with the
        # default (10 s, longer than the outage) the caller only sees a slow send that succeeds;
        # with a short one, the UnavailableError reaches the caller.
        patient = Sender(patient_agent, "receiver")
        hasty = Sender(hasty_agent, "receiver")
        try:
            await assert_eventually(lambda: health.now == _SERVING)
            patient.start()
            hasty.start()
            await assert_eventually(
                lambda: len(hasty.accepted) >= 10 and len(patient.accepted) >= 10
            )

            own_redis.kill()
            down_at = time.monotonic()
            patient.outage = hasty.outage = True
            await assert_eventually(lambda: health.now == _NOT_SERVING, timeout=5.0)
            # The server answers at once, with UNAVAILABLE: no hang until the deadline.
            assert await unary_send(channel, "receiver") == grpc.StatusCode.UNAVAILABLE
            await assert_eventually(
                lambda: len(hasty.failed) >= 3 and time.monotonic() - down_at >= OUTAGE,
                timeout=OUTAGE + 5.0,
            )
            hasty_accepted_while_down = hasty.accepted_during_outage
            patient_accepted_while_down = patient.accepted_during_outage
            own_redis.start()
            hasty.outage = patient.outage = False
            # Without restarting anything, sends go through again.
            accepted_before = len(hasty.accepted)
            await assert_eventually(lambda: len(hasty.accepted) >= accepted_before + 10, 10.0)
        finally:
            await asyncio.gather(patient.stop(), hasty.stop())
        await assert_eventually(lambda: health.now == _SERVING, timeout=10.0)
        assert await unary_send(channel, "receiver") == grpc.StatusCode.OK
        # The sessions lived through it.
        assert {a.session_id for a in (receiver, patient_agent, hasty_agent)} == sessions

        assert health.seen == [_SERVING, _NOT_SERVING, _SERVING], health.seen
        # Refused sends were refused (not left hanging), with the documented error.
        assert hasty.failed, "no send failed while Redis was down"
        assert all(isinstance(e, agentpost.UnavailableError) for e in hasty.failed)
        # Nothing was stored while Redis was down: the only sends accepted "during" the outage
        # are those that were answered as Redis was killed.
        assert hasty_accepted_while_down <= 1
        assert patient_accepted_while_down <= 1
        assert not patient.failed, patient.failed  # its resends outlast the outage

        accepted = {*patient.accepted, *hasty.accepted}
        assert len(accepted) == len(patient.accepted) + len(hasty.accepted)
        await assert_eventually(lambda: all_received(accepted), timeout=15.0)
        ids = [m.id for m in received]
        assert len(ids) == len(set(ids)), "a message reached the application twice"
        unary = {m.id for m in received if m.payload == "unary"}
        # Received beyond the accepted ones: the unary sends, and at most a send per sender
        # whose answer was lost when Redis was killed (its outcome was unknown to the caller).
        assert len(set(ids) - accepted - unary) <= 2
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        print(
            f"\noutage: patient sent {len(patient.accepted)} (longest send"
            f" {patient.longest:.2f}s), hasty sent {len(hasty.accepted)} and had"
            f" {len(hasty.failed)} refused (longest {hasty.longest:.2f}s)"
        )


async def test_a_message_sent_as_redis_comes_back_reaches_an_idle_session(
    own_redis: RedisProcess, start_server: StartServer
) -> None:
    """The first send after an outage may be stored before the server's bus is subscribed
    again, so its wake-up is lost: the session must still read its mailbox (keep-alive ticks,
    which nudge every mailbox, are an hour apart here)."""
    app = await start_server(redis_url=own_redis.url, keepalive_interval=3600.0)
    target = f"127.0.0.1:{app.port}"
    async with (
        agentpost.connect(target, agent_id="receiver") as receiver,
        grpc.aio.insecure_channel(target) as channel,
        health_watch(target) as health,
    ):
        received: list[agentpost.Message] = []

        async def collect() -> None:
            async for message in receiver.messages():
                received.append(message)

        collector = asyncio.create_task(collect())
        try:
            assert await unary_send(channel, "receiver") == grpc.StatusCode.OK
            await assert_eventually(lambda: len(received) == 1)
            await assert_eventually(lambda: health.now == _SERVING)
            own_redis.kill()
            await assert_eventually(lambda: health.now == _NOT_SERVING, timeout=5.0)
            own_redis.start()
            codes = []
            while (code := await unary_send(channel, "receiver")) != grpc.StatusCode.OK:
                codes.append(code)
                assert len(codes) < 100, codes
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
            await assert_eventually(lambda: len(received) == 2, timeout=10.0)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


async def test_a_send_is_announced_after_redis_forgot_its_scripts(
    own_redis: RedisProcess, start_server: StartServer
) -> None:
    """A restarted Redis has no scripts: the mailbox append is loaded and run again in the next
    batch, and its wake-up must follow it there (an idle session is woken by nothing else)."""
    app = await start_server(redis_url=own_redis.url, keepalive_interval=3600.0)
    target = f"127.0.0.1:{app.port}"
    async with (
        agentpost.connect(target, agent_id="receiver") as receiver,
        grpc.aio.insecure_channel(target) as channel,
    ):
        received: list[agentpost.Message] = []

        async def collect() -> None:
            async for message in receiver.messages():
                received.append(message)

        collector = asyncio.create_task(collect())
        try:
            for n in range(1, 4):
                client = redis.Redis.from_url(own_redis.url)
                try:
                    client.script_flush()
                finally:
                    client.close()
                assert await unary_send(channel, "receiver") == grpc.StatusCode.OK
                await assert_eventually(lambda: len(received) == n, timeout=10.0)  # noqa: B023
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
