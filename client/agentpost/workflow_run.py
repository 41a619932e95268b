"""Workflow runs as the SDK shows them: `WorkflowRunState`, `WorkflowStepState`,
`WorkflowEventKind`, `WorkflowEvent`, `WorkflowInfo` (with one `WorkflowStepInfo` per step) and
`WorkflowFailedError`.

A run (started by `Agent.coordinate` or `Client.coordinate`) is `running` until it ends
`completed` (its outputs are there), `failed` (a step failed for good, or the run timed out) or
`canceled`. Its history is a list of `WorkflowEvent`s numbered from 1 (`seq`), from
`run.started` to one of `run.completed`, `run.failed`, `run.canceled`. Times are aware UTC
datetimes; inputs, outputs and payloads are plain JSON values.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Any

from agentpost.errors import AgentpostError, InvalidArgumentError
from agentpost.message import timestamp_or_none
from agentpost.payload import from_value
from agentpost.v1 import workflows_pb2

__all__ = [
    "WorkflowEvent",
    "WorkflowEventKind",
    "WorkflowFailedError",
    "WorkflowInfo",
    "WorkflowRunState",
    "WorkflowStepInfo",
    "WorkflowStepState",
    "run_state_to_proto",
]

_R = workflows_pb2.WorkflowRunState
_S = workflows_pb2.WorkflowStepState
_K = workflows_pb2.WorkflowEventKind


class WorkflowRunState(enum.StrEnum):
    """Where a workflow run is in its life."""

    RUNNING = "running"
    """Steps are running or waiting."""
    COMPLETED = "completed"
    """Terminal: every step completed, was skipped, or failed under `on_failure: continue`."""
    FAILED = "failed"
    """Terminal: a step failed for good (under `on_failure: fail_run`), or the run timed out."""
    CANCELED = "canceled"
    """Terminal: `cancel_workflow` stopped it."""
    UNKNOWN = "unknown"
    """A state this SDK does not know (a newer server)."""

    @property
    def terminal(self) -> bool:
        """Whether the run is over."""
        return self in (self.COMPLETED, self.FAILED, self.CANCELED)


class WorkflowStepState(enum.StrEnum):
    """Where one step of a run is."""

    PENDING = "pending"
    """Waiting for its dependencies or a free slot (a fallback step: for its primary to fail)."""
    RUNNING = "running"
    """Handed off as a task: submitted, offered or being worked on."""
    RETRY_WAIT = "retry-wait"
    """An attempt failed; the next one starts after the backoff."""
    COMPLETED = "completed"
    """Terminal: completed; `output` holds its output."""
    FAILED = "failed"
    """Terminal: every attempt failed; `error` says why."""
    SKIPPED = "skipped"
    """Terminal: its condition was false, or a step upstream failed; `error` says why."""
    CANCELED = "canceled"
    """Terminal: the run was canceled or failed while the step was open."""
    UNKNOWN = "unknown"
    """A state this SDK does not know (a newer server)."""

    @property
    def terminal(self) -> bool:
        """Whether the step is over."""
        return self in (self.COMPLETED, self.FAILED, self.SKIPPED, self.CANCELED)


class WorkflowEventKind(enum.StrEnum):
    """What a workflow event records."""

    RUN_STARTED = "run.started"
    """The run was accepted and started; `payload` is its input."""
    STEP_WAITING = "step.waiting"
    """A step waits for its dependencies (`message` names them) or for a free slot."""
    STEP_OFFERED = "step.offered"
    """A step's task was offered to an agent (`agent_id`)."""
    STEP_STARTED = "step.started"
    """An agent accepted a step's task and works on it."""
    STEP_PROGRESS = "step.progress"
    """The agent working on a step reported progress (`message`, `percent`)."""
    STEP_COMPLETED = "step.completed"
    """A step completed; `payload` is its output."""
    STEP_FAILED = "step.failed"
    """A step failed for good; `message` is the reason."""
    STEP_RETRYING = "step.retrying"
    """An attempt failed; another one follows after `retry_delay` seconds."""
    STEP_SKIPPED = "step.skipped"
    """A step was skipped; `message` says why."""
    RUN_COMPLETED = "run.completed"
    """Terminal: the run completed; `payload` is its outputs."""
    RUN_FAILED = "run.failed"
    """Terminal: the run failed; `step_id` (None when the run timed out) and `message` say
    where and why."""
    RUN_CANCELED = "run.canceled"
    """Terminal: the run was canceled; `message` is the reason given."""
    UNKNOWN = "unknown"
    """A kind this SDK does not know (a newer server)."""

    @property
    def terminal(self) -> bool:
        """Whether an event of this kind ends the run."""
        return self in _TERMINAL_KINDS


