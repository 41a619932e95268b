"""The engine's scenarios, driven by a tiny in-memory driver (no Redis, no grpc, no clock)."""

from typing import Any

import pytest

from agentpost.errors import InvalidWorkflowError, WorkflowStateError
from agentpost.payload import from_value
from agentpost.v1 import workflows_pb2 as pb
from agentpost.workflow import definition_from_dict
from agentpost_server.core.workflows import engine
from agentpost_server.core.workflows.actions import (
    Action,
    CancelTask,
    Completed,
    Emit,
    Failed,
    FinishRun,
    ScheduleRetry,
    ScheduleRunTimeout,
    StartStep,
    TaskUpdate,
    UpdateKind,
)

E = pb.WorkflowEventKind
S = pb.WorkflowStepState
R = pb.WorkflowRunState


class Driver:
    """Applies the engine and keeps what a real driver would persist or do."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.now = 100.0
        self.events: list[pb.WorkflowEvent] = []
        self.started: list[StartStep] = []
        self.retries: list[ScheduleRetry] = []
        self.cancels: list[CancelTask] = []
        self.finished: list[FinishRun] = []
        self.other: list[Action] = []
        self.run, actions = engine.start(
            definition_from_dict(data), run_id="r1", originator="tester", now=self.now
        )
        self.last = self.absorb(actions)

    def absorb(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Emit):
                assert action.event.seq == len(self.events) + 1
                self.events.append(action.event)
            elif isinstance(action, StartStep):
                self.started.append(action)
            elif isinstance(action, ScheduleRetry):
                self.retries.append(action)
            elif isinstance(action, CancelTask):
                self.cancels.append(action)
            elif isinstance(action, FinishRun):
                self.finished.append(action)
            else:
                self.other.append(action)
        assert self.run.last_seq == len(self.events)
        return actions

    def tick(self) -> float:
        self.now += 1
        return self.now

    def complete(
        self, step: str, output: Any = None, attempt: int = 1, agent: str = ""
    ) -> list[Action]:
        self.run, actions = engine.on_step_finished(
            self.run, step, attempt, Completed(output, agent_id=agent), now=self.tick()
        )
        return self.absorb(actions)

    def fail(self, step: str, reason: str = "boom", attempt: int = 1, **kw: Any) -> list[Action]:
        self.run, actions = engine.on_step_finished(
            self.run, step, attempt, Failed(reason, **kw), now=self.tick()
        )
        return self.absorb(actions)

    def retry_due(self, step: str, attempt: int) -> list[Action]:
        self.run, actions = engine.on_retry_due(self.run, step, attempt, now=self.tick())
        return self.absorb(actions)

    def update(self, step: str, update: TaskUpdate, attempt: int = 1) -> list[Action]:
        self.run, actions = engine.on_task_update(self.run, step, attempt, update, self.tick())
        return self.absorb(actions)

    def cancel(self, reason: str = "stop") -> list[Action]:
        self.run, actions = engine.on_cancel(self.run, reason, now=self.tick())
        return self.absorb(actions)

    def step(self, step_id: str) -> pb.WorkflowStepRun:
        return next(s for s in self.run.steps if s.step_id == step_id)

    def kinds(self, step_id: str | None = None) -> list[str]:
        return [
            E.Name(e.kind).removeprefix("WORKFLOW_EVENT_KIND_")
            for e in self.events
            if step_id is None or e.step_id == step_id
        ]

    def started_ids(self, actions: list[Action]) -> list[str]:
        return [a.step_id for a in actions if isinstance(a, StartStep)]

    @property
    def outputs(self) -> Any:
        return from_value(self.run.outputs)


def cap(step_id: str, **body: Any) -> dict[str, Any]:
    return {"id": step_id, "capability": "code", **body}


def test_three_step_chain_passes_outputs_along() -> None:
    d = Driver(
        {
            "input": {"repo": "agentpost"},
            "steps": [
                cap("plan", input={"repo": "${input.repo}"}),
                cap("code", depends_on="plan", input={"files": "${steps.plan.output.files}"}),
                cap("test", depends_on="code", input="changed ${steps.code.output.changed}"),
            ],
        }
    )
    assert d.started_ids(d.last) == ["plan"]
    assert d.started[0].input == {"repo": "agentpost"}
    assert d.started[0].idempotency_key == "r1/plan/1"
    assert d.kinds() == ["RUN_STARTED", "STEP_WAITING", "STEP_WAITING"]
    assert d.events[1].message == "waiting for 'plan'"
    assert d.started_ids(d.complete("plan", {"files": ["a.py"]})) == ["code"]
    assert d.started[1].input == {"files": ["a.py"]}
    assert d.started_ids(d.complete("code", {"changed": 1})) == ["test"]
    assert d.started[2].input == "changed 1"
    d.complete("test", "green")
    assert d.run.state == R.WORKFLOW_RUN_STATE_COMPLETED
    assert d.outputs == {"test": "green"}
    assert d.kinds()[-1] == "RUN_COMPLETED"
    assert from_value(d.events[-1].payload) == {"test": "green"}
    assert d.finished == [FinishRun("r1", R.WORKFLOW_RUN_STATE_COMPLETED, {"test": "green"}, None)]
    assert [s.state for s in d.run.steps] == [S.WORKFLOW_STEP_STATE_COMPLETED] * 3


def test_diamond_starts_both_branches_together_and_the_join_sees_both() -> None:
    d = Driver(
        {
            "steps": [
                cap("a"),
                cap("b", depends_on="a", input="${steps.a.output}"),
                cap("c", depends_on="a"),
                cap("d", depends_on=["b", "c"], input=["${steps.b.output}", "${steps.c.output}"]),
            ]
        }
    )
    assert d.started_ids(d.complete("a", 1)) == ["b", "c"]
    assert d.started_ids(d.complete("c", "C")) == []
    assert d.step("b").state == S.WORKFLOW_STEP_STATE_RUNNING
    assert d.started_ids(d.complete("b", "B")) == ["d"]
    assert d.started[-1].input == ["B", "C"]
    d.complete("d", "D")
    assert d.outputs == {"d": "D"}


def test_a_failing_step_is_retried_on_another_agent_and_succeeds() -> None:
    retry = {"max_attempts": 3, "backoff": "2s", "multiplier": 3, "other_agent": True}
    d = Driver({"steps": [cap("build", retry=retry), cap("ship", depends_on="build")]})
    d.update("build", TaskUpdate(UpdateKind.OFFERED, "T1", "alice", task_seq=2))
    actions = d.fail("build", "compiler crashed")
    assert d.retries == [ScheduleRetry("build", 2, 2.0)]
    assert d.kinds("build")[-1] == "STEP_RETRYING"
    assert d.events[-1].message == "compiler crashed"
    assert d.events[-1].agent_id == "alice"
    assert d.events[-1].retry_delay.ToSeconds() == 2
    assert d.step("build").state == S.WORKFLOW_STEP_STATE_RETRY_WAIT
    assert not d.started_ids(actions)
    assert d.started_ids(d.retry_due("build", 2)) == ["build"]
    assert d.started[-1].exclude_agents == ("alice",)
    assert d.started[-1].idempotency_key == "r1/build/2"
    d.fail("build", "again", attempt=2, agent_id="bob")
    assert d.retries[-1] == ScheduleRetry("build", 3, 6.0)
    d.retry_due("build", 3)
    assert d.started[-1].exclude_agents == ("alice", "bob")
    assert d.started_ids(d.complete("build", "ok", attempt=3, agent="carol")) == ["ship"]
    assert d.step("build").attempt == 3
    assert list(d.step("build").failed_assignees) == ["alice", "bob"]
    assert d.step("build").error == ""  # the earlier failures are history


def test_retries_used_up_fail_the_run_naming_the_step_and_reason() -> None:
    d = Driver(
        {
            "steps": [
                cap("build", retry={"max_attempts": 2}),
                cap("docs"),
                cap("ship", depends_on=["build", "docs"]),
            ]
        }
    )
    d.update("docs", TaskUpdate(UpdateKind.SUBMITTED, "T-docs"))
    d.fail("build", "disk full")
    d.retry_due("build", 2)
    actions = d.fail("build", "disk full", attempt=2)
    assert d.run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert d.run.error == pb.WorkflowError(
        step_id="build", message="step 'build' failed: disk full"
    )
    assert d.kinds()[-2:] == ["STEP_FAILED", "RUN_FAILED"]
    assert d.events[-1].step_id == "build"
    assert [a for a in actions if isinstance(a, CancelTask)] == [
        CancelTask("docs", 1, "T-docs", "step 'build' failed: disk full")
    ]
    assert d.step("docs").state == S.WORKFLOW_STEP_STATE_CANCELED
    assert d.step("ship").state == S.WORKFLOW_STEP_STATE_CANCELED
    assert d.finished[0].error == d.run.error
    # a late completion of the canceled step changes nothing
    assert d.complete("docs", "late") == []


def test_a_non_retryable_failure_is_not_retried() -> None:
    d = Driver({"steps": [cap("a", retry={"max_attempts": 5})]})
    d.fail("a", "bad input", retryable=False)
    assert d.retries == []
    assert d.run.state == R.WORKFLOW_RUN_STATE_FAILED


def test_continue_policy_skips_the_downstream_steps_only() -> None:
    d = Driver(
        {
            "steps": [
                cap("lint", on_failure="continue"),
                cap("fix", depends_on="lint"),
                cap("report", depends_on="fix"),
                cap("test"),
            ]
        }
    )
    d.fail("lint", "style")
    assert d.step("fix").state == S.WORKFLOW_STEP_STATE_SKIPPED
    assert d.step("fix").skipped_upstream
    assert d.step("fix").error == "upstream step 'lint' failed"
    assert d.step("report").error == "upstream step 'lint' failed"  # the first failure
    assert d.run.state == R.WORKFLOW_RUN_STATE_RUNNING
    d.complete("test", "ok")
    assert d.run.state == R.WORKFLOW_RUN_STATE_COMPLETED
    assert d.outputs == {"report": None, "test": "ok"}


def test_a_step_is_skipped_as_soon_as_one_dependency_failed() -> None:
    d = Driver(
        {
            "steps": [
                cap("slow"),
                cap("flaky", on_failure="continue"),
                cap("join", depends_on=["slow", "flaky"]),
            ]
        }
    )
    d.fail("flaky")
    assert d.step("join").state == S.WORKFLOW_STEP_STATE_SKIPPED
    assert d.step("slow").state == S.WORKFLOW_STEP_STATE_RUNNING
    assert d.run.state == R.WORKFLOW_RUN_STATE_RUNNING
    d.complete("slow", 1)
    assert d.outputs == {"join": None}


def test_fallback_runs_in_place_of_its_failed_primary() -> None:
    d = Driver(
        {
            "steps": [
                cap("gen", input="x"),
                cap("build", depends_on="gen", on_failure="fallback", fallback="manual"),
                cap("manual", input={"why": "${steps.build.error}", "gen": "${steps.gen.output}"}),
                cap("ship", depends_on="build", input="${steps.build.output}"),
            ]
        }
    )
    assert "manual" not in [e.step_id for e in d.events]  # no WAITING for a fallback
    d.complete("gen", "G")
    assert d.started_ids(d.fail("build", "no compiler")) == ["manual"]
    assert d.events[-1].message == "no compiler; falling back to 'manual'"
    assert d.started[-1].input == {"why": "no compiler", "gen": "G"}
    assert d.step("build").fell_back_to == "manual"
    assert d.started_ids(d.complete("manual", "built by hand")) == ["ship"]
    assert d.started[-1].input == "built by hand"
    d.complete("ship", "shipped")
    assert d.run.state == R.WORKFLOW_RUN_STATE_COMPLETED
    assert d.step("build").state == S.WORKFLOW_STEP_STATE_FAILED


def test_an_unneeded_fallback_is_skipped_and_a_failed_one_fails_the_run() -> None:
    d = Driver({"steps": [cap("a", on_failure="fallback", fallback="f"), cap("f"), cap("b")]})
    d.complete("a", 1)
    assert d.step("f").state == S.WORKFLOW_STEP_STATE_SKIPPED
    assert d.step("f").error == "not needed: 'a' completed"
    d.complete("b", 2)
    assert d.outputs == {"a": 1, "b": 2}

    d = Driver({"steps": [cap("a", on_failure="fallback", fallback="f"), cap("f")]})
    d.fail("a", "one")
    d.fail("f", "two")
    assert d.run.error == pb.WorkflowError(step_id="f", message="step 'f' failed: two")


def test_a_false_condition_skips_the_step_but_not_its_dependents() -> None:
    d = Driver(
        {
            "steps": [
                cap("review"),
                cap("deploy", depends_on="review", condition="${steps.review.output.ok} == true"),
                cap("notify", depends_on="deploy", input={"deployed": "${steps.deploy.output}"}),
            ]
        }
    )
    assert d.started_ids(d.complete("review", {"ok": False})) == ["notify"]
    assert d.step("deploy").state == S.WORKFLOW_STEP_STATE_SKIPPED
    assert not d.step("deploy").skipped_upstream
    assert d.events[-1].kind == E.WORKFLOW_EVENT_KIND_STEP_SKIPPED
    assert d.events[-1].message == "condition is false: ${steps.review.output.ok} == true"
    assert d.started[-1].input == {"deployed": None}


def test_a_missing_reference_fails_the_step_without_retry() -> None:
    d = Driver(
        {
            "steps": [
                cap("a"),
                cap("b", depends_on="a", input="${steps.a.output.nope}", retry={"max_attempts": 3}),
            ]
        }
    )
    d.complete("a", {})
    assert d.run.state == R.WORKFLOW_RUN_STATE_FAILED
    assert d.run.error.message == (
        "step 'b' failed: input: ${steps.a.output.nope}: the output of step 'a' has no key"
        " 'nope' at the top"
    )
    assert d.retries == []


def test_cancel_cancels_running_tasks_and_stops_the_run() -> None:
    d = Driver({"steps": [cap("a"), cap("b"), cap("c", depends_on=["a", "b"])]})
    d.update("a", TaskUpdate(UpdateKind.SUBMITTED, "T-a"))
    assert d.run.updated_at.ToSeconds() == int(d.now)
    actions = d.cancel("changed my mind")
    assert [a for a in actions if isinstance(a, CancelTask)] == [
        CancelTask("a", 1, "T-a", "changed my mind"),
        CancelTask("b", 1, "", "changed my mind"),
    ]
    assert d.run.state == R.WORKFLOW_RUN_STATE_CANCELED
    assert d.kinds()[-1] == "RUN_CANCELED"
    assert {s.state for s in d.run.steps} == {S.WORKFLOW_STEP_STATE_CANCELED}
    with pytest.raises(WorkflowStateError, match="workflow run 'r1' is already canceled"):
        d.cancel()
    assert d.complete("a") == []


def test_repeated_and_stale_notifications_are_no_ops() -> None:
    d = Driver({"steps": [cap("a", retry={"max_attempts": 2}), cap("b", depends_on="a")]})
    offered = TaskUpdate(UpdateKind.OFFERED, "T1", "x", task_seq=3)
    assert len(d.update("a", offered)) == 1
    assert d.update("a", offered) == []
    assert d.update("a", TaskUpdate(UpdateKind.PROGRESS, "T1", message="half", percent=50)) != []
    assert d.events[-1].percent == 50
    d.fail("a", "flaky")
    state = d.run
    assert d.fail("a", "flaky") == []  # the same failure again
    assert d.complete("a", "late", attempt=1) == []  # an old attempt
    assert d.retry_due("a", 3) == []  # not the next attempt
    assert d.run is state
    d.retry_due("a", 2)
    assert d.retry_due("a", 2) == []  # the retry job fired twice
    assert d.started_ids(d.complete("a", "A", attempt=2)) == ["b"]
    assert d.complete("a", "A", attempt=2) == []
    assert d.complete("b", "B", attempt=1) != []
    assert d.complete("b", "B", attempt=1) == []
    assert d.kinds().count("RUN_COMPLETED") == 1


def test_max_parallel_holds_ready_steps_until_a_slot_frees() -> None:
    d = Driver({"options": {"max_parallel": 2}, "steps": [cap(f"s{i}") for i in range(4)]})
    assert d.started_ids(d.last) == ["s0", "s1"]
    assert [e.message for e in d.events if e.kind == E.WORKFLOW_EVENT_KIND_STEP_WAITING] == [
        "waiting for a free slot",
        "waiting for a free slot",
    ]
    assert d.started_ids(d.complete("s1")) == ["s2"]
    assert d.started_ids(d.complete("s0")) == ["s3"]


def test_run_timeout_and_step_timeouts() -> None:
    d = Driver(
        {
            "options": {"timeout": "5m", "default_step_timeout": "30s"},
            "steps": [cap("a"), cap("b", timeout="2m")],
        }
    )
    assert d.other == [ScheduleRunTimeout(300.0)]
    assert [s.timeout for s in d.started] == [30.0, 120.0]
    d.run, actions = engine.on_run_timeout(d.run, now=d.tick())
    d.absorb(actions)
    assert d.run.error == pb.WorkflowError(step_id="", message="the run timed out after 300 s")
    assert len(d.cancels) == 2
    assert engine.on_run_timeout(d.run, now=d.tick()) == (d.run, [])


def test_the_input_state_is_never_modified() -> None:
    d = Driver({"steps": [cap("a"), cap("b", depends_on="a")]})
    before = pb.WorkflowRun()
    before.CopyFrom(d.run)
    engine.on_step_finished(d.run, "a", 1, Completed(1), now=1.0)
    assert d.run == before


def test_progress_events_carry_the_task_and_agent() -> None:
    d = Driver({"steps": [cap("a")]})
    d.update("a", TaskUpdate(UpdateKind.OFFERED, "T1", "ann"))
    d.update("a", TaskUpdate(UpdateKind.STARTED, "T1", "ann"))
    assert [(e.kind, e.task_id, e.agent_id, e.attempt) for e in d.events[-2:]] == [
        (E.WORKFLOW_EVENT_KIND_STEP_OFFERED, "T1", "ann", 1),
        (E.WORKFLOW_EVENT_KIND_STEP_STARTED, "T1", "ann", 1),
    ]
    assert d.step("a").task_id == "T1" and d.step("a").assignee == "ann"


def test_start_validates_and_counts_against_the_limit() -> None:
    with pytest.raises(InvalidWorkflowError, match="limit is 1"):
        engine.start(
            definition_from_dict({"steps": [cap("a"), cap("b")]}),
            run_id="r",
            originator="o",
            now=0,
            max_steps=1,
        )


def test_a_state_survives_serialization_between_calls() -> None:
    """The driver stores the run as bytes; a reloaded state continues where it stopped."""
    d = Driver({"steps": [cap("a"), cap("b", depends_on="a", input="${steps.a.output}")]})
    d.complete("a", {"x": 1})
    reloaded = pb.WorkflowRun.FromString(d.run.SerializeToString())
    _, actions = engine.on_step_finished(reloaded, "a", 1, Completed({"x": 1}), now=1.0)
    assert actions == []  # a completed step is not redone
    run, actions = engine.on_step_finished(reloaded, "b", 1, Completed(2), now=1.0)
    assert run.state == R.WORKFLOW_RUN_STATE_COMPLETED
