"""The task state machine: pure decisions from a stored task to the `Change` that moves it on.

Nothing here does I/O; `core.tasks.service` reads, decides with these functions and commits.
Every refusal is a TaskStateError (FAILED_PRECONDITION) whose text says what the task is now.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agentpost.errors import PermissionDeniedError, TaskStateError
from agentpost.v1 import envelope_pb2, payload_pb2, tasks_pb2
from agentpost_server.core.ports import Job
from agentpost_server.core.tasks.model import (
    CANCELED,
    COMPLETED,
    DEAD,
    EXPIRED,
    FAILED,
    HELD,
    INPUT_REQUIRED,
    OFFERED,
    REJECTED,
    SERVER_ACTOR,
    SUBMITTED,
    TERMINAL,
    WORKING,
    Change,
    Mail,
    TaskRecord,
    state_name,
    waiting_score,
)

K = tasks_pb2.TaskEventKind
Kind = envelope_pb2.MessageKind


@dataclass(frozen=True, slots=True)
class TaskConfig:
    accept_ms: int = 30_000
    max_attempts: int = 3
    offline_grace_ms: int = 30_000
    backoff_ms: int = 1_000
    backoff_max_ms: int = 60_000
    dispatch_grace_ms: int = 2_000


def task_view(
    record: TaskRecord, *, history: list[tasks_pb2.TaskEvent] | None = None
) -> tasks_pb2.Task:
    """The Task message for a record."""
    task = tasks_pb2.Task(
        id=record.id,
        originator=record.originator,
        state=record.state,  # type: ignore[arg-type]
        assignee=record.assignee,
        attempt=record.attempt,
        workflow_run_id=record.workflow_run_id,
        workflow_step_id=record.workflow_step_id,
    )
    task.spec.CopyFrom(record.spec)
    task.spec.max_attempts = record.max_attempts
    task.spec.accept_timeout.FromMilliseconds(record.accept_ms)
    task.created_at.FromMilliseconds(record.created_ms)
    task.updated_at.FromMilliseconds(record.updated_ms or record.created_ms)
    if record.result is not None:
        task.result.CopyFrom(record.result)
    if record.error:
        task.error.message = record.error
        task.error.retryable = record.retryable
    if history:
        task.history.extend(history)
    return task


def _event(
    record: TaskRecord,
    kind: int,
    state: int,
    actor: str,
    now_ms: int,
    *,
    message: str = "",
    percent: int = -1,
    payload: payload_pb2.Payload | None = None,
    error: str = "",
    retryable: bool = False,
    assignee: str | None = None,
    attempt: int | None = None,
) -> tasks_pb2.TaskEvent:
    event = tasks_pb2.TaskEvent(
        # The commit appends it as the next event: the version check makes record.seq current.
        seq=record.seq + 1,
        task_id=record.id,
        kind=kind,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        actor=actor,
        message=message,
        percent=percent,
        assignee=record.assignee if assignee is None else assignee,
        attempt=record.attempt if attempt is None else attempt,
    )
    event.time.FromMilliseconds(now_ms)
    if payload is not None:
        event.payload.CopyFrom(payload)
    if error:
        event.error.message = error
        event.error.retryable = retryable
    return event


def _job(record: TaskRecord, change: Change, run_at_ms: int) -> None:
    """Schedule a check of the task at `run_at_ms` (each job gets its own id)."""
    ticks = record.ticks + 1 + len(change.jobs)
    change.jobs.append(Job(f"task:{record.id}:{ticks}", "task_tick", [record.id], run_at_ms))
    change.set(ticks=ticks)


def _notice(
    record: TaskRecord,
    agent_id: str,
    kind: int,
    event: tasks_pb2.TaskEvent | None,
    envelope_id: str,
) -> Mail:
    envelope = envelope_pb2.Envelope(id=envelope_id, sender=SERVER_ACTOR, kind=kind)  # type: ignore[arg-type]
    envelope.recipient.agent_id = agent_id
    envelope.created_at.GetCurrentTime()
    envelope.task.task.CopyFrom(task_view(record))
    if event is not None:
        envelope.task.event.CopyFrom(event)
    return Mail(agent_id, envelope)


def _finish(record: TaskRecord, change: Change, state: int) -> None:
    """End the task: off its assignee's load, out of its queue, continuation job queued."""
    change.set(state=state)
    change.terminal = True
    change.dead = state in DEAD
    change.drop.append("queued")
    if record.assignee:
        change.load[record.assignee] = change.load.get(record.assignee, 0) - 1
    change.dequeue = record.queue
    if record.on_done:
        change.jobs.append(Job(f"task:{record.id}:done", record.on_done, [record.id], 0))


