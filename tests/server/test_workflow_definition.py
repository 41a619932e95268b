from typing import Any

import pytest

from agentpost.errors import InvalidWorkflowError
from agentpost.v1 import workflows_pb2
from agentpost.workflow import definition_from_dict
from agentpost_server.core.workflows.definition import validate


def steps(*bodies: dict[str, Any], **top: Any) -> workflows_pb2.WorkflowDefinition:
    """A definition whose steps default to capability "code"."""
    return definition_from_dict(
        {"steps": [{"capability": "code", **body} for body in bodies], **top}
    )


def fails(definition: workflows_pb2.WorkflowDefinition, message: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidWorkflowError) as caught:
        validate(definition, **kwargs)
    assert caught.value.message == message


def test_a_valid_definition_gives_its_plan() -> None:
    plan = validate(
        steps(
            {"id": "plan"},
            {"id": "b", "depends_on": ["plan"], "input": "${steps.plan.output.files}"},
            {"id": "c", "depends_on": ["plan"], "on_failure": "fallback", "fallback": "c2"},
            {"id": "c2", "input": {"why": "${steps.c.error}", "f": "${steps.plan.output}"}},
            {"id": "d", "depends_on": ["b", "c"], "condition": "exists(${steps.plan.output.x})"},
        )
    )
    assert plan.order == ("plan", "b", "c", "c2", "d")
    assert plan.deps["d"] == ("b", "c")
    assert plan.dependents["plan"] == ("b", "c")
    assert plan.fallback_of == {"c2": "c"}
    assert plan.outputs == ("d",)


def test_outputs_default_to_the_leaves_and_can_be_named() -> None:
    definition = steps({"id": "a"}, {"id": "b", "depends_on": ["a"]}, {"id": "c"})
    assert validate(definition).outputs == ("b", "c")
    definition.outputs.append("a")
    assert validate(definition).outputs == ("a",)


def test_no_steps() -> None:
    fails(workflows_pb2.WorkflowDefinition(), "the workflow has no steps")


def test_more_steps_than_the_limit() -> None:
    definition = steps(*({"id": f"s{i}"} for i in range(4)))
    validate(definition, max_steps=4)
    with pytest.raises(InvalidWorkflowError) as caught:
        validate(definition, max_steps=3)
    assert caught.value.message == "the workflow has 4 steps; the limit is 3"
    assert caught.value.metadata == {"limit": "max_workflow_steps", "max": "3"}


