"""Task handoffs in the SDK: the value types and their proto conversions, the checks made before
anything is sent, and the originator's and the assignee's sides against a scriptable fake of the
task RPCs (a `FakeBus` that also serves Handoff, GetTask, WatchTask, UpdateTask...): offers and
news routed to `tasks()` and never to `messages()`, acknowledged as documented; actions naming
their attempt; `ask()` answered by a TASK_UPDATE; `result()` driven by WatchTask, resumed after a
dropped stream; the CLI commands."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

import agentpost
from agentpost import _status, cli
from agentpost.tasks import build_spec, state_from_proto, state_to_proto
from agentpost.v1 import envelope_pb2, messaging_pb2_grpc, tasks_pb2
from tests.client.conftest import FakeBus, delivery, envelope
from tests.helpers import assert_eventually

S = tasks_pb2.TaskState
K = tasks_pb2.TaskEventKind
UTC = datetime.UTC
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# ----------------------------------------------------------------------------- the fake


class TaskBus(FakeBus):
    """The fake bus, plus task RPCs: tasks kept in memory, events appended by the test (or by
    the fake's own UpdateTask/CancelTask), WatchTask streaming them live."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, tasks_pb2.Task] = {}
        self.history: dict[str, list[tasks_pb2.TaskEvent]] = {}
        self.handoffs: list[tuple[tasks_pb2.HandoffRequest, str]] = []  # (request, caller)
        self.updates: list[tasks_pb2.UpdateTaskRequest] = []
        self.watches: list[tasks_pb2.WatchTaskRequest] = []
        self.lists: list[Any] = []
        self.keys: dict[str, str] = {}
        self.unavailable_handoffs = 0
        self.drop_watch_after: int | None = None  # end one watch with UNAVAILABLE after n events
        self.update_error: agentpost.AgentpostError | None = None
        self._changed = asyncio.Event()
        self._task_ids = itertools.count(1)

    def add_event(
        self,
        task_id: str,
        state: int,
        kind: int = K.TASK_EVENT_KIND_TRANSITION,
        payload: Any = None,
        **fields: Any,
    ) -> tasks_pb2.TaskEvent:
        events = self.history.setdefault(task_id, [])
        event = tasks_pb2.TaskEvent(
            seq=len(events) + 1,
            task_id=task_id,
            kind=kind,
            state=state,  # type: ignore[arg-type]
            actor=fields.pop("actor", "coder"),
            percent=fields.pop("percent", -1),
            **fields,
        )
        event.time.FromDatetime(NOW)
        if payload is not None:
            agentpost.payload.fill_payload(event.payload, payload)
        events.append(event)
        if task_id in self.tasks:
            self.tasks[task_id].state = state  # type: ignore[assignment]
            if state == S.TASK_STATE_COMPLETED and kind == K.TASK_EVENT_KIND_TRANSITION:
                self.tasks[task_id].result.CopyFrom(event.payload)
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    async def Handoff(
        self, request: tasks_pb2.HandoffRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.HandoffResponse:
        caller = dict(context.invocation_metadata() or ()).get("agentpost-agent-id", "anonymous")
        self.handoffs.append((request, caller))
        if self.unavailable_handoffs > 0:
            self.unavailable_handoffs -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        await self._maybe_fail(context)
        known = self.keys.get(request.idempotency_key)
        if known is not None:
            return tasks_pb2.HandoffResponse(task=self.tasks[known], duplicate=True)
        task = tasks_pb2.Task(id=f"t-{next(self._task_ids)}", originator=caller, spec=request.spec)
        task.state = S.TASK_STATE_SUBMITTED
        task.created_at.FromDatetime(NOW)
        self.tasks[task.id] = task
        self.keys[request.idempotency_key] = task.id
        self.add_event(task.id, S.TASK_STATE_SUBMITTED, actor=caller)
        return tasks_pb2.HandoffResponse(task=task)

    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.GetTaskResponse:
        task = await self._task(request.task_id, context)
        response = tasks_pb2.GetTaskResponse(task=task)
        if request.history:
            response.task.history.extend(self.history.get(task.id, []))
        return response

    async def WatchTask(
        self, request: tasks_pb2.WatchTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        self.watches.append(request)
        await self._task(request.task_id, context)
        sent, after = 0, request.after_seq
        while True:
            changed = self._changed
            events = [e for e in self.history.get(request.task_id, []) if e.seq > after]
            for event in events:
                if self.drop_watch_after is not None and sent >= self.drop_watch_after:
                    self.drop_watch_after = None
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped")
                yield tasks_pb2.WatchTaskResponse(events=[event])
                sent += 1
                after = event.seq
                if event.kind == K.TASK_EVENT_KIND_TRANSITION and event.state >= 5:
                    return
            if self.tasks[request.task_id].state >= 5:
                return  # over, and nothing after `after_seq` (as the server does)
            await changed.wait()

    async def UpdateTask(
        self, request: tasks_pb2.UpdateTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.UpdateTaskResponse:
        self.updates.append(request)
        task = await self._task(request.task_id, context)
        if self.update_error is not None:
            code, details, trailers = _status.to_status(self.update_error)
            await context.abort(code, details, trailers)
        action = request.WhichOneof("action")
        state = {
            "accept": S.TASK_STATE_WORKING,
            "reject": S.TASK_STATE_SUBMITTED,
            "progress": task.state,
            "request_input": S.TASK_STATE_INPUT_REQUIRED,
            "complete": S.TASK_STATE_COMPLETED,
            "fail": S.TASK_STATE_FAILED,
            "input": S.TASK_STATE_WORKING,
        }[action or ""]
        kind = K.TASK_EVENT_KIND_PROGRESS if action == "progress" else K.TASK_EVENT_KIND_TRANSITION
        self.add_event(task.id, state, kind)
        return tasks_pb2.UpdateTaskResponse(task=self.tasks[task.id])

    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.CancelTaskResponse:
        task = await self._task(request.task_id, context)
        self.add_event(
            task.id, S.TASK_STATE_CANCELED, error=tasks_pb2.TaskError(message=request.reason)
        )
        return tasks_pb2.CancelTaskResponse(task=self.tasks[task.id])

    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.ListTasksResponse:
        self.lists.append(request)
        return tasks_pb2.ListTasksResponse(tasks=list(self.tasks.values()))

    async def ListAudit(
        self, request: tasks_pb2.ListAuditRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.ListAuditResponse:
        self.lists.append(request)
        record = tasks_pb2.AuditRecord(
            id="1-0", actor="planner", action="task.handoff", subject="t-1", details={"to": "coder"}
        )
        record.time.FromDatetime(NOW)
        return tasks_pb2.ListAuditResponse(records=[record])

    async def _task(
        self, task_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.Task:
        task = self.tasks.get(task_id)
        if task is None:
            code, details, trailers = _status.to_status(
                agentpost.TaskNotFoundError(f"no task {task_id}")
            )
            await context.abort(code, details, trailers)
        assert task is not None
        return task


@pytest.fixture
async def bus() -> AsyncIterator[TaskBus]:
    fake = TaskBus()  # type: ignore[abstract]
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


def _connect(bus: TaskBus) -> agentpost.AgentConnector:
    return agentpost.connect(bus.target, agent_id="me", options=OPTIONS)


def _task_proto(task_id: str = "t-1", attempt: int = 1, **spec: Any) -> tasks_pb2.Task:
    task = tasks_pb2.Task(
        id=task_id, originator="planner", state=S.TASK_STATE_OFFERED, assignee="me", attempt=attempt
    )
    task.spec.agent_id = "me"
    task.spec.title = spec.pop("title", "Fix the build")
    agentpost.payload.fill_payload(task.spec.input, spec.pop("input", {"log": "x"}))
    return task


def _offer(
    bus: TaskBus, task_id: str = "t-1", attempt: int = 1, **spec: Any
) -> envelope_pb2.Envelope:
    """A TASK_OFFER envelope (and the task, known to the fake)."""
    task = _task_proto(task_id, attempt, **spec)
    bus.tasks[task_id] = task
    env = envelope(kind=envelope_pb2.MESSAGE_KIND_TASK_OFFER, id=f"o-{task_id}-{attempt}")
    env.sender = "agentpost"
    env.task.task.CopyFrom(task)
    return env


def _update(
    task_id: str,
    state: int,
    *,
    kind: int = K.TASK_EVENT_KIND_TRANSITION,
    attempt: int = 1,
    assignee: str = "me",
    payload: Any = None,
    reason: str = "",
    env_id: str = "u-1",
) -> envelope_pb2.Envelope:
    env = envelope(kind=envelope_pb2.MESSAGE_KIND_TASK_UPDATE, id=env_id)
    env.sender = "agentpost"
    env.task.task.id = task_id
    env.task.task.attempt = attempt
    event = env.task.event
    event.task_id, event.kind, event.state = task_id, kind, state  # type: ignore[assignment]
    event.attempt, event.assignee, event.seq = attempt, assignee, 5
    if payload is not None:
        agentpost.payload.fill_payload(event.payload, payload)
    if reason:
        event.error.message = reason
    return env


# ----------------------------------------------------------------------------- value types


def test_every_proto_state_has_a_task_state_and_back() -> None:
    names = {
        S.TASK_STATE_SUBMITTED: "submitted",
        S.TASK_STATE_OFFERED: "offered",
        S.TASK_STATE_WORKING: "working",
        S.TASK_STATE_INPUT_REQUIRED: "input-required",
        S.TASK_STATE_COMPLETED: "completed",
        S.TASK_STATE_FAILED: "failed",
        S.TASK_STATE_REJECTED: "rejected",
        S.TASK_STATE_CANCELED: "canceled",
        S.TASK_STATE_EXPIRED: "expired",
    }
    assert set(names) == set(S.values()) - {S.TASK_STATE_UNSPECIFIED}
    for number, name in names.items():
        state = state_from_proto(number)
        assert state == name and state_to_proto(state) == number
    terminal = {s.value for s in agentpost.TaskState if s.terminal}
    assert terminal == {"completed", "failed", "rejected", "canceled", "expired"}
    assert state_from_proto(S.TASK_STATE_UNSPECIFIED) is agentpost.TaskState.UNKNOWN
    assert state_from_proto(99) is agentpost.TaskState.UNKNOWN  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["input-required", "INPUT_REQUIRED", "input_required"])
def test_states_are_accepted_by_any_spelling_of_their_name(text: str) -> None:
    assert state_to_proto(text) == S.TASK_STATE_INPUT_REQUIRED


@pytest.mark.parametrize("text", ["done", "unknown", ""])
def test_unknown_state_names_are_refused(text: str) -> None:
    with pytest.raises(agentpost.InvalidArgumentError, match="unknown task state"):
        state_to_proto(text)


def test_task_info_from_proto() -> None:
    task = _task_proto(attempt=2)
    task.spec.description = "the details"
    task.spec.context.update({"cwd": "/repo", "n": 1})
    task.spec.references["conversation_id"] = "c-42"
    task.spec.priority = 7
    task.spec.deadline.FromDatetime(NOW)
    task.spec.accept_timeout.FromMilliseconds(1500)
    task.spec.max_attempts = 3
    task.state = S.TASK_STATE_FAILED
    task.created_at.FromDatetime(NOW)
    task.error.message, task.error.retryable = "disk full", True
    task.history.add(seq=1, kind=K.TASK_EVENT_KIND_PROGRESS, state=S.TASK_STATE_WORKING, percent=40)
    info = agentpost.TaskInfo.from_proto(task)
    assert (info.id, info.originator, info.agent_id, info.capability) == (
        "t-1",
        "planner",
        "me",
        None,
    )
    assert (info.title, info.description, info.input) == (
        "Fix the build",
        "the details",
        {"log": "x"},
    )
    assert info.context == {"cwd": "/repo", "n": 1}
    assert info.references == {"conversation_id": "c-42"}
    assert (info.priority, info.deadline, info.accept_timeout, info.max_attempts) == (
        7,
        NOW,
        1.5,
        3,
    )
    assert (info.state, info.assignee, info.attempt) == (agentpost.TaskState.FAILED, "me", 2)
    assert (info.created_at, info.updated_at, info.result) == (NOW, None, None)
    assert (info.error, info.retryable, info.target) == ("disk full", True, "me")
    assert [(e.seq, e.kind, e.percent) for e in info.history] == [
        (1, agentpost.TaskEventKind.PROGRESS, 40)
    ]
    bare = agentpost.TaskInfo.from_proto(
        tasks_pb2.Task(id="t-2", spec=tasks_pb2.TaskSpec(capability="code"))
    )
    assert (bare.agent_id, bare.capability, bare.target) == (None, "code", "capability:code")
    assert (bare.input, bare.deadline, bare.accept_timeout, bare.max_attempts) == (
        None,
        None,
        None,
        None,
    )
    assert (bare.assignee, bare.error, bare.context) == (None, None, {})


def test_task_event_from_proto() -> None:
    event = tasks_pb2.TaskEvent(
        seq=4,
        task_id="t-1",
        kind=K.TASK_EVENT_KIND_TRANSITION,
        state=S.TASK_STATE_REJECTED,
        actor="coder",
        message="not mine",
        percent=-1,
        attempt=2,
    )
    event.error.message = "not mine"
    parsed = agentpost.TaskEvent.from_proto(event)
    assert (parsed.seq, parsed.state, parsed.terminal) == (4, agentpost.TaskState.REJECTED, True)
    assert (parsed.percent, parsed.assignee, parsed.payload, parsed.time) == (
        None,
        None,
        None,
        None,
    )
    assert (parsed.error, parsed.retryable, parsed.attempt) == ("not mine", False, 2)
    progress = agentpost.TaskEvent.from_proto(
        tasks_pb2.TaskEvent(
            kind=K.TASK_EVENT_KIND_PROGRESS, state=S.TASK_STATE_COMPLETED, percent=0
        )
    )
    assert progress.percent == 0 and not progress.terminal  # only transitions end a task
    with pytest.raises(dataclasses_frozen()):
        parsed.seq = 5  # type: ignore[misc]


def dataclasses_frozen() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_task_failed_error_is_an_agentpost_error_with_the_outcome() -> None:
    event = agentpost.TaskEvent.from_proto(
        tasks_pb2.TaskEvent(
            seq=3,
            state=S.TASK_STATE_EXPIRED,
            kind=K.TASK_EVENT_KIND_TRANSITION,
            error=tasks_pb2.TaskError(message="deadline passed"),
        )
    )
    error = agentpost.TaskFailedError.of("t-9", event)
    assert isinstance(error, agentpost.AgentpostError)
    assert (error.task_id, error.state, error.reason) == (
        "t-9",
        agentpost.TaskState.EXPIRED,
        "deadline passed",
    )
    assert error.message == "task t-9 expired: deadline passed"
    assert error.metadata == {"task_id": "t-9", "state": "expired"}


# ----------------------------------------------------------------------------- the spec


def test_build_spec_fills_every_field() -> None:
    spec = build_spec(
        to=None,
        capability="code",
        title="T",
        description="D",
        input=b"\x00",
        context={"cwd": "/repo"},
        references={"c": "1"},
        priority=-1000,
        deadline=datetime.timedelta(minutes=5),
        accept_timeout=2.5,
        max_attempts=2,
        now=NOW,
    )
    assert spec.WhichOneof("target") == "capability" and spec.capability == "code"
    assert (spec.title, spec.description, spec.input.data) == ("T", "D", b"\x00")
    assert dict(spec.references) == {"c": "1"} and spec.context["cwd"] == "/repo"
    assert spec.priority == -1000 and spec.max_attempts == 2
    assert spec.deadline.ToDatetime(tzinfo=UTC) == NOW + datetime.timedelta(minutes=5)
    assert spec.accept_timeout.ToMilliseconds() == 2500
    assert build_spec(to="a", capability=None, title="T", deadline=30, now=NOW).deadline.ToDatetime(
        tzinfo=UTC
    ) == NOW + datetime.timedelta(seconds=30)
    other_zone = datetime.datetime(
        2026, 1, 2, 5, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    assert (
        build_spec(to="a", capability=None, title="T", deadline=other_zone).deadline.ToDatetime(
            tzinfo=UTC
        )
        == NOW
    )
    bare = build_spec(to="a", capability=None, title="T")
    for field in ("input", "deadline", "accept_timeout"):
        assert not bare.HasField(field)
    assert bare.max_attempts == 0 and bare.priority == 0


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"to": None, "capability": None}, "target"),
        ({"to": "a", "capability": "c"}, "target"),
        ({"to": ""}, "to"),
        ({"title": ""}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"priority": 1001}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"deadline": datetime.datetime(2030, 1, 1)}, "deadline"),  # naive
        ({"deadline": datetime.timedelta(0)}, "deadline"),
        ({"deadline": -1}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"accept_timeout": 0}, "accept_timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"references": {"k": 1}}, "references"),
        ({"context": {"x": object()}}, "payload"),
        ({"input": {1, 2}}, "payload"),
    ],
)
def test_build_spec_refuses_bad_arguments(arguments: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {"to": "coder", "capability": None, "title": "T", **arguments}
    with pytest.raises(agentpost.InvalidArgumentError) as caught:
        build_spec(**values)
    assert caught.value.metadata["field"] == field


def test_a_title_of_200_characters_is_fine() -> None:
    assert len(build_spec(to="a", capability=None, title="é" * 200).title) == 200


# ----------------------------------------------------------------------------- originator


async def test_handoff_sends_the_spec_as_the_agent_with_a_retry_key(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        handle = await agent.handoff("coder", title="Fix it", input={"n": 1}, priority=5)
        again = await agent.handoff(capability="code", title="Other")
    assert isinstance(handle, agentpost.TaskHandle)
    assert (handle.id, handle.duplicate, again.id) == ("t-1", False, "t-2")
    (first, caller), (second, _) = bus.handoffs
    assert caller == "me"
    assert (first.spec.agent_id, first.spec.title, first.spec.priority) == ("coder", "Fix it", 5)
    assert second.spec.capability == "code"
    keys = [request.idempotency_key for request, _ in bus.handoffs]
    assert all(key.startswith("~") for key in keys) and len(set(keys)) == 2


async def test_a_handoff_is_repeated_with_the_same_key_while_unavailable(bus: TaskBus) -> None:
    bus.unavailable_handoffs = 2
    async with agentpost.Client(bus.target, agent_id="script", options=OPTIONS) as client:
        handle = await client.handoff("coder", title="T")
        assert handle.id == "t-1" and not handle.duplicate
        mine = await client.handoff("coder", title="T", idempotency_key="job-7")
        same = await client.handoff("coder", title="T", idempotency_key="job-7")
    assert len(bus.handoffs) == 5
    assert len({request.idempotency_key for request, _ in bus.handoffs[:3]}) == 1
    assert {caller for _, caller in bus.handoffs} == {"script"}
    assert same.id == mine.id and same.duplicate


@pytest.mark.parametrize("key", ["~mine", ""])
async def test_handoff_keys_must_not_look_like_retry_keys(bus: TaskBus, key: str) -> None:
    async with agentpost.Client(bus.target, options=OPTIONS) as client:
        with pytest.raises(agentpost.InvalidArgumentError, match="idempotency_key"):
            await client.handoff("coder", title="T", idempotency_key=key)
        with pytest.raises(agentpost.InvalidArgumentError):
            await client.handoff(title="T")  # no target
    assert bus.handoffs == []


async def test_a_final_unavailable_handoff_names_the_callers_key(bus: TaskBus) -> None:
    bus.unavailable_handoffs = 1000
    options = agentpost.ConnectOptions(request_timeout=0.3, reconnect_initial_backoff=0.01)
    async with agentpost.Client(bus.target, options=options) as client:
        with pytest.raises(agentpost.UnavailableError) as caught:
            await client.handoff("coder", title="T", idempotency_key="job-1")
        assert caught.value.metadata["idempotency_key"] == "job-1"
        with pytest.raises(agentpost.UnavailableError) as caught:
            await client.handoff("coder", title="T")
        assert "idempotency_key" not in caught.value.metadata


async def test_result_follows_the_events_to_the_result(bus: TaskBus) -> None:
    async with agentpost.Client(bus.target, agent_id="planner", options=OPTIONS) as client:
        handle = await client.handoff("coder", title="T")
        waiting = asyncio.create_task(handle.result(timeout=5))
        bus.add_event(handle.id, S.TASK_STATE_OFFERED, assignee="coder", attempt=1)
        bus.add_event(handle.id, S.TASK_STATE_WORKING)
        bus.add_event(
            handle.id, S.TASK_STATE_WORKING, K.TASK_EVENT_KIND_PROGRESS, percent=50, message="half"
        )
        bus.add_event(handle.id, S.TASK_STATE_COMPLETED, payload={"fixed": True})
        assert await waiting == {"fixed": True}
        assert await handle.result() == {"fixed": True}  # kept: no second watch
        assert len(bus.watches) == 1
        events = [e async for e in handle.events()]
        assert [(e.seq, e.state.value, e.kind.value) for e in events] == [
            (1, "submitted", "transition"),
            (2, "offered", "transition"),
            (3, "working", "transition"),
            (4, "working", "progress"),
            (5, "completed", "transition"),
        ]
        assert events[3].percent == 50 and events[3].message == "half"
        assert [e.seq async for e in handle.events(after_seq=3)] == [4, 5]
        assert [e.seq async for e in client.watch_task(handle.id, after_seq=4)] == [5]
        assert [e.seq async for e in client.watch_task(handle.id, after_seq=5)] == []


@pytest.mark.parametrize(
    "state", [S.TASK_STATE_FAILED, S.TASK_STATE_REJECTED, S.TASK_STATE_EXPIRED]
)
async def test_result_raises_task_failed_error_for_other_ends(bus: TaskBus, state: int) -> None:
    async with agentpost.Client(bus.target, options=OPTIONS) as client:
        handle = await client.handoff("coder", title="T")
        bus.add_event(handle.id, state, error=tasks_pb2.TaskError(message="why", retryable=True))
        with pytest.raises(agentpost.TaskFailedError) as caught:
            await handle.result()
    assert caught.value.state == state_from_proto(state)  # type: ignore[arg-type]
    assert (caught.value.reason, caught.value.retryable, caught.value.task_id) == (
        "why",
        True,
        handle.id,
    )


async def test_result_times_out_without_canceling_the_task(bus: TaskBus) -> None:
    async with agentpost.Client(bus.target, options=OPTIONS) as client:
        handle = await client.handoff("coder", title="T")
        with pytest.raises(agentpost.RequestTimeoutError, match="did not end within"):
            await handle.result(timeout=0.2)
        with pytest.raises(TimeoutError):  # asyncio.TimeoutError too
            await handle.result(timeout=0.05)
        with pytest.raises(agentpost.InvalidArgumentError):
            await handle.result(timeout=0)
        assert (await handle.get()).state is agentpost.TaskState.SUBMITTED


async def test_a_dropped_watch_resumes_after_the_last_event_seen(bus: TaskBus) -> None:
    async with agentpost.Client(bus.target, options=OPTIONS) as client:
        handle = await client.handoff("coder", title="T")
        bus.add_event(handle.id, S.TASK_STATE_OFFERED)
        bus.add_event(handle.id, S.TASK_STATE_WORKING)
        bus.drop_watch_after = 2
        waiting = asyncio.create_task(_collect(handle))
        await assert_eventually(lambda: len(bus.watches) == 2)
        bus.add_event(handle.id, S.TASK_STATE_COMPLETED, payload="done")
        assert await waiting == [1, 2, 3, 4]
    assert [w.after_seq for w in bus.watches] == [0, 2]


async def _collect(handle: agentpost.TaskHandle) -> list[int]:
    return [event.seq async for event in handle.events()]


async def test_unknown_tasks_raise_task_not_found(bus: TaskBus) -> None:
    async with agentpost.Client(bus.target, options=OPTIONS) as client:
        with pytest.raises(agentpost.TaskNotFoundError):
            await client.get_task("t-404")
        with pytest.raises(agentpost.TaskNotFoundError):
            await client.task_handle("t-404").result()
        with pytest.raises(agentpost.TaskNotFoundError):
            await client.cancel_task("t-404")
        with pytest.raises(agentpost.InvalidArgumentError):
            await client.get_task("")


async def test_cancel_provide_input_get_list_and_audit(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        handle = await agent.handoff("coder", title="T")
        answered = await handle.provide_input({"branch": "main"})
        assert answered.state is agentpost.TaskState.WORKING
        update = bus.updates[-1]
        assert (update.task_id, update.attempt, update.WhichOneof("action")) == (
            handle.id,
            0,
            "input",
        )
        assert update.input.payload.json.struct_value.fields["branch"].string_value == "main"
        canceled = await handle.cancel("not needed")
        assert canceled.state is agentpost.TaskState.CANCELED
        info = await agent.get_task(handle.id, history=True)
        assert [e.state.value for e in info.history][-1] == "canceled"
        assert info.history[-1].error == "not needed"
        tasks = await agent.list_tasks(
            states=["working", agentpost.TaskState.CANCELED], originator="me", dead=True, limit=5
        )
        assert [t.id for t in tasks] == [handle.id]
        records = await agent.audit(handle.id, limit=10)
        assert [(r.actor, r.action, r.subject, r.details, r.time) for r in records] == [
            ("planner", "task.handoff", "t-1", {"to": "coder"}, NOW)
        ]
        with pytest.raises(agentpost.InvalidArgumentError):
            await agent.list_tasks(limit=1001)
        with pytest.raises(agentpost.InvalidArgumentError):
            await agent.list_tasks(states=["nope"])
    listed, audited = bus.lists
    assert list(listed.states) == [S.TASK_STATE_WORKING, S.TASK_STATE_CANCELED]
    assert (listed.dead, listed.originator, listed.assignee, listed.limit) == (True, "me", "", 5)
    assert (audited.subject, audited.limit) == (handle.id, 10)


# ----------------------------------------------------------------------------- assignee


async def test_offers_and_news_go_to_tasks_never_to_messages(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d-offer")
        server.deliver(_offer(bus, "t-1"), "d-again")  # the same offer delivered again
        server.deliver(envelope(id="m-1", payload="plain"), "d-msg")
        server.deliver(_update("t-1", S.TASK_STATE_WORKING, kind=K.TASK_EVENT_KIND_INPUT), "d-news")
        message = await asyncio.wait_for(anext(agent.messages()), 2)
        assert message.id == "m-1"
        offers = agent.tasks()
        offer = await asyncio.wait_for(anext(offers), 2)
        assert isinstance(offer, agentpost.Assignment)
        assert (offer.id, offer.title, offer.input, offer.originator, offer.attempt) == (
            "t-1",
            "Fix the build",
            {"log": "x"},
            "planner",
            1,
        )
        # The offer was acknowledged when handed out; the news and the duplicate at once.
        await assert_eventually(lambda: {"d-offer", "d-again", "d-news"} <= set(server.acked()))
        server.deliver(_offer(bus, "t-2"), "d-next")
        following = await asyncio.wait_for(anext(offers), 2)
        assert following.id == "t-2"  # the duplicate was not shown again
        await offers.aclose()
    assert "d-msg" in server.acked()  # messages() acked its own on close


async def test_an_offer_not_handed_out_is_not_acknowledged(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d-offer")
        server.deliver(envelope(id="m-1"), "d-msg")
        await asyncio.wait_for(anext(agent.messages()), 2)
    assert "d-offer" not in server.acked()  # it comes again to the next session


async def test_assignee_actions_name_the_attempt(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        bus.last.deliver(_offer(bus, "t-1", attempt=3), "d1")
        offer = await asyncio.wait_for(anext(agent.tasks()), 2)
        await offer.accept()
        assert offer.state is agentpost.TaskState.WORKING
        await offer.progress("reading", percent=42.4)
        await offer.progress("still")
        await offer.complete({"ok": True})
        assert offer.finished and offer.state is agentpost.TaskState.COMPLETED
        with pytest.raises(agentpost.InvalidArgumentError):
            await offer.progress("x", percent=101)
    assert [(u.task_id, u.attempt, u.WhichOneof("action")) for u in bus.updates] == [
        ("t-1", 3, "accept"),
        ("t-1", 3, "progress"),
        ("t-1", 3, "progress"),
        ("t-1", 3, "complete"),
    ]
    first, second = bus.updates[1].progress, bus.updates[2].progress
    assert (first.message, first.percent, first.has_percent) == ("reading", 42, True)
    assert (second.percent, second.has_percent) == (-1, False)
    assert bus.updates[3].complete.result.json.struct_value.fields["ok"].bool_value


async def test_a_stale_offer_raises_task_state_error(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        bus.last.deliver(_offer(bus, "t-1"), "d1")
        offer = await asyncio.wait_for(anext(agent.tasks()), 2)
        bus.update_error = agentpost.TaskStateError("the offer timed out")
        with pytest.raises(agentpost.TaskStateError, match="timed out"):
            await offer.accept()


async def test_ask_returns_the_originators_answer(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d1")
        offer = await asyncio.wait_for(anext(agent.tasks()), 2)
        await offer.accept()
        asking = asyncio.create_task(offer.ask("Which branch?", {"options": ["main", "dev"]}))
        await assert_eventually(lambda: bus.updates[-1].WhichOneof("action") == "request_input")
        asked = bus.updates[-1].request_input
        assert asked.message == "Which branch?" and asked.payload.HasField("json")
        server.deliver(
            _update("t-1", S.TASK_STATE_WORKING, kind=K.TASK_EVENT_KIND_INPUT, payload="dev"), "d2"
        )
        assert await asyncio.wait_for(asking, 2) == "dev"
        assert offer.state is agentpost.TaskState.WORKING
        await assert_eventually(lambda: "d2" in server.acked())
        with pytest.raises(agentpost.RequestTimeoutError, match="no answer"):
            await offer.ask("Anyone?", timeout=0.1)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_update("t-1", S.TASK_STATE_CANCELED, reason="not needed"), "was canceled: not needed"),
        (_update("t-1", S.TASK_STATE_EXPIRED), "was expired"),
        (_update("t-1", S.TASK_STATE_OFFERED, attempt=2, assignee="other"), "no longer"),
        (_update("t-1", S.TASK_STATE_SUBMITTED, reason="offer timed out"), "timed out"),
        (_update("t-1", S.TASK_STATE_SUBMITTED, attempt=1, assignee=""), "no longer"),
    ],
)
async def test_news_that_the_task_is_gone_ends_an_ask_and_sets_canceled(
    bus: TaskBus, update: envelope_pb2.Envelope, reason: str
) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d1")
        offer = await asyncio.wait_for(anext(agent.tasks()), 2)
        await offer.accept()
        asking = asyncio.create_task(offer.ask("?"))
        await assert_eventually(lambda: bus.updates[-1].WhichOneof("action") == "request_input")
        assert not offer.canceled.is_set()
        server.deliver(update, "d2")
        with pytest.raises(agentpost.TaskStateError, match=reason):
            await asyncio.wait_for(asking, 2)
        assert offer.canceled.is_set() and offer.finished
        assert offer.cancellation is not None
        with pytest.raises(agentpost.TaskStateError):
            await offer.complete("late")  # refused before anything is sent
        assert bus.updates[-1].WhichOneof("action") == "request_input"


async def test_an_offer_canceled_before_it_is_handed_out_is_skipped(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.push(  # in one frame: the news is in before the offer is handed out
            delivery(_offer(bus, "t-1"), "d1"),
            delivery(_update("t-1", S.TASK_STATE_CANCELED), "d2"),
            delivery(_offer(bus, "t-2"), "d3"),
        )
        offer = await asyncio.wait_for(anext(agent.tasks()), 2)
        assert offer.id == "t-2"
        await assert_eventually(lambda: {"d1", "d2", "d3"} <= set(server.acked()))


async def test_a_new_attempt_offered_to_the_same_agent_replaces_the_old(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1", attempt=1), "d1")
        tasks = agent.tasks()
        old = await asyncio.wait_for(anext(tasks), 2)
        server.deliver(_offer(bus, "t-1", attempt=2), "d2")
        new = await asyncio.wait_for(anext(tasks), 2)
        assert (old.attempt, new.attempt) == (1, 2)
        assert old.canceled.is_set() and not new.canceled.is_set()
        # News about attempt 2 concerns the new one only.
        server.deliver(_update("t-1", S.TASK_STATE_WORKING, attempt=2), "d3")
        await assert_eventually(lambda: "d3" in server.acked())
        assert not new.canceled.is_set()
        await tasks.aclose()


async def test_a_task_handler_completes_with_its_return_value(bus: TaskBus) -> None:
    seen: list[str] = []
    async with _connect(bus) as agent:

        @agent.on_task
        async def work(task: agentpost.Assignment) -> dict[str, Any]:
            seen.append(task.state.value)
            await task.progress("half", percent=50)
            answer = await task.ask("branch?")
            return {"input": task.input, "answer": answer}

        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d1")
        await assert_eventually(
            lambda: bool(bus.updates) and bus.updates[-1].WhichOneof("action") == "request_input"
        )
        server.deliver(
            _update("t-1", S.TASK_STATE_WORKING, kind=K.TASK_EVENT_KIND_INPUT, payload="main"), "d2"
        )
        await assert_eventually(lambda: bus.updates[-1].WhichOneof("action") == "complete")
    assert seen == ["working"]
    assert [u.WhichOneof("action") for u in bus.updates] == [
        "accept",
        "progress",
        "request_input",
        "complete",
    ]
    result = agentpost.payload.from_payload(bus.updates[-1].complete.result)
    assert result == {"input": {"log": "x"}, "answer": "main"}


async def test_a_failing_handler_fails_the_task_not_retryable(bus: TaskBus) -> None:
    async with _connect(bus) as agent:

        async def broken(task: agentpost.Assignment) -> None:
            raise KeyError("log")

        agent.handle_tasks(broken)
        bus.last.deliver(_offer(bus, "t-1"), "d1")
        await assert_eventually(
            lambda: bool(bus.updates) and bus.updates[-1].WhichOneof("action") == "fail"
        )
        failed = bus.updates[-1].fail
        assert (failed.message, failed.retryable) == ("KeyError: 'log'", False)

        async def unsendable(task: agentpost.Assignment) -> object:
            return object()

        agent.handle_tasks(unsendable)
        bus.last.deliver(_offer(bus, "t-2"), "d2")
        await assert_eventually(
            lambda: (
                bus.updates[-1].task_id == "t-2" and bus.updates[-1].WhichOneof("action") == "fail"
            )
        )
        assert "cannot be sent" in bus.updates[-1].fail.message


async def test_a_handler_whose_task_is_canceled_is_cancelled(bus: TaskBus) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()
    async with _connect(bus) as agent:

        async def slow(task: agentpost.Assignment) -> str:
            started.set()
            try:
                await asyncio.sleep(60)
            finally:
                stopped.set()
            return "never"

        agent.handle_tasks(slow)
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d1")
        await asyncio.wait_for(started.wait(), 2)
        server.deliver(_update("t-1", S.TASK_STATE_CANCELED), "d2")
        await asyncio.wait_for(stopped.wait(), 2)
        desk = agent._session.desk
        await assert_eventually(lambda: not desk._running)  # the runner is over
    assert [u.WhichOneof("action") for u in bus.updates] == ["accept"]  # nothing reported


async def test_offers_queued_before_the_handler_is_set_go_to_it(bus: TaskBus) -> None:
    async with _connect(bus) as agent:
        server = bus.last
        server.deliver(_offer(bus, "t-1"), "d1")
        server.deliver(envelope(id="m-1"), "d-msg")
        await asyncio.wait_for(anext(agent.messages()), 2)  # the offer is queued by now
        done: list[str] = []

        async def work(task: agentpost.Assignment) -> str:
            done.append(task.id)
            return "ok"

        agent.handle_tasks(work)
        await assert_eventually(lambda: done == ["t-1"])
        await assert_eventually(lambda: bus.updates[-1].WhichOneof("action") == "complete")


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "command", ["handoff", "tasks", "task", "task show", "task watch", "task cancel", "audit"]
)
def test_task_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command.split(), "--help"])
    assert exited.value.code == 0
    assert f"agentpost {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["handoff", "--title", "T"],  # no target
        ["handoff", "--to", "a", "--capability", "c", "--title", "T"],
        ["handoff", "--to", "a"],  # no title
        ["handoff", "--to", "a", "--title", "T", "--priority", "2000"],
        ["handoff", "--to", "a", "--title", "T", "--timeout", "5"],  # without --wait
        ["handoff", "--to", "a", "--title", "T", "--context", "[1]"],
        ["tasks", "--state", "done"],
        ["task"],
    ],
)
def test_task_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli.main(argv)
    except SystemExit as exited:
        status = int(exited.code or 0)
    assert status == 2
    assert capsys.readouterr().err.strip()


def test_handoff_passes_its_arguments_and_prints_the_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []

    async def handoff(self: agentpost.Client, to: str | None = None, **kwargs: Any) -> Any:
        calls.append({"to": to, "as": self.agent_id, **kwargs})
        return agentpost.TaskHandle(None, "t-7")  # type: ignore[arg-type]

    monkeypatch.setattr(agentpost.Client, "handoff", handoff)
    argv = [
        "--as",
        "planner",
        "handoff",
        "--capability",
        "code",
        "--title",
        "T",
        "--input",
        '{"a": 1}',
        "--context",
        '{"cwd": "/r"}',
        "--reference",
        "c=42",
        "--priority",
        "-3",
        "--deadline",
        "60",
        "--accept-timeout",
        "5",
        "--max-attempts",
        "2",
        "--idempotency-key",
        "k1",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "t-7\n"
    assert calls == [
        {
            "to": None,
            "as": "planner",
            "capability": "code",
            "title": "T",
            "description": "",
            "input": {"a": 1},
            "context": {"cwd": "/r"},
            "references": {"c": "42"},
            "priority": -3,
            "deadline": 60.0,
            "accept_timeout": 5.0,
            "max_attempts": 2,
            "idempotency_key": "k1",
        }
    ]
    assert cli.main(["--json", "handoff", "--to", "coder", "--title", "T"]) == 0
    assert json.loads(capsys.readouterr().out) == {"task_id": "t-7", "duplicate": False}
    assert calls[-1]["idempotency_key"]  # a key of the CLI's own, offered for a retry


async def test_task_commands_against_the_fake(
    bus: TaskBus, capsys: pytest.CaptureFixture[str]
) -> None:
    async with agentpost.Client(bus.target, agent_id="planner", options=OPTIONS) as client:
        handle = await client.handoff("coder", title="Fix the build")
        bus.add_event(
            handle.id, S.TASK_STATE_WORKING, K.TASK_EVENT_KIND_PROGRESS, percent=10, message="go"
        )
        bus.add_event(handle.id, S.TASK_STATE_COMPLETED, payload={"ok": 1})
    server = ["--server", bus.target, "--as", "planner"]

    def run(*argv: str) -> tuple[int, str]:
        status = cli.main([*server, *argv])
        captured = capsys.readouterr()
        errors.append(captured.err)
        return status, captured.out

    errors: list[str] = []

    status, out = await asyncio.to_thread(run, "tasks")
    assert status == 0 and "t-1" in out and "Fix the build" in out and "completed" in out
    status, out = await asyncio.to_thread(run, "--json", "task", "show", "t-1", "--history")
    shown = json.loads(out)
    assert (shown["state"], shown["result"], len(shown["history"])) == ("completed", {"ok": 1}, 3)
    status, out = await asyncio.to_thread(run, "task", "watch", "t-1")
    assert status == 0 and out.count("\n") == 3 and "10%" in out and "completed" in out
    status, out = await asyncio.to_thread(run, "--json", "audit", "--subject", "t-1")
    assert json.loads(out)[0]["action"] == "task.handoff"
    status, out = await asyncio.to_thread(run, "task", "show", "t-404")
    assert status == 1 and "no task t-404" in errors[-1]


async def test_after_close_calls_fail_fast_and_tasks_ends(bus: TaskBus) -> None:
    agent = await _connect(bus)
    await agent.close()
    with pytest.raises(agentpost.ConnectionLostError, match="closed"):
        await asyncio.wait_for(agent.get_task("t-1"), 2)  # not retried for request_timeout
    with pytest.raises(agentpost.ConnectionLostError, match="closed"):
        await asyncio.wait_for(agent.task_handle("t-1").result(), 2)
    assert [offer async for offer in agent.tasks()] == []
