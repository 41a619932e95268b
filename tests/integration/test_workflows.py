"""Coordinate on the wire: workflows of task handoffs, run by the server and the arq worker.
The agents are RawAgents that accept and complete each offer with a canned output."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from agentpost._status import from_rpc_error
from agentpost.errors import InvalidWorkflowError, WorkflowStateError
from agentpost.payload import from_payload, to_payload
from agentpost.v1 import envelope_pb2, messaging_pb2_grpc, tasks_pb2, workflows_pb2
from agentpost.workflow import definition_from_dict
from tests.conftest import StartServer
from tests.helpers import assert_eventually
from tests.integration.raw import RawAgent
from tests.integration.test_tasks import spawn_worker

E = workflows_pb2.WorkflowEventKind
OFFER = envelope_pb2.MESSAGE_KIND_TASK_OFFER
Answer = Callable[[tasks_pb2.Task], Any]  # the output, or an Exception instance to fail


class Worker:
    """An agent that accepts every offer and completes it with `answer(task)` after `delay`."""

    def __init__(
        self,
        target: str,
        agent_id: str,
        capabilities: list[str],
        answer: Answer,
        delay: float = 0.0,
    ) -> None:
        self.raw = RawAgent(target, agent_id, capabilities=capabilities)
        self.agent_id = agent_id
        self.answer = answer
        self.delay = delay
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = messaging_pb2_grpc.AgentMessagingStub(self.channel)
        self.handled: list[tuple[str, float, float]] = []  # (task title, started, finished)
        self._seen = 0
        self._task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Worker:
        await self.raw.__aenter__()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.raw.__aexit__(None, None, None)
        await self.channel.close()

    async def _update(self, task: tasks_pb2.Task, **action: Any) -> None:
        request = tasks_pb2.UpdateTaskRequest(task_id=task.id, attempt=task.attempt)
        json_format.ParseDict(action, request)
        await self.stub.UpdateTask(request, metadata=(("agentpost-agent-id", self.agent_id),))

    async def _run(self) -> None:
        while True:
            offers = [
                e.delivery.task.task for e in self.raw.deliveries() if e.delivery.kind == OFFER
            ]
            for task in offers[self._seen :]:
                self._seen += 1
                handling = asyncio.create_task(self._handle(task))
                self._handling.add(handling)
                handling.add_done_callback(self._handling.discard)
            await asyncio.sleep(0.005)

    async def _handle(self, task: tasks_pb2.Task) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._update(task, accept={})
            await asyncio.sleep(self.delay)
            output = self.answer(task)
            if isinstance(output, Exception):
                await self._update(task, fail={"message": str(output), "retryable": True})
            else:
                payload = json_format.MessageToDict(to_payload(output))
                await self._update(task, complete={"result": payload})
        self.handled.append((task.spec.title, started, loop.time()))


def inputs(task: tasks_pb2.Task) -> Any:
    return from_payload(task.spec.input)


class Caller:
    def __init__(self, target: str, agent_id: str = "boss") -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = messaging_pb2_grpc.AgentMessagingStub(self.channel)
        self.md = (("agentpost-agent-id", agent_id),)

    async def events(
        self, definition: Any = None, run_id: str = "", after: int = 0, stop_after: int = 0
    ) -> list[workflows_pb2.WorkflowEvent]:
        request = workflows_pb2.CoordinateRequest(run_id=run_id, after_seq=after)
        if definition is not None:
            request.definition.CopyFrom(definition_from_dict(definition))
        seen: list[workflows_pb2.WorkflowEvent] = []
        try:
            async for frame in self.stub.Coordinate(request, metadata=self.md, timeout=30):
                seen.extend(frame.events)
                if stop_after and len(seen) >= stop_after:
                    break
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return seen

    async def call(self, name: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, name)(request, metadata=self.md, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def close(self) -> None:
        await self.channel.close()


@contextlib.asynccontextmanager
async def workers(
    target: str, *specs: tuple[str, list[str], Answer, float]
) -> AsyncIterator[list[Worker]]:
    started = [
        Worker(target, agent_id, caps, answer, delay) for agent_id, caps, answer, delay in specs
    ]
    for worker in started:
        await worker.__aenter__()
    try:
        yield started
    finally:
        for worker in started:
            await worker.__aexit__(None, None, None)


def kinds(events: list[workflows_pb2.WorkflowEvent], step: str = "") -> list[str]:
    return [
        E.Name(e.kind).removeprefix("WORKFLOW_EVENT_KIND_")
        for e in events
        if not step or e.step_id == step
    ]


async def test_a_three_step_chain_passes_outputs_along(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    definition = {
        "input": {"topic": "caching"},
        "steps": [
            {"id": "plan", "capability": "plan", "title": "Plan", "input": "${input.topic}"},
            {
                "id": "code",
                "capability": "code",
                "title": "Code",
                "depends_on": ["plan"],
                "input": {"files": "${steps.plan.output.files}"},
            },
            {
                "id": "review",
                "capability": "review",
                "title": "Review",
                "depends_on": ["code"],
                "input": "reviewing ${steps.code.output.lines} lines",
            },
        ],
    }
    async with workers(
        target,
        ("planner", ["plan"], lambda t: {"files": ["a.py", inputs(t) + ".py"]}, 0.0),
        ("coder", ["code"], lambda t: {"lines": 10 * len(inputs(t)["files"])}, 0.0),
        ("reviewer", ["review"], lambda t: {"verdict": inputs(t)}, 0.0),
    ):
        events = await boss.events(definition)
    assert kinds(events)[0] == "RUN_STARTED" and kinds(events)[-1] == "RUN_COMPLETED"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert kinds(events, "code") == [
        "STEP_WAITING",
        "STEP_OFFERED",
        "STEP_STARTED",
        "STEP_COMPLETED",
    ]
    outputs = json_format.MessageToDict(events[-1].payload)
    assert outputs == {"review": {"verdict": "reviewing 20 lines"}}
    run = (
        await boss.call("GetWorkflow", workflows_pb2.GetWorkflowRequest(run_id=events[0].run_id))
    ).run
    assert run.state == workflows_pb2.WORKFLOW_RUN_STATE_COMPLETED
    await boss.close()


async def test_a_diamond_runs_its_branches_in_parallel(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    definition = {
        "steps": [
            {"id": "a", "capability": "w", "title": "A", "input": 1},
            {
                "id": "b",
                "capability": "w",
                "title": "B",
                "depends_on": ["a"],
                "input": "${steps.a.output}",
            },
            {
                "id": "c",
                "capability": "w",
                "title": "C",
                "depends_on": ["a"],
                "input": "${steps.a.output}",
            },
            {
                "id": "d",
                "capability": "w",
                "title": "D",
                "depends_on": ["b", "c"],
                "input": {"b": "${steps.b.output}", "c": "${steps.c.output}"},
            },
        ],
    }
    async with workers(
        target,
        ("w1", ["w"], lambda t: {"from": t.spec.title, "in": inputs(t)}, 0.3),
        ("w2", ["w"], lambda t: {"from": t.spec.title, "in": inputs(t)}, 0.3),
    ) as pool:
        events = await boss.events(definition)
    done = {title: (start, end) for w in pool for title, start, end in w.handled}
    assert done["B"][0] < done["C"][1] and done["C"][0] < done["B"][1]  # B and C overlapped
    seq = {(e.step_id, kinds([e])[0]): e.seq for e in events}
    assert seq[("b", "STEP_STARTED")] < seq[("c", "STEP_COMPLETED")]
    assert seq[("c", "STEP_STARTED")] < seq[("b", "STEP_COMPLETED")]
    outputs = json_format.MessageToDict(events[-1].payload)
    assert outputs["d"]["in"] == {
        "b": {"from": "B", "in": {"from": "A", "in": 1}},
        "c": {"from": "C", "in": {"from": "A", "in": 1}},
    }
    await boss.close()


async def test_a_failing_step_is_retried_on_another_agent(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    definition = {
        "steps": [
            {
                "id": "flaky",
                "capability": "x",
                "title": "F",
                "input": 0,
                "retry": {"max_attempts": 3, "backoff": "50ms", "other_agent": True},
            },
        ],
    }
    async with workers(
        target,
        ("broken", ["x"], lambda t: RuntimeError("disk full"), 0.0),
        ("fine", ["x"], lambda t: "ok", 0.0),
    ) as (broken, fine):
        events = await boss.events(definition)
    assert kinds(events)[-1] == "RUN_COMPLETED"
    assert len(broken.handled) + len(fine.handled) <= 2  # a retry never returns to "broken" first
    assert fine.handled
    await boss.close()


async def test_a_step_that_keeps_failing_fails_the_run_or_falls_back(
    start_server: StartServer,
) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    failing = {
        "steps": [
            {
                "id": "bad",
                "capability": "x",
                "title": "Bad",
                "input": 0,
                "retry": {"max_attempts": 2, "backoff": "10ms"},
            },
            {"id": "after", "capability": "x", "title": "After", "depends_on": ["bad"], "input": 1},
        ],
    }
    with_fallback = {
        "steps": [
            {
                "id": "bad",
                "capability": "x",
                "title": "Bad",
                "input": 0,
                "retry": {"max_attempts": 2, "backoff": "10ms"},
                "on_failure": "fallback",
                "fallback": "rescue",
            },
            {"id": "rescue", "capability": "y", "title": "Rescue", "input": "${steps.bad.error}"},
            {
                "id": "after",
                "capability": "y",
                "title": "After",
                "depends_on": ["bad"],
                "input": "${steps.bad.output}",
            },
        ],
    }
    async with workers(
        target,
        ("broken", ["x"], lambda t: RuntimeError("no luck"), 0.0),
        ("rescuer", ["y"], lambda t: {"rescued": inputs(t)}, 0.0),
    ):
        failed = await boss.events(failing)
        rescued = await boss.events(with_fallback)
    assert kinds(failed)[-1] == "RUN_FAILED"
    assert failed[-1].step_id == "bad" and "no luck" in failed[-1].message
    assert kinds(rescued)[-1] == "RUN_COMPLETED"
    after = json_format.MessageToDict(rescued[-1].payload)["after"]
    assert after == {"rescued": {"rescued": "failed by broken: no luck"}}
    await boss.close()


async def test_cancel_mid_run_cancels_the_running_tasks(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    definition = {
        "run_id": "to-cancel",
        "steps": [{"id": "slow", "capability": "s", "title": "Slow", "input": 0}],
    }
    async with workers(target, ("sloth", ["s"], lambda t: "late", 5.0)):
        started = await boss.events(definition, stop_after=3)  # started, offered, started
        assert kinds(started)[-1] == "STEP_STARTED"
        task_id = started[-1].task_id
        run = (
            await boss.call(
                "CancelWorkflow",
                workflows_pb2.CancelWorkflowRequest(run_id="to-cancel", reason="stop"),
            )
        ).run
        assert run.state == workflows_pb2.WORKFLOW_RUN_STATE_CANCELED
        rest = await boss.events(run_id="to-cancel", after=started[-1].seq)
        assert kinds(rest)[-1] == "RUN_CANCELED"
        task = (await boss.call("GetTask", tasks_pb2.GetTaskRequest(task_id=task_id))).task
        assert task.state == tasks_pb2.TASK_STATE_CANCELED
        with pytest.raises(WorkflowStateError):
            await boss.call(
                "CancelWorkflow", workflows_pb2.CancelWorkflowRequest(run_id="to-cancel")
            )
    await boss.close()


async def test_an_invalid_definition_is_refused_before_anything_runs(
    start_server: StartServer,
) -> None:
    app = await start_server()
    boss = Caller(f"127.0.0.1:{app.port}")
    cyclic = {
        "steps": [
            {"id": "a", "capability": "x", "title": "A", "depends_on": ["b"]},
            {"id": "b", "capability": "x", "title": "B", "depends_on": ["a"]},
        ]
    }
    with pytest.raises(InvalidWorkflowError, match="cycle: a -> b -> a"):
        await boss.events(cyclic)
    listed = await boss.call("ListWorkflows", workflows_pb2.ListWorkflowsRequest())
    assert not listed.runs
    await boss.close()


async def test_the_worker_killed_mid_run_the_run_completes_without_redoing_steps(
    start_server: StartServer,
    redis_url: str,
    key_prefix: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = await start_server()  # no worker inside: the worker is a process we kill
    # Fault injection: the server's fast path (moving the run on when a step's task ends) is
    # lost, so only the durable path, the task's on_done job on the worker, can do it.
    assert app.hub is not None and app.hub.workflows is not None

    async def lost(task_id: str) -> None:
        return None

    monkeypatch.setattr(app.hub.workflows, "_finish_quietly", lost)
    target = f"127.0.0.1:{app.port}"
    boss = Caller(target)
    worker = spawn_worker(redis_url, key_prefix, tmp_path)
    definition = {
        "run_id": "survivor",
        "steps": [
            {"id": "one", "capability": "s", "title": "one", "input": 1},
            {"id": "two", "capability": "slow", "title": "two", "depends_on": ["one"], "input": 2},
            {"id": "three", "capability": "s", "title": "three", "depends_on": ["two"], "input": 3},
        ],
    }
    try:
        async with workers(
            target,
            ("quick", ["s"], lambda t: inputs(t) * 10, 0.0),
            ("tortoise", ["slow"], lambda t: inputs(t) * 10, 1.5),
        ) as (quick, tortoise):
            seen = await boss.events(definition, stop_after=8)
            while "STEP_STARTED" not in kinds(seen, "two"):
                seen += await boss.events(run_id="survivor", after=seen[-1].seq, stop_after=1)
            worker.send_signal(signal.SIGKILL)  # while "two" runs
            worker.wait(10)
            two = next(e.task_id for e in seen if e.step_id == "two" and e.task_id)

            async def two_completed() -> bool:  # with no worker to notice
                task = (await boss.call("GetTask", tasks_pb2.GetTaskRequest(task_id=two))).task
                return bool(task.state == tasks_pb2.TASK_STATE_COMPLETED)

            await assert_eventually(two_completed, timeout=10)
            settled = await boss.events(run_id="survivor", stop_after=len(seen))
            assert "STEP_COMPLETED" not in kinds(settled, "two")
            worker = spawn_worker(redis_url, key_prefix, tmp_path)
            rest = await boss.events(run_id="survivor", after=seen[-1].seq)
        events = seen + rest
        assert kinds(events)[-1] == "RUN_COMPLETED"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert json_format.MessageToDict(events[-1].payload) == {"three": 30.0}
        assert sorted(t for t, _, _ in quick.handled) == ["one", "three"]  # "one" not redone
        assert [t for t, _, _ in tortoise.handled] == ["two"]
    finally:
        worker.kill()
        worker.wait(10)
        await boss.close()


async def test_a_watcher_reattaches_through_another_server_and_misses_nothing(
    start_server: StartServer, spawn: Any
) -> None:
    doomed = await spawn()
    survivor = await start_server(worker=True)
    there = f"127.0.0.1:{survivor.port}"
    definition = {
        "run_id": "watched",
        "steps": [
            {
                "id": f"s{i}",
                "capability": "c",
                "title": f"s{i}",
                "input": i,
                **({"depends_on": [f"s{i - 1}"]} if i else {}),
            }
            for i in range(4)
        ],
    }
    async with workers(there, ("steady", ["c"], lambda t: inputs(t), 0.4)):
        first = Caller(doomed.target)
        seen: list[workflows_pb2.WorkflowEvent] = []
        request = workflows_pb2.CoordinateRequest(definition=definition_from_dict(definition))
        stream = first.stub.Coordinate(request, metadata=first.md)
        async for frame in stream:
            seen.extend(frame.events)
            if len(seen) >= 6:
                doomed.kill()  # the server holding the stream dies mid-run
                break
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for frame in stream:
                seen.extend(frame.events)
        second = Caller(there)
        seen += await second.events(run_id="watched", after=seen[-1].seq)
        await first.close()
        await second.close()
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))  # each once, in order
    assert kinds(seen)[-1] == "RUN_COMPLETED"
