from agentpost_server.core.ids import UlidFactory


def test_ulids_are_unique_sortable_and_26_chars() -> None:
    factory = UlidFactory()
    ids = [factory.new() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


def test_ulids_sort_by_time_across_milliseconds() -> None:
    factory = UlidFactory()
    early = factory.new(now_ms=1_000)
    late = factory.new(now_ms=2_000)
    assert early < late
