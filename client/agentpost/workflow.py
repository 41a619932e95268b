"""Workflow definitions from plain data, JSON files or YAML files (YAML needs PyYAML:
`pip install 'agentpost[cli]'`).

    run_id: release-42            # optional; starting the same id again attaches to the run
    name: release                 # optional, for people
    input: {repo: agentpost}      # the run's input: ${input.repo}
    outputs: [report]             # optional; default: every leaf step
    options:
      max_parallel: 4             # 0: no limit
      timeout: 30m                # the whole run
      default_step_timeout: 5m
      default_retry: {max_attempts: 3}
    steps:
      - id: plan
        capability: planning      # or agent_id: planner (alias: agent)
        title: Plan the change
        description: What to do, for a person or a model
        input: {repo: "${input.repo}"}
      - id: build
        capability: code
        depends_on: [plan]        # or a single id
        input: {files: "${steps.plan.output.files}"}
        timeout: 10m
        retry: {max_attempts: 3, backoff: 1s, multiplier: 2, max_backoff: 30s, other_agent: true}
        on_failure: fallback      # fail_run (default) | continue | fallback
        fallback: build_by_hand
        condition: "${steps.plan.output.needs_build} == true"
        priority: 1

`steps` may also be a mapping from step id to step. Durations are a number of seconds or text
such as "250ms", "30s", "5m", "1h30m", "2d". Unknown keys are errors (a typo must not silently
change the meaning). Every problem raises `InvalidWorkflowError` naming the key; the server
checks the graph itself (cycles, references) when the run starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from agentpost.errors import AgentpostError, InvalidWorkflowError
from agentpost.payload import fill_payload
from agentpost.v1 import payload_pb2, workflows_pb2

__all__ = ["definition_from_dict", "load_definition", "parse_duration"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_POLICIES = {
    "fail_run": workflows_pb2.FAILURE_POLICY_FAIL_RUN,
    "continue": workflows_pb2.FAILURE_POLICY_CONTINUE,
    "fallback": workflows_pb2.FAILURE_POLICY_FALLBACK,
}
_TOP_KEYS = {"run_id", "name", "input", "outputs", "options", "steps"}
_OPTION_KEYS = {"max_parallel", "timeout", "default_step_timeout", "default_retry"}
_RETRY_KEYS = {"max_attempts", "backoff", "multiplier", "max_backoff", "other_agent"}
_STEP_KEYS = {
    "id", "agent_id", "agent", "capability", "title", "description", "input", "depends_on",
    "timeout", "retry", "on_failure", "fallback", "condition", "priority",
}  # fmt: skip


def load_definition(path: str | os.PathLike[str]) -> workflows_pb2.WorkflowDefinition:
    """Read a `.json`, `.yaml` or `.yml` file (anything else: JSON, then YAML)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidWorkflowError(f"cannot read {file}: {exc.strerror or exc}") from None
    suffix = file.suffix.lower()
    if suffix == ".json":
        data = _from_json(text, file)
    elif suffix in (".yaml", ".yml"):
        data = _from_yaml(text, file)
    else:
        try:
            data = json.loads(text)
        except ValueError:
            data = _from_yaml(text, file)
    return definition_from_dict(data)


def definition_from_dict(data: Any) -> workflows_pb2.WorkflowDefinition:
    """Build the proto from plain data (the file format above)."""
    top = _mapping(data, "the workflow", _TOP_KEYS)
    definition = workflows_pb2.WorkflowDefinition(
        run_id=_str(top.get("run_id", ""), "run_id"), name=_str(top.get("name", ""), "name")
    )
    if "input" in top:
        definition.input.CopyFrom(_value(top["input"], "input"))
    definition.outputs.extend(_ids(top.get("outputs", []), "outputs"))
    if "options" in top:
        _fill_options(definition.options, _mapping(top["options"], "options", _OPTION_KEYS))
    steps = top.get("steps")
    if isinstance(steps, Mapping):
        steps = [
            {"id": key, **_mapping(body or {}, f"steps.{key}", _STEP_KEYS)}
            for key, body in steps.items()
        ]
    if not isinstance(steps, list) or not steps:
        raise InvalidWorkflowError("steps must be a non-empty list (or a mapping of id to step)")
    for index, step in enumerate(steps, 1):
        _fill_step(definition.steps.add(), step, index)
    return definition


