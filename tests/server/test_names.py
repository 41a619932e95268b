import pytest

from agentpost.errors import InvalidAgentIdError, InvalidArgumentError, InvalidTopicError
from agentpost_server.core import names


@pytest.mark.parametrize("value", ["a", "planner", "agent-1", "team.a:coder_2", "A" * 128])
def test_valid_agent_ids(value: str) -> None:
    assert names.check_agent_id(value) == value


@pytest.mark.parametrize("value", ["", "-lead", ".x", "a b", "ä", "a/b", "A" * 129, "x\n"])
def test_invalid_agent_ids_name_the_rule(value: str) -> None:
    with pytest.raises(InvalidAgentIdError, match="1-128 characters"):
        names.check_agent_id(value)


@pytest.mark.parametrize("value", ["builds", "builds.done", "a.b-c.d_e", "x" * 255])
def test_valid_topics(value: str) -> None:
    assert names.check_topic(value) == value


@pytest.mark.parametrize("value", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "x" * 256, "a/b"])
def test_invalid_topics(value: str) -> None:
    with pytest.raises(InvalidTopicError):
        names.check_topic(value)


def test_system_topics_are_reserved_for_the_server() -> None:
    with pytest.raises(InvalidTopicError, match="reserved"):
        names.check_topic("_agentpost.agents.online")
    assert names.check_pattern("_agentpost.agents.*")


@pytest.mark.parametrize("value", ["a.*", "a.>", "*", ">", "*.b.>", "a.b"])
def test_valid_patterns(value: str) -> None:
    assert names.check_pattern(value) == value


@pytest.mark.parametrize("value", ["a.>.b", "a*", "a.**", ""])
def test_invalid_patterns(value: str) -> None:
    with pytest.raises(InvalidTopicError):
        names.check_pattern(value)


def test_capabilities_are_checked_and_deduplicated() -> None:
    assert names.check_capabilities(["code", "code", "review"]) == ["code", "review"]
    with pytest.raises(InvalidArgumentError, match="capability"):
        names.check_capabilities(["no spaces"])
    with pytest.raises(InvalidArgumentError, match="too many"):
        names.check_capabilities([f"c{i}" for i in range(65)])
