"""The workflow driver: feeds the pure engine and carries out what it asks, durably.

Every engine call is applied as load -> call -> commit (compare-and-set on the run's version):
the new state, its events, its timers (arq jobs for retries and the run timeout) and the actions
still to carry out (StartStep, CancelTask, FinishRun) are stored in one atomic write, with a
`workflow_kick` job a few seconds later. The actions are then carried out at once and marked
done; if the process dies first, the kick job carries them out (each is idempotent: a step's
handoff has the idempotency key "run/step/attempt"). A step's task reports back through its
`on_done` job (`workflow_step_done`, durable) and, for offered/started/progress news, through
the task service's observer (best effort: news only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from agentpost.errors import (
    AgentNotFoundError,
    AgentpostError,
    InvalidArgumentError,
    PayloadTooLargeError,
    PermissionDeniedError,
    TaskNotFoundError,
    TaskStateError,
    WorkflowNotFoundError,
)
from agentpost.payload import content_type_of, from_payload, to_payload
from agentpost.v1 import tasks_pb2, workflows_pb2
from agentpost_server.core import names
from agentpost_server.core.background import Background
from agentpost_server.core.follow import Follow
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.ports import Audit, Job
from agentpost_server.core.tasks.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    INPUT_REQUIRED,
    OFFERED,
    SERVER_ACTOR,
    TERMINAL,
    WORKING,
    TaskRecord,
)
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.core.workflows import engine
from agentpost_server.core.workflows.actions import (
    Action,
    CancelTask,
    Completed,
    Emit,
    Failed,
    FinishRun,
    Outcome,
    ScheduleRetry,
    ScheduleRunTimeout,
    StartStep,
    TaskUpdate,
    UpdateKind,
)

log = logging.getLogger(__name__)

E = workflows_pb2.WorkflowEventKind
_END = frozenset(
    {
        E.WORKFLOW_EVENT_KIND_RUN_COMPLETED,
        E.WORKFLOW_EVENT_KIND_RUN_FAILED,
        E.WORKFLOW_EVENT_KIND_RUN_CANCELED,
    }
)
_KICK_AFTER_MS = 3_000
_CONFLICT_RETRIES = 16
Result = tuple[workflows_pb2.WorkflowRun, list[Action]]


class WorkflowStore(Protocol):
    async def load(self, run_id: str) -> tuple[workflows_pb2.WorkflowRun, int, list[str]] | None:
        """(run, version, pending actions as JSON), or None."""
        ...

    async def commit(
        self,
        run_id: str,
        version: int,
        run: workflows_pb2.WorkflowRun,
        events: list[workflows_pb2.WorkflowEvent],
        *,
        pending: list[str],
        jobs_to_schedule: list[Job],
        terminal: bool,
        now_ms: int,
    ) -> int | None: ...

    async def pending_done(self, run_id: str, up_to_version: int) -> None: ...

    async def events(
        self, run_id: str, after_seq: int, limit: int
    ) -> list[workflows_pb2.WorkflowEvent]: ...

    async def ids(self, limit: int, offset: int = 0) -> list[str]: ...

    async def trim(self, before_ms: int) -> None: ...


def _ms() -> int:
    return time.time_ns() // 1_000_000


class WorkflowService:
    def __init__(
        self,
        store: WorkflowStore,
        tasks: TaskService,
        ids: UlidFactory,
        audit: Audit | None,
        *,
        max_steps: int,
    ) -> None:
        self.store = store
        self._tasks = tasks
        self._ids = ids
        self._audit = audit
        self._max_steps = max_steps
        self._follow: Follow[workflows_pb2.WorkflowEvent] = Follow()
        self._background = Background()
        tasks.observer = self.on_task_event

    # -- the RPCs -----------------------------------------------------------------------------

    async def coordinate(
        self,
        caller: str,
        admin: bool,
        definition: workflows_pb2.WorkflowDefinition | None,
        run_id: str,
        after_seq: int,
    ) -> AsyncIterator[list[workflows_pb2.WorkflowEvent]]:
        """Start the run (or attach to it) and stream its events after `after_seq`."""
        if definition is not None:
            run_id = await self.start(caller, admin, definition)
        elif not run_id:
            raise InvalidArgumentError(
                "set definition (to start or attach) or run_id (to attach)",
                metadata={"field": "definition"},
            )
        await self.get(caller, admin, run_id)
        async for events in self._stream(run_id, after_seq):
            yield events

    async def start(
        self, caller: str, admin: bool, definition: workflows_pb2.WorkflowDefinition
    ) -> str:
        run_id = definition.run_id or self._ids.new()
        names.check_agent_id(run_id, "definition.run_id")
        for _ in range(_CONFLICT_RETRIES):
            if await self.store.load(run_id) is not None:
                await self.get(caller, admin, run_id)  # attach: only its originator (or admin)
                return run_id
            run, actions = engine.start(
                definition,
                run_id=run_id,
                originator=caller,
                now=time.time(),
                max_steps=self._max_steps,
            )
            if await self._commit(run_id, -1, run, actions):
                await self._record(
                    caller, "workflow.started", run_id, {"steps": str(len(run.steps))}
                )
                return run_id
        raise AgentpostError(f"workflow run {run_id} could not be started; retry")

    async def get(self, caller: str, admin: bool, run_id: str) -> workflows_pb2.WorkflowRun:
        if not run_id:
            raise InvalidArgumentError("run_id is required", metadata={"field": "run_id"})
        loaded = await self.store.load(run_id)
        if loaded is None:
            raise WorkflowNotFoundError(f"no workflow run {run_id!r}", metadata={"run_id": run_id})
        run = loaded[0]
        if not admin and caller != run.originator:
            raise PermissionDeniedError(
                f"workflow run {run_id} belongs to {run.originator}; {caller} may not see it",
                metadata={"run_id": run_id},
            )
        return run

    async def list_runs(
        self, caller: str, admin: bool, states: list[int], limit: int
    ) -> list[workflows_pb2.WorkflowRun]:
        wanted = set(states)
        found: list[workflows_pb2.WorkflowRun] = []
        offset = 0
        while len(found) < limit and offset < 20_000:
            ids = await self.store.ids(200, offset)
            if not ids:
                break
            offset += len(ids)
            for run_id in ids:
                loaded = await self.store.load(run_id)
                if loaded is None:
                    continue
                run = loaded[0]
                if (wanted and run.state not in wanted) or (not admin and caller != run.originator):
                    continue
                found.append(run)
                if len(found) >= limit:
                    break
        return found

    async def cancel(
        self, caller: str, admin: bool, run_id: str, reason: str
    ) -> workflows_pb2.WorkflowRun:
        await self.get(caller, admin, run_id)
        why = reason.strip()[:500] or f"canceled by {caller}"
        run = await self._apply(run_id, lambda r, now: engine.on_cancel(r, why, now=now))
        await self._record(caller, "workflow.cancel", run_id, {"why": why})
        return run

    # -- news from tasks and timers (the worker's jobs) ---------------------------------------

    async def on_task_done(self, task_id: str) -> None:
        """A step's task ended (its on_done job)."""
        record = await self._tasks.store.load(task_id)
        if record is None or record.state not in TERMINAL or not record.workflow_run_id:
            return
        outcome: Outcome
        if record.state == COMPLETED:
            output = _json(record.result) if record.result is not None else None
            outcome = Completed(output, record.assignee)
        else:
            why = record.error or f"the task ended {tasks_pb2.TaskState.Name(record.state)}"  # type: ignore[arg-type]
            # A timeout (expired) or a rejection may go better next time; a cancel never does.
            retryable = record.state != CANCELED and (record.state != FAILED or record.retryable)
            outcome = Failed(why, retryable, record.assignee)
        await self._apply(
            record.workflow_run_id,
            lambda r, now: engine.on_step_finished(
                r, record.workflow_step_id, record.workflow_attempt, outcome, now=now
            ),
        )

    async def on_task_event(self, record: TaskRecord, event: tasks_pb2.TaskEvent) -> None:
        """News of a step's task (the task service's observer, after each commit). The end of
        the task moves the run on at once, in the background (its on_done job, which follows
        within the worker's polling delay, then finds nothing left to do); offered, started and
        progress are folded in before the call that caused them returns, so they stay in order."""
        if event.state in TERMINAL:
            self._background.spawn(self._finish_quietly(record.id))
            return
        update = _update(record, event)
        if update is None:
            return
        with contextlib.suppress(WorkflowNotFoundError):
            await self._apply(
                record.workflow_run_id,
                lambda r, now: engine.on_task_update(
                    r, record.workflow_step_id, record.workflow_attempt, update, now
                ),
            )

    async def close(self) -> None:
        """Stop the background work (before the storage connections close)."""
        await self._background.close()

    async def _finish_quietly(self, task_id: str) -> None:
        try:
            await self.on_task_done(task_id)
        except AgentpostError as exc:  # the on_done job will do it
            log.info("task %s: moving its workflow on failed here (%s)", task_id, exc.message)

    async def on_retry_due(self, run_id: str, step_id: str, attempt: int) -> None:
        await self._apply(run_id, lambda r, now: engine.on_retry_due(r, step_id, attempt, now=now))

    async def on_run_timeout(self, run_id: str) -> None:
        await self._apply(run_id, lambda r, now: engine.on_run_timeout(r, now=now))

    async def kick(self, run_id: str) -> None:
        """Carry out actions a crashed process left pending."""
        loaded = await self.store.load(run_id)
        if loaded is None or not loaded[2]:
            return
        run, version, pending = loaded
        await self._carry_out(run, version, [_decode(raw) for raw in pending])

    # -- applying the engine ------------------------------------------------------------------

    async def _apply(
        self, run_id: str, step: Callable[[workflows_pb2.WorkflowRun, float], Result]
    ) -> workflows_pb2.WorkflowRun:
        for _ in range(_CONFLICT_RETRIES):
            loaded = await self.store.load(run_id)
            if loaded is None:
                raise WorkflowNotFoundError(
                    f"no workflow run {run_id!r}", metadata={"run_id": run_id}
                )
            run, version, _ = loaded
            new_run, actions = step(run, time.time())
            if new_run is run and not actions:
                return run  # stale or repeated news
            if await self._commit(run_id, version, new_run, actions):
                return new_run
        raise AgentpostError(f"workflow run {run_id} is changing too fast; retry")

    async def _commit(
        self, run_id: str, version: int, run: workflows_pb2.WorkflowRun, actions: list[Action]
    ) -> bool:
        now = _ms()
        events = [a.event for a in actions if isinstance(a, Emit)]
        timers: list[Job] = []
        todo: list[Action] = []
        for action in actions:
            if isinstance(action, ScheduleRetry):
                timers.append(
                    Job(
                        f"wf:{run_id}:{action.step_id}:{action.attempt}:retry",
                        "workflow_retry",
                        [run_id, action.step_id, str(action.attempt)],
                        now + int(action.delay * 1000),
                    )
                )
            elif isinstance(action, ScheduleRunTimeout):
                timers.append(
                    Job(
                        f"wf:{run_id}:timeout",
                        "workflow_timeout",
                        [run_id],
                        now + int(action.delay * 1000),
                    )
                )
            elif isinstance(action, StartStep | CancelTask | FinishRun):
                todo.append(action)
        if todo:
            timers.append(
                Job(
                    f"wf:{run_id}:kick:{version + 1}",
                    "workflow_kick",
                    [run_id],
                    now + _KICK_AFTER_MS,
                )
            )
        new_version = await self.store.commit(
            run_id,
            version,
            run,
            events,
            pending=[_encode(a) for a in todo],
            jobs_to_schedule=timers,
            terminal=engine.is_terminal(run),
            now_ms=now,
        )
        if new_version is None:
            return False
        if todo:
            await self._carry_out(run, new_version, todo)
        return True

    async def _carry_out(
        self, run: workflows_pb2.WorkflowRun, version: int, todo: list[Action]
    ) -> None:
        for action in todo:
            if isinstance(action, StartStep):
                await self._start_step(run, action)
            elif isinstance(action, CancelTask):
                await self._cancel_task(run, action)
            elif isinstance(action, FinishRun):
                state = (
                    workflows_pb2.WorkflowRunState.Name(action.state)
                    .removeprefix("WORKFLOW_RUN_STATE_")
                    .lower()
                )
                details = {"state": state}
                if action.error is not None:
                    details.update(step=action.error.step_id, why=action.error.message[:500])
                await self._record(SERVER_ACTOR, f"workflow.{state}", run.id, details)
        await self.store.pending_done(run.id, version)

    async def _start_step(self, run: workflows_pb2.WorkflowRun, action: StartStep) -> None:
        spec = tasks_pb2.TaskSpec(
            title=action.title, description=action.description, priority=action.priority
        )
        if action.agent_id:
            spec.agent_id = action.agent_id
        else:
            spec.capability = action.capability
        spec.input.CopyFrom(to_payload(action.input))
        if action.timeout:
            spec.deadline.FromMilliseconds(_ms() + int(action.timeout * 1000))
        spec.max_attempts = 1  # the step's own retry policy decides about another attempt
        spec.references["workflow_run_id"] = run.id
        spec.references["workflow_step_id"] = action.step_id
        try:
            task, duplicate = await self._tasks.handoff(
                run.originator,
                spec,
                action.idempotency_key,
                workflow_run_id=run.id,
                workflow_step_id=action.step_id,
                workflow_attempt=action.attempt,
                on_done="workflow_step_done",
                avoid=action.exclude_agents,
            )
        except (InvalidArgumentError, AgentNotFoundError, PayloadTooLargeError) as exc:
            # Never going to work: the step fails (other errors propagate; the kick job retries).
            reason = f"the step could not be handed off: {exc.message}"
            await self._apply(
                run.id,
                lambda r, now: engine.on_step_finished(
                    r, action.step_id, action.attempt, Failed(reason, False), now=now
                ),
            )
            return
        if duplicate:  # a repeat: make sure the run knows the task
            update = TaskUpdate(UpdateKind.SUBMITTED, task.id)
            await self._apply(
                run.id,
                lambda r, now: engine.on_task_update(
                    r, action.step_id, action.attempt, update, now
                ),
            )

    async def _cancel_task(self, run: workflows_pb2.WorkflowRun, action: CancelTask) -> None:
        task_id = action.task_id or await self._tasks.store.by_key(
            run.originator, f"{run.id}/{action.step_id}/{action.attempt}"
        )
        if not task_id:
            return
        with contextlib.suppress(TaskStateError, TaskNotFoundError):
            await self._tasks.cancel(SERVER_ACTOR, True, task_id, action.reason)

    async def _record(self, actor: str, action: str, run_id: str, details: dict[str, str]) -> None:
        if self._audit is None:
            return
        try:
            await self._audit.append(actor, action, run_id, details)
        except AgentpostError as exc:
            log.warning("audit record %s for %s not written: %s", action, run_id, exc)

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(
        self, run_id: str, after_seq: int
    ) -> AsyncIterator[list[workflows_pb2.WorkflowEvent]]:
        async def read(after: int) -> list[workflows_pb2.WorkflowEvent]:
            return await self.store.events(run_id, after, 1000)

        async def finished(after: int) -> bool:
            loaded = await self.store.load(run_id)
            return loaded is None or (engine.is_terminal(loaded[0]) and after >= loaded[0].last_seq)

        async for events in self._follow.stream(
            run_id,
            after_seq,
            read=read,
            position=lambda event: event.seq,
            ends=lambda event: event.kind in _END,
            finished=finished,
        ):
            yield events

    def notify(self, run_id: str) -> None:
        self._follow.notify(run_id)

    def notify_all(self) -> None:
        self._follow.notify_all()