def test_the_default_limit_is_500_and_a_long_chain_is_fine() -> None:
    chain = [{"id": "s0"}] + [{"id": f"s{i}", "depends_on": [f"s{i - 1}"]} for i in range(1, 500)]
    chain[-1]["input"] = "${steps.s0.output}"
    validate(steps(*chain))
    fails(steps(*chain, {"id": "one_more"}), "the workflow has 501 steps; the limit is 500")


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        (
            steps({"id": "a"}, run_id="bad id"),
            "run_id 'bad id' is not valid: use 1-128 characters of A-Z a-z 0-9 . _ : -,"
            " starting with a letter or digit",
        ),
        (steps({"id": "a"}, {"id": ""}), "step 2 has no id"),
        (
            steps({"id": "a.b"}),
            "step id 'a.b' is not valid: use 1-64 characters of A-Z a-z 0-9 _ -,"
            " starting with a letter",
        ),
        (
            steps({"id": "1a"}),
            "step id '1a' is not valid: use 1-64 characters of A-Z a-z 0-9 _ -,"
            " starting with a letter",
        ),
        (
            definition_from_dict({"steps": [{"id": "a"}]}),
            "step 'a' has no target: set agent_id or capability",
        ),
        (
            definition_from_dict({"steps": [{"id": "a", "capability": ""}]}),
            "step 'a' has no target: set agent_id or capability",
        ),
        (
            definition_from_dict({"steps": [{"id": "a", "agent_id": "no way"}]}),
            "step 'a': agent_id 'no way' is not valid: use 1-128 characters of"
            " A-Z a-z 0-9 . _ : -, starting with a letter or digit",
        ),
        (
            definition_from_dict({"steps": [{"id": "a", "capability": "two words"}]}),
            "step 'a': capability 'two words' is not valid: use 1-64 characters of"
            " A-Z a-z 0-9 . _ : -, starting with a letter or digit",
        ),
        (steps({"id": "a", "title": "t" * 201}), "step 'a': title is 201 characters; at most 200"),
        (steps({"id": "a", "depends_on": ["a"]}), "step 'a' depends on itself"),
        (
            steps({"id": "a"}, {"id": "a"}, {"id": "b"}),
            "duplicate step id 'a' (steps 1 and 2)",
        ),
        (steps({"id": "a", "depends_on": ["x"]}), "step 'a' depends on unknown step 'x'"),
        (
            steps({"id": "a", "on_failure": "fallback", "fallback": "x"}),
            "step 'a' names unknown fallback step 'x'",
        ),
        (steps({"id": "a"}, outputs=["x"]), "outputs names unknown step 'x'"),
        (
            steps({"id": "a", "on_failure": "fallback"}),
            "step 'a' has on_failure FALLBACK but names no fallback step",
        ),
        (
            steps({"id": "a", "fallback": "b"}, {"id": "b"}),
            "step 'a' names fallback 'b' but on_failure is not FALLBACK",
        ),
        (
            steps({"id": "a", "on_failure": "fallback", "fallback": "a"}),
            "step 'a' names itself as its fallback",
        ),
        (
            steps(
                {"id": "a", "on_failure": "fallback", "fallback": "f"},
                {"id": "b", "on_failure": "fallback", "fallback": "f"},
                {"id": "f"},
            ),
            "step 'f' is the fallback of both 'a' and 'b'; a fallback step serves one primary",
        ),
        (
            steps(
                {"id": "a", "on_failure": "fallback", "fallback": "f"},
                {"id": "f", "depends_on": ["a"]},
            ),
            "fallback step 'f' must not have depends_on: it runs after 'a' fails"
            " and sees what 'a' sees",
        ),
        (
            steps(
                {"id": "a", "on_failure": "fallback", "fallback": "f"},
                {"id": "f", "on_failure": "fallback", "fallback": "g"},
                {"id": "g"},
            ),
            "fallback step 'f' cannot have a fallback of its own",
        ),
        (
            steps(
                {"id": "a", "on_failure": "fallback", "fallback": "f"},
                {"id": "f"},
                {"id": "c", "depends_on": ["f"]},
            ),
            "step 'c' depends on fallback step 'f'; depend on its primary 'a' instead",
        ),
        (
            steps(
                {"id": "a", "on_failure": "fallback", "fallback": "f"}, {"id": "f"}, outputs=["f"]
            ),
            "outputs names fallback step 'f'; name its primary 'a' instead",
        ),
        (
            steps({"id": "a", "depends_on": ["b"]}, {"id": "b", "depends_on": ["a"]}),
            "cycle: a -> b -> a (each step depends on the next)",
        ),
        (
            steps(
                {"id": "start"},
                {"id": "a", "depends_on": ["start", "c"]},
                {"id": "b", "depends_on": ["a"]},
                {"id": "c", "depends_on": ["b"]},
            ),
            "cycle: a -> c -> b -> a (each step depends on the next)",
        ),
        (
            steps({"id": "a"}, {"id": "b", "input": {"x": ["${steps.a.output}"]}}),
            "step 'b': input.x.0 refers to step 'a' (${steps.a.output}), which is not upstream"
            " of 'b'; add it to depends_on",
        ),
        (
            steps(
                {"id": "a"},
                {"id": "b", "depends_on": ["a"]},
                {"id": "c", "depends_on": ["a"], "input": "${steps.b.output}"},
            ),
            "step 'c': input refers to step 'b' (${steps.b.output}), which is not upstream"
            " of 'c'; add it to depends_on",
        ),
        (
            steps({"id": "a", "input": "${steps.ghost.output}"}),
            "step 'a': input refers to unknown step 'ghost' (${steps.ghost.output})",
        ),
        (
            steps({"id": "a"}, {"id": "b", "condition": "${steps.a.output.ok} == true"}),
            "step 'b': condition refers to step 'a' (${steps.a.output.ok}), which is not"
            " upstream of 'b'; add it to depends_on",
        ),
        (
            steps({"id": "a", "input": {"k": "see ${steps.a}"}}),
            "step 'a': input.k: malformed reference ${steps.a}: use ${input}, ${input.PATH},"
            " ${steps.ID.output}, ${steps.ID.output.PATH} or ${steps.ID.error}",
        ),
        (
            steps({"id": "a", "input": "${input.x"}),
            "step 'a': input: malformed reference '${input.x': '${' without a closing '}'",
        ),
        (
            steps({"id": "a", "condition": "${input.x} =="}),
            "step 'a': condition: '${input.x} ==' ends early: an operand is missing",
        ),
        (
            steps({"id": "a", "condition": "${input.x} = 1"}),
            "step 'a': condition: unexpected '= 1' at position 12",
        ),
        (
            definition_from_dict(
                {"steps": [{"id": "a", "agent_id": "x", "retry": {"other_agent": True}}]}
            ),
            "step 'a': retry.other_agent needs a capability target (there is no other agent"
            " to try)",
        ),
        (
            steps({"id": "a", "retry": {"max_attempts": -1}}),
            "step 'a': retry.max_attempts is -1; use 0 or more",
        ),
        (
            steps({"id": "a", "retry": {"multiplier": 0.5}}),
            "step 'a': retry.backoff_multiplier is 0.5; use 1 or more",
        ),
        (
            steps({"id": "a"}, options={"max_parallel": -2}),
            "options.max_parallel is -2; use 0 or more",
        ),
    ],
)
def test_each_invalid_definition_has_a_precise_message(
    definition: workflows_pb2.WorkflowDefinition, message: str
) -> None:
    fails(definition, message)


def test_negative_durations() -> None:
    definition = steps({"id": "a"})
    definition.steps[0].timeout.FromSeconds(-1)
    fails(definition, "step 'a': timeout is negative")


def test_references_may_reach_any_upstream_step_and_the_input() -> None:
    validate(
        steps(
            {"id": "a"},
            {"id": "b", "depends_on": ["a"]},
            {"id": "c", "depends_on": ["b"], "input": "${steps.a.output} ${input.q} $${steps.z}"},
            {"id": "d", "depends_on": ["c"], "condition": "${steps.a.error} == null"},
        )
    )
