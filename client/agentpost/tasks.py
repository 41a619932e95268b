"""Tasks as the SDK shows them: `TaskState`, `TaskInfo`, `TaskEvent`, `TaskFailedError`, and the
`TaskSpec` a handoff sends.

A task is handed off by its originator (`Agent.handoff`, `Client.handoff`), offered by the
server to one assignee at a time, and moves through the states of `TaskState`:

    submitted -> offered -> working <-> input-required -> completed | failed
    any open state -> canceled | expired | rejected | failed

Its history is a list of `TaskEvent`s numbered from 1 (`seq`). Times are aware UTC datetimes;
payloads (input, result, questions, answers) are decoded as in `agentpost.payload`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from collections.abc import Mapping
from typing import Any

from agentpost import payload as _payload
from agentpost.errors import AgentpostError, InvalidArgumentError
from agentpost.message import timestamp_or_none
from agentpost.v1 import tasks_pb2

__all__ = [
    "MAX_PRIORITY",
    "MAX_TITLE",
    "TaskEvent",
    "TaskEventKind",
    "TaskFailedError",
    "TaskInfo",
    "TaskState",
    "build_spec",
    "state_from_proto",
    "state_to_proto",
]

#: The longest title, in characters.
MAX_TITLE = 200
#: Priorities range from -MAX_PRIORITY to MAX_PRIORITY (default 0; higher is offered first).
MAX_PRIORITY = 1000

_S = tasks_pb2.TaskState
_K = tasks_pb2.TaskEventKind


class TaskState(enum.StrEnum):
    """Where a task is in its life (the names of the A2A protocol's task states)."""

    SUBMITTED = "submitted"
    """Accepted by the server; waiting for an assignee."""
    OFFERED = "offered"
    """Offered to one assignee, which has not accepted yet."""
    WORKING = "working"
    """Accepted; the assignee is working on it."""
    INPUT_REQUIRED = "input-required"
    """The assignee asked the originator a question and waits for the answer."""
    COMPLETED = "completed"
    """Terminal: completed; the result is there."""
    FAILED = "failed"
    """Terminal: the assignee failed it, or every attempt was used up."""
    REJECTED = "rejected"
    """Terminal: the target agent (or every capable agent) rejected it."""
    CANCELED = "canceled"
    """Terminal: the originator canceled it."""
    EXPIRED = "expired"
    """Terminal: its deadline passed before it completed."""
    UNKNOWN = "unknown"
    """A state this SDK does not know (a newer server)."""

    @property
    def terminal(self) -> bool:
        """Whether the task is over (nothing changes it any more)."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        TaskState.COMPLETED,
        TaskState.FAILED,
        TaskState.REJECTED,
        TaskState.CANCELED,
        TaskState.EXPIRED,
    }
)
_STATES: dict[tasks_pb2.TaskState.ValueType, TaskState] = {
    _S.TASK_STATE_SUBMITTED: TaskState.SUBMITTED,
    _S.TASK_STATE_OFFERED: TaskState.OFFERED,
    _S.TASK_STATE_WORKING: TaskState.WORKING,
    _S.TASK_STATE_INPUT_REQUIRED: TaskState.INPUT_REQUIRED,
    _S.TASK_STATE_COMPLETED: TaskState.COMPLETED,
    _S.TASK_STATE_FAILED: TaskState.FAILED,
    _S.TASK_STATE_REJECTED: TaskState.REJECTED,
    _S.TASK_STATE_CANCELED: TaskState.CANCELED,
    _S.TASK_STATE_EXPIRED: TaskState.EXPIRED,
}
_STATE_NUMBERS = {state: number for number, state in _STATES.items()}


def state_from_proto(number: tasks_pb2.TaskState.ValueType) -> TaskState:
    """The `TaskState` of a proto enum value (`UNKNOWN` for one this SDK does not know)."""
    return _STATES.get(number, TaskState.UNKNOWN)


def state_to_proto(state: TaskState | str) -> tasks_pb2.TaskState.ValueType:
    """The proto enum value of a state, given as a `TaskState` or its name ("input-required",
    "INPUT_REQUIRED" and "input_required" all work); `InvalidArgumentError` otherwise."""
    text = str(state).strip().lower().replace("_", "-")
    try:
        return _STATE_NUMBERS[TaskState(text)]
    except (ValueError, KeyError):
        names = ", ".join(s.value for s in _STATE_NUMBERS)
        raise InvalidArgumentError(
            f"unknown task state {str(state)!r} (one of {names})", metadata={"field": "states"}
        ) from None


class TaskEventKind(enum.StrEnum):
    """What a task event records."""

    TRANSITION = "transition"
    """The task changed state (`state` is the new one)."""
    PROGRESS = "progress"
    """The assignee reported progress (`message`, `percent`); the state is unchanged."""
    INPUT = "input"
    """The originator answered an input request (`payload` is the answer)."""
    UNKNOWN = "unknown"
    """A kind this SDK does not know (a newer server)."""


_KINDS: dict[tasks_pb2.TaskEventKind.ValueType, TaskEventKind] = {
    _K.TASK_EVENT_KIND_TRANSITION: TaskEventKind.TRANSITION,
    _K.TASK_EVENT_KIND_PROGRESS: TaskEventKind.PROGRESS,
    _K.TASK_EVENT_KIND_INPUT: TaskEventKind.INPUT,
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskEvent:
    """One entry of a task's history."""

    #: Position in the history, from 1.
    seq: int
    task_id: str
    kind: TaskEventKind
    #: The task's state after the event.
    state: TaskState
    #: Who caused it: an agent id, or "agentpost" for the server's own decisions.
    actor: str
    time: datetime.datetime | None
    #: The progress message, the rejection or failure reason, the question asked.
    message: str
    #: Progress percent, 0-100; None when not given.
    percent: int | None
    #: The assignee of this attempt (None while there is none).
    assignee: str | None
    attempt: int
    #: The result (completed), the question's detail (input-required) or the answer (input).
    payload: Any
    #: Why it failed, was rejected, canceled or expired (None otherwise).
    error: str | None
    #: The assignee said another attempt may succeed (with `error`).
    retryable: bool = False

    @classmethod
    def from_proto(cls, event: tasks_pb2.TaskEvent) -> TaskEvent:
        error = event.error if event.HasField("error") else None
        return cls(
            seq=event.seq,
            task_id=event.task_id,
            kind=_KINDS.get(event.kind, TaskEventKind.UNKNOWN),
            state=state_from_proto(event.state),
            actor=event.actor,
            time=timestamp_or_none(event, "time"),
            message=event.message,
            percent=event.percent if event.percent >= 0 else None,
            assignee=event.assignee or None,
            attempt=event.attempt,
            payload=_payload.from_payload(event.payload) if event.HasField("payload") else None,
            error=error.message if error is not None else None,
            retryable=error.retryable if error is not None else False,
        )

    @property
    def terminal(self) -> bool:
        """Whether this event ended the task."""
        return self.kind is TaskEventKind.TRANSITION and self.state.terminal


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TaskInfo:
    """A task as the server knows it (`GetTask`, `ListTasks`, `Handoff`)."""

    id: str
    #: The agent that handed it off.
    originator: str
    #: The target: one agent (`agent_id`) or any agent with a capability (`capability`).
    agent_id: str | None
    capability: str | None
    title: str
    description: str
    input: Any
    context: dict[str, Any]
    references: dict[str, str]
    priority: int
    deadline: datetime.datetime | None
    #: Seconds an assignee has to accept an offer (None: the server's default).
    accept_timeout: float | None
    #: How many assignees may be tried (None: the server's default).
    max_attempts: int | None
    state: TaskState
    #: The agent it is offered to or worked on by (None while there is none).
    assignee: str | None
    #: How many offers were made so far (1 for the first).
    attempt: int
    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None
    #: The result, once completed.
    result: Any
    #: Why it failed, was rejected, canceled or expired (None otherwise).
    error: str | None
    retryable: bool
    #: Every event so far, oldest first (only when asked for).
    history: tuple[TaskEvent, ...] = ()
    workflow_run_id: str | None = None
    workflow_step_id: str | None = None

    @classmethod
    def from_proto(cls, task: tasks_pb2.Task) -> TaskInfo:
        spec = task.spec
        target = spec.WhichOneof("target")
        error = task.error if task.HasField("error") else None
        accept = spec.accept_timeout if spec.HasField("accept_timeout") else None
        return cls(
            id=task.id,
            originator=task.originator,
            agent_id=spec.agent_id if target == "agent_id" else None,
            capability=spec.capability if target == "capability" else None,
            title=spec.title,
            description=spec.description,
            input=_payload.from_payload(spec.input) if spec.HasField("input") else None,
            context=_payload.from_struct(spec.context),
            references=dict(spec.references),
            priority=spec.priority,
            deadline=timestamp_or_none(spec, "deadline"),
            accept_timeout=accept.ToNanoseconds() / 1e9 if accept is not None else None,
            max_attempts=spec.max_attempts or None,
            state=state_from_proto(task.state),
            assignee=task.assignee or None,
            attempt=task.attempt,
            created_at=timestamp_or_none(task, "created_at"),
            updated_at=timestamp_or_none(task, "updated_at"),
            result=_payload.from_payload(task.result) if task.HasField("result") else None,
            error=error.message if error is not None else None,
            retryable=error.retryable if error is not None else False,
            history=tuple(TaskEvent.from_proto(event) for event in task.history),
            workflow_run_id=task.workflow_run_id or None,
            workflow_step_id=task.workflow_step_id or None,
        )

    @property
    def target(self) -> str:
        """The target for people: the agent id, or "capability:NAME"."""
        return self.agent_id if self.agent_id is not None else f"capability:{self.capability}"


class TaskFailedError(AgentpostError):
    """A task ended without a result: it failed, was rejected, canceled or expired.

    Raised by `TaskHandle.result()` on the originator's side; it never travels on the wire.
    `state` says how it ended, `reason` why (the assignee's or the server's sentence), `event`
    is the terminal event (actor, time) and `retryable` whether the assignee said another try
    may succeed.
    """

    def __init__(self, message: str, *, task_id: str, event: TaskEvent) -> None:
        super().__init__(message, metadata={"task_id": task_id, "state": event.state.value})
        self.task_id = task_id
        self.event = event

    @property
    def state(self) -> TaskState:
        return self.event.state

    @property
    def reason(self) -> str:
        return self.event.error or self.event.message

    @property
    def retryable(self) -> bool:
        return self.event.retryable

    @classmethod
    def of(cls, task_id: str, event: TaskEvent) -> TaskFailedError:
        """The error for a task that ended with `event`."""
        reason = event.error or event.message
        text = f"task {task_id} {event.state.value}" + (f": {reason}" if reason else "")
        return cls(text, task_id=task_id, event=event)


# --------------------------------------------------------------------------- the spec


def build_spec(
    *,
    to: str | None,
    capability: str | None,
    title: str,
    description: str = "",
    input: Any = None,
    context: Mapping[str, Any] | None = None,
    references: Mapping[str, str] | None = None,
    priority: int = 0,
    deadline: datetime.datetime | datetime.timedelta | float | None = None,
    accept_timeout: float | None = None,
    max_attempts: int | None = None,
    now: datetime.datetime | None = None,
) -> tasks_pb2.TaskSpec:
    """The `TaskSpec` of a handoff, checked before anything is sent (`InvalidArgumentError`).

    `deadline` is an aware datetime, a `timedelta` from `now`, or seconds from `now`.
    """
    spec = tasks_pb2.TaskSpec()
    if (to is None) == (capability is None):
        raise InvalidArgumentError(
            "hand a task off to exactly one of an agent (to) or a capability",
            metadata={"field": "target"},
        )
    if to is not None:
        spec.agent_id = _text(to, "to")
    elif capability is not None:
        spec.capability = _text(capability, "capability")
    if not isinstance(title, str) or not 1 <= len(title) <= MAX_TITLE:
        raise InvalidArgumentError(
            f"title must be 1 to {MAX_TITLE} characters", metadata={"field": "title"}
        )
    spec.title = title
    if not isinstance(description, str):
        raise InvalidArgumentError(
            "description must be a string", metadata={"field": "description"}
        )
    spec.description = description
    if input is not None:
        _payload.fill_payload(spec.input, input)
    if context:
        _payload.fill_struct(spec.context, context)
    if references:
        for key, value in references.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidArgumentError(
                    "references map strings to strings", metadata={"field": "references"}
                )
            spec.references[key] = value
    if type(priority) is not int or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidArgumentError(
            f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}",
            metadata={"field": "priority"},
        )
    spec.priority = priority
    if deadline is not None:
        spec.deadline.FromDatetime(_deadline(deadline, now))
    if accept_timeout is not None:
        seconds = _seconds(accept_timeout, "accept_timeout")
        spec.accept_timeout.FromNanoseconds(int(seconds * 1e9))
    if max_attempts is not None:
        if type(max_attempts) is not int or not 1 <= max_attempts <= 2**31 - 1:
            raise InvalidArgumentError(
                "max_attempts must be a positive integer", metadata={"field": "max_attempts"}
            )
        spec.max_attempts = max_attempts
    return spec


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{field} must be a non-empty string", metadata={"field": field})
    return value


def _seconds(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{field} must be seconds", metadata={"field": field})
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgumentError(
            f"{field} must be positive and finite", metadata={"field": field}
        )
    return float(value)


def _deadline(
    value: datetime.datetime | datetime.timedelta | float, now: datetime.datetime | None
) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgumentError(
                "deadline must be an aware datetime (with a tzinfo)",
                metadata={"field": "deadline"},
            )
        return value.astimezone(datetime.UTC)
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    if isinstance(value, datetime.timedelta):
        if value <= datetime.timedelta(0):
            raise InvalidArgumentError(
                "deadline must be in the future", metadata={"field": "deadline"}
            )
        return now + value
    return now + datetime.timedelta(seconds=_seconds(value, "deadline"))
