"""Task handoffs and workflows, driven through the SDK exactly as an agent author would use it.

They need the arq worker in the server process: workflow steps advance through its jobs."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import agentpost
from bench.probe import Probe
from bench.procs import BenchError
from bench.scenarios import Credentials, bounded, no_credentials, spread
from bench.stats import Run, read_stamp, stamped

_now = time.perf_counter_ns


async def _connect_all(
    stack: AsyncExitStack,
    target: str,
    ids: list[str],
    credentials: Credentials,
    capabilities: tuple[str, ...] = (),
) -> list[agentpost.Agent]:
    """The agents `ids`, connected (closed with `stack`)."""
    agents = []
    for agent_id in ids:
        connector = agentpost.connect(
            target, agent_id=agent_id, capabilities=capabilities, options=credentials(agent_id)
        )
        agents.append(await stack.enter_async_context(connector))
    return agents


async def _answer_at_once(task: agentpost.Assignment) -> object:
    """A task handler that completes every task at once (accepting is the SDK's part)."""
    return {"done": task.title}


async def offer(
    target: str,
    *,
    count: int,
    probe: Probe,
    timeout: float,
    credentials: Credentials = no_credentials,
) -> Run:
    """`count` handoffs by capability, one after the other: `handoff()` called to the offer
    reaching the one assignee's `tasks()` loop. The next handoff starts once the offer arrived;
    the assignee accepts and completes each offer meanwhile, as a real agent would."""
    async with AsyncExitStack() as stack:
        (originator,) = await _connect_all(stack, target, ["bench-ho-a"], credentials)
        (assignee,) = await _connect_all(stack, target, ["bench-ho-b"], credentials, ("bench",))
        arrived: asyncio.Queue[int] = asyncio.Queue()
        finishing: set[asyncio.Task[None]] = set()

        async def finish(task: agentpost.Assignment) -> None:
            await task.accept()
            await task.complete()

        async def receive() -> None:
            async for task in assignee.tasks():
                arrived.put_nowait(_now() - read_stamp(task.input)[0])
                work = asyncio.create_task(finish(task))
                finishing.add(work)
                work.add_done_callback(finishing.discard)

        latencies: list[int] = []

        async def hand_off(share: int) -> None:
            for _ in range(share):
                await originator.handoff(capability="bench", title="bench", input=stamped())
                async with asyncio.timeout(timeout):
                    latencies.append(await arrived.get())

        receiver = asyncio.create_task(receive())
        try:
            await bounded("the warm-up handoffs", timeout * 2, hand_off(min(100, count)))
            latencies.clear()
            probe.begin("handoff-offer")
            try:
                start = _now()
                await bounded("the handoffs", timeout + count / 50, hand_off(count))
                seconds = (_now() - start) / 1e9
            finally:
                cpu = probe.end()
            await bounded("the last completions", timeout, _drain(finishing))
        finally:
            receiver.cancel()
            for work in finishing:  # left only when something failed
                work.cancel()
        return Run(count=len(latencies), seconds=seconds, latencies_ns=latencies, cpu=cpu)


async def _drain(tasks: set[asyncio.Task[None]]) -> None:
    while tasks:
        await asyncio.gather(*list(tasks))


async def end_to_end(
    target: str,
    *,
    count: int,
    originators: int,
    assignees: int,
    probe: Probe,
    timeout: float,
    credentials: Credentials = no_credentials,
) -> Run:
    """`originators` loops of one agent hand tasks off by capability and wait for each result;
    `assignees` agents (task handlers) accept and complete each at once. Latency: `handoff()`
    called to `result()` returned."""
    async with AsyncExitStack() as stack:
        (originator,) = await _connect_all(stack, target, ["bench-e2e-a"], credentials)
        workers = [f"bench-e2e-w{i}" for i in range(assignees)]
        for agent in await _connect_all(stack, target, workers, credentials, ("bench-e2e",)):
            agent.handle_tasks(_answer_at_once)
        latencies: list[int] = []

        async def hand_off(share: int) -> None:
            for _ in range(share):
                started = _now()
                handle = await originator.handoff(capability="bench-e2e", title="e2e")
                result = await handle.result(timeout=timeout)
                if result != {"done": "e2e"}:
                    raise BenchError(f"task {handle.id} returned {result!r}")
                latencies.append(_now() - started)

        await bounded(
            "the warm-up tasks", timeout * 2, spread(min(200, count), originators, hand_off)
        )
        latencies.clear()
        probe.begin("handoff-e2e")
        try:
            start = _now()
            await bounded("the tasks", timeout + count / 20, spread(count, originators, hand_off))
            seconds = (_now() - start) / 1e9
        finally:
            cpu = probe.end()
        return Run(count=len(latencies), seconds=seconds, latencies_ns=latencies, cpu=cpu)


def chain(steps: int) -> dict[str, Any]:
    """`steps` steps, each depending on the one before and taking its output as input."""
    definition: list[dict[str, Any]] = [{"id": "s0", "capability": "w", "title": "s0"}]
    for i in range(1, steps):
        definition.append(
            {
                "id": f"s{i}",
                "capability": "w",
                "title": f"s{i}",
                "input": f"${{steps.s{i - 1}.output}}",
                "depends_on": [f"s{i - 1}"],
            }
        )
    return {"name": "bench-chain", "steps": definition}


def fan_out(width: int) -> dict[str, Any]:
    """One root, `width` parallel steps after it, one join after all of them."""
    parallel = [f"p{i}" for i in range(width)]
    definition: list[dict[str, Any]] = [{"id": "root", "capability": "w", "title": "root"}]
    definition += [
        {
            "id": step,
            "capability": "w",
            "title": step,
            "input": "${steps.root.output}",
            "depends_on": ["root"],
        }
        for step in parallel
    ]
    definition.append(
        {
            "id": "join",
            "capability": "w",
            "title": "join",
            "input": {step: f"${{steps.{step}.output}}" for step in parallel},
            "depends_on": parallel,
        }
    )
    return {"name": "bench-fan", "steps": definition}


async def workflow(
    target: str,
    definition: dict[str, Any],
    *,
    runs: int,
    assignees: int,
    probe: Probe,
    name: str,
    timeout: float,
    credentials: Credentials = no_credentials,
) -> Run:
    """`runs` runs of `definition` one after the other, each `coordinate()` called to
    `result()` returned; `assignees` agents with capability `w` complete every step at once.
    The definition's last step is its only leaf: the run's output is that step's."""
    steps = definition["steps"]
    last = steps[-1]["id"]
    async with AsyncExitStack() as stack:
        (coordinator,) = await _connect_all(stack, target, ["bench-wf-a"], credentials)
        workers = [f"bench-wf-w{i}" for i in range(assignees)]
        for agent in await _connect_all(stack, target, workers, credentials, ("w",)):
            agent.handle_tasks(_answer_at_once)
        durations: list[int] = []

        async def one_run() -> None:
            started = _now()
            run = await coordinator.coordinate(definition)  # a new run id each time
            async with run:
                outputs = await run.result(timeout=timeout)
            if outputs != {last: {"done": last}}:
                raise BenchError(f"workflow run {run.id} returned {outputs!r}")
            durations.append(_now() - started)

        await one_run()  # warm-up
        durations.clear()
        probe.begin(name)
        try:
            start = _now()
            for _ in range(runs):
                await one_run()
            seconds = (_now() - start) / 1e9
        finally:
            cpu = probe.end()
        return Run(
            count=len(durations),
            seconds=seconds,
            latencies_ns=durations,
            cpu=cpu,
            steps=len(steps),
        )
