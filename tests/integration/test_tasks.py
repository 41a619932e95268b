"""Task handoffs on the wire (generated stubs + RawAgent): lifecycle, routing, retries, timing.
The SDK's view of the same is in test_tasks_sdk.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from agentpost._status import from_rpc_error
from agentpost.errors import TaskStateError
from agentpost.v1 import envelope_pb2, messaging_pb2, messaging_pb2_grpc, tasks_pb2
from tests.conftest import StartServer
from tests.helpers import assert_eventually
from tests.integration.raw import RawAgent

S = tasks_pb2.TaskState
OFFER = envelope_pb2.MESSAGE_KIND_TASK_OFFER
UPDATE = envelope_pb2.MESSAGE_KIND_TASK_UPDATE


class Calls:
    """Unary task calls as one agent (the identity metadata)."""

    def __init__(self, target: str, agent_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = messaging_pb2_grpc.AgentMessagingStub(self.channel)
        self.md = (("agentpost-agent-id", agent_id),)

    async def call(self, name: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, name)(request, metadata=self.md, timeout=10)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def handoff(self, key: str = "", **spec: Any) -> tasks_pb2.Task:
        request = tasks_pb2.HandoffRequest(idempotency_key=key)
        json_format.ParseDict(spec, request.spec)
        return (await self.call("Handoff", request)).task  # type: ignore[no-any-return]

    async def update(self, task: tasks_pb2.Task, **action: Any) -> tasks_pb2.Task:
        request = tasks_pb2.UpdateTaskRequest(task_id=task.id, attempt=task.attempt)
        json_format.ParseDict(action, request)
        return (await self.call("UpdateTask", request)).task  # type: ignore[no-any-return]

    async def get(self, task_id: str, history: bool = False) -> tasks_pb2.Task:
        request = tasks_pb2.GetTaskRequest(task_id=task_id, history=history)
        return (await self.call("GetTask", request)).task  # type: ignore[no-any-return]

    async def watch(self, task_id: str, after: int = 0) -> list[tasks_pb2.TaskEvent]:
        events: list[tasks_pb2.TaskEvent] = []
        request = tasks_pb2.WatchTaskRequest(task_id=task_id, after_seq=after)
        async for frame in self.stub.WatchTask(request, metadata=self.md, timeout=20):
            events.extend(frame.events)
        return events

    async def close(self) -> None:
        await self.channel.close()


def offers(agent: RawAgent) -> list[tasks_pb2.Task]:
    return [e.delivery.task.task for e in agent.deliveries() if e.delivery.kind == OFFER]


async def next_offer(agent: RawAgent, seen: int = 0) -> tasks_pb2.Task:
    await assert_eventually(lambda: len(offers(agent)) > seen, timeout=10)
    return offers(agent)[seen]


async def test_handoff_to_an_agent_accepted_progressed_completed(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss, bob = Calls(target, "boss"), Calls(target, "bob")
    async with RawAgent(target, "bob"):
        pass  # bob is known now
    async with RawAgent(target, "bob") as agent:
        task = await boss.handoff(agentId="bob", title="write tests", input={"json": {"n": 1}})
        offered = await next_offer(agent)
        assert offered.id == task.id and offered.spec.title == "write tests"
        assert offered.originator == "boss" and offered.attempt == 1
        await bob.update(offered, accept={})
        await bob.update(offered, progress={"message": "half", "percent": 50, "hasPercent": True})
        done = await bob.update(offered, complete={"result": {"json": {"ok": True}}})
        assert done.state == S.TASK_STATE_COMPLETED
        with pytest.raises(TaskStateError):
            await bob.update(offered, complete={"result": {"json": 2}})
    events = await boss.watch(task.id)
    assert [e.state for e in events] == [
        S.TASK_STATE_SUBMITTED,
        S.TASK_STATE_OFFERED,
        S.TASK_STATE_WORKING,
        S.TASK_STATE_WORKING,
        S.TASK_STATE_COMPLETED,
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[3].percent == 50 and events[3].message == "half"
    assert json_format.MessageToDict(events[-1].payload) == {"json": {"ok": True}}
    final = await boss.get(task.id, history=True)
    assert final.result.json.struct_value["ok"] and len(final.history) == 5
    await boss.close()
    await bob.close()


def spawn_worker(
    redis_url: str, key_prefix: str, log_dir: Any, **env: str
) -> subprocess.Popen[bytes]:
    """A real `agentpost worker` process."""
    environment = {
        **os.environ,
        "AGENTPOST_REDIS_URL": redis_url,
        "AGENTPOST_KEY_PREFIX": key_prefix,
        **env,
    }
    code = "import sys; from agentpost_server.app import worker_main; sys.exit(worker_main())"
    with (log_dir / f"worker-{time.monotonic_ns()}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], env=environment, stdout=log, stderr=subprocess.STDOUT
        )


async def test_capability_spreads_load_and_a_rejection_goes_elsewhere(
    start_server: StartServer,
) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    agents = [RawAgent(target, f"coder{i}", capabilities=["code"]) for i in range(3)]
    for agent in agents:
        await agent.__aenter__()
    try:
        tasks = [await boss.handoff(capability="code", title=f"job {i}") for i in range(6)]
        await assert_eventually(lambda: sum(len(offers(a)) for a in agents) == 6)
        assert sorted(len(offers(a)) for a in agents) == [2, 2, 2]
        assert {t.id for a in agents for t in offers(a)} == {t.id for t in tasks}

        # coder0 rejects one of its offers: it goes to another capable agent, not back.
        first = offers(agents[0])[0]
        await Calls(target, "coder0").update(first, reject={"reason": "busy"})
        await assert_eventually(
            lambda: any(t.id == first.id for a in agents[1:] for t in offers(a))
        )
        again = await boss.get(first.id)
        assert again.state == S.TASK_STATE_OFFERED and again.attempt == 2
        assert again.assignee in ("coder1", "coder2")
    finally:
        for agent in agents:
            await agent.__aexit__(None, None, None)
        await boss.close()


async def test_every_capable_agent_rejecting_ends_rejected_and_dead(
    start_server: StartServer,
) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with (
        RawAgent(target, "a1", capabilities=["x"]) as a1,
        RawAgent(target, "a2", capabilities=["x"]) as a2,
    ):
        task = await boss.handoff(capability="x", title="nobody wants this", maxAttempts=5)
        for attempt in (1, 2):
            await assert_eventually(lambda n=attempt: len(offers(a1)) + len(offers(a2)) == n)
            current = await boss.get(task.id)
            await Calls(target, current.assignee).update(current, reject={"reason": "no"})
        final = await boss.get(task.id)
        assert final.state == S.TASK_STATE_REJECTED
        assert "rejected by every capable agent" in final.error.message
        dead = await boss.call("ListTasks", tasks_pb2.ListTasksRequest(dead=True))
        assert [t.id for t in dead.tasks] == [task.id]
    await boss.close()


async def test_an_offer_not_accepted_in_time_exhausts_its_attempts_and_is_dead(
    start_server: StartServer,
) -> None:
    app = await start_server(worker=True, task_retry_backoff=0.05)
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "sleepy") as sleepy:
        task = await boss.handoff(
            agentId="sleepy", title="ignored", acceptTimeout="0.3s", maxAttempts=3
        )
        events = await boss.watch(task.id)
        assert len(offers(sleepy)) == 3
    assert [e.state for e in events][-1] == S.TASK_STATE_FAILED
    assert [e.attempt for e in events if e.state == S.TASK_STATE_OFFERED] == [1, 2, 3]
    final = await boss.get(task.id)
    assert "did not accept within 0.3s" in final.error.message
    assert "all 3 attempts used" in final.error.message
    dead = await boss.call("ListTasks", tasks_pb2.ListTasksRequest(dead=True))
    assert task.id in [t.id for t in dead.tasks]
    audit = await boss.call("ListAudit", tasks_pb2.ListAuditRequest(subject=task.id))
    actions = [r.action for r in reversed(audit.records)]
    assert actions[0] == "task.handoff" and actions[-1] == "task.failed"
    assert actions.count("task.offered") == 3
    await boss.close()


async def test_an_assignee_lost_while_working_is_replaced_and_cannot_complete_late(
    start_server: StartServer,
) -> None:
    app = await start_server(worker=True, task_offline_grace=0.5, keepalive_interval=0.5)
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "steady", capabilities=["c"]) as steady:
        quitter = RawAgent(target, "quitter", capabilities=["c"])
        await quitter.__aenter__()
        # Make quitter the one offered: steady holds a task already.
        await boss.handoff(agentId="steady", title="keep steady busy")
        task = await boss.handoff(capability="c", title="important")
        first = await next_offer(quitter)
        assert first.id == task.id
        await Calls(target, "quitter").update(first, accept={})
        await quitter.__aexit__(None, None, None)  # gone while working
        await assert_eventually(lambda: any(t.id == task.id for t in offers(steady)), timeout=15)
        with pytest.raises(TaskStateError, match="no longer holds it"):
            await Calls(target, "quitter").update(first, complete={"result": {"json": 1}})
        current = await boss.get(task.id)
        assert current.assignee == "steady" and current.attempt == 2
        await Calls(target, "steady").update(current, accept={})
        await Calls(target, "steady").update(current, complete={"result": {"json": 2}})
        assert (await boss.get(task.id)).result.json.number_value == 2
    await boss.close()


async def test_cancel_tells_the_assignee_and_only_the_originator_may(
    start_server: StartServer,
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "worker1") as agent:
        task = await boss.handoff(agentId="worker1", title="t")
        offered = await next_offer(agent)
        await Calls(target, "worker1").update(offered, accept={})
        from agentpost.errors import PermissionDeniedError

        with pytest.raises(PermissionDeniedError):
            await Calls(target, "worker1").call(
                "CancelTask", tasks_pb2.CancelTaskRequest(task_id=task.id)
            )
        response = await boss.call(
            "CancelTask", tasks_pb2.CancelTaskRequest(task_id=task.id, reason="changed my mind")
        )
        assert response.task.state == S.TASK_STATE_CANCELED

        def updates() -> list[tasks_pb2.TaskEvent]:
            return [e.delivery.task.event for e in agent.deliveries() if e.delivery.kind == UPDATE]

        await assert_eventually(lambda: len(updates()) == 1)
        assert updates()[0].state == S.TASK_STATE_CANCELED
        assert updates()[0].seq == 4  # submitted, offered, working, canceled
        assert updates()[0].message == "changed my mind"
        with pytest.raises(TaskStateError):
            await boss.call("CancelTask", tasks_pb2.CancelTaskRequest(task_id=task.id))
    await boss.close()


async def test_a_deadline_that_passes_expires_the_task(start_server: StartServer) -> None:
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "offline-soon"):
        pass
    deadline = time.time() + 0.5
    task = await boss.handoff(
        agentId="offline-soon",
        title="too late",
        deadline=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(deadline))
        + f".{int(deadline % 1 * 1000):03d}Z",
    )
    assert task.state == S.TASK_STATE_SUBMITTED  # the agent is offline: it waits
    events = await boss.watch(task.id)
    assert events[-1].state == S.TASK_STATE_EXPIRED
    assert (await boss.get(task.id)).error.message == "the deadline passed"
    await boss.close()


async def test_input_required_round_trip(start_server: StartServer) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    boss, helper = Calls(target, "boss"), Calls(target, "helper")
    async with RawAgent(target, "helper") as agent:
        task = await boss.handoff(agentId="helper", title="needs a question")
        offered = await next_offer(agent)
        await helper.update(offered, accept={})
        asked = await helper.update(offered, requestInput={"message": "which branch?"})
        assert asked.state == S.TASK_STATE_INPUT_REQUIRED
        with pytest.raises(TaskStateError):
            await helper.update(offered, requestInput={"message": "again?"})
        answered = await boss.update(
            tasks_pb2.Task(id=task.id), input={"payload": {"json": "main"}}
        )
        assert answered.state == S.TASK_STATE_WORKING

        def answers() -> list[tasks_pb2.TaskEvent]:
            return [e.delivery.task.event for e in agent.deliveries() if e.delivery.kind == UPDATE]

        await assert_eventually(lambda: len(answers()) == 1)
        assert answers()[0].kind == tasks_pb2.TASK_EVENT_KIND_INPUT
        assert answers()[0].payload.json.string_value == "main"
        await helper.update(offered, complete={"result": {"json": "done on main"}})
    states = [e.state for e in await boss.watch(task.id)]
    assert S.TASK_STATE_INPUT_REQUIRED in states and states[-1] == S.TASK_STATE_COMPLETED
    await boss.close()
    await helper.close()


async def test_waiting_tasks_are_offered_by_priority_when_the_agent_connects(
    start_server: StartServer,
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "late"):
        pass
    low = await boss.handoff(agentId="late", title="low", priority=-5)
    high = await boss.handoff(agentId="late", title="high", priority=10)
    normal = await boss.handoff(agentId="late", title="normal")
    high2 = await boss.handoff(agentId="late", title="high too", priority=10)
    async with RawAgent(target, "late") as agent:
        await assert_eventually(lambda: len(offers(agent)) == 4)
        assert [t.id for t in offers(agent)] == [high.id, high2.id, normal.id, low.id]
    await boss.close()


async def test_a_repeated_handoff_with_the_same_key_returns_the_same_task(
    start_server: StartServer,
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    async with RawAgent(target, "x"):
        pass
    first = await boss.call(
        "Handoff",
        tasks_pb2.HandoffRequest(
            spec=tasks_pb2.TaskSpec(agent_id="x", title="once"), idempotency_key="k1"
        ),
    )
    again = await boss.call(
        "Handoff",
        tasks_pb2.HandoffRequest(
            spec=tasks_pb2.TaskSpec(agent_id="x", title="once"), idempotency_key="k1"
        ),
    )
    assert again.task.id == first.task.id and again.duplicate and not first.duplicate
    other = await Calls(target, "someone-else").handoff("k1", agentId="x", title="once")
    assert other.id != first.task.id
    await boss.close()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"title": "t"}, "needs a target"),
        ({"agentId": "x"}, "spec.title"),
        ({"agentId": "nobody-known", "title": "t"}, "no agent"),
        ({"capability": "bad cap!", "title": "t"}, "capabilit"),
        ({"agentId": "x", "title": "t", "priority": 5000}, "priority"),
        ({"agentId": "x", "title": "t", "maxAttempts": 1000}, "max_attempts"),
        ({"agentId": "x", "title": "t", "deadline": "2001-01-01T00:00:00Z"}, "in the past"),
        ({"agentId": "x", "title": "t", "acceptTimeout": "100000s"}, "accept_timeout"),
    ],
)
async def test_bad_handoffs_are_refused_clearly(
    start_server: StartServer, spec: dict[str, Any], needle: str
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    async with RawAgent(target, "x"):
        pass
    boss = Calls(target, "boss")
    from agentpost.errors import AgentNotFoundError, InvalidArgumentError

    with pytest.raises((InvalidArgumentError, AgentNotFoundError), match=needle):
        await boss.handoff(**spec)
    await boss.close()


async def test_the_worker_killed_between_offer_and_acceptance(
    start_server: StartServer, redis_url: str, key_prefix: str, tmp_path: Any
) -> None:
    """The first offer times out while no worker runs; a new worker re-offers it and the task
    completes exactly once."""
    app = await start_server()  # no worker inside
    target = f"127.0.0.1:{app.port}"
    boss = Calls(target, "boss")
    worker = spawn_worker(redis_url, key_prefix, tmp_path)
    try:
        async with RawAgent(target, "slow") as agent:
            task = await boss.handoff(agentId="slow", title="survive", acceptTimeout="1s")
            await next_offer(agent)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            await asyncio.sleep(1.5)  # the accept timeout passes with no worker running
            assert (await boss.get(task.id)).attempt == 1
            worker = spawn_worker(redis_url, key_prefix, tmp_path)
            second = await next_offer(agent, 1)
            assert second.attempt == 2
            slow = Calls(target, "slow")
            await slow.update(second, accept={})
            await slow.update(second, complete={"result": {"json": "once"}})
            with pytest.raises(TaskStateError):
                await slow.update(second, complete={"result": {"json": "twice"}})
        events = await boss.watch(task.id)
        assert [e.state for e in events].count(S.TASK_STATE_COMPLETED) == 1
        assert [e.attempt for e in events if e.state == S.TASK_STATE_OFFERED] == [1, 2]
    finally:
        worker.kill()
        worker.wait(10)
        await boss.close()


async def test_the_server_killed_mid_task_the_assignee_finishes_through_another(
    start_server: StartServer, spawn: Any
) -> None:
    doomed = await spawn()  # a real server process, killed below
    survivor = await start_server(worker=True)
    there = f"127.0.0.1:{survivor.port}"
    boss = Calls(there, "boss")
    async with RawAgent(doomed.target, "builder") as on_doomed:
        task = await boss.handoff(agentId="builder", title="build it")
        offered = await next_offer(on_doomed)
        await Calls(doomed.target, "builder").update(offered, accept={})
        doomed.kill()
    async with RawAgent(there, "builder"):
        builder = Calls(there, "builder")
        await builder.update(offered, progress={"message": "back, on another server"})
        await builder.update(offered, complete={"result": {"json": "built"}})
        await builder.close()
    final = await boss.get(task.id)
    assert final.state == S.TASK_STATE_COMPLETED and final.attempt == 1
    assert final.result.json.string_value == "built"
    await boss.close()


async def test_a_task_the_server_could_not_offer_is_offered_by_the_worker(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the server stores the handoff and 'dies' before its fast-path offer
    (dispatch does nothing on the first call); the worker's safety-net check offers it."""
    app = await start_server(worker=True)
    target = f"127.0.0.1:{app.port}"
    assert app.hub is not None and app.hub.tasks is not None
    service = app.hub.tasks
    real = service.dispatch
    skipped: list[str] = []

    async def lost_once(record: Any, task_id: str = "") -> Any:
        if not skipped:
            skipped.append(record.id)
            return record
        return await real(record, task_id)

    monkeypatch.setattr(service, "dispatch", lost_once)
    boss = Calls(target, "boss")
    async with RawAgent(target, "patient") as agent:
        task = await boss.handoff(agentId="patient", title="offered late")
        assert skipped == [task.id] and task.state == S.TASK_STATE_SUBMITTED
        offered = await next_offer(agent)  # by the worker, ~AGENTPOST dispatch grace later
        assert offered.id == task.id and offered.attempt == 1
    await boss.close()


