"""What the engine is told (outcomes, task updates) and what it asks the driver to do (actions).

Actions come in the order they must be carried out, after the returned run state is persisted
together with the events of its `Emit` actions (one atomic write): a crash between the write and
the actions repeats the actions, so every action is safe to repeat. `StartStep.idempotency_key`
makes the handoff once-only, `CancelTask` of a finished task is a no-op, `ScheduleRetry` may fire
twice (the engine ignores the second).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from agentpost.v1 import workflows_pb2

__all__ = [
    "Action",
    "CancelTask",
    "Completed",
    "Emit",
    "Failed",
    "FinishRun",
    "Outcome",
    "ScheduleRetry",
    "ScheduleRunTimeout",
    "StartStep",
    "TaskUpdate",
    "UpdateKind",
]


@dataclass(frozen=True, slots=True)
class StartStep:
    """Hand the step off as a task (TaskSpec: target, title, description, input, priority,
    deadline = now + timeout), avoiding `exclude_agents` when another capable agent is online.
    Report the task with `on_task_update` and its end with `on_step_finished`."""

    step_id: str
    attempt: int
    agent_id: str  # exactly one of agent_id / capability is set
    capability: str
    title: str
    description: str
    input: Any  # JSON-shaped, references resolved
    timeout: float | None  # seconds; None: no deadline
    priority: int
    exclude_agents: tuple[str, ...]
    idempotency_key: str  # "run_id/step_id/attempt": the Handoff idempotency key


@dataclass(frozen=True, slots=True)
class ScheduleRetry:
    """After `delay` seconds, call `on_retry_due(run, step_id, attempt)`."""

    step_id: str
    attempt: int  # the attempt to start
    delay: float


@dataclass(frozen=True, slots=True)
class ScheduleRunTimeout:
    """After `delay` seconds, call `on_run_timeout(run)`."""

    delay: float


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Cancel the step's task. `task_id` is empty when the driver has not reported it yet: find
    it by the idempotency key `run_id/step_id/attempt` (or make sure it is never created)."""

    step_id: str
    attempt: int
    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Emit:
    """Append the event to the run's log (with the state, atomically) and publish it."""

    event: workflows_pb2.WorkflowEvent


@dataclass(frozen=True, slots=True)
class FinishRun:
    """The run reached a terminal state: stop its timers, notify whoever waits for it."""

    run_id: str
    state: workflows_pb2.WorkflowRunState.ValueType
    outputs: Any  # COMPLETED: {step id: output}; otherwise None
    error: workflows_pb2.WorkflowError | None  # FAILED: where and why


Action = StartStep | ScheduleRetry | ScheduleRunTimeout | CancelTask | Emit | FinishRun


@dataclass(frozen=True, slots=True)
class Completed:
    """The step's task completed with this output (JSON-shaped)."""

    output: Any
    agent_id: str = ""


@dataclass(frozen=True, slots=True)
class Failed:
    """The step's task failed, was rejected, expired (its timeout) or was canceled from outside.
    `retryable` False means another attempt cannot help (the retry policy is then ignored)."""

    reason: str
    retryable: bool = True
    agent_id: str = ""


Outcome = Completed | Failed


class UpdateKind(Enum):
    """What a task update reports (the driver maps TaskEvents onto these)."""

    SUBMITTED = "submitted"  # the handoff was accepted: the task id is known
    OFFERED = "offered"  # offered to `agent_id`
    STARTED = "started"  # `agent_id` accepted it (TASK_STATE_WORKING)
    PROGRESS = "progress"  # `message`, `percent`


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """News about a running step's task. `task_seq` (the TaskEvent seq) makes a repeated update
    a no-op; 0 disables that check."""

    kind: UpdateKind
    task_id: str
    agent_id: str = ""
    message: str = ""
    percent: int = -1
    task_seq: int = 0