def create(
    record: TaskRecord, config: TaskConfig, now_ms: int, *, wait_first: bool = False
) -> Change:
    """The first commit of a task (state submitted), with its safety-net and deadline checks."""
    change = Change(actor=record.originator, action="task.handoff")
    change.set(
        id=record.id,
        originator=record.originator,
        spec=record.spec.SerializeToString(),
        state=SUBMITTED,
        attempt=0,
        max_attempts=record.max_attempts,
        accept_ms=record.accept_ms,
        deadline_ms=record.deadline_ms,
        created_ms=now_ms,
        updated_ms=now_ms,
    )
    if record.workflow_run_id:
        change.set(
            wf_run=record.workflow_run_id,
            wf_step=record.workflow_step_id,
            wf_att=record.workflow_attempt,
        )
    if record.tried:
        change.set(tried=" ".join(record.tried))
    if record.on_done:
        change.set(on_done=record.on_done)
    target = record.spec.WhichOneof("target") or ""
    change.details = {
        "target": f"{target}:{getattr(record.spec, target, '')}",
        "title": record.spec.title[:200],
        "priority": str(record.spec.priority),
    }
    change.event = _event(
        record, K.TASK_EVENT_KIND_TRANSITION, SUBMITTED, record.originator, now_ms
    )
    # If this server dies before offering the task, the worker offers it.
    _job(record, change, now_ms + config.dispatch_grace_ms)
    if record.deadline_ms:
        _job(record, change, record.deadline_ms)
    return change


def wait(record: TaskRecord, now_ms: int) -> Change:
    """No assignee is available: the task waits in its target's queue."""
    change = Change()
    change.set(queued=True, updated_ms=now_ms)
    change.enqueue = record.queue
    change.score = waiting_score(record.priority, record.created_ms)
    return change


def offer(record: TaskRecord, assignee: str, now_ms: int, envelope_id: str) -> Change:
    attempt = record.attempt + 1
    change = Change(action="task.offered", details={"assignee": assignee, "attempt": str(attempt)})
    change.set(
        state=OFFERED, assignee=assignee, attempt=attempt, offered_ms=now_ms, updated_ms=now_ms
    )
    change.drop.append("queued")
    change.dequeue = record.queue
    change.load[assignee] = 1
    change.event = _event(
        record,
        K.TASK_EVENT_KIND_TRANSITION,
        OFFERED,
        SERVER_ACTOR,
        now_ms,
        assignee=assignee,
        attempt=attempt,
    )
    offered = replace(record, state=OFFERED, assignee=assignee, attempt=attempt)
    mail = _notice(offered, assignee, Kind.MESSAGE_KIND_TASK_OFFER, None, envelope_id)
    mail.expires_ms = now_ms + record.accept_ms
    change.mail.append(mail)
    _job(record, change, now_ms + record.accept_ms)
    return change


