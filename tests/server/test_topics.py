import pytest

from agentpost_server.core.topics import TopicIndex, pattern_matches


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "x.b", True),
        (">", "anything.at.all", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_pattern_matching(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_matches(pattern.split("."), topic.split(".")) is expected


def test_overlapping_patterns_match_a_subscriber_once() -> None:
    index: TopicIndex[str] = TopicIndex()
    for pattern in ("builds.done", "builds.*", "builds.>", ">"):
        index.add("s1", pattern)
    index.add("s2", "other.*")
    assert index.match("builds.done") == {"s1"}


def test_remove_stops_matching() -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add("s1", "a.*")
    index.add("s1", "a.b")
    index.remove("s1", "a.*")
    assert index.match("a.c") == set()
    assert index.match("a.b") == {"s1"}
    index.remove("s1", "a.b")
    assert index.match("a.b") == set()
