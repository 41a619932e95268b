"""Workflows (issue 5, `Coordinate`): a pure engine that the driver feeds and obeys.

Nothing here imports grpc or redis, does I/O, reads the clock or keeps state between calls:

    definition.py   validate(WorkflowDefinition, max_steps=500) -> Plan; InvalidWorkflowError
    refs.py         ${input.a}, ${steps.ID.output.path}, ${steps.ID.error} in input templates
    conditions.py   the `condition` language (parsed by hand, no eval)
    actions.py      what the engine asks for (StartStep, ScheduleRetry, ScheduleRunTimeout,
                    CancelTask, Emit, FinishRun) and what it is told (Completed, Failed,
                    TaskUpdate)
    engine.py       start / on_task_update / on_step_finished / on_retry_due / on_run_timeout /
                    on_cancel: (WorkflowRun, news) -> (WorkflowRun, [Action])
    tick.py         one transition's working copy and the scheduling rules

How the driver (phase 2, jobs/ + store/ + rpc/) runs it:

* State: per run, the `WorkflowRun` proto (serialized bytes) and an event log (a Redis stream of
  `WorkflowEvent`s with seq 1..last_seq). Every engine call is applied as load state -> call ->
  write the new state and append the `Emit` events in one MULTI/EXEC, guarded by WATCH on the
  state key (or a Lua script comparing `last_seq`), so two callers cannot both apply a
  transition; the loser reloads and calls again (a stale notification then becomes a no-op).
  Only after the write are the other actions carried out, in order; each is idempotent, so a
  crash in between only repeats them.
* `Coordinate(definition)`: if the run id exists, attach; else `start()` and persist. Then the
  rpc layer streams the log from `after_seq` (XRANGE for the backlog, then XREAD BLOCK), ending
  after RUN_COMPLETED / RUN_FAILED / RUN_CANCELED. Any server can serve any re-attach, because
  the log is in Redis and the seq numbers are the engine's.
* `StartStep` -> a task handoff (issue 4) with `idempotency_key` "run/step/attempt", TaskSpec
  from the action (deadline = now + timeout, `workflow_run_id` / `workflow_step_id` set), and
  `exclude_agents` passed to capability routing. The task layer's completion hook enqueues an
  arq job `workflow_advance(run_id, step_id, attempt, outcome)` that calls `on_step_finished`;
  its transitions (offered, working, progress) enqueue `on_task_update` with the TaskEvent seq.
  arq jobs are retried after a worker crash and the engine ignores repeats, so a killed worker
  loses nothing and redoes no completed step (completed outputs are in the stored state).
* `ScheduleRetry` / `ScheduleRunTimeout` -> arq jobs deferred by `delay`, with a job id derived
  from (run, step, attempt) so a repeat does not enqueue twice; they call `on_retry_due` /
  `on_run_timeout`. `CancelTask` -> cancel the task (found by the idempotency key when the task
  id is empty). `FinishRun` -> abort the run's pending timers, audit record.
* `GetWorkflow` returns the stored `WorkflowRun`; `ListWorkflows` reads a sorted set of run ids
  by creation time (per state, or filtered); `CancelWorkflow` applies `on_cancel`.

Decisions (also in the proto comments):
* Fallback: `on_failure: FALLBACK` + `fallback: F`. F runs only when its primary fails for good,
  has no depends_on, sees its primary's upstream plus `${steps.P.error}`; when F completes, P's
  dependents run with F's output as P's output (P stays FAILED, with `fell_back_to` = F).
  An unused fallback is SKIPPED ("not needed").
* Skips: a step skipped by its condition does not skip its dependents; its output is null. A
  step downstream of a failure (FAILURE_POLICY_CONTINUE, or a failed fallback under CONTINUE) is
  skipped with `skipped_upstream`, and that does propagate.
* More steps than the limit: InvalidWorkflowError (INVALID_ARGUMENT, as the issue says), with
  metadata {"limit": "max_workflow_steps", "max": N}.
* Retries: an attempt is retried when its failure is retryable and attempts remain; a failed
  condition or reference is never retried. RETRY_WAIT holds its `max_parallel` slot.
"""
