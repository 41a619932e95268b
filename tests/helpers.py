"""Shared test helpers: waiting on conditions (never bare sleeps), free ports, server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


async def assert_eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Poll `predicate` until it is true; fail with a clear message after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_serving(target: str, timeout: float = 15.0) -> None:
    """Until the server's gRPC health check answers SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server at {target} not SERVING within {timeout}s")
            await asyncio.sleep(0.05)


@dataclass
class ServerProcess:
    """A real `agentpost serve` process (for crashes, signals and several processes)."""

    process: subprocess.Popen[bytes]
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.process.terminate()
        return self.process.wait(timeout)


def spawn_server(
    redis_url: str, key_prefix: str, log_dir: Path, *, worker: bool = False, **env: str
) -> ServerProcess:
    port = free_port()
    target = f"127.0.0.1:{port}"
    environment = {
        **os.environ,
        "AGENTPOST_REDIS_URL": redis_url,
        "AGENTPOST_LISTEN": target,
        "AGENTPOST_KEY_PREFIX": key_prefix,
        "AGENTPOST_WORKER": "true" if worker else "false",
        "AGENTPOST_PLAINTEXT": "true",
        **env,
    }
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "agentpost_server"],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return ServerProcess(process, target, log_path)


@contextlib.asynccontextmanager
async def agent_process(target: str, agent_id: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A real agent in its own process (tests/integration/agent_process.py), connected."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.agent_process", target, agent_id],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        assert line.strip() == b"ready", f"agent process did not start: {line!r}"
        yield process
    finally:
        process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
