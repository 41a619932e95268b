"""One transition of a run: a private working copy of the state, the actions it produces, and the
scheduling rules (readiness, skips, failure policies, completion). `engine` is the public face.

Rules, in terms of a step's dependencies (each one "settled" when terminal):
* every dependency completed, or skipped by its condition -> the step is ready;
* some dependency failed for good (or was skipped because of an upstream failure) -> the step is
  skipped with `skipped_upstream` (so its own dependents are skipped too);
* a primary that failed with a fallback counts as its fallback: completed when the fallback
  completed (its output is then the fallback's), failed when the fallback failed.
A ready step's condition is evaluated first (false -> skipped, dependents still run), then its
input is resolved; an error in either fails the step without retry. `max_parallel` counts steps
RUNNING or in RETRY_WAIT; ready steps beyond it wait, in definition order.
"""

from __future__ import annotations

import heapq
from typing import Any

from agentpost.errors import AgentpostError
from agentpost.payload import from_value, to_payload
from agentpost.v1 import workflows_pb2 as pb
from agentpost_server.core.workflows.actions import (
    Action,
    CancelTask,
    Emit,
    FinishRun,
    ScheduleRetry,
    StartStep,
)
from agentpost_server.core.workflows.conditions import ConditionError, parse_condition
from agentpost_server.core.workflows.definition import Plan, plan_of
from agentpost_server.core.workflows.refs import RefError, Scope, resolve

# Enum values are read as module attributes (pb.X), plain ints: the enum wrappers' attribute
# lookup is slow enough to dominate a transition of a large run.
TERMINAL_STEP = frozenset(
    (
        pb.WORKFLOW_STEP_STATE_COMPLETED,
        pb.WORKFLOW_STEP_STATE_FAILED,
        pb.WORKFLOW_STEP_STATE_SKIPPED,
        pb.WORKFLOW_STEP_STATE_CANCELED,
    )
)
_DEFAULT_BACKOFF = 1.0
_DEFAULT_MULTIPLIER = 2.0
_DEFAULT_MAX_BACKOFF = 60.0

# What a dependency means for its dependent.
_WAIT, _OK, _BROKEN = "wait", "ok", "broken"