def _json(payload: Any) -> Any:
    value = from_payload(payload)
    if isinstance(value, bytes):  # outputs are JSON: bytes travel as base64 with their type
        return {
            "content_type": content_type_of(payload),
            "base64": base64.b64encode(value).decode(),
        }
    return value


def _update(record: TaskRecord, event: tasks_pb2.TaskEvent) -> TaskUpdate | None:
    K = tasks_pb2.TaskEventKind
    kind: UpdateKind | None = None
    message, percent = event.message, -1
    if event.kind == K.TASK_EVENT_KIND_PROGRESS:
        kind, percent = UpdateKind.PROGRESS, event.percent
    elif event.kind == K.TASK_EVENT_KIND_TRANSITION:
        # (SUBMITTED is not reported: the offer names the task too, and until then the driver
        # finds the task by its idempotency key; one commit of the run saved per step.)
        if event.state == OFFERED:
            kind = UpdateKind.OFFERED
        elif event.state == WORKING:
            kind = UpdateKind.STARTED
        elif event.state == INPUT_REQUIRED:
            kind, message = UpdateKind.PROGRESS, f"waiting for input: {event.message}"
    if kind is None:
        return None
    return TaskUpdate(kind, record.id, event.assignee, message, percent, event.seq)


def _encode(action: Action) -> str:
    if isinstance(action, StartStep):
        return json.dumps(
            {
                "t": "start",
                "step": action.step_id,
                "attempt": action.attempt,
                "agent": action.agent_id,
                "cap": action.capability,
                "title": action.title,
                "description": action.description,
                "input": action.input,
                "timeout": action.timeout,
                "priority": action.priority,
                "avoid": list(action.exclude_agents),
                "key": action.idempotency_key,
            }
        )
    if isinstance(action, CancelTask):
        return json.dumps(
            {
                "t": "cancel",
                "step": action.step_id,
                "attempt": action.attempt,
                "task": action.task_id,
                "why": action.reason,
            }
        )
    assert isinstance(action, FinishRun)
    error = action.error
    return json.dumps(
        {
            "t": "finish",
            "run": action.run_id,
            "state": int(action.state),
            "step": error.step_id if error is not None else "",
            "why": error.message if error is not None else "",
        }
    )


def _decode(raw: str) -> Action:
    data = json.loads(raw)
    if data["t"] == "start":
        return StartStep(
            step_id=data["step"],
            attempt=int(data["attempt"]),
            agent_id=data["agent"],
            capability=data["cap"],
            title=data["title"],
            description=data["description"],
            input=data["input"],
            timeout=data["timeout"],
            priority=int(data["priority"]),
            exclude_agents=tuple(data["avoid"]),
            idempotency_key=data["key"],
        )
    if data["t"] == "cancel":
        return CancelTask(data["step"], int(data["attempt"]), data["task"], data["why"])
    error = None
    if data["step"] or data["why"]:
        error = workflows_pb2.WorkflowError(step_id=data["step"], message=data["why"])
    return FinishRun(data["run"], data["state"], None, error)
