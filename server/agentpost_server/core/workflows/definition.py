"""Checking a WorkflowDefinition before anything runs, and the graph facts the engine needs.

`validate()` raises `InvalidWorkflowError` (INVALID_ARGUMENT) with one precise sentence for the
first problem found, in this order: the run id, the step count, each step's own fields, duplicate
ids, unknown ids (depends_on, fallback, outputs), fallback rules, cycles, then every reference (in
inputs and conditions) and condition syntax. More steps than the limit is also an
InvalidWorkflowError (the issue asks for INVALID_ARGUMENT), with `metadata` {"limit":
"max_workflow_steps", "max": N} like a LimitExceededError would carry.

Fallbacks: step P with `on_failure: FALLBACK` and `fallback: F` makes F a fallback step. F runs
only when P fails for good; it has no depends_on of its own and sees what P sees plus P itself
(`${steps.P.error}`); nothing depends on F (depend on P: when F completes, P's dependents run with
F's output as P's output); F serves one primary and has no fallback of its own; F is not a leaf
and may not be named in `outputs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agentpost.errors import AgentpostError, InvalidWorkflowError
from agentpost.payload import from_value
from agentpost.v1 import workflows_pb2
from agentpost_server.core.names import check_agent_id, check_capabilities
from agentpost_server.core.workflows.conditions import ConditionError, parse_condition
from agentpost_server.core.workflows.refs import Ref, RefError, find_refs

__all__ = ["DEFAULT_MAX_STEPS", "STEP_ID_RULE", "Plan", "plan_of", "validate"]

DEFAULT_MAX_STEPS = 500
MAX_TITLE = 200
STEP_ID_RULE = "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter"
_STEP_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_FALLBACK = workflows_pb2.FAILURE_POLICY_FALLBACK

Step = workflows_pb2.WorkflowStep


@dataclass(frozen=True, slots=True)
class Plan:
    """The graph of a valid definition: steps by id, dependencies both ways, fallbacks."""

    steps: Mapping[str, Step]
    order: tuple[str, ...]  # definition order
    deps: Mapping[str, tuple[str, ...]]
    dependents: Mapping[str, tuple[str, ...]]
    fallback_of: Mapping[str, str]  # fallback step id -> its primary
    outputs: tuple[str, ...]  # named, or every leaf


def plan_of(definition: workflows_pb2.WorkflowDefinition) -> Plan:
    """The plan of a definition that passed `validate` (cheap: no checks)."""
    steps = {step.id: step for step in definition.steps}
    order = tuple(steps)
    deps = {sid: tuple(dict.fromkeys(step.depends_on)) for sid, step in steps.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in order}
    for sid in order:
        for dep in deps[sid]:
            dependents[dep].append(sid)
    fallback_of = {
        step.fallback: sid for sid, step in steps.items() if step.on_failure == _FALLBACK
    }
    outputs = tuple(definition.outputs) or tuple(
        sid for sid in order if not dependents[sid] and sid not in fallback_of
    )
    return Plan(
        steps=steps,
        order=order,
        deps=deps,
        dependents={sid: tuple(found) for sid, found in dependents.items()},
        fallback_of=fallback_of,
        outputs=outputs,
    )


def validate(
    definition: workflows_pb2.WorkflowDefinition, *, max_steps: int = DEFAULT_MAX_STEPS
) -> Plan:
    """Check everything; return the plan. Raises InvalidWorkflowError."""
    if definition.run_id:
        _checked(check_agent_id, definition.run_id, "run_id")
    count = len(definition.steps)
    if count == 0:
        raise InvalidWorkflowError("the workflow has no steps")
    if count > max_steps:
        raise InvalidWorkflowError(
            f"the workflow has {count} steps; the limit is {max_steps}",
            metadata={"limit": "max_workflow_steps", "max": str(max_steps)},
        )
    _check_options(definition.options)
    seen: dict[str, int] = {}
    for index, step in enumerate(definition.steps, 1):
        _check_step(step, index)
        if step.id in seen:
            raise InvalidWorkflowError(
                f"duplicate step id {step.id!r} (steps {seen[step.id]} and {index})"
            )
        seen[step.id] = index
    _check_names(definition, seen)
    plan = plan_of(definition)
    _check_fallbacks(plan)
    _check_cycles(plan)
    upstream = _upstream(plan)
    for sid in plan.order:
        _check_refs(plan.steps[sid], plan, upstream[sid])
    for name in plan.outputs:
        if name in plan.fallback_of:
            raise InvalidWorkflowError(
                f"outputs names fallback step {name!r}; name its primary"
                f" {plan.fallback_of[name]!r} instead"
            )
    return plan


def _checked(check: Callable[[str, str], object], value: str, field: str) -> None:
    try:
        check(value, field)
    except AgentpostError as exc:
        raise InvalidWorkflowError(exc.message, metadata={"field": field}) from None


def _check_options(options: workflows_pb2.WorkflowOptions) -> None:
    if options.max_parallel < 0:
        raise InvalidWorkflowError(f"options.max_parallel is {options.max_parallel}; use 0 or more")
    _check_duration(options.timeout, "options.timeout")
    _check_duration(options.default_step_timeout, "options.default_step_timeout")
    _check_retry(options.default_retry, "options.default_retry", capability=True)


def _check_step(step: Step, index: int) -> None:
    if not step.id:
        raise InvalidWorkflowError(f"step {index} has no id")
    if not _STEP_ID.fullmatch(step.id):
        raise InvalidWorkflowError(f"step id {step.id!r} is not valid: use {STEP_ID_RULE}")
    where = f"step {step.id!r}"
    target = step.WhichOneof("target")
    if target is None or not getattr(step, target):
        raise InvalidWorkflowError(f"{where} has no target: set agent_id or capability")
    if target == "agent_id":
        _checked(check_agent_id, step.agent_id, f"{where}: agent_id")
    else:
        try:
            check_capabilities([step.capability])
        except AgentpostError as exc:
            raise InvalidWorkflowError(f"{where}: {exc.message}") from None
    if len(step.title) > MAX_TITLE:
        raise InvalidWorkflowError(
            f"{where}: title is {len(step.title)} characters; at most {MAX_TITLE}"
        )
    if step.id in step.depends_on:
        raise InvalidWorkflowError(f"{where} depends on itself")
    _check_duration(step.timeout, f"{where}: timeout")
    _check_retry(step.retry, f"{where}: retry", capability=target == "capability")
    if step.on_failure == _FALLBACK and not step.fallback:
        raise InvalidWorkflowError(f"{where} has on_failure FALLBACK but names no fallback step")
    if step.fallback and step.on_failure != _FALLBACK:
        raise InvalidWorkflowError(
            f"{where} names fallback {step.fallback!r} but on_failure is not FALLBACK"
        )
    if step.fallback == step.id:
        raise InvalidWorkflowError(f"{where} names itself as its fallback")


def _check_duration(value: Any, where: str) -> None:
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidWorkflowError(f"{where} is negative")


def _check_retry(retry: workflows_pb2.RetryPolicy, where: str, *, capability: bool) -> None:
    if retry.max_attempts < 0:
        raise InvalidWorkflowError(f"{where}.max_attempts is {retry.max_attempts}; use 0 or more")
    if retry.backoff_multiplier and retry.backoff_multiplier < 1:
        raise InvalidWorkflowError(
            f"{where}.backoff_multiplier is {retry.backoff_multiplier:g}; use 1 or more"
        )
    _check_duration(retry.initial_backoff, f"{where}.initial_backoff")
    _check_duration(retry.max_backoff, f"{where}.max_backoff")
    if retry.other_agent and not capability:
        raise InvalidWorkflowError(
            f"{where}.other_agent needs a capability target (there is no other agent to try)"
        )


def _check_names(definition: workflows_pb2.WorkflowDefinition, known: Mapping[str, int]) -> None:
    for step in definition.steps:
        for dep in step.depends_on:
            if dep not in known:
                raise InvalidWorkflowError(f"step {step.id!r} depends on unknown step {dep!r}")
        if step.fallback and step.fallback not in known:
            raise InvalidWorkflowError(
                f"step {step.id!r} names unknown fallback step {step.fallback!r}"
            )
    for name in definition.outputs:
        if name not in known:
            raise InvalidWorkflowError(f"outputs names unknown step {name!r}")


def _check_fallbacks(plan: Plan) -> None:
    primaries: dict[str, str] = {}
    for sid in plan.order:
        fallback = plan.steps[sid].fallback
        if not fallback:
            continue
        if fallback in primaries:
            raise InvalidWorkflowError(
                f"step {fallback!r} is the fallback of both {primaries[fallback]!r} and {sid!r};"
                " a fallback step serves one primary"
            )
        primaries[fallback] = sid
    for fallback, primary in primaries.items():
        step = plan.steps[fallback]
        if step.depends_on:
            raise InvalidWorkflowError(
                f"fallback step {fallback!r} must not have depends_on: it runs after"
                f" {primary!r} fails and sees what {primary!r} sees"
            )
        if step.fallback:
            raise InvalidWorkflowError(
                f"fallback step {fallback!r} cannot have a fallback of its own"
            )
        if plan.dependents[fallback]:
            raise InvalidWorkflowError(
                f"step {plan.dependents[fallback][0]!r} depends on fallback step {fallback!r};"
                f" depend on its primary {primary!r} instead"
            )


def _check_cycles(plan: Plan) -> None:
    """Depth-first over depends_on, in definition order; names the first cycle found."""
    done: set[str] = set()
    for root in plan.order:
        if root in done:
            continue
        path = [root]
        stack = [iter(plan.deps[root])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path.pop())
            elif nxt in path:
                cycle = [*path[path.index(nxt) :], nxt]
                raise InvalidWorkflowError(
                    f"cycle: {' -> '.join(cycle)} (each step depends on the next)"
                )
            elif nxt not in done:
                path.append(nxt)
                stack.append(iter(plan.deps[nxt]))


def _upstream(plan: Plan) -> dict[str, frozenset[str]]:
    """Every step's transitive dependencies (for a fallback: its primary's, plus the primary).
    Iterative, in dependency order (the graph has no cycle by now)."""

    def direct(sid: str) -> tuple[str, ...]:
        primary = plan.fallback_of.get(sid)
        return (primary,) if primary else plan.deps[sid]

    waiting = {sid: len(direct(sid)) for sid in plan.order}
    after: dict[str, list[str]] = {sid: [] for sid in plan.order}
    for sid in plan.order:
        for dep in direct(sid):
            after[dep].append(sid)
    ready = [sid for sid in plan.order if waiting[sid] == 0]
    result: dict[str, frozenset[str]] = {}
    while ready:
        sid = ready.pop()
        deps = direct(sid)
        result[sid] = frozenset(deps).union(*(result[dep] for dep in deps))
        for nxt in after[sid]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    return result


def _check_refs(step: Step, plan: Plan, upstream: frozenset[str]) -> None:
    where = f"step {step.id!r}"
    refs: list[tuple[str, Ref]] = []
    if step.HasField("input"):
        try:
            refs.extend(find_refs(from_value(step.input)))
        except RefError as exc:
            raise InvalidWorkflowError(f"{where}: {exc}") from None
    if step.condition:
        try:
            refs.extend(("condition", ref) for ref in parse_condition(step.condition).refs)
        except ConditionError as exc:
            raise InvalidWorkflowError(f"{where}: condition: {exc}") from None
    for at, ref in refs:
        if not ref.step or ref.step in upstream:
            continue
        if ref.step not in plan.steps:
            raise InvalidWorkflowError(
                f"{where}: {at} refers to unknown step {ref.step!r} ({ref.text})"
            )
        raise InvalidWorkflowError(
            f"{where}: {at} refers to step {ref.step!r} ({ref.text}), which is not upstream"
            f" of {step.id!r}; add it to depends_on"
        )
