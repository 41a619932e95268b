"""Fixtures: a real redis-server per test session, in-process servers on port 0 with a key prefix
per test (isolation without FLUSHALL), and server processes for crash and restart tests."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from agentpost_server.app import App
from agentpost_server.settings import Settings
from tests.helpers import ServerProcess, free_port, spawn_server, wait_serving


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (or run .ci/run)",
            pytrace=False,
        )
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="agentpost-redis-")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
            time.sleep(0.05)
    client.close()
    yield url
    process.terminate()
    process.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


StartServer = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_server(redis_url: str, key_prefix: str) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(**settings)` -> a started in-process App (all stopped at the
    end). Servers made by one test share its key prefix, so they form one cluster."""
    apps: list[App] = []

    async def start(**overrides: Any) -> App:
        values: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "worker": False,
            "shutdown_grace": 1.0,
            "plaintext": True,
        }
        values.update(overrides)
        app = App(Settings(**values))
        await app.start()
        apps.append(app)
        return app

    yield start
    await asyncio.gather(*(app.stop() for app in apps), return_exceptions=True)


@pytest.fixture
async def server(start_server: StartServer) -> App:
    return await start_server()


@pytest.fixture
def target(server: App) -> str:
    return f"127.0.0.1:{server.port}"


SpawnServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def spawn(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[SpawnServer]:
    """Factory for real server processes sharing this test's Redis and key prefix."""
    processes: list[ServerProcess] = []

    async def start(**env: str) -> ServerProcess:
        proc = spawn_server(redis_url, key_prefix, tmp_path, **env)
        processes.append(proc)
        try:
            await wait_serving(proc.target)
        except AssertionError:
            proc.kill()
            raise AssertionError(f"server did not start; its log:\n{proc.log()}") from None
        return proc

    yield start
    for proc in processes:
        if proc.process.poll() is None:
            proc.kill()
