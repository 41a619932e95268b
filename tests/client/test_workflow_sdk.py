"""Workflows in the SDK: the value types and their proto conversions, the definition prepared
before anything is sent, and `coordinate`/`attach`/`RunHandle` against a scriptable fake of the
workflow RPCs (a `FakeBus` that also serves Coordinate, GetWorkflow, ListWorkflows and
CancelWorkflow): events in order, `result()` outcomes, re-attaching after a dropped stream with
every event seen once, the errors; and the `agentpost workflow` commands."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

import agentpost
from agentpost import _status, cli
from agentpost._workflow_view import RunView
from agentpost.payload import from_value, to_payload
from agentpost.run_handle import new_run_id, prepare_definition
from agentpost.v1 import messaging_pb2_grpc, workflows_pb2
from agentpost.workflow_run import run_state_to_proto
from tests.client.conftest import FakeBus
from tests.helpers import assert_eventually

K = workflows_pb2.WorkflowEventKind
R = workflows_pb2.WorkflowRunState
ST = workflows_pb2.WorkflowStepState
UTC = datetime.UTC
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CHAIN = {
    "name": "chain",
    "input": {"repo": "agentpost"},
    "steps": [
        {"id": "plan", "capability": "plan"},
        {"id": "code", "agent_id": "coder", "depends_on": "plan"},
    ],
}


# ----------------------------------------------------------------------------- the fake


@dataclass
class FakeRun:
    definition: workflows_pb2.WorkflowDefinition
    originator: str
    events: list[workflows_pb2.WorkflowEvent] = field(default_factory=list)
    state: int = R.WORKFLOW_RUN_STATE_RUNNING
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, kind: int, payload: Any = None, **fields: Any) -> workflows_pb2.WorkflowEvent:
        event = workflows_pb2.WorkflowEvent(
            seq=len(self.events) + 1,
            run_id=self.definition.run_id,
            kind=kind,  # type: ignore[arg-type]
            percent=fields.pop("percent", -1),
            **fields,
        )
        event.time.FromDatetime(NOW)
        if payload is not None:
            holder = to_payload(payload)
            event.payload.CopyFrom(holder.json)
        self.events.append(event)
        if kind == K.WORKFLOW_EVENT_KIND_RUN_COMPLETED:
            self.state = R.WORKFLOW_RUN_STATE_COMPLETED
        elif kind == K.WORKFLOW_EVENT_KIND_RUN_FAILED:
            self.state = R.WORKFLOW_RUN_STATE_FAILED
        elif kind == K.WORKFLOW_EVENT_KIND_RUN_CANCELED:
            self.state = R.WORKFLOW_RUN_STATE_CANCELED
        self.changed.set()
        self.changed = asyncio.Event()
        return event

    def proto(self) -> workflows_pb2.WorkflowRun:
        run = workflows_pb2.WorkflowRun(
            id=self.definition.run_id,
            state=self.state,  # type: ignore[arg-type]
            originator=self.originator,
            last_seq=len(self.events),
        )
        run.definition.CopyFrom(self.definition)
        run.created_at.FromDatetime(NOW)
        for step in self.definition.steps:
            run.steps.add(step_id=step.id, state=ST.WORKFLOW_STEP_STATE_PENDING)
        last = self.events[-1] if self.events else None
        if last is not None and last.kind == K.WORKFLOW_EVENT_KIND_RUN_COMPLETED:
            run.outputs.CopyFrom(last.payload)
        if last is not None and last.kind == K.WORKFLOW_EVENT_KIND_RUN_FAILED:
            run.error.step_id, run.error.message = last.step_id, last.message
        return run


class WorkflowBus(FakeBus):
    """The fake bus, plus workflow RPCs over runs kept in memory; the test emits the events.

    * `drops`: per Coordinate stream, in order: end it with UNAVAILABLE after that many events
      (0: before any).
    * `ends`: the same, but the stream ends cleanly (a server draining, say).
    * `overlap`: a resumed stream also sends this many events at or before `after_seq` again
      (the SDK must drop them).
    * `coordinate_error`: every Coordinate fails with this error.
    * `scripts`: run id -> what happens to the run once started (called just after).
    """

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, FakeRun] = {}
        self.coordinates: list[tuple[workflows_pb2.CoordinateRequest, str]] = []
        self.unary: list[Any] = []
        self.drops: list[int] = []
        self.ends: list[int] = []
        self.overlap = 0
        self.coordinate_error: agentpost.AgentpostError | None = None
        self.scripts: dict[str, Callable[[FakeRun], None]] = {}

    async def Coordinate(
        self,
        request: workflows_pb2.CoordinateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[workflows_pb2.CoordinateResponse]:
        caller = dict(context.invocation_metadata() or ()).get("agentpost-agent-id", "anonymous")
        self.coordinates.append((request, caller))
        drop = self.drops.pop(0) if self.drops else None
        clean = False
        if drop is None and self.ends:
            drop, clean = self.ends.pop(0), True
        if self.coordinate_error is not None:
            await _abort(context, self.coordinate_error)
        if request.HasField("definition"):
            definition = request.definition
            if not definition.steps:
                await _abort(context, agentpost.InvalidWorkflowError("a workflow needs steps"))
            run = self.runs.get(definition.run_id)
            if run is None:
                run = self.runs[definition.run_id] = FakeRun(definition, caller)
                run.emit(K.WORKFLOW_EVENT_KIND_RUN_STARTED, from_value(definition.input))
                script = self.scripts.get(definition.run_id)
                if script is not None:
                    asyncio.get_running_loop().call_soon(script, run)
        else:
            found = self.runs.get(request.run_id)
            if found is None:
                await _abort(context, agentpost.WorkflowNotFoundError(f"no run {request.run_id}"))
            assert found is not None
            run = found
        index = max(0, request.after_seq - self.overlap)
        sent = 0
        while True:
            if drop is not None and sent >= drop:
                if clean:
                    return
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
            changed = run.changed
            batch = run.events[index:]
            if drop is not None:
                batch = batch[: drop - sent]
            if batch:
                yield workflows_pb2.CoordinateResponse(events=batch)
                index += len(batch)
                sent += len(batch)
                if batch[-1].kind in TERMINAL:
                    return
                continue
            if run.state != R.WORKFLOW_RUN_STATE_RUNNING:
                return  # nothing after after_seq of a run that is over
            await changed.wait()

    async def GetWorkflow(
        self, request: workflows_pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workflows_pb2.GetWorkflowResponse:
        self.unary.append(request)
        run = self.runs.get(request.run_id)
        if run is None:
            await _abort(context, agentpost.WorkflowNotFoundError(f"no run {request.run_id}"))
        assert run is not None
        return workflows_pb2.GetWorkflowResponse(run=run.proto())

    async def ListWorkflows(
        self,
        request: workflows_pb2.ListWorkflowsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> workflows_pb2.ListWorkflowsResponse:
        self.unary.append(request)
        runs = [
            run.proto()
            for run in reversed(self.runs.values())
            if not request.states or run.state in request.states
        ]
        return workflows_pb2.ListWorkflowsResponse(runs=runs[: request.limit])

    async def CancelWorkflow(
        self,
        request: workflows_pb2.CancelWorkflowRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> workflows_pb2.CancelWorkflowResponse:
        self.unary.append(request)
        run = self.runs.get(request.run_id)
        if run is None:
            await _abort(context, agentpost.WorkflowNotFoundError(f"no run {request.run_id}"))
        assert run is not None
        if run.state != R.WORKFLOW_RUN_STATE_RUNNING:
            await _abort(context, agentpost.WorkflowStateError("the run has ended"))
        run.emit(K.WORKFLOW_EVENT_KIND_RUN_CANCELED, message=request.reason)
        return workflows_pb2.CancelWorkflowResponse(run=run.proto())

    def run(self, run_id: str | None = None) -> FakeRun:
        return self.runs[run_id] if run_id else list(self.runs.values())[-1]


TERMINAL = {
    K.WORKFLOW_EVENT_KIND_RUN_COMPLETED,
    K.WORKFLOW_EVENT_KIND_RUN_FAILED,
    K.WORKFLOW_EVENT_KIND_RUN_CANCELED,
}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    assert isinstance(error, agentpost.AgentpostError)
    code, details, trailers = _status.to_status(error)
    await context.abort(code, details, trailers)


@pytest.fixture
async def bus() -> AsyncIterator[WorkflowBus]:
    fake = WorkflowBus()  # type: ignore[abstract]
    server = grpc.aio.server()
    messaging_pb2_grpc.add_AgentMessagingServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.target = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(None)


OPTIONS = agentpost.ConnectOptions(
    connect_timeout=3.0,
    request_timeout=3.0,
    reconnect_initial_backoff=0.01,
    reconnect_max_backoff=0.05,
)


@pytest.fixture
async def client(bus: WorkflowBus) -> AsyncIterator[agentpost.Client]:
    async with agentpost.Client(bus.target, agent_id="lead", options=OPTIONS) as made:
        yield made


def _finish(run: FakeRun) -> None:
    """plan and code complete, then the run."""
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_OFFERED, step_id="plan", attempt=1, agent_id="planner")
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_STARTED, step_id="plan", attempt=1, agent_id="planner")
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_COMPLETED, {"files": ["a.py"]}, step_id="plan", attempt=1)
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_COMPLETED, {"diff": "+x"}, step_id="code", attempt=1)
    run.emit(K.WORKFLOW_EVENT_KIND_RUN_COMPLETED, {"code": {"diff": "+x"}})


async def _all(handle: agentpost.RunHandle) -> list[agentpost.WorkflowEvent]:
    return [event async for event in handle]


async def _collect(handle: agentpost.RunHandle, kinds: list[str]) -> None:
    async for event in handle:
        kinds.append(event.kind.value)


# ----------------------------------------------------------------------------- value types


def test_every_proto_kind_and_state_has_an_sdk_value() -> None:
    for number in K.values():
        event = agentpost.WorkflowEvent.from_proto(workflows_pb2.WorkflowEvent(kind=number))
        expected = "unknown" if number == 0 else K.Name(number).removeprefix("WORKFLOW_EVENT_KIND_")
        assert event.kind.value.replace(".", "_").upper() == expected.upper()
    for number in R.values():
        info = agentpost.WorkflowInfo.from_proto(workflows_pb2.WorkflowRun(state=number))
        assert info.state.value.upper() == ("UNKNOWN" if number == 0 else R.Name(number)[19:])
    for number in ST.values():
        step = agentpost.WorkflowStepInfo.from_proto(
            workflows_pb2.WorkflowStepRun(state=number), None
        )
        name = "UNKNOWN" if number == 0 else ST.Name(number).removeprefix("WORKFLOW_STEP_STATE_")
        assert step.state.value.replace("-", "_").upper() == name
    assert agentpost.WorkflowEventKind.RUN_FAILED.terminal
    assert not agentpost.WorkflowEventKind.STEP_FAILED.terminal
    assert agentpost.WorkflowRunState.CANCELED.terminal
    assert not agentpost.WorkflowRunState.RUNNING.terminal
    assert agentpost.WorkflowStepState.SKIPPED.terminal
    assert not agentpost.WorkflowStepState.RETRY_WAIT.terminal


def test_workflow_event_from_proto() -> None:
    proto = workflows_pb2.WorkflowEvent(
        seq=7,
        run_id="r-1",
        kind=K.WORKFLOW_EVENT_KIND_STEP_RETRYING,
        step_id="code",
        task_id="t-9",
        attempt=2,
        message="exit 1",
        percent=-1,
        agent_id="coder",
    )
    proto.time.FromDatetime(NOW)
    proto.retry_delay.FromMilliseconds(1500)
    event = agentpost.WorkflowEvent.from_proto(proto)
    assert event == agentpost.WorkflowEvent(
        seq=7,
        run_id="r-1",
        kind=agentpost.WorkflowEventKind.STEP_RETRYING,
        step_id="code",
        task_id="t-9",
        attempt=2,
        message="exit 1",
        payload=None,
        time=NOW,
        percent=None,
        agent_id="coder",
        retry_delay=1.5,
    )
    assert event.kind == "step.retrying" and not event.terminal
    done = workflows_pb2.WorkflowEvent(seq=8, kind=K.WORKFLOW_EVENT_KIND_RUN_COMPLETED, percent=40)
    done.payload.CopyFrom(to_payload({"code": {"n": 1}, "x": None}).json)
    event = agentpost.WorkflowEvent.from_proto(done)
    assert (event.payload, event.percent, event.step_id, event.task_id, event.agent_id) == (
        {"code": {"n": 1}, "x": None},
        40,
        None,
        None,
        None,
    )
    assert event.terminal and event.time is None and event.retry_delay is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 9  # type: ignore[misc]


def test_workflow_info_from_proto_joins_steps_with_their_definition() -> None:
    definition = prepare_definition({**CHAIN, "run_id": "r-1", "steps": [
        {"id": "plan", "capability": "plan", "title": "Plan it"},
        {"id": "code", "agent_id": "coder", "depends_on": ["plan"]},
    ]})  # fmt: skip
    run = workflows_pb2.WorkflowRun(
        id="r-1", state=R.WORKFLOW_RUN_STATE_FAILED, originator="lead", last_seq=12
    )
    run.definition.CopyFrom(definition)
    run.error.step_id, run.error.message = "code", "exit 1"
    run.created_at.FromDatetime(NOW)
    plan = run.steps.add(step_id="plan", state=ST.WORKFLOW_STEP_STATE_COMPLETED, attempt=1)
    plan.output.CopyFrom(to_payload({"files": ["a"]}).json)
    plan.assignee, plan.task_id = "planner", "t-1"
    plan.finished_at.FromDatetime(NOW)
    code = run.steps.add(step_id="code", state=ST.WORKFLOW_STEP_STATE_FAILED, attempt=3)
    code.failed_assignees.extend(["c1", "c2"])
    code.error, code.fell_back_to, code.skipped_upstream = "exit 1", "by_hand", True
    info = agentpost.WorkflowInfo.from_proto(run)
    assert (info.id, info.name, info.state, info.originator, info.last_seq) == (
        "r-1",
        "chain",
        agentpost.WorkflowRunState.FAILED,
        "lead",
        12,
    )
    assert (info.input, info.outputs, info.error_step_id, info.error) == (
        {"repo": "agentpost"},
        None,
        "code",
        "exit 1",
    )
    assert info.created_at == NOW and info.updated_at is None
    first, second = info.steps
    assert (first.id, first.title, first.target, first.output, first.assignee) == (
        "plan",
        "Plan it",
        "capability:plan",
        {"files": ["a"]},
        "planner",
    )
    assert first.finished_at == NOW and first.started_at is None and first.task_id == "t-1"
    assert (second.target, second.title, second.depends_on, second.failed_assignees) == (
        "coder",
        "code",
        ("plan",),
        ("c1", "c2"),
    )
    assert (second.error, second.fell_back_to, second.skipped_upstream) == (
        "exit 1",
        "by_hand",
        True,
    )
    assert info.step("code") is second
    with pytest.raises(KeyError):
        info.step("nope")


def test_workflow_failed_error_carries_the_outcome_and_never_travels() -> None:
    event = agentpost.WorkflowEvent.from_proto(
        workflows_pb2.WorkflowEvent(
            seq=5, run_id="r-1", kind=K.WORKFLOW_EVENT_KIND_RUN_FAILED, step_id="code", message="x"
        )
    )
    error = agentpost.WorkflowFailedError.of_event(event)
    assert isinstance(error, agentpost.AgentpostError)
    assert (error.run_id, error.state, error.step_id, error.reason, error.event) == (
        "r-1",
        agentpost.WorkflowRunState.FAILED,
        "code",
        "x",
        event,
    )
    assert error.message == "workflow run r-1 failed at step code: x"
    assert error.metadata == {"run_id": "r-1", "state": "failed", "step_id": "code"}
    canceled = agentpost.WorkflowFailedError.of_event(
        agentpost.WorkflowEvent.from_proto(
            workflows_pb2.WorkflowEvent(run_id="r-1", kind=K.WORKFLOW_EVENT_KIND_RUN_CANCELED)
        )
    )
    assert canceled.state is agentpost.WorkflowRunState.CANCELED and canceled.step_id is None
    assert canceled.message == "workflow run r-1 canceled"
    assert agentpost.WorkflowFailedError not in {cls for cls, _, _ in _status._TABLE}


@pytest.mark.parametrize("text", ["completed", "COMPLETED", " Failed "])
def test_run_states_are_accepted_by_any_case(text: str) -> None:
    assert run_state_to_proto(text) != 0


@pytest.mark.parametrize("text", ["", "done", "unknown"])
def test_unknown_run_states_are_refused(text: str) -> None:
    with pytest.raises(agentpost.InvalidArgumentError, match="unknown workflow run state"):
        run_state_to_proto(text)


def test_new_run_ids_are_ulids_in_creation_order() -> None:
    ids = [new_run_id() for _ in range(50)]
    assert all(len(i) == 26 and set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)
    assert len(set(ids)) == 50
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)  # the time part never decreases


def test_prepare_definition_from_data_files_and_protos(tmp_path: Path) -> None:
    from_data = prepare_definition(CHAIN)
    assert len(from_data.run_id) == 26 and [s.id for s in from_data.steps] == ["plan", "code"]
    (tmp_path / "flow.json").write_text(json.dumps({**CHAIN, "run_id": "r-j"}))
    (tmp_path / "flow.yaml").write_text("run_id: r-y\nsteps: [{id: a, capability: c}]\n")
    assert prepare_definition(tmp_path / "flow.json").run_id == "r-j"
    assert prepare_definition(str(tmp_path / "flow.yaml")).run_id == "r-y"
    original = prepare_definition({**CHAIN, "run_id": "r-0"})
    changed = prepare_definition(original, run_id="r-1", input={"repo": "other"})
    assert (changed.run_id, from_value(changed.input)) == ("r-1", {"repo": "other"})
    assert (original.run_id, from_value(original.input)) == ("r-0", {"repo": "agentpost"})
    with pytest.raises(agentpost.InvalidArgumentError, match="definition must be"):
        prepare_definition(42)  # type: ignore[arg-type]
    with pytest.raises(agentpost.InvalidArgumentError, match="run_id"):
        prepare_definition(CHAIN, run_id="")
    with pytest.raises(agentpost.InvalidWorkflowError, match="bytes"):
        prepare_definition(CHAIN, input=b"x")
    with pytest.raises(agentpost.InvalidWorkflowError, match="cannot read"):
        prepare_definition(tmp_path / "missing.yaml")
    with pytest.raises(agentpost.InvalidWorkflowError, match="unknown key 'stepz'"):
        prepare_definition({"stepz": []})


# ----------------------------------------------------------------------------- against the fake


async def test_coordinate_starts_the_run_and_streams_its_events_in_order(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    handle = await client.coordinate(CHAIN, input={"repo": "x"})
    request, caller = bus.coordinates[0]
    assert caller == "lead" and request.after_seq == 0
    assert request.definition.run_id == handle.id and len(handle.id) == 26
    assert from_value(request.definition.input) == {"repo": "x"}
    run = bus.run(handle.id)
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_PROGRESS, step_id="plan", message="half", percent=50)
    _finish(run)
    events = await asyncio.wait_for(_all(handle), 5)
    assert [e.seq for e in events] == list(range(1, 8))
    assert [e.kind.value for e in events] == [
        "run.started",
        "step.progress",
        "step.offered",
        "step.started",
        "step.completed",
        "step.completed",
        "run.completed",
    ]
    assert events[0].payload == {"repo": "x"}
    assert (events[1].percent, events[1].message, events[2].agent_id) == (50, "half", "planner")
    assert await handle.result(timeout=5) == {"code": {"diff": "+x"}}
    assert handle.done and handle.end == events[-1] and handle.last_seq == 7
    # Every iteration starts from the first event; nothing more is called for it.
    assert [e.seq for e in await _all(handle)] == list(range(1, 8))
    assert len(bus.coordinates) == 1
    await handle.close()


async def test_the_agent_coordinates_as_itself(bus: WorkflowBus) -> None:
    async with agentpost.connect(bus.target, agent_id="planner", options=OPTIONS) as agent:
        handle = await agent.coordinate(prepare_definition(CHAIN, run_id="r-agent"))
        assert handle.id == "r-agent" and bus.coordinates[-1][1] == "planner"
        _finish(bus.run("r-agent"))
        assert (await handle.result(timeout=5))["code"] == {"diff": "+x"}
        assert (await agent.get_workflow("r-agent")).state is agentpost.WorkflowRunState.COMPLETED
        assert [r.id for r in await agent.list_workflows(states=["completed"])] == ["r-agent"]


@pytest.mark.parametrize(
    ("kind", "state", "step_id"),
    [
        (K.WORKFLOW_EVENT_KIND_RUN_FAILED, agentpost.WorkflowRunState.FAILED, "code"),
        (K.WORKFLOW_EVENT_KIND_RUN_FAILED, agentpost.WorkflowRunState.FAILED, ""),
        (K.WORKFLOW_EVENT_KIND_RUN_CANCELED, agentpost.WorkflowRunState.CANCELED, ""),
    ],
)
async def test_result_raises_workflow_failed_error_for_other_ends(
    bus: WorkflowBus,
    client: agentpost.Client,
    kind: int,
    state: agentpost.WorkflowRunState,
    step_id: str,
) -> None:
    handle = await client.coordinate(CHAIN)
    bus.run(handle.id).emit(kind, step_id=step_id, message="boom")
    with pytest.raises(agentpost.WorkflowFailedError) as caught:
        await handle.result(timeout=5)
    assert (caught.value.state, caught.value.step_id, caught.value.reason) == (
        state,
        step_id or None,
        "boom",
    )
    assert caught.value.run_id == handle.id and caught.value.event == handle.end
    await handle.close()


async def test_result_times_out_and_the_run_can_still_be_followed(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    handle = await client.coordinate(CHAIN)
    with pytest.raises(agentpost.RequestTimeoutError, match="did not end within"):
        await handle.result(timeout=0.1)
    with pytest.raises(agentpost.InvalidArgumentError):
        await handle.result(timeout=0)
    _finish(bus.run(handle.id))
    assert await handle.result(timeout=5) == {"code": {"diff": "+x"}}
    assert len(bus.coordinates) == 1
    await handle.close()


async def test_a_dropped_stream_is_resumed_after_the_last_event_seen(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    bus.drops = [2, 0, 2]  # two events, then none (an attempt fails), then two events
    bus.overlap = 1  # of which the first repeats the last event seen (and is dropped)
    handle = await client.coordinate(CHAIN)
    iterating = asyncio.create_task(_all(handle))
    run = bus.run(handle.id)
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_WAITING, step_id="code", message="waits for plan")
    await assert_eventually(lambda: len(bus.coordinates) >= 3)
    _finish(run)
    events = await asyncio.wait_for(iterating, 5)
    assert [e.seq for e in events] == list(range(1, 8))  # each once, in order
    requests = [request for request, _ in bus.coordinates]
    assert requests[0].HasField("definition")
    # Once an event arrived, the run exists: re-attached by id, after the last seq seen.
    assert [(r.HasField("definition"), r.run_id, r.after_seq) for r in requests[1:]] == [
        (False, handle.id, 2),
        (False, handle.id, 2),
        (False, handle.id, 3),
    ]
    assert await handle.result() == {"code": {"diff": "+x"}}
    await handle.close()


async def test_a_stream_that_ends_early_is_resumed_too(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    bus.ends = [1, 0]
    handle = await client.coordinate(CHAIN)
    run = bus.run(handle.id)
    _finish(run)
    assert [e.seq for e in await asyncio.wait_for(_all(handle), 5)] == list(range(1, 7))
    assert [r.after_seq for r, _ in bus.coordinates] == [0, 1, 1]
    await handle.close()


async def test_a_start_lost_before_any_event_sends_the_definition_again(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    bus.drops = [0, 0]
    handle = await client.coordinate(CHAIN)
    requests = [request for request, _ in bus.coordinates]
    assert len(requests) == 3 and all(r.HasField("definition") for r in requests)
    assert {r.definition.run_id for r in requests} == {handle.id}
    assert len(bus.runs) == 1  # one run, however often the start was sent
    await handle.close()


async def test_starting_an_existing_run_id_attaches_to_it(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    first = await client.coordinate(CHAIN, run_id="r-same")
    bus.run("r-same").emit(K.WORKFLOW_EVENT_KIND_STEP_WAITING, step_id="code")
    second = await client.coordinate({**CHAIN, "name": "ignored"}, run_id="r-same")
    assert len(bus.runs) == 1
    _finish(bus.run("r-same"))
    assert [e.seq for e in await _all(second)] == [e.seq for e in await _all(first)]
    await first.close()
    await second.close()


async def test_attach_follows_after_a_seq_and_a_finished_log_ends_with_the_record(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    started = await client.coordinate(CHAIN)
    _finish(bus.run(started.id))
    await started.result(timeout=5)
    later = client.attach(started.id, after_seq=4)
    assert later.last_seq == 4 and not later.done
    assert [e.seq for e in await _all(later)] == [5, 6]
    assert await later.result() == {"code": {"diff": "+x"}}
    # Attached after the end: nothing to replay; the outcome comes from the run's record.
    past = client.attach(started.id, after_seq=6)
    assert await _all(past) == []
    assert await past.result(timeout=5) == {"code": {"diff": "+x"}}
    assert past.end is None
    for handle in (started, later, past):
        await handle.close()


async def test_a_failed_run_attached_after_its_end_raises_from_the_record(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    handle = await client.coordinate(CHAIN)
    bus.run(handle.id).emit(K.WORKFLOW_EVENT_KIND_RUN_FAILED, step_id="plan", message="no plan")
    await handle.close()
    with pytest.raises(agentpost.WorkflowFailedError) as caught:
        await client.attach(handle.id, after_seq=2).result(timeout=5)
    assert (caught.value.state, caught.value.step_id, caught.value.reason) == (
        agentpost.WorkflowRunState.FAILED,
        "plan",
        "no plan",
    )
    assert caught.value.event is None


async def test_errors_of_the_server_are_raised_as_they_are(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    with pytest.raises(agentpost.InvalidWorkflowError, match="a workflow needs steps"):
        await client.coordinate(workflows_pb2.WorkflowDefinition(name="empty"))
    with pytest.raises(agentpost.WorkflowNotFoundError, match="no run r-404"):
        await client.attach("r-404").result(timeout=5)
    with pytest.raises(agentpost.WorkflowNotFoundError):
        await client.get_workflow("r-404")
    bus.coordinate_error = agentpost.PermissionDeniedError("not yours")
    handle = client.attach("r-1")
    with pytest.raises(agentpost.PermissionDeniedError):
        await _all(handle)
    with pytest.raises(agentpost.PermissionDeniedError):  # every consumer hears it
        await handle.result()


async def test_an_unreachable_server_raises_unavailable_after_connect_timeout(
    bus: WorkflowBus,
) -> None:
    options = agentpost.ConnectOptions(
        connect_timeout=0.3, reconnect_initial_backoff=0.01, reconnect_max_backoff=0.05
    )
    bus.drops = [0] * 1000
    async with agentpost.Client(bus.target, options=options) as client:
        with pytest.raises(agentpost.UnavailableError, match="server going away"):
            await client.coordinate(CHAIN)
    assert len(bus.coordinates) > 2


async def test_a_server_without_workflows_says_so(fake_bus: FakeBus) -> None:
    async with agentpost.Client(fake_bus.target, options=OPTIONS) as client:
        with pytest.raises(agentpost.AgentpostError, match="does not run workflows"):
            await client.coordinate(CHAIN)
        with pytest.raises(agentpost.AgentpostError, match="does not run workflows"):
            await client.list_workflows()


async def test_get_list_and_cancel(bus: WorkflowBus, client: agentpost.Client) -> None:
    one = await client.coordinate(CHAIN, run_id="r-1")
    two = await client.coordinate(CHAIN, run_id="r-2")
    _finish(bus.run("r-1"))
    await one.result(timeout=5)
    info = await two.cancel("not needed")
    assert (info.id, info.state) == ("r-2", agentpost.WorkflowRunState.CANCELED)
    with pytest.raises(agentpost.WorkflowFailedError, match="canceled: not needed") as caught:
        await two.result(timeout=5)
    assert caught.value.state is agentpost.WorkflowRunState.CANCELED
    with pytest.raises(agentpost.WorkflowStateError):
        await client.cancel_workflow("r-1", "too late")
    assert [r.id for r in await client.list_workflows()] == ["r-2", "r-1"]
    assert [r.id for r in await client.list_workflows(states=["completed"], limit=5)] == ["r-1"]
    listed = bus.unary[-1]
    assert (list(listed.states), listed.limit) == ([R.WORKFLOW_RUN_STATE_COMPLETED], 5)
    got = await one.get()
    assert (got.state, got.outputs, got.originator) == (
        agentpost.WorkflowRunState.COMPLETED,
        {"code": {"diff": "+x"}},
        "lead",
    )
    with pytest.raises(agentpost.InvalidArgumentError, match="limit"):
        await client.list_workflows(limit=0)
    with pytest.raises(agentpost.InvalidArgumentError, match="unknown workflow run state"):
        await client.list_workflows(states=["done"])
    with pytest.raises(agentpost.InvalidArgumentError, match="run_id"):
        await client.get_workflow("")
    with pytest.raises(agentpost.InvalidArgumentError, match="after_seq"):
        client.attach("r-1", after_seq=-1)
    await one.close()
    await two.close()


async def test_close_stops_following_but_not_the_run(
    bus: WorkflowBus, client: agentpost.Client
) -> None:
    handle = await client.coordinate(CHAIN)
    waiting = asyncio.create_task(handle.result())
    await asyncio.sleep(0)
    async with handle:
        pass
    with pytest.raises(agentpost.ConnectionLostError, match="stopped following"):
        await asyncio.wait_for(waiting, 5)
    seen: list[str] = []
    with pytest.raises(agentpost.ConnectionLostError):
        await _collect(handle, seen)  # what was received, then the reason it stopped
    assert seen == ["run.started"]
    assert bus.run(handle.id).state == R.WORKFLOW_RUN_STATE_RUNNING


async def test_closing_the_client_ends_its_handles(bus: WorkflowBus) -> None:
    client = agentpost.Client(bus.target, options=OPTIONS)
    handle = await client.coordinate(CHAIN)
    await client.close()
    with pytest.raises(agentpost.ConnectionLostError):
        await asyncio.wait_for(handle.result(), 5)


# ----------------------------------------------------------------------------- the view


def test_the_view_folds_events_into_one_row_per_step() -> None:
    view = RunView("r-1", "chain", [("plan", "capability:plan"), ("code", "coder")])
    run = FakeRun(prepare_definition(CHAIN, run_id="r-1"), "lead")
    run.emit(K.WORKFLOW_EVENT_KIND_RUN_STARTED)
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_STARTED, step_id="plan", attempt=1, agent_id="p")
    run.emit(K.WORKFLOW_EVENT_KIND_STEP_PROGRESS, step_id="plan", message="reading", percent=30)
    retry = run.emit(K.WORKFLOW_EVENT_KIND_STEP_RETRYING, step_id="code", attempt=1, message="x")
    retry.retry_delay.FromSeconds(2)
    for proto in run.events:
        view.apply(agentpost.WorkflowEvent.from_proto(proto))
    plan, code = view.rows["plan"], view.rows["code"]
    assert (plan.state, plan.agent, plan.attempt, plan.percent, plan.note) == (
        "running",
        "p",
        1,
        30,
        "reading",
    )
    assert (code.state, code.note) == ("retrying", "again in 2s: x")
    run.emit(K.WORKFLOW_EVENT_KIND_RUN_CANCELED, message="stop")
    view.apply(agentpost.WorkflowEvent.from_proto(run.events[-1]))
    assert (view.state, view.outcome, plan.state, code.state) == (
        "canceled",
        "stop",
        "canceled",
        "canceled",
    )
    from rich.console import Console

    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(view)
    text = console.export_text()
    assert "plan" in text and "canceled" in text and "r-1" in text and "30% reading" in text
    console.file.close()


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("command", ["run", "watch", "list", "show", "cancel"])
def test_workflow_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["workflow", command, "--help"])
    assert exited.value.code == 0
    assert "usage: agentpost workflow" in capsys.readouterr().out


async def test_workflow_commands_against_the_fake(
    bus: WorkflowBus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(CHAIN))
    server = ["--server", bus.target, "--as", "lead"]
    errors: list[str] = []

    def run(*argv: str) -> tuple[int, str]:
        status = cli.main([*server, *argv])
        captured = capsys.readouterr()
        errors.append(captured.err)
        return status, captured.out

    # Not a terminal: JSON lines, one per event, exit 0 on completion.
    bus.scripts["r-cli"] = _finish
    status, out = await asyncio.to_thread(
        run, "workflow", "run", str(flow), "--run-id", "r-cli", "--input", '{"repo": "y"}'
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert status == 0, errors[-1]
    assert [line["seq"] for line in lines] == list(range(1, 7))
    assert lines[0] == {**lines[0], "kind": "run.started", "payload": {"repo": "y"}}
    assert lines[-1]["kind"] == "run.completed" and lines[-1]["payload"] == {"code": {"diff": "+x"}}
    assert bus.coordinates[-1][1] == "lead"

    # A failing run exits 1, a canceled one 2, with the reason on stderr.
    bus.scripts["r-bad"] = lambda run: run.emit(
        K.WORKFLOW_EVENT_KIND_RUN_FAILED, step_id="code", message="exit 1"
    )
    status, out = await asyncio.to_thread(run, "workflow", "run", str(flow), "--run-id", "r-bad")
    assert status == 1 and "workflow run r-bad failed at step code: exit 1" in errors[-1]
    bus.scripts["r-off"] = lambda run: run.emit(K.WORKFLOW_EVENT_KIND_RUN_CANCELED, message="x")
    status, out = await asyncio.to_thread(run, "workflow", "run", str(flow), "--run-id", "r-off")
    assert status == 2 and "workflow run r-off canceled: x" in errors[-1]

    # watch, list, show, cancel.
    status, out = await asyncio.to_thread(run, "workflow", "watch", "r-cli", "--after", "4")
    assert status == 0 and [json.loads(line)["seq"] for line in out.splitlines()] == [5, 6]
    status, out = await asyncio.to_thread(run, "workflow", "list", "--state", "completed")
    assert status == 0 and "r-cli" in out and "r-bad" not in out and "chain" in out
    status, out = await asyncio.to_thread(run, "--json", "workflow", "list", "--limit", "2")
    assert [r["id"] for r in json.loads(out)] == ["r-off", "r-bad"]
    status, out = await asyncio.to_thread(run, "workflow", "show", "r-bad")
    assert status == 0 and "step code: exit 1" in out and "capability:plan" in out
    status, out = await asyncio.to_thread(run, "--json", "workflow", "show", "r-cli")
    shown = json.loads(out)
    assert (shown["state"], shown["outputs"], [s["id"] for s in shown["steps"]]) == (
        "completed",
        {"code": {"diff": "+x"}},
        ["plan", "code"],
    )


async def test_workflow_cancel_and_errors_from_the_cli(
    bus: WorkflowBus, client: agentpost.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = await client.coordinate(CHAIN, run_id="r-c")
    server = ["--server", bus.target]

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli.main([*server, *argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    status, out, _ = await asyncio.to_thread(run, "workflow", "cancel", "r-c", "--reason", "stop")
    assert (status, out) == (0, "r-c canceled\n")
    assert bus.unary[-1].reason == "stop"
    with pytest.raises(agentpost.WorkflowFailedError):
        await handle.result(timeout=5)
    status, _, err = await asyncio.to_thread(run, "workflow", "cancel", "r-c")
    assert status == 1 and err.startswith("agentpost: error: the run has ended")
    status, _, err = await asyncio.to_thread(run, "workflow", "show", "r-404")
    assert status == 1 and "no run r-404" in err
    status, _, err = await asyncio.to_thread(run, "workflow", "run", str(tmp_path / "x.yaml"))
    assert status == 1 and "cannot read" in err
    empty = tmp_path / "empty.json"
    empty.write_text('{"steps": []}')
    status, _, err = await asyncio.to_thread(run, "workflow", "run", str(empty))
    assert status == 1 and "steps must be a non-empty list" in err
    await handle.close()