def check_assignee(record: TaskRecord, caller: str, attempt: int, action: str) -> None:
    if record.state in TERMINAL:
        raise TaskStateError(
            f"task {record.id} is {state_name(record.state)}; it cannot be {action} now",
            metadata={"task_id": record.id, "state": state_name(record.state)},
        )
    if record.assignee != caller or (attempt and attempt != record.attempt):
        holder = (
            f"is {state_name(record.state)} with {record.assignee} (attempt {record.attempt})"
            if record.assignee
            else f"is {state_name(record.state)} with no assignee"
        )
        raise TaskStateError(
            f"task {record.id} {holder}; {caller} (attempt {attempt or '?'}) no longer holds it",
            metadata={"task_id": record.id, "state": state_name(record.state)},
        )


def require(record: TaskRecord, allowed: frozenset[int], action: str) -> None:
    if record.state not in allowed:
        raise TaskStateError(
            f"task {record.id} is {state_name(record.state)}; {action} needs it to be "
            + " or ".join(sorted(state_name(s) for s in allowed)),
            metadata={"task_id": record.id, "state": state_name(record.state)},
        )


def accept(
    record: TaskRecord, caller: str, attempt: int, config: TaskConfig, now_ms: int
) -> Change:
    check_assignee(record, caller, attempt, "accepted")
    require(record, frozenset({OFFERED}), "accept")
    change = Change(actor=caller, action="task.accepted")
    change.set(state=WORKING, updated_ms=now_ms)
    change.event = _event(record, K.TASK_EVENT_KIND_TRANSITION, WORKING, caller, now_ms)
    _job(record, change, now_ms + config.offline_grace_ms)  # is the assignee still there?
    return change


def progress(
    record: TaskRecord, caller: str, attempt: int, message: str, percent: int, now_ms: int
) -> Change:
    check_assignee(record, caller, attempt, "updated")
    require(record, frozenset({WORKING}), "progress")
    change = Change()
    change.set(updated_ms=now_ms)
    change.event = _event(
        record,
        K.TASK_EVENT_KIND_PROGRESS,
        record.state,
        caller,
        now_ms,
        message=message,
        percent=percent,
    )
    return change


def request_input(
    record: TaskRecord,
    caller: str,
    attempt: int,
    message: str,
    payload: payload_pb2.Payload | None,
    now_ms: int,
) -> Change:
    check_assignee(record, caller, attempt, "paused for input")
    require(record, frozenset({WORKING}), "request_input")
    change = Change(actor=caller, action="task.input_required")
    change.set(state=INPUT_REQUIRED, updated_ms=now_ms)
    change.event = _event(
        record,
        K.TASK_EVENT_KIND_TRANSITION,
        INPUT_REQUIRED,
        caller,
        now_ms,
        message=message,
        payload=payload,
    )
    return change


def provide_input(
    record: TaskRecord,
    caller: str,
    admin: bool,
    payload: payload_pb2.Payload,
    now_ms: int,
    envelope_id: str,
) -> Change:
    if caller != record.originator and not admin:
        raise PermissionDeniedError(
            f"only the originator of task {record.id} can answer its questions",
            metadata={"task_id": record.id},
        )
    require(record, frozenset({INPUT_REQUIRED}), "input")
    change = Change(actor=caller, action="task.input")
    change.set(state=WORKING, updated_ms=now_ms)
    change.event = _event(record, K.TASK_EVENT_KIND_INPUT, WORKING, caller, now_ms, payload=payload)
    working = replace(record, state=WORKING)
    change.mail.append(
        _notice(working, record.assignee, Kind.MESSAGE_KIND_TASK_UPDATE, change.event, envelope_id)
    )
    return change


def complete(
    record: TaskRecord, caller: str, attempt: int, result: payload_pb2.Payload, now_ms: int
) -> Change:
    check_assignee(record, caller, attempt, "completed")
    require(record, frozenset({WORKING, INPUT_REQUIRED}), "complete")
    change = Change(actor=caller, action="task.completed")
    change.set(result=result.SerializeToString(), updated_ms=now_ms)
    _finish(record, change, COMPLETED)
    change.event = _event(
        record, K.TASK_EVENT_KIND_TRANSITION, COMPLETED, caller, now_ms, payload=result
    )
    return change


