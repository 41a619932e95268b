from typing import Any

import pytest

from agentpost_server.core.workflows.conditions import ConditionError, parse_condition
from agentpost_server.core.workflows.refs import RefError, Scope, find_refs, resolve

OUTPUTS: dict[str, Any] = {
    "plan": {"files": ["a.py", "b.py"], "count": 2, "meta": {"ok": True}, "none": None},
    "skipped": None,
    "review": {"approved": True, "score": 7.5, "who": "ann"},
}
ERRORS = {"broken": "it broke"}


def scope() -> Scope:
    def output(step: str) -> Any:
        if step == "broken":
            return None
        return OUTPUTS[step]

    def error(step: str) -> str | None:
        if step not in OUTPUTS and step not in ERRORS:
            raise KeyError(step)
        return ERRORS.get(step)

    return Scope(input={"repo": "agentpost", "n": 3}, output=output, error=error)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${steps.plan.output.files}", ["a.py", "b.py"]),
        ("${steps.plan.output}", OUTPUTS["plan"]),
        ("${steps.plan.output.files.1}", "b.py"),
        ("${steps.plan.output.count}", 2),
        ("${steps.plan.output.meta.ok}", True),
        ("${ steps.plan.output.count }", 2),
        ("${input}", {"repo": "agentpost", "n": 3}),
        ("${input.repo}", "agentpost"),
        ("${steps.skipped.output}", None),
        ("${steps.broken.error}", "it broke"),
        ("${steps.plan.error}", None),
        ("files: ${steps.plan.output.files}", 'files: ["a.py","b.py"]'),
        ("${input.repo}/${input.n}", "agentpost/3"),
        ("n=${steps.skipped.output}", "n=null"),
        ("literal $${input.repo} and ${input.n}", "literal ${input.repo} and 3"),
        ("$${input.repo}", "${input.repo}"),
        ("no refs at all, $5", "no refs at all, $5"),
        (
            {"files": "${steps.plan.output.files}", "list": ["${input.n}", 1, None]},
            {"files": ["a.py", "b.py"], "list": [3, 1, None]},
        ),
        ({"${input.repo}": "keys stay"}, {"${input.repo}": "keys stay"}),
        (42, 42),
    ],
)
def test_resolve(template: Any, expected: Any) -> None:
    assert resolve(template, scope()) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "${steps.plan.output.missing}",
            "${steps.plan.output.missing}: the output of step 'plan' has no key 'missing'"
            " at the top",
        ),
        (
            "${steps.plan.output.files.5}",
            "${steps.plan.output.files.5}: the output of step 'plan' has a list of 2 at files,"
            " no item '5'",
        ),
        (
            "${steps.plan.output.count.x}",
            "${steps.plan.output.count.x}: the output of step 'plan' is int at count, not an"
            " object or a list",
        ),
        (
            "x ${steps.skipped.output.a}",
            "${steps.skipped.output.a}: the output of step 'skipped' is null at the top, not an"
            " object or a list",
        ),
        ("${input.nope}", "${input.nope}: the run's input has no key 'nope' at the top"),
        ("${steps.other.output}", "${steps.other.output}: step 'other' is not upstream"),
    ],
)
def test_missing_paths_name_the_reference(template: str, message: str) -> None:
    with pytest.raises(RefError) as caught:
        resolve(template, scope())
    assert str(caught.value) == message


def test_find_refs_reports_where_each_reference_is() -> None:
    found = list(find_refs({"a": ["x ${input.q}", {"b": "${steps.s.output.k}"}]}))
    assert [(at, ref.step, ref.field, ref.path) for at, ref in found] == [
        ("input.a.0", "", "", ("q",)),
        ("input.a.1.b", "s", "output", ("k",)),
    ]


@pytest.mark.parametrize(
    "text", ["${}", "${steps}", "${steps.a}", "${steps.a.outputs}", "${steps.a.error.x}", "${x}"]
)
def test_malformed_references(text: str) -> None:
    with pytest.raises(RefError, match="malformed reference"):
        list(find_refs(text))


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("${steps.review.output.approved} == true", True),
        ("${steps.review.output.approved} != true", False),
        ("${steps.review.output.approved}", True),
        ("not ${steps.review.output.approved}", False),
        ("${steps.review.output.score} >= 7", True),
        ("${steps.review.output.score} < 7.5", False),
        ("${steps.review.output.who} == 'ann'", True),
        ('${steps.review.output.who} == "bob"', False),
        ('${steps.review.output.who} > "al"', True),
        ("${steps.plan.output.count} == 2.0", True),
        ("${steps.plan.output.meta.ok} == 1", False),  # a bool never equals a number
        ("${steps.plan.output.none} == null", True),
        ("exists(${steps.plan.output.files})", True),
        ("exists(${steps.plan.output.none})", False),
        ("exists(${steps.plan.output.nothing})", False),
        ("exists(${steps.skipped.output.x})", False),
        ("exists(${steps.plan.output.files}) and ${input.n} > 5", False),
        ("${input.n} > 5 or ${input.repo} == 'agentpost'", True),
        ("not (${input.n} > 5 or false)", True),
        ("true and not false and (null or 1)", True),
        ("${steps.plan.output.files}", True),
        ("${steps.skipped.output}", False),
        ("0", False),
        ("''", False),
        ("-1 < 0", True),
    ],
)
def test_conditions(condition: str, expected: bool) -> None:
    assert parse_condition(condition).holds(scope()) is expected


def test_and_binds_tighter_than_or() -> None:
    assert parse_condition("true or false and false").holds(scope()) is True
    assert parse_condition("(true or false) and false").holds(scope()) is False


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("", "'' ends early: an operand is missing"),
        ("1 ==", "'1 ==' ends early: an operand is missing"),
        ("a == 1", "expected an operand at position 1, got 'a'"),
        ("1 == 1 1", "unexpected '1' at position 8"),
        ("(true", "'(true' ends early: an operand is missing"),
        ("exists(1)", "exists() takes a reference, at position 8"),
        ("1 & 2", "unexpected '& 2' at position 3"),
        ("__import__('os')", "expected an operand at position 1, got '__import__'"),
        (
            "${steps.a}",
            "malformed reference ${steps.a}: use ${input}, ${input.PATH},"
            " ${steps.ID.output}, ${steps.ID.output.PATH} or ${steps.ID.error}",
        ),
    ],
)
def test_malformed_conditions(condition: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition(condition)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("${input.repo} < 3", 'cannot order "agentpost" and 3 with <'),
        (
            "${input.missing} == 1",
            "${input.missing}: the run's input has no key 'missing' at the top",
        ),
    ],
)
def test_evaluation_errors(condition: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition(condition).holds(scope())
    assert str(caught.value) == message


def test_a_condition_lists_its_references() -> None:
    condition = parse_condition("exists(${steps.a.output.x}) and ${steps.b.error} == null")
    assert [ref.step for ref in condition.refs] == ["a", "b"]