class Tick:
    """A working copy of `run` at time `now` (unix seconds), collecting actions."""

    def __init__(self, run: pb.WorkflowRun, now: float, plan: Plan | None = None) -> None:
        self.run = pb.WorkflowRun()
        self.run.CopyFrom(run)
        self.now = now
        self.plan = plan or plan_of(self.run.definition)
        self.steps = {step.step_id: step for step in self.run.steps}
        self.index = {sid: i for i, sid in enumerate(self.plan.order)}
        self.settled: list[str] = []  # steps that became terminal or fell back since `advance`
        self.actions: list[Action] = []

    @property
    def running(self) -> bool:
        return self.run.state == pb.WORKFLOW_RUN_STATE_RUNNING

    def result(self) -> tuple[pb.WorkflowRun, list[Action]]:
        self.run.updated_at.FromNanoseconds(int(self.now * 1e9))
        return self.run, self.actions

    # events

    def emit(
        self,
        kind: pb.WorkflowEventKind.ValueType,
        step: pb.WorkflowStepRun | None = None,
        **fields: Any,
    ) -> None:
        self.run.last_seq += 1
        event = pb.WorkflowEvent(seq=self.run.last_seq, run_id=self.run.id, kind=kind, percent=-1)
        event.time.FromNanoseconds(int(self.now * 1e9))
        if step is not None:
            event.step_id = step.step_id
            event.task_id = step.task_id
            event.attempt = step.attempt
        payload = fields.pop("payload", None)
        if payload is not None:
            event.payload.CopyFrom(payload)
        delay = fields.pop("retry_delay", None)
        if delay is not None:
            event.retry_delay.FromNanoseconds(int(delay * 1e9))
        for name, value in fields.items():
            setattr(event, name, value)
        self.actions.append(Emit(event))

    # scheduling

    def advance(self, everything: bool = False) -> None:
        """Start, skip or hold pending steps until nothing changes; then maybe finish the run.

        Only the steps that something settled may affect are looked at (the dependents of a
        step that reached a terminal state, a fallback whose primary fell back, the primary's
        dependents once the fallback ended), in definition order; all of them at the start and
        when `max_parallel` is set (a freed slot may let any ready step start)."""
        if everything or self.run.definition.options.max_parallel > 0:
            queue = list(range(len(self.plan.order)))
        else:
            queue = sorted({i for sid in self.settled for i in self._affected(sid)})
        self.settled.clear()
        queued = set(queue)
        while queue and self.running:
            index = heapq.heappop(queue)
            queued.discard(index)
            sid = self.plan.order[index]
            if self.steps[sid].state == pb.WORKFLOW_STEP_STATE_PENDING:
                self._try(sid)
            for settled in self.settled:
                for nxt in self._affected(settled):
                    if nxt not in queued:
                        queued.add(nxt)
                        heapq.heappush(queue, nxt)
            self.settled.clear()
        if self.running and all(s.state in TERMINAL_STEP for s in self.run.steps):
            self.complete_run()

    def _affected(self, sid: str) -> list[int]:
        """Indexes of the steps whose readiness may change when `sid` settles."""
        plan = self.plan
        found = [*plan.dependents[sid]]
        if plan.steps[sid].fallback:
            found.append(plan.steps[sid].fallback)
        primary = plan.fallback_of.get(sid)
        if primary is not None:
            found.extend(plan.dependents[primary])
        return [self.index[other] for other in found]

    def _try(self, sid: str) -> bool:
        status, blame = self._deps_status(sid)
        if status == _WAIT:
            return False
        step = self.steps[sid]
        if status == _BROKEN:
            dep = self.steps[blame]
            inherited = dep.state == pb.WORKFLOW_STEP_STATE_SKIPPED  # names the first failure
            self.skip(
                step, dep.error if inherited else f"upstream step {blame!r} failed", upstream=True
            )
            return True
        if self._slots_full():
            return False
        self.begin(step, attempt=1)
        return True

    def _deps_status(self, sid: str) -> tuple[str, str]:
        primary = self.plan.fallback_of.get(sid)
        if primary is not None:
            fell = self.steps[primary].fell_back_to == sid
            return (_OK, "") if fell else (_WAIT, "")
        waiting = ""
        for dep in self.plan.deps[sid]:
            status = self._settled(dep)
            if status == _BROKEN:  # skipped at once, without waiting for the other deps
                return _BROKEN, dep
            if status == _WAIT:
                waiting = waiting or dep
        return (_WAIT, waiting) if waiting else (_OK, "")

    def _settled(self, sid: str) -> str:
        step = self.steps[sid]
        if step.fell_back_to:
            step = self.steps[step.fell_back_to]
        if step.state == pb.WORKFLOW_STEP_STATE_COMPLETED:
            return _OK
        if step.state == pb.WORKFLOW_STEP_STATE_SKIPPED:
            return _BROKEN if step.skipped_upstream else _OK
        if step.state in (pb.WORKFLOW_STEP_STATE_FAILED, pb.WORKFLOW_STEP_STATE_CANCELED):
            return _BROKEN
        return _WAIT

    def _slots_full(self) -> bool:
        limit = self.run.definition.options.max_parallel
        if limit <= 0:
            return False
        busy = (pb.WORKFLOW_STEP_STATE_RUNNING, pb.WORKFLOW_STEP_STATE_RETRY_WAIT)
        return sum(1 for s in self.run.steps if s.state in busy) >= limit

    def begin(self, step: pb.WorkflowStepRun, attempt: int) -> None:
        """Evaluate the condition (first attempt only), resolve the input, hand off."""
        spec = self.plan.steps[step.step_id]
        scope = self.scope()
        try:
            skipped = attempt == 1 and bool(spec.condition)
            if skipped and not parse_condition(spec.condition).holds(scope):
                self.skip(step, f"condition is false: {spec.condition}", upstream=False)
                return
            template = from_value(spec.input) if spec.HasField("input") else None
            resolved = resolve(template, scope)
        except (RefError, ConditionError) as exc:
            where = "condition" if isinstance(exc, ConditionError) else "input"
            step.attempt = attempt
            self.fail(step, f"{where}: {exc}", retryable=False)
            return
        if attempt == 1:
            step.started_at.FromNanoseconds(int(self.now * 1e9))
        step.state = pb.WORKFLOW_STEP_STATE_RUNNING
        step.attempt = attempt
        step.task_id = ""
        step.assignee = ""
        step.task_seq = 0
        retry = self.retry_policy(spec)
        self.actions.append(
            StartStep(
                step_id=step.step_id,
                attempt=attempt,
                agent_id=spec.agent_id,
                capability=spec.capability,
                title=spec.title or step.step_id,
                description=spec.description,
                input=resolved,
                timeout=self.step_timeout(spec),
                priority=spec.priority,
                exclude_agents=tuple(step.failed_assignees) if retry.other_agent else (),
                idempotency_key=f"{self.run.id}/{step.step_id}/{attempt}",
            )
        )

    def scope(self) -> Scope:
        steps = self.steps

        def output(sid: str) -> Any:
            step = steps[sid]
            return from_value(step.output) if step.HasField("output") else None

        def error(sid: str) -> str | None:
            return steps[sid].error or None

        run_input = self.run.definition.input
        value = from_value(run_input) if self.run.definition.HasField("input") else None
        return Scope(input=value, output=output, error=error)

    def retry_policy(self, spec: pb.WorkflowStep) -> pb.RetryPolicy:
        return spec.retry if spec.HasField("retry") else self.run.definition.options.default_retry

    def step_timeout(self, spec: pb.WorkflowStep) -> float | None:
        options = self.run.definition.options
        if spec.HasField("timeout"):
            return spec.timeout.ToNanoseconds() / 1e9
        if options.HasField("default_step_timeout"):
            return options.default_step_timeout.ToNanoseconds() / 1e9
        return None

    # step endings

    def finish(self, step: pb.WorkflowStepRun, state: pb.WorkflowStepState.ValueType) -> None:
        step.state = state
        self.settled.append(step.step_id)
        step.finished_at.FromNanoseconds(int(self.now * 1e9))

    def complete(self, step: pb.WorkflowStepRun, output: Any) -> None:
        try:
            value = to_payload(output).json
        except AgentpostError as exc:
            self.fail(step, f"the output is not JSON: {exc.message}", retryable=False)
            return
        step.output.CopyFrom(value)
        step.error = ""  # an earlier attempt's failure is history now
        self.finish(step, pb.WORKFLOW_STEP_STATE_COMPLETED)
        self.emit(
            pb.WORKFLOW_EVENT_KIND_STEP_COMPLETED, step, payload=value, agent_id=step.assignee
        )
        primary = self.plan.fallback_of.get(step.step_id)
        if primary is not None:
            self.steps[primary].output.CopyFrom(value)
        self._settle_fallback(step)

    def skip(self, step: pb.WorkflowStepRun, why: str, *, upstream: bool) -> None:
        step.error = why
        step.skipped_upstream = upstream
        self.finish(step, pb.WORKFLOW_STEP_STATE_SKIPPED)
        self.emit(pb.WORKFLOW_EVENT_KIND_STEP_SKIPPED, step, message=why)
        self._settle_fallback(step)

    def _settle_fallback(self, primary: pb.WorkflowStepRun) -> None:
        """A primary that did not fail does not need its fallback."""
        spec = self.plan.steps[primary.step_id]
        if spec.on_failure != pb.FAILURE_POLICY_FALLBACK or primary.fell_back_to:
            return
        fallback = self.steps[spec.fallback]
        if fallback.state == pb.WORKFLOW_STEP_STATE_PENDING:
            verb = (
                "completed" if primary.state == pb.WORKFLOW_STEP_STATE_COMPLETED else "was skipped"
            )
            self.skip(fallback, f"not needed: {primary.step_id!r} {verb}", upstream=False)

    def fail(
        self, step: pb.WorkflowStepRun, reason: str, *, retryable: bool, agent: str = ""
    ) -> None:
        """An attempt failed: retry per policy, or apply the failure policy."""
        spec = self.plan.steps[step.step_id]
        agent = agent or step.assignee
        if agent:
            step.failed_assignees.append(agent)
        retry = self.retry_policy(spec)
        if retryable and step.attempt < retry.max_attempts:
            delay = backoff(retry, step.attempt)
            step.state = pb.WORKFLOW_STEP_STATE_RETRY_WAIT
            step.error = reason
            self.emit(
                pb.WORKFLOW_EVENT_KIND_STEP_RETRYING,
                step,
                message=reason,
                agent_id=agent,
                retry_delay=delay,
            )
            self.actions.append(ScheduleRetry(step.step_id, step.attempt + 1, delay))
            return
        step.error = reason
        self.finish(step, pb.WORKFLOW_STEP_STATE_FAILED)
        policy = spec.on_failure
        note = (
            f"; falling back to {spec.fallback!r}" if policy == pb.FAILURE_POLICY_FALLBACK else ""
        )
        self.emit(pb.WORKFLOW_EVENT_KIND_STEP_FAILED, step, message=reason + note, agent_id=agent)
        if policy == pb.FAILURE_POLICY_FALLBACK:
            step.fell_back_to = spec.fallback  # `finish` above queued it: the fallback is affected
        elif policy != pb.FAILURE_POLICY_CONTINUE:
            what = f"step {step.step_id!r} failed: {reason}"
            self.fail_run(step.step_id, what)

    # run endings

    def stop_open_steps(self, reason: str) -> None:
        for step in self.run.steps:
            if step.state == pb.WORKFLOW_STEP_STATE_RUNNING:
                self.actions.append(CancelTask(step.step_id, step.attempt, step.task_id, reason))
            if step.state not in TERMINAL_STEP:
                self.finish(step, pb.WORKFLOW_STEP_STATE_CANCELED)

    def fail_run(self, step_id: str, message: str) -> None:
        self.stop_open_steps(message)
        self.run.state = pb.WORKFLOW_RUN_STATE_FAILED
        self.run.error.step_id = step_id
        self.run.error.message = message
        self.emit(pb.WORKFLOW_EVENT_KIND_RUN_FAILED, message=message, step_id=step_id)
        error = pb.WorkflowError()
        error.CopyFrom(self.run.error)
        self.actions.append(FinishRun(self.run.id, self.run.state, None, error))

    def cancel_run(self, reason: str) -> None:
        self.stop_open_steps(reason or "the run was canceled")
        self.run.state = pb.WORKFLOW_RUN_STATE_CANCELED
        self.emit(pb.WORKFLOW_EVENT_KIND_RUN_CANCELED, message=reason)
        self.actions.append(FinishRun(self.run.id, self.run.state, None, None))

    def complete_run(self) -> None:
        outputs: dict[str, Any] = {}
        for sid in self.plan.outputs:
            step = self.steps[sid]
            ok = step.HasField("output") and self._settled(sid) == _OK
            outputs[sid] = from_value(step.output) if ok else None
        value = to_payload(outputs).json
        self.run.outputs.CopyFrom(value)
        self.run.state = pb.WORKFLOW_RUN_STATE_COMPLETED
        self.emit(pb.WORKFLOW_EVENT_KIND_RUN_COMPLETED, payload=value)
        self.actions.append(FinishRun(self.run.id, self.run.state, outputs, None))


def backoff(retry: pb.RetryPolicy, failed_attempt: int) -> float:
    """The wait after attempt `failed_attempt` (1 for the first) failed."""
    initial = (
        retry.initial_backoff.ToNanoseconds() / 1e9 if retry.HasField("initial_backoff") else None
    )
    ceiling = retry.max_backoff.ToNanoseconds() / 1e9 if retry.HasField("max_backoff") else None
    multiplier = retry.backoff_multiplier or _DEFAULT_MULTIPLIER
    base = _DEFAULT_BACKOFF if initial is None else initial
    top = _DEFAULT_MAX_BACKOFF if ceiling is None else ceiling
    return float(min(base * multiplier ** (failed_attempt - 1), top))
