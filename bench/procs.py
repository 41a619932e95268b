"""The processes a benchmark runs against: a throwaway redis-server, an agentpost server, the raw
relay, each on a free port and (when the machine has two cores) pinned away from the clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CLIENT_CORE = 0
SERVER_CORE = 1


class BenchError(Exception):
    """A benchmark could not run (a missing binary, a process that did not start)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_pin() -> bool:
    """Pinning needs sched_setaffinity and both cores available to us."""
    getter = getattr(os, "sched_getaffinity", None)
    return getter is not None and {CLIENT_CORE, SERVER_CORE} <= getter(0)


def pin_self() -> None:
    """Pin this process (and the threads it starts from now on) to the client core."""
    os.sched_setaffinity(0, {CLIENT_CORE})


@dataclass
class Child:
    """A child process with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    target: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.process.returncode}; its log:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def _spawn(
    name: str, argv: list[str], workdir: Path, *, pin: bool, env: dict[str, str] | None = None
) -> Child:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if pin:  # at once, before the interpreter starts any thread: its threads inherit this
        os.sched_setaffinity(process.pid, {SERVER_CORE})
    return Child(name, process, log_path)


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agentpost-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def redis_server(directory: Path) -> Iterator[Child]:
    """A throwaway redis-server (no persistence) on a free port; `target` is its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(
            "redis-server is not installed: `apt-get install redis-server` (the benchmark starts"
            " its own throwaway instance)"
        )
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(directory)]
    child = _spawn("redis", argv, directory, pin=False)
    child.target = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            child.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server did not answer on port {port} within 10s")
            time.sleep(0.05)
        yield child
    finally:
        child.stop()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@asynccontextmanager
async def agentpost_server(
    redis_url: str, directory: Path, *, pin: bool, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Child]:
    """`python -m agentpost_server` (no worker) on a free port; waits until SERVING."""
    target = f"127.0.0.1:{free_port()}"
    env = {
        "AGENTPOST_REDIS_URL": redis_url,
        "AGENTPOST_LISTEN": target,
        "AGENTPOST_WORKER": "false",
        "AGENTPOST_PLAINTEXT": "true",
        "AGENTPOST_KEY_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
        **(extra_env or {}),
    }
    argv = [sys.executable, "-m", "agentpost_server"]
    child = _spawn("agentpost-server", argv, directory, pin=pin, env=env)
    child.target = target
    try:
        await _wait_serving(child)
        yield child
    finally:
        child.stop()


@asynccontextmanager
async def relay_server(directory: Path, *, pin: bool) -> AsyncIterator[Child]:
    """`python -m bench.relay` on a free port; waits until SERVING."""
    target = f"127.0.0.1:{free_port()}"
    child = _spawn("relay", [sys.executable, "-m", "bench.relay", target], directory, pin=pin)
    child.target = target
    try:
        await _wait_serving(child)
        yield child
    finally:
        child.stop()


async def _wait_serving(child: Child, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(child.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            child.check_alive()
            with suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{child.name} not SERVING within {timeout:g}s:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.05)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None if unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU use (% of one core) of named processes over a measured stretch, and of everything
    else on the machine ("other": other people's work disturbs the figures)."""

    pids: dict[str, int]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._start = {}
        for name, pid in self.pids.items():
            seconds = _cpu_seconds(pid)
            if seconds is not None:
                self._start[name] = seconds
        busy = _busy_seconds()
        if busy is not None:
            self._start[""] = busy

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        usage: dict[str, float] = {}
        if wall <= 0:
            return usage
        for name, before in self._start.items():
            after = _busy_seconds() if name == "" else _cpu_seconds(self.pids[name])
            if after is not None:
                usage[name] = 100 * (after - before) / wall
        if "" in usage:
            usage["other"] = max(0.0, usage.pop("") - sum(usage.values()))
        return {name: round(pct, 1) for name, pct in usage.items()}