async def test_an_agent_with_max_tasks_gets_the_waiting_ones_by_priority(
    start_server: StartServer,
) -> None:
    app = await start_server()
    target = f"127.0.0.1:{app.port}"
    boss, busy = Calls(target, "boss"), Calls(target, "single")
    async with RawAgent(target, "single", capabilities=["one"], max_tasks=1) as agent:
        first = await boss.handoff(capability="one", title="first")
        held = await next_offer(agent)
        assert held.id == first.id
        waiting = [
            await boss.handoff(capability="one", title="low", priority=-1),
            await boss.handoff(agentId="single", title="high", priority=9),
            await boss.handoff(capability="one", title="normal"),
        ]
        # A handoff returns after its offer is made, if one is: these were kept waiting.
        for task in waiting:
            assert task.state == S.TASK_STATE_SUBMITTED
            assert (await boss.get(task.id)).state == S.TASK_STATE_SUBMITTED
        assert len(offers(agent)) == 1  # it holds one: the others wait
        order = []
        for seen in range(1, 4):
            current = offers(agent)[-1]
            await busy.update(current, accept={})
            await busy.update(current, complete={"result": {"json": current.spec.title}})
            nxt = await next_offer(agent, seen)
            order.append(nxt.spec.title)
        # "high" waits in the agent's own queue, the others in the capability's: each queue is
        # offered best first, and the agent's own queue is looked at first.
        assert order == ["high", "normal", "low"]
        info = await Calls(target, "x").call(
            "GetAgent",
            messaging_pb2.GetAgentRequest(agent_id="single"),
        )
        assert info.agent.max_tasks == 1
    await boss.close()
    await busy.close()