def parse_duration(value: Any, where: str = "duration") -> float:
    """Seconds from a number or text such as "30s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise InvalidWorkflowError(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = list(_DURATION_PART.finditer(text))
        if "".join(part.group(0) for part in parts) != text:
            raise InvalidWorkflowError(
                f"{where}: {value!r} is not a duration; use seconds or text like 30s, 5m, 1h30m"
            )
        seconds = sum(float(part.group(1)) * _UNITS[part.group(2)] for part in parts)
    else:
        raise InvalidWorkflowError(f"{where}: {value!r} is not a duration")
    if seconds < 0:
        raise InvalidWorkflowError(f"{where}: {value!r} is negative")
    return seconds


def _fill_step(target: workflows_pb2.WorkflowStep, data: Any, index: int) -> None:
    where = f"step {index}"
    if isinstance(data, Mapping) and isinstance(data.get("id"), str):
        where = f"step {data['id']!r}"
    step = _mapping(data, where, _STEP_KEYS)
    target.id = _str(step.get("id", ""), f"{where}: id")
    agent = step.get("agent_id", step.get("agent"))
    if agent is not None and "capability" in step:
        raise InvalidWorkflowError(f"{where}: set agent_id or capability, not both")
    if agent is not None:
        target.agent_id = _str(agent, f"{where}: agent_id")
    elif "capability" in step:
        target.capability = _str(step["capability"], f"{where}: capability")
    target.title = _str(step.get("title", ""), f"{where}: title")
    target.description = _str(step.get("description", ""), f"{where}: description")
    if "input" in step:
        target.input.CopyFrom(_value(step["input"], f"{where}: input"))
    depends = step.get("depends_on", [])
    target.depends_on.extend(
        _ids([depends] if isinstance(depends, str) else depends, f"{where}: depends_on")
    )
    if "timeout" in step:
        _fill_duration(target.timeout, step["timeout"], f"{where}: timeout")
    if "retry" in step:
        _fill_retry(target.retry, step["retry"], f"{where}: retry")
    if "on_failure" in step:
        policy = _str(step["on_failure"], f"{where}: on_failure").lower()
        if policy not in _POLICIES:
            raise InvalidWorkflowError(
                f"{where}: on_failure {policy!r} is not one of {', '.join(_POLICIES)}"
            )
        target.on_failure = _POLICIES[policy]
    target.fallback = _str(step.get("fallback", ""), f"{where}: fallback")
    target.condition = _str(step.get("condition", ""), f"{where}: condition")
    target.priority = _int(step.get("priority", 0), f"{where}: priority")


def _fill_options(target: workflows_pb2.WorkflowOptions, options: Mapping[str, Any]) -> None:
    target.max_parallel = _int(options.get("max_parallel", 0), "options.max_parallel")
    if "timeout" in options:
        _fill_duration(target.timeout, options["timeout"], "options.timeout")
    if "default_step_timeout" in options:
        _fill_duration(
            target.default_step_timeout,
            options["default_step_timeout"],
            "options.default_step_timeout",
        )
    if "default_retry" in options:
        _fill_retry(target.default_retry, options["default_retry"], "options.default_retry")


def _fill_retry(target: workflows_pb2.RetryPolicy, data: Any, where: str) -> None:
    retry = _mapping(data, where, _RETRY_KEYS)
    target.max_attempts = _int(retry.get("max_attempts", 0), f"{where}.max_attempts")
    if "backoff" in retry:
        _fill_duration(target.initial_backoff, retry["backoff"], f"{where}.backoff")
    if "max_backoff" in retry:
        _fill_duration(target.max_backoff, retry["max_backoff"], f"{where}.max_backoff")
    multiplier = retry.get("multiplier", 0)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
        raise InvalidWorkflowError(f"{where}.multiplier: {multiplier!r} is not a number")
    target.backoff_multiplier = float(multiplier)
    other = retry.get("other_agent", False)
    if not isinstance(other, bool):
        raise InvalidWorkflowError(f"{where}.other_agent: {other!r} is not true or false")
    target.other_agent = other


def _fill_duration(target: duration_pb2.Duration, value: Any, where: str) -> None:
    target.FromNanoseconds(round(parse_duration(value, where) * 1e9))


def _value(value: Any, where: str) -> struct_pb2.Value:
    holder = payload_pb2.Payload()
    try:
        fill_payload(holder, value)
    except AgentpostError as exc:
        raise InvalidWorkflowError(f"{where}: {exc.message}") from None
    if holder.WhichOneof("body") != "json":
        raise InvalidWorkflowError(f"{where}: bytes are not allowed, use JSON values")
    return holder.json


def _mapping(data: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidWorkflowError(f"{where} must be a mapping, not {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise InvalidWorkflowError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
        )
    return data


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidWorkflowError(f"{where}: {value!r} is not a string")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidWorkflowError(f"{where}: {value!r} is not an integer")
    return value


def _ids(values: Any, where: str) -> list[str]:
    if not isinstance(values, list):
        raise InvalidWorkflowError(f"{where} must be a list of step ids")
    return [_str(value, where) for value in values]


def _from_json(text: str, file: Path) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidWorkflowError(f"{file} is not valid JSON: {exc}") from None


def _from_yaml(text: str, file: Path) -> Any:
    try:
        import yaml  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        raise InvalidWorkflowError(
            f"reading {file} needs PyYAML: pip install 'agentpost[cli]' (or use JSON)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidWorkflowError(f"{file} is not valid YAML: {exc}") from None
