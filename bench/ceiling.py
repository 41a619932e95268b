"""The same patterns over the raw relay (`bench.relay`): one message per gRPC frame."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc

from bench.probe import Probe
from bench.relay import ECHO, LISTEN, PUSH
from bench.scenarios import spread
from bench.stats import Run, read_stamp, stamped

_now = time.perf_counter_ns


async def one_way(target: str, *, count: int, probe: Probe, timeout: float) -> Run:
    """A writes `count` 256-byte frames on its Push stream; B reads them from its Listen stream."""
    async with (
        grpc.aio.insecure_channel(target) as sender_channel,
        grpc.aio.insecure_channel(target) as receiver_channel,
    ):
        listen: Any = receiver_channel.unary_stream(LISTEN, None, None)(b"b")
        await listen.read()  # registered
        latencies: list[int] = []
        last = [0]
        reached = asyncio.Event()
        goal = [0]

        async def consume() -> None:
            while True:
                frame = await listen.read()
                if not isinstance(frame, bytes):  # grpc.aio.EOF
                    return
                last[0] = now = _now()
                latencies.append(now - read_stamp(frame)[0])
                if len(latencies) >= goal[0]:
                    reached.set()

        consumer = asyncio.create_task(consume())
        push: Any = sender_channel.stream_stream(PUSH, None, None)(None, metadata=(("to", "b"),))

        async def burst(frames: int) -> None:
            goal[0] = frames
            reached.clear()
            for _ in range(frames):
                await push.write(stamped())
            await asyncio.wait_for(reached.wait(), timeout)

        try:
            await burst(min(2_000, count))
            latencies.clear()
            probe.begin("ceiling-one-way")
            try:
                start = _now()
                with contextlib.suppress(TimeoutError):  # reported as incomplete
                    await burst(count)
            finally:
                cpu = probe.end()
            await push.done_writing()
        finally:
            consumer.cancel()
            listen.cancel()
        return Run(
            count=len(latencies),
            expected=count,
            seconds=(last[0] - start) / 1e9,
            latencies_ns=latencies,
            cpu=cpu,
        )


async def echo(target: str, *, count: int, callers: int, probe: Probe, name: str) -> Run:
    """`callers` loops of unary Echo calls with a 256-byte payload."""
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(ECHO, None, None)
        latencies: list[int] = []

        async def ask(share: int) -> None:
            for _ in range(share):
                started = _now()
                await call(stamped())
                latencies.append(_now() - started)

        await spread(min(500, count), callers, ask)
        latencies.clear()
        probe.begin(name)
        try:
            start = _now()
            await spread(count, callers, ask)
            seconds = (_now() - start) / 1e9
        finally:
            cpu = probe.end()
        return Run(count=len(latencies), seconds=seconds, latencies_ns=latencies, cpu=cpu)