_TERMINAL_KINDS = frozenset(
    {
        WorkflowEventKind.RUN_COMPLETED,
        WorkflowEventKind.RUN_FAILED,
        WorkflowEventKind.RUN_CANCELED,
    }
)
_RUN_STATES: dict[int, WorkflowRunState] = {
    _R.WORKFLOW_RUN_STATE_RUNNING: WorkflowRunState.RUNNING,
    _R.WORKFLOW_RUN_STATE_COMPLETED: WorkflowRunState.COMPLETED,
    _R.WORKFLOW_RUN_STATE_FAILED: WorkflowRunState.FAILED,
    _R.WORKFLOW_RUN_STATE_CANCELED: WorkflowRunState.CANCELED,
}
_RUN_STATE_NUMBERS = {state: number for number, state in _RUN_STATES.items()}
_STEP_STATES: dict[int, WorkflowStepState] = {
    _S.WORKFLOW_STEP_STATE_PENDING: WorkflowStepState.PENDING,
    _S.WORKFLOW_STEP_STATE_RUNNING: WorkflowStepState.RUNNING,
    _S.WORKFLOW_STEP_STATE_RETRY_WAIT: WorkflowStepState.RETRY_WAIT,
    _S.WORKFLOW_STEP_STATE_COMPLETED: WorkflowStepState.COMPLETED,
    _S.WORKFLOW_STEP_STATE_FAILED: WorkflowStepState.FAILED,
    _S.WORKFLOW_STEP_STATE_SKIPPED: WorkflowStepState.SKIPPED,
    _S.WORKFLOW_STEP_STATE_CANCELED: WorkflowStepState.CANCELED,
}
_KINDS: dict[int, WorkflowEventKind] = {
    _K.WORKFLOW_EVENT_KIND_RUN_STARTED: WorkflowEventKind.RUN_STARTED,
    _K.WORKFLOW_EVENT_KIND_STEP_WAITING: WorkflowEventKind.STEP_WAITING,
    _K.WORKFLOW_EVENT_KIND_STEP_OFFERED: WorkflowEventKind.STEP_OFFERED,
    _K.WORKFLOW_EVENT_KIND_STEP_STARTED: WorkflowEventKind.STEP_STARTED,
    _K.WORKFLOW_EVENT_KIND_STEP_PROGRESS: WorkflowEventKind.STEP_PROGRESS,
    _K.WORKFLOW_EVENT_KIND_STEP_COMPLETED: WorkflowEventKind.STEP_COMPLETED,
    _K.WORKFLOW_EVENT_KIND_STEP_FAILED: WorkflowEventKind.STEP_FAILED,
    _K.WORKFLOW_EVENT_KIND_STEP_RETRYING: WorkflowEventKind.STEP_RETRYING,
    _K.WORKFLOW_EVENT_KIND_STEP_SKIPPED: WorkflowEventKind.STEP_SKIPPED,
    _K.WORKFLOW_EVENT_KIND_RUN_COMPLETED: WorkflowEventKind.RUN_COMPLETED,
    _K.WORKFLOW_EVENT_KIND_RUN_FAILED: WorkflowEventKind.RUN_FAILED,
    _K.WORKFLOW_EVENT_KIND_RUN_CANCELED: WorkflowEventKind.RUN_CANCELED,
}


