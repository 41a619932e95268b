import json
from pathlib import Path
from typing import Any

import pytest

from agentpost.errors import InvalidWorkflowError
from agentpost.payload import from_value
from agentpost.v1 import workflows_pb2 as pb
from agentpost.workflow import definition_from_dict, load_definition, parse_duration

YAML = """\
run_id: release-42
name: release
input: {repo: agentpost}
outputs: [ship]
options:
  max_parallel: 4
  timeout: 1h30m
  default_step_timeout: 5m
  default_retry: {max_attempts: 2}
steps:
  - id: plan
    agent: planner
    title: Plan it
    input: {repo: "${input.repo}"}
  - id: build
    capability: code
    depends_on: plan
    input: {files: "${steps.plan.output.files}"}
    timeout: 250ms
    retry: {max_attempts: 3, backoff: 1s, multiplier: 2, max_backoff: 30s, other_agent: true}
    on_failure: fallback
    fallback: manual
    condition: "${steps.plan.output.go} == true"
    priority: 5
  - id: manual
    agent_id: lead
  - id: ship
    capability: deploy
    depends_on: [build]
    on_failure: continue
"""


def check_release(definition: pb.WorkflowDefinition) -> None:
    assert definition.run_id == "release-42"
    assert definition.name == "release"
    assert from_value(definition.input) == {"repo": "agentpost"}
    assert list(definition.outputs) == ["ship"]
    assert definition.options.max_parallel == 4
    assert definition.options.timeout.ToSeconds() == 5400
    assert definition.options.default_step_timeout.ToSeconds() == 300
    assert definition.options.default_retry.max_attempts == 2
    plan, build, manual, ship = definition.steps
    assert (plan.id, plan.agent_id, plan.title) == ("plan", "planner", "Plan it")
    assert from_value(plan.input) == {"repo": "${input.repo}"}
    assert build.capability == "code"
    assert list(build.depends_on) == ["plan"]
    assert build.timeout.ToMilliseconds() == 250
    assert build.retry == pb.RetryPolicy(
        max_attempts=3, backoff_multiplier=2, other_agent=True,
        initial_backoff={"seconds": 1}, max_backoff={"seconds": 30},
    )  # fmt: skip
    assert build.on_failure == pb.FAILURE_POLICY_FALLBACK
    assert build.fallback == "manual"
    assert build.condition == "${steps.plan.output.go} == true"
    assert build.priority == 5
    assert manual.agent_id == "lead"
    assert not manual.HasField("input")
    assert ship.on_failure == pb.FAILURE_POLICY_CONTINUE


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(YAML)
    check_release(load_definition(path))


def test_json_file_and_unknown_suffixes(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(YAML)
    (tmp_path / "release.json").write_text(json.dumps(data))
    check_release(load_definition(tmp_path / "release.json"))
    (tmp_path / "release.wf").write_text(YAML)
    check_release(load_definition(str(tmp_path / "release.wf")))


def test_steps_as_a_mapping() -> None:
    definition = definition_from_dict(
        {"steps": {"a": {"capability": "x"}, "b": {"capability": "x", "depends_on": ["a"]}}}
    )
    assert [(s.id, list(s.depends_on)) for s in definition.steps] == [("a", []), ("b", ["a"])]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1.5s", 1.5),
        (" 1m 30s ", 90.0),
        ("0s", 0.0),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "30", "5 minutes", "1x", "s", True, None, -1, "m5"])
def test_bad_durations(value: Any) -> None:
    with pytest.raises(InvalidWorkflowError, match=r"duration|negative"):
        parse_duration(value, "timeout")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "the workflow must be a mapping, not list"),
        (
            {"step": []},
            "the workflow: unknown key 'step' (known: input, name, options, outputs,"
            " run_id, steps)",
        ),
        ({"steps": []}, "steps must be a non-empty list (or a mapping of id to step)"),
        (
            {"steps": [{"id": "a", "dependson": "b"}]},
            "step 'a': unknown key 'dependson' (known:"
            " agent, agent_id, capability, condition, depends_on, description, fallback, id, input,"
            " on_failure, priority, retry, timeout, title)",
        ),
        (
            {"steps": [{"id": "a", "agent_id": "x", "capability": "y"}]},
            "step 'a': set agent_id or capability, not both",
        ),
        (
            {"steps": [{"id": "a", "on_failure": "ignore"}]},
            "step 'a': on_failure 'ignore' is not one of fail_run, continue, fallback",
        ),
        (
            {"steps": [{"id": "a", "timeout": "soon"}]},
            "step 'a': timeout: 'soon' is not a duration; use seconds or text like 30s, 5m, 1h30m",
        ),
        (
            {"steps": [{"id": "a", "priority": "high"}]},
            "step 'a': priority: 'high' is not an integer",
        ),
        ({"steps": [{"id": 7}]}, "step 1: id: 7 is not a string"),
        (
            {"steps": [{"id": "a", "retry": {"max_attempts": 2, "other": 1}}]},
            "step 'a': retry: unknown key 'other' (known: backoff, max_attempts, max_backoff,"
            " multiplier, other_agent)",
        ),
        (
            {"steps": [{"id": "a", "retry": {"other_agent": "yes"}}]},
            "step 'a': retry.other_agent: 'yes' is not true or false",
        ),
        (
            {"steps": [{"id": "a", "input": {"x": float("nan")}}]},
            "step 'a': input: payload: nan is not a JSON number",
        ),
        (
            {"steps": [{"id": "a", "input": b"raw"}]},
            "step 'a': input: bytes are not allowed, use JSON values",
        ),
        ({"outputs": "a", "steps": [{"id": "a"}]}, "outputs must be a list of step ids"),
    ],
)
def test_malformed_data_names_the_key(data: Any, message: str) -> None:
    with pytest.raises(InvalidWorkflowError) as caught:
        definition_from_dict(data)
    assert caught.value.message == message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidWorkflowError, match="cannot read"):
        load_definition(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidWorkflowError, match="is not valid JSON"):
        load_definition(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("steps: [")
    with pytest.raises(InvalidWorkflowError, match="is not valid YAML"):
        load_definition(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_examples_are_valid_workflows(path: Path) -> None:
    from agentpost_server.core.workflows.definition import validate

    plan = validate(load_definition(path))
    assert plan.order
