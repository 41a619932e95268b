"""The workflow state machine: pure functions from (run state, something that happened) to (new
run state, actions for the driver). The state is a `WorkflowRun` proto (serializable as bytes,
and what GetWorkflow returns); the input state is never modified. Times are unix seconds passed
in by the caller, so the functions are deterministic.

Every function but `start` and `on_cancel` is a no-op (the same state back, no actions) when the
notification is stale or repeated: the run is no longer running, the step is not in the state
the notification is about, the attempt is not the current one, or the task event was already
folded in. The driver may therefore deliver at-least-once.

    run, actions = start(definition, run_id="r1", originator="me", now=t)
    run, actions = on_task_update(run, "plan", 1, TaskUpdate(UpdateKind.OFFERED, "T1", "coder"), t)
    run, actions = on_step_finished(run, "plan", 1, Completed({"files": ["a.py"]}), now=t)
    run, actions = on_retry_due(run, "build", 2, now=t)      # when a ScheduleRetry fires
    run, actions = on_run_timeout(run, now=t)                 # when ScheduleRunTimeout fires
    run, actions = on_cancel(run, "not needed", now=t)
"""

from __future__ import annotations

from agentpost.errors import WorkflowStateError
from agentpost.payload import to_payload
from agentpost.v1 import workflows_pb2 as pb
from agentpost_server.core.workflows.actions import (
    Action,
    Completed,
    Outcome,
    ScheduleRunTimeout,
    TaskUpdate,
    UpdateKind,
)
from agentpost_server.core.workflows.definition import DEFAULT_MAX_STEPS, validate
from agentpost_server.core.workflows.tick import Tick

__all__ = [
    "is_terminal",
    "on_cancel",
    "on_retry_due",
    "on_run_timeout",
    "on_step_finished",
    "on_task_update",
    "start",
]

S = pb.WorkflowStepState
E = pb.WorkflowEventKind
R = pb.WorkflowRunState
Result = tuple[pb.WorkflowRun, list[Action]]

_STATE_WORDS = {
    R.WORKFLOW_RUN_STATE_COMPLETED: "completed",
    R.WORKFLOW_RUN_STATE_FAILED: "failed",
    R.WORKFLOW_RUN_STATE_CANCELED: "canceled",
}


def is_terminal(run: pb.WorkflowRun) -> bool:
    return run.state in _STATE_WORDS