def run_state_to_proto(state: WorkflowRunState | str) -> workflows_pb2.WorkflowRunState.ValueType:
    """The proto enum value of a run state, given as a `WorkflowRunState` or its name
    ("completed", "COMPLETED"); `InvalidArgumentError` otherwise."""
    text = str(state).strip().lower()
    try:
        return _RUN_STATE_NUMBERS[WorkflowRunState(text)]  # type: ignore[return-value]
    except (ValueError, KeyError):
        names = ", ".join(s.value for s in _RUN_STATE_NUMBERS)
        raise InvalidArgumentError(
            f"unknown workflow run state {str(state)!r} (one of {names})",
            metadata={"field": "states"},
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowEvent:
    """One entry of a run's event log."""

    #: Position in the log, from 1.
    seq: int
    run_id: str
    kind: WorkflowEventKind
    #: The step it is about; None for run events (and for `run.failed` when the run timed out).
    step_id: str | None
    #: The step's task, when known.
    task_id: str | None
    #: The step's attempt, from 1; 0 for run events.
    attempt: int
    #: What it waits for, who it was offered to, progress, the failure or skip reason.
    message: str
    #: The run's input (`run.started`), a step's output (`step.completed`), the run's outputs
    #: (`run.completed`); None otherwise.
    payload: Any
    time: datetime.datetime | None
    #: Progress percent, 0-100 (`step.progress`); None when not given.
    percent: int | None
    #: The agent concerned (offered to, working, failed), when known.
    agent_id: str | None
    #: `step.retrying`: seconds until the next attempt; None otherwise.
    retry_delay: float | None

    @classmethod
    def from_proto(cls, event: workflows_pb2.WorkflowEvent) -> WorkflowEvent:
        delay = event.retry_delay if event.HasField("retry_delay") else None
        return cls(
            seq=event.seq,
            run_id=event.run_id,
            kind=_KINDS.get(event.kind, WorkflowEventKind.UNKNOWN),
            step_id=event.step_id or None,
            task_id=event.task_id or None,
            attempt=event.attempt,
            message=event.message,
            payload=from_value(event.payload) if event.HasField("payload") else None,
            time=timestamp_or_none(event, "time"),
            percent=event.percent if event.percent >= 0 else None,
            agent_id=event.agent_id or None,
            retry_delay=delay.ToNanoseconds() / 1e9 if delay is not None else None,
        )

    @property
    def terminal(self) -> bool:
        """Whether this event ended the run."""
        return self.kind.terminal


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowStepInfo:
    """One step of a run: what the definition asks, and where the step is."""

    id: str
    state: WorkflowStepState
    #: The target: one agent (`agent_id`) or any agent with a capability (`capability`).
    agent_id: str | None
    capability: str | None
    title: str
    depends_on: tuple[str, ...]
    #: The current (or last) attempt, from 1; 0 before the first.
    attempt: int
    #: The task of the current (or last) attempt; None before it was handed off.
    task_id: str | None
    #: The agent working on the current attempt, or the last one that did.
    assignee: str | None
    #: The agents whose attempts failed, in order.
    failed_assignees: tuple[str, ...]
    #: The output, once completed (or its fallback's output); None otherwise.
    output: Any
    #: Why it failed or was skipped.
    error: str | None
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    #: Set on a primary step whose fallback ran: the fallback's id.
    fell_back_to: str | None
    #: Skipped because a step upstream failed (not because its condition was false).
    skipped_upstream: bool

    @classmethod
    def from_proto(
        cls, step: workflows_pb2.WorkflowStepRun, spec: workflows_pb2.WorkflowStep | None
    ) -> WorkflowStepInfo:
        target = spec.WhichOneof("target") if spec is not None else None
        return cls(
            id=step.step_id,
            state=_STEP_STATES.get(step.state, WorkflowStepState.UNKNOWN),
            agent_id=spec.agent_id if spec is not None and target == "agent_id" else None,
            capability=spec.capability if spec is not None and target == "capability" else None,
            title=(spec.title or step.step_id) if spec is not None else step.step_id,
            depends_on=tuple(spec.depends_on) if spec is not None else (),
            attempt=step.attempt,
            task_id=step.task_id or None,
            assignee=step.assignee or None,
            failed_assignees=tuple(step.failed_assignees),
            output=from_value(step.output) if step.HasField("output") else None,
            error=step.error or None,
            started_at=timestamp_or_none(step, "started_at"),
            finished_at=timestamp_or_none(step, "finished_at"),
            fell_back_to=step.fell_back_to or None,
            skipped_upstream=step.skipped_upstream,
        )

    @property
    def target(self) -> str:
        """ "agent_id", or "capability:name" for a step handed to a capability ("-" unknown)."""
        if self.agent_id is not None:
            return self.agent_id
        return f"capability:{self.capability}" if self.capability is not None else "-"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WorkflowInfo:
    """A workflow run as the server knows it (`get_workflow`, `list_workflows`,
    `cancel_workflow`). `list_workflows` may leave out the steps and their outputs."""

    id: str
    #: The definition's name (for people); "" when it has none.
    name: str
    state: WorkflowRunState
    #: One entry per step, in definition order.
    steps: tuple[WorkflowStepInfo, ...]
    #: The run's input.
    input: Any
    #: Once completed: each output step's id to its output; None before.
    outputs: Any
    #: Once failed: the step that failed the run (None when the run itself timed out).
    error_step_id: str | None
    #: Once failed: why, a sentence for a person; None otherwise.
    error: str | None
    #: The agent that started it.
    originator: str
    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None
    #: The `seq` of its last event; its events are numbered 1..last_seq.
    last_seq: int
    #: The definition it runs (as the server holds it).
    definition: workflows_pb2.WorkflowDefinition = dataclasses.field(
        default_factory=workflows_pb2.WorkflowDefinition, repr=False, compare=False
    )

    @classmethod
    def from_proto(cls, run: workflows_pb2.WorkflowRun) -> WorkflowInfo:
        definition = run.definition
        specs = {step.id: step for step in definition.steps}
        error = run.error if run.HasField("error") else None
        return cls(
            id=run.id,
            name=definition.name,
            state=_RUN_STATES.get(run.state, WorkflowRunState.UNKNOWN),
            steps=tuple(
                WorkflowStepInfo.from_proto(step, specs.get(step.step_id)) for step in run.steps
            ),
            input=from_value(definition.input) if definition.HasField("input") else None,
            outputs=from_value(run.outputs) if run.HasField("outputs") else None,
            error_step_id=(error.step_id or None) if error is not None else None,
            error=(error.message or None) if error is not None else None,
            originator=run.originator,
            created_at=timestamp_or_none(run, "created_at"),
            updated_at=timestamp_or_none(run, "updated_at"),
            last_seq=run.last_seq,
            definition=definition,
        )

    def step(self, step_id: str) -> WorkflowStepInfo:
        """The step `step_id` (`KeyError` if the run has none)."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


class WorkflowFailedError(AgentpostError):
    """A workflow run ended without outputs: it failed or was canceled.

    Raised by `RunHandle.result()`; it never travels on the wire. `state` says how it ended
    (`WorkflowRunState.FAILED` or `CANCELED`), `step_id` which step failed it (None when the
    run timed out, or was canceled), `reason` why; `event` is the terminal event when it was
    seen (None when only the run's record told).
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        state: WorkflowRunState,
        step_id: str | None = None,
        reason: str = "",
        event: WorkflowEvent | None = None,
    ) -> None:
        metadata = {"run_id": run_id, "state": state.value}
        if step_id:
            metadata["step_id"] = step_id
        super().__init__(message, metadata=metadata)
        self.run_id = run_id
        self.state = state
        self.step_id = step_id
        self.reason = reason
        self.event = event

    @classmethod
    def of_event(cls, event: WorkflowEvent) -> WorkflowFailedError:
        """The error for a run that ended with `event` (`run.failed` or `run.canceled`)."""
        state = (
            WorkflowRunState.CANCELED
            if event.kind is WorkflowEventKind.RUN_CANCELED
            else WorkflowRunState.FAILED
        )
        return cls(
            _text(event.run_id, state, event.step_id, event.message),
            run_id=event.run_id,
            state=state,
            step_id=event.step_id,
            reason=event.message,
            event=event,
        )

    @classmethod
    def of_info(cls, info: WorkflowInfo) -> WorkflowFailedError:
        """The error for a run that ended as `info` tells (failed or canceled)."""
        reason = info.error or ""
        return cls(
            _text(info.id, info.state, info.error_step_id, reason),
            run_id=info.id,
            state=info.state,
            step_id=info.error_step_id,
            reason=reason,
        )


def _text(run_id: str, state: WorkflowRunState, step_id: str | None, reason: str) -> str:
    where = f" at step {step_id}" if step_id else ""
    return f"workflow run {run_id} {state.value}{where}" + (f": {reason}" if reason else "")
