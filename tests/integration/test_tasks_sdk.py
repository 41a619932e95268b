"""Task handoffs through the SDK against a real server: handoff -> offer -> accept -> progress ->
complete with the originator's `result()` and `events()`; rejection; a question answered with
`provide_input`; cancellation reaching the assignee; task handlers; offers kept while the
assignee is away; offers and news never in `messages()`; the CLI's `handoff --wait`.
The wire-level view of the same is in test_tasks.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

import agentpost
from agentpost.v1 import envelope_pb2
from tests.helpers import assert_eventually
from tests.integration.test_cli import cli

pytestmark = pytest.mark.timeout(60)


async def _next_offer(agent: agentpost.Agent, timeout: float = 10) -> agentpost.Assignment:
    async with asyncio.timeout(timeout):
        return await anext(agent.tasks())


async def _events(handle: agentpost.TaskHandle) -> list[agentpost.TaskEvent]:
    return [event async for event in handle.events()]


async def test_handoff_accept_progress_complete(make_agent: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    handle = await planner.handoff(
        "coder",
        title="Fix the build",
        description="CI is red",
        input={"log": "error: x"},
        context={"branch": "main"},
        references={"conversation_id": "c-42"},
        priority=5,
    )
    assert len(handle.id) == 26 and not handle.duplicate
    watching = asyncio.create_task(_events(handle))
    offer = await _next_offer(coder)
    assert (offer.id, offer.title, offer.description) == (handle.id, "Fix the build", "CI is red")
    assert (offer.input, offer.context, offer.references) == (
        {"log": "error: x"},
        {"branch": "main"},
        {"conversation_id": "c-42"},
    )
    assert (offer.originator, offer.attempt, offer.priority) == ("planner", 1, 5)
    await offer.accept()
    await offer.progress("reading the log", percent=30)
    await offer.complete({"fixed": True})
    assert await handle.result(timeout=10) == {"fixed": True}
    events = await asyncio.wait_for(watching, 10)
    assert [(e.kind.value, e.state.value) for e in events] == [
        ("transition", "submitted"),
        ("transition", "offered"),
        ("transition", "working"),
        ("progress", "working"),
        ("transition", "completed"),
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert (events[3].message, events[3].percent, events[3].actor) == (
        "reading the log",
        30,
        "coder",
    )
    assert events[4].payload == {"fixed": True}
    info = await planner.get_task(handle.id, history=True)
    assert (info.state, info.assignee, info.result) == (
        agentpost.TaskState.COMPLETED,
        "coder",
        {"fixed": True},
    )
    assert len(info.history) == 5
    # A late second complete is refused.
    with pytest.raises(agentpost.TaskStateError):
        await offer.complete({"again": True})


async def test_a_rejected_task_fails_result_with_the_reason(make_agent: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    handle = await planner.handoff("coder", title="Not mine")
    offer = await _next_offer(coder)
    await offer.reject("wrong team")
    with pytest.raises(agentpost.TaskFailedError) as caught:
        await handle.result(timeout=10)
    assert caught.value.state is agentpost.TaskState.REJECTED
    assert "wrong team" in caught.value.reason
    assert caught.value.task_id == handle.id


async def test_a_question_is_answered_by_the_originator(make_agent: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    handle = await planner.handoff("coder", title="Deploy")

    async def answer() -> None:
        async for question in handle.questions():
            assert question.message == "Which environment?"
            assert question.payload == {"options": ["staging", "prod"]}
            await handle.provide_input("staging")

    answering = asyncio.create_task(answer())
    offer = await _next_offer(coder)
    await offer.accept()
    reply = await offer.ask("Which environment?", {"options": ["staging", "prod"]}, timeout=10)
    assert reply == "staging"
    assert offer.state is agentpost.TaskState.WORKING
    await offer.complete("deployed to staging")
    assert await handle.result(timeout=10) == "deployed to staging"
    await asyncio.wait_for(answering, 10)
    states = [e.state.value for e in await _events(handle)]
    assert states == [
        "submitted",
        "offered",
        "working",
        "input-required",
        "working",
        "completed",
    ]


async def test_cancel_tells_the_assignee(make_agent: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    handle = await planner.handoff("coder", title="Long job")
    offer = await _next_offer(coder)
    await offer.accept()
    asking = asyncio.create_task(offer.ask("Still needed?"))
    await assert_eventually(
        lambda: _state_is(planner, handle.id, agentpost.TaskState.INPUT_REQUIRED), timeout=10
    )
    canceled = await handle.cancel("not needed any more")
    assert canceled.state is agentpost.TaskState.CANCELED
    await asyncio.wait_for(offer.canceled.wait(), 10)
    with pytest.raises(agentpost.TaskStateError, match="not needed any more"):
        await asyncio.wait_for(asking, 10)
    assert offer.cancellation is not None
    assert offer.cancellation.state is agentpost.TaskState.CANCELED
    with pytest.raises(agentpost.TaskFailedError) as caught:
        await handle.result(timeout=10)
    assert caught.value.state is agentpost.TaskState.CANCELED
    with pytest.raises(agentpost.TaskStateError):
        await handle.cancel()  # already over


async def _state_is(agent: agentpost.Agent, task_id: str, state: agentpost.TaskState) -> bool:
    return (await agent.get_task(task_id)).state is state


async def test_a_task_handler_works_through_to_the_result(make_agent: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder", capabilities=["code"])

    @coder.on_task
    async def work(task: agentpost.Assignment) -> dict[str, Any]:
        await task.progress("on it", percent=50)
        if task.input == "boom":
            raise ValueError("cannot do boom")
        return {"done": task.input}

    good = await planner.handoff(capability="code", title="Good", input="x")
    bad = await planner.handoff("coder", title="Bad", input="boom")
    assert await good.result(timeout=10) == {"done": "x"}
    with pytest.raises(agentpost.TaskFailedError) as caught:
        await bad.result(timeout=10)
    assert caught.value.state is agentpost.TaskState.FAILED
    assert "ValueError: cannot do boom" in caught.value.reason
    listed = await planner.list_tasks(originator="planner")
    assert {task.id for task in listed} == {good.id, bad.id}
    dead = await planner.list_tasks(dead=True)
    assert [task.id for task in dead] == [bad.id]
    actions = [record.action for record in await planner.audit(good.id)]
    assert "task.completed" in actions


async def test_an_offer_waits_for_an_agent_that_is_away(make_agent: Any, target: str) -> None:
    async with agentpost.Client(target) as admin:
        await admin.register_agent("sleeper")
    async with agentpost.Client(target, agent_id="planner") as client:
        handle = await client.handoff("sleeper", title="When you are back", accept_timeout=30)
        assert (await handle.get()).state is agentpost.TaskState.SUBMITTED
        sleeper = await make_agent("sleeper")
        offer = await _next_offer(sleeper)
        assert offer.id == handle.id
        await offer.accept()
        await offer.complete(b"\x00\x01")
        assert await handle.result(timeout=10) == b"\x00\x01"
        assert [e.seq async for e in client.watch_task(handle.id, after_seq=3)][-1] >= 4


async def test_task_deliveries_never_show_up_in_messages(make_agent: Any, inbox: Any) -> None:
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    box = inbox(coder)
    handle = await planner.handoff("coder", title="T")
    offer = await _next_offer(coder)
    await offer.accept()
    await handle.cancel()  # a TASK_UPDATE for coder
    await asyncio.wait_for(offer.canceled.wait(), 10)
    await planner.send("coder", "plain")
    await assert_eventually(lambda: len(box.messages) == 1)
    assert box.payloads() == ["plain"]


async def test_idempotent_handoff_returns_the_same_task(make_agent: Any) -> None:
    planner = await make_agent("planner")
    await make_agent("coder")
    first = await planner.handoff("coder", title="Once", idempotency_key="job-1")
    again = await planner.handoff("coder", title="Once", idempotency_key="job-1")
    assert again.id == first.id and again.duplicate and not first.duplicate
    with pytest.raises(agentpost.AgentNotFoundError):
        await planner.handoff("nobody", title="T")


async def test_cli_handoff_wait_prints_the_result(make_agent: Any, target: str) -> None:
    coder = await make_agent("coder")

    @coder.on_task
    async def work(task: agentpost.Assignment) -> dict[str, Any]:
        await task.progress("working", percent=10)
        return {"echo": task.input}

    code, out, err = await cli(
        target,
        "--as",
        "shell",
        "handoff",
        "--to",
        "coder",
        "--title",
        "From the shell",
        "--input",
        '{"n": 1}',
        "--wait",
        "--timeout",
        "20",
    )
    assert code == 0, err
    assert json.loads(out) == {"echo": {"n": 1}}
    assert "completed" in err and "10%" in err  # the events went to stderr
    code, out, err = await cli(target, "--json", "tasks", "--originator", "shell")
    assert code == 0, err
    assert [task["state"] for task in json.loads(out)] == ["completed"]


async def test_cli_handoff_wait_exits_1_when_rejected(make_agent: Any, target: str) -> None:
    coder = await make_agent("coder")

    async def refuse() -> None:
        offer = await _next_offer(coder, timeout=20)
        await offer.reject("busy")

    refusing = asyncio.create_task(refuse())
    code, out, err = await cli(
        target, "--as", "shell", "--json", "handoff", "--to", "coder", "--title", "T", "--wait"
    )
    await refusing
    assert code == 1
    assert json.loads(out)["state"] == "rejected"
    assert "rejected" in err.splitlines()[-1] and "busy" in err


async def test_news_the_mailbox_gives_another_replica_still_reaches_the_holder(
    make_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With replicas of one agent, the mailbox hands each TASK_UPDATE to any of them. Fault
    injection: the holder never sees one through its mailbox (as if another replica got it);
    while it asks, it still gets the originator's answer, or learns that the task was canceled,
    because it follows the task."""
    planner = await make_agent("planner")
    coder = await make_agent("coder")
    desk = coder._session.desk
    deliver = desk.deliver

    def elsewhere(event: Any) -> None:
        if event.delivery.kind != envelope_pb2.MESSAGE_KIND_TASK_UPDATE:
            deliver(event)

    monkeypatch.setattr(desk, "deliver", elsewhere)
    outcomes: list[str] = []

    async def work(task: agentpost.Assignment) -> Any:
        try:
            first = await task.ask("which branch?", timeout=10)
            second = await task.ask("which file?", timeout=10)
        except agentpost.TaskStateError as exc:
            outcomes.append(f"lost: {exc.message}")
            raise
        outcomes.append(f"{first} {second}")
        return second

    coder.handle_tasks(work)
    answered = await planner.handoff("coder", title="answered")
    async with contextlib.aclosing(answered.questions()) as questions:
        async for question in questions:
            await answered.provide_input("main" if question.message == "which branch?" else "a.py")
    assert await answered.result(timeout=10) == "a.py"
    canceled = await planner.handoff("coder", title="canceled")
    async with contextlib.aclosing(canceled.questions()) as questions:
        async for _question in questions:
            await canceled.cancel("changed my mind")
            break
    await assert_eventually(lambda: len(outcomes) == 2)
    assert outcomes[0] == "main a.py"
    assert outcomes[1].startswith("lost:") and "canceled" in outcomes[1]


async def test_max_tasks_keeps_an_agent_to_one_task_at_a_time(make_agent: Any) -> None:
    planner = await make_agent("planner")
    solo = await make_agent("solo", capabilities=["c"], max_tasks=1)
    running = 0
    most = 0

    @solo.on_task
    async def work(task: agentpost.Assignment) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return task.title

    handles = [await planner.handoff(capability="c", title=f"t{i}") for i in range(5)]
    assert [await h.result(timeout=15) for h in handles] == [f"t{i}" for i in range(5)]
    assert most == 1
    with pytest.raises(agentpost.InvalidArgumentError):
        await agentpost.connect("127.0.0.1:1", agent_id="x", max_tasks=-1)