def start(
    definition: pb.WorkflowDefinition,
    *,
    run_id: str,
    originator: str,
    now: float,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> Result:
    """Validate the definition (InvalidWorkflowError) and start the run: RUN_STARTED, the root
    steps' StartStep actions, STEP_WAITING for every other step that is not a fallback."""
    plan = validate(definition, max_steps=max_steps)
    run = pb.WorkflowRun(id=run_id, state=R.WORKFLOW_RUN_STATE_RUNNING, originator=originator)
    run.definition.CopyFrom(definition)
    run.definition.run_id = run_id
    run.created_at.FromNanoseconds(int(now * 1e9))
    for sid in plan.order:
        run.steps.add(step_id=sid, state=S.WORKFLOW_STEP_STATE_PENDING)
    tick = Tick(run, now, plan)
    input_value = definition.input if definition.HasField("input") else to_payload(None).json
    tick.emit(E.WORKFLOW_EVENT_KIND_RUN_STARTED, payload=input_value)
    options = definition.options
    if options.HasField("timeout"):
        tick.actions.append(ScheduleRunTimeout(options.timeout.ToNanoseconds() / 1e9))
    tick.advance(everything=True)
    for sid in plan.order:
        step = tick.steps[sid]
        if step.state == S.WORKFLOW_STEP_STATE_PENDING and sid not in plan.fallback_of:
            waiting = [
                dep
                for dep in plan.deps[sid]
                if tick.steps[dep].state != S.WORKFLOW_STEP_STATE_COMPLETED
            ]
            what = ", ".join(repr(dep) for dep in waiting) if waiting else "a free slot"
            tick.emit(E.WORKFLOW_EVENT_KIND_STEP_WAITING, step, message=f"waiting for {what}")
    return tick.result()


def on_task_update(
    run: pb.WorkflowRun, step_id: str, attempt: int, update: TaskUpdate, now: float
) -> Result:
    """Fold in news about a running step's task: record its id and assignee; emit STEP_OFFERED,
    STEP_STARTED or STEP_PROGRESS (SUBMITTED only records the task id)."""
    tick = Tick(run, now)
    step = tick.steps.get(step_id)
    if not _current(tick, step, attempt, S.WORKFLOW_STEP_STATE_RUNNING):
        return run, []
    assert step is not None
    if update.task_seq and update.task_seq <= step.task_seq:
        return run, []
    step.task_seq = update.task_seq or step.task_seq
    if update.task_id:
        step.task_id = update.task_id
    if update.kind is UpdateKind.SUBMITTED:
        return tick.result()
    if update.agent_id:
        step.assignee = update.agent_id
    if update.kind is UpdateKind.OFFERED:
        tick.emit(
            E.WORKFLOW_EVENT_KIND_STEP_OFFERED,
            step,
            agent_id=step.assignee,
            message=f"offered to {step.assignee}",
        )
    elif update.kind is UpdateKind.STARTED:
        tick.emit(
            E.WORKFLOW_EVENT_KIND_STEP_STARTED,
            step,
            agent_id=step.assignee,
            message=f"{step.assignee} is working on it",
        )
    else:
        tick.emit(
            E.WORKFLOW_EVENT_KIND_STEP_PROGRESS,
            step,
            agent_id=step.assignee,
            message=update.message,
            percent=update.percent,
        )
    return tick.result()


def on_step_finished(
    run: pb.WorkflowRun, step_id: str, attempt: int, outcome: Outcome, *, now: float
) -> Result:
    """The task of `attempt` ended. Completed: store the output and start what became ready.
    Failed: retry per the step's policy (ScheduleRetry), else apply its failure policy."""
    tick = Tick(run, now)
    step = tick.steps.get(step_id)
    if not _current(tick, step, attempt, S.WORKFLOW_STEP_STATE_RUNNING):
        return run, []
    assert step is not None
    if outcome.agent_id:
        step.assignee = outcome.agent_id
    if isinstance(outcome, Completed):
        tick.complete(step, outcome.output)
    else:
        tick.fail(step, outcome.reason, retryable=outcome.retryable, agent=outcome.agent_id)
    tick.advance()
    return tick.result()


def on_retry_due(run: pb.WorkflowRun, step_id: str, attempt: int, *, now: float) -> Result:
    """A ScheduleRetry fired: start `attempt` of the step (inputs resolved again)."""
    tick = Tick(run, now)
    step = tick.steps.get(step_id)
    if not _current(tick, step, attempt - 1, S.WORKFLOW_STEP_STATE_RETRY_WAIT):
        return run, []
    assert step is not None
    tick.begin(step, attempt)
    tick.advance()
    return tick.result()


def on_run_timeout(run: pb.WorkflowRun, *, now: float) -> Result:
    """The run's `options.timeout` passed: fail it (no step named), canceling open steps."""
    tick = Tick(run, now)
    if not tick.running:
        return run, []
    limit = tick.run.definition.options.timeout.ToNanoseconds() / 1e9
    tick.fail_run("", f"the run timed out after {limit:g} s")
    return tick.result()


def on_cancel(run: pb.WorkflowRun, reason: str, *, now: float) -> Result:
    """Cancel the run: CancelTask for each running step, RUN_CANCELED. A finished run raises
    WorkflowStateError (FAILED_PRECONDITION)."""
    if is_terminal(run):
        raise WorkflowStateError(
            f"workflow run {run.id!r} is already {_STATE_WORDS[run.state]}",
            metadata={"run_id": run.id},
        )
    tick = Tick(run, now)
    tick.cancel_run(reason)
    return tick.result()


def _current(
    tick: Tick, step: pb.WorkflowStepRun | None, attempt: int, state: pb.WorkflowStepState.ValueType
) -> bool:
    return tick.running and step is not None and step.state == state and step.attempt == attempt
