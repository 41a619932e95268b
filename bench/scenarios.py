"""The agentpost patterns, driven through the SDK exactly as an agent author would use it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import agentpost
from bench.probe import Probe
from bench.procs import BenchError
from bench.stats import Run, read_stamp, stamped

_now = time.perf_counter_ns

#: The options (with a token, when the server requires one) an agent connects with.
Credentials = Callable[[str], "agentpost.ConnectOptions | None"]


def no_credentials(agent_id: str) -> agentpost.ConnectOptions | None:
    return None


async def spread(
    total: int, workers: int, work: Callable[[int], Coroutine[Any, Any, None]]
) -> None:
    """Run `work(share)` in `workers` concurrent loops that together do `total` operations."""
    workers = max(1, min(workers, total))
    shares = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
    async with asyncio.TaskGroup() as group:
        for share in shares:
            group.create_task(work(share))


class _Arrivals:
    """Counts deliveries and their one-way latency (the payload carries its send time)."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.last = 0
        self.goal = 0
        self.reached = asyncio.Event()

    def expect(self, goal: int) -> None:
        self.latencies = []
        self.goal = goal
        self.reached.clear()

    def arrived(self, payload: bytes) -> None:
        self.last = now = _now()
        self.latencies.append(now - read_stamp(payload)[0])
        if len(self.latencies) >= self.goal:
            self.reached.set()

    async def wait(self, stall: float) -> bool:
        """Until the goal is reached (True), or nothing arrived for `stall` seconds (False)."""
        seen = -1
        while len(self.latencies) != seen:
            seen = len(self.latencies)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reached.wait(), stall)
                return True
        return False


async def bounded(what: str, seconds: float, work: Coroutine[Any, Any, None]) -> None:
    """`work`, or a `BenchError` naming `what` if it takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await work
    except TimeoutError:
        raise BenchError(f"{what} did not finish within {seconds:g}s") from None


async def _consume(agent: agentpost.Agent, arrivals: _Arrivals) -> None:
    async for message in agent.messages():
        arrivals.arrived(message.payload)


async def direct(
    target: str,
    *,
    credentials: Credentials = no_credentials,
    count: int,
    window: int,
    probe: Probe,
    timeout: float,
) -> Run:
    """A sends `count` 256-byte messages to B with `window` sends in flight; B counts them."""
    async with (
        agentpost.connect(
            target, agent_id="bench-direct-a", options=credentials("bench-direct-a")
        ) as sender,
        agentpost.connect(
            target, agent_id="bench-direct-b", options=credentials("bench-direct-b")
        ) as receiver,
    ):
        arrivals = _Arrivals()
        consumer = asyncio.create_task(_consume(receiver, arrivals))

        async def send(share: int) -> None:
            for _ in range(share):
                await sender.send("bench-direct-b", stamped())

        try:
            warmup = min(2_000, count)
            arrivals.expect(warmup)
            await bounded("the warm-up sends", timeout, spread(warmup, window, send))
            if not await arrivals.wait(timeout):
                raise BenchError(
                    f"warm-up: {len(arrivals.latencies):,} of {warmup:,} messages arrived"
                    f" (none for {timeout:g}s)"
                )
            arrivals.expect(count)
            probe.begin("direct")
            try:
                start = _now()
                await bounded("the sends", timeout + count / 1_000, spread(count, window, send))
                await arrivals.wait(timeout)  # short of the goal: reported as incomplete
            finally:
                cpu = probe.end()
        finally:
            consumer.cancel()
        return Run(
            count=len(arrivals.latencies),
            expected=count,
            seconds=(arrivals.last - start) / 1e9,
            latencies_ns=arrivals.latencies,
            cpu=cpu,
        )


async def request(
    target: str,
    *,
    count: int,
    callers: int,
    probe: Probe,
    name: str,
    timeout: float,
    credentials: Credentials = no_credentials,
) -> Run:
    """`callers` loops request from B (which answers at once) until `count` replies came back."""
    async with (
        agentpost.connect(
            target, agent_id="bench-req-a", options=credentials("bench-req-a")
        ) as caller,
        agentpost.connect(
            target, agent_id="bench-req-b", options=credentials("bench-req-b")
        ) as responder,
    ):

        @responder.on_request
        async def echo(message: agentpost.Message) -> object:
            return message.payload

        latencies: list[int] = []

        async def ask(share: int) -> None:
            for _ in range(share):
                started = _now()
                await caller.request("bench-req-b", stamped(), timeout=timeout)
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


async def broadcast(
    target: str,
    *,
    credentials: Credentials = no_credentials,
    agents: int,
    rounds: int,
    probe: Probe,
    timeout: float,
) -> Run:
    """One broadcast to `agents` connected agents, `rounds` times: call to last arrival."""
    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(
            agentpost.connect(
                target, agent_id="bench-bcast-sender", options=credentials("bench-bcast-sender")
            )
        )
        connected = await asyncio.gather(
            *(
                agentpost.connect(
                    target, agent_id=f"bench-bcast-{i}", options=credentials(f"bench-bcast-{i}")
                )
                for i in range(agents)
            ),
            return_exceptions=True,
        )
        receivers = [agent for agent in connected if isinstance(agent, agentpost.Agent)]
        for receiver in receivers:
            stack.push_async_callback(receiver.close)
        failed = [exc for exc in connected if isinstance(exc, BaseException)]
        if failed:
            raise BenchError(f"{len(failed)} of {agents} agents could not connect: {failed[0]}")
        arrivals = _Arrivals()
        current = [-1]

        async def listen(agent: agentpost.Agent) -> None:
            async for message in agent.messages():
                if message.broadcast and read_stamp(message.payload)[1] == current[0]:
                    arrivals.arrived(message.payload)

        consumers = [asyncio.create_task(listen(r)) for r in receivers]
        stack.callback(lambda: [c.cancel() for c in consumers])
        durations: list[int] = []
        for round_no in (-2, -1):  # warm-up
            current[0] = round_no
            arrivals.expect(agents)
            await sender.broadcast(stamped(round_no))
            if not await arrivals.wait(timeout):
                raise BenchError(
                    f"warm-up broadcast reached {len(arrivals.latencies)} of {agents} agents"
                )
        probe.begin("broadcast")
        try:
            started = _now()
            for round_no in range(rounds):
                current[0] = round_no
                arrivals.expect(agents)
                sent = _now()
                await sender.broadcast(stamped(round_no))
                if not await arrivals.wait(timeout):
                    break  # reported as incomplete
                durations.append(arrivals.last - sent)
            seconds = (_now() - started) / 1e9
        finally:
            cpu = probe.end()
        return Run(
            count=len(durations), expected=rounds, seconds=seconds, latencies_ns=durations, cpu=cpu
        )