def _backoff(config: TaskConfig, attempt: int) -> int:
    return min(config.backoff_ms * (1 << max(0, min(attempt - 1, 20))), config.backoff_max_ms)


def release(
    record: TaskRecord,
    actor: str,
    why: str,
    config: TaskConfig,
    now_ms: int,
    envelope_id: str,
    *,
    rejected: bool = False,
    retryable: bool = True,
    immediate: bool = False,
) -> Change:
    """The assignee's attempt is over without a result (rejected, offer timed out, assignee
    lost, retryable failure): another attempt, or the end when none is left or allowed."""
    previous = record.assignee
    change = Change(actor=actor)
    change.set(updated_ms=now_ms, error=why, retryable=retryable)
    if rejected:
        change.set(rejected_by=" ".join([*record.rejected_by, previous]))
    else:
        change.set(tried=" ".join([*record.tried, previous]))
    out_of_attempts = record.attempt >= record.max_attempts
    if rejected and not record.by_capability:
        final = REJECTED
    elif not retryable:
        final = FAILED
    elif out_of_attempts:
        final = FAILED
        if record.max_attempts > 1:
            why = f"{why}; all {record.max_attempts} attempts used"
    else:
        final = SUBMITTED
    if final == SUBMITTED:
        delay = 0 if immediate else _backoff(config, record.attempt)
        change.set(state=SUBMITTED, assignee="", not_before_ms=now_ms + delay)
        change.load[previous] = -1
        change.action = "task.retry"
        change.details = {"assignee": previous, "why": why, "delay_ms": str(delay)}
        message = f"attempt {record.attempt} ({previous}) ended: {why}"
        if delay:
            message += f"; next attempt in {delay / 1000:g}s"
        _job(record, change, now_ms + delay)
    else:
        change.set(assignee=previous, error=why)
        _finish(record, change, final)
        change.action = f"task.{state_name(final)}"
        change.details = {"assignee": previous, "why": why}
        message = why
    change.event = _event(
        record,
        K.TASK_EVENT_KIND_TRANSITION,
        final,
        actor,
        now_ms,
        message=message,
        error=why,
        retryable=final == SUBMITTED,
    )
    if actor != previous:  # tell the assignee its attempt is over
        ended = replace(record, state=final, assignee="")
        change.mail.append(
            _notice(ended, previous, Kind.MESSAGE_KIND_TASK_UPDATE, change.event, envelope_id)
        )
    return change


def end(
    record: TaskRecord,
    state: int,
    actor: str,
    why: str,
    now_ms: int,
    envelope_id: str,
) -> Change:
    """Cancel or expire an open task; its assignee (if any) is told."""
    change = Change(actor=actor, action=f"task.{state_name(state)}", details={"why": why})
    change.set(updated_ms=now_ms, error=why, retryable=False)
    _finish(record, change, state)
    change.event = _event(
        record, K.TASK_EVENT_KIND_TRANSITION, state, actor, now_ms, message=why, error=why
    )
    if record.assignee and record.state in HELD:
        ended = replace(record, state=state)
        change.mail.append(
            _notice(
                ended, record.assignee, Kind.MESSAGE_KIND_TASK_UPDATE, change.event, envelope_id
            )
        )
    return change


def check_cancel(record: TaskRecord, caller: str, admin: bool) -> None:
    if caller != record.originator and not admin:
        raise PermissionDeniedError(
            f"only the originator of task {record.id} (or an admin) can cancel it",
            metadata={"task_id": record.id},
        )
    if record.state in TERMINAL:
        raise TaskStateError(
            f"task {record.id} is already {state_name(record.state)}",
            metadata={"task_id": record.id, "state": state_name(record.state)},
        )


__all__ = [
    "CANCELED",
    "EXPIRED",
    "TaskConfig",
    "accept",
    "check_cancel",
    "complete",
    "create",
    "end",
    "offer",
    "progress",
    "provide_input",
    "release",
    "request_input",
    "require",
    "task_view",
    "wait",
]
