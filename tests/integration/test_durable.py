"""Durable delivery through the SDK: nothing lost across disconnects, server crashes, agent
crashes and replicas, and each message shown to the application once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import psutil
import pytest

import agentpost
from tests.helpers import ROOT, assert_eventually

pytestmark = pytest.mark.timeout(180)


async def send_all(sender: agentpost.Agent, to: str, count: int, chunk: int = 1000) -> None:
    for start in range(0, count, chunk):
        await asyncio.gather(*(sender.send(to, n) for n in range(start, min(start + chunk, count))))


async def take(agent: agentpost.Agent, count: int, seen: list[int]) -> None:
    async for message in agent.messages():
        seen.append(message.payload)
        if len(seen) >= count:
            return


async def test_ten_thousand_messages_sent_while_offline_arrive_in_order_once(target, make_agent):
    async with agentpost.Client(target) as client:
        await client.register_agent("sleeper")
    sender = await make_agent("sender")
    await send_all(sender, "sleeper", 10_000)
    async with agentpost.Client(target) as client:
        assert (await client.get_mailbox("sleeper")).depth == 10_000
    sleeper = await make_agent("sleeper")
    seen: list[int] = []
    await asyncio.wait_for(take(sleeper, 10_000, seen), 60)
    assert seen == list(range(10_000))
    async with agentpost.Client(target) as client:
        await assert_eventually(lambda: _depth(client, "sleeper", 0))


async def _depth(client: agentpost.Client, agent_id: str, depth: int) -> bool:
    return (await client.get_mailbox(agent_id)).depth == depth


async def test_a_server_killed_mid_stream_loses_and_repeats_nothing(spawn):
    doomed, survivor = await spawn(), await spawn()
    both = f"ipv4:{doomed.target},{survivor.target}"  # gRPC tries them in order
    async with agentpost.Client(survivor.target) as client:
        await client.register_agent("reader")
    seen: list[int] = []
    async with (
        agentpost.connect(survivor.target, agent_id="writer") as writer,
        agentpost.connect(both, agent_id="reader") as reader,
    ):
        assert reader.server_id != ""
        reading = asyncio.create_task(take(reader, 10_000, seen))
        sending = asyncio.create_task(send_all(writer, "reader", 10_000))
        await assert_eventually(lambda: len(seen) >= 3_000, timeout=60)
        doomed.kill()  # SIGKILL, in the middle of the stream
        await sending
        await asyncio.wait_for(reading, 90)
    assert seen == list(range(10_000))


async def test_an_agent_killed_mid_stream_and_restarted_sees_each_message_once(target, tmp_path):
    count = 3_000
    async with agentpost.Client(target) as client:
        await client.register_agent("crashy")
        async with agentpost.connect(target, agent_id="feeder") as feeder:
            await send_all(feeder, "crashy", count)
    state, out = tmp_path / "crashy.state", tmp_path / "crashy.out"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.receiver_process",
                target,
                "crashy",
                str(state),
                str(out),
                str(count),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )

    first = start()
    try:
        await assert_eventually(
            lambda: out.exists() and len(out.read_text().splitlines()) >= count // 3, timeout=60
        )
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    finally:
        first.kill()
    second = start()
    try:
        assert await asyncio.to_thread(second.wait, 90) == 0
    finally:
        second.kill()
    payloads = [int(line.split(" ", 1)[1]) for line in out.read_text().splitlines()]
    assert payloads == list(range(count))


async def test_replicas_share_the_mailbox_and_a_dead_ones_messages_go_to_the_other(
    target, make_agent
):
    async with agentpost.Client(target) as client:
        await client.register_agent("pool")
    # One replica takes a window of messages and dies without acknowledging any of them.
    greedy = await agentpost.connect(
        target,
        agent_id="pool",
        options=agentpost.ConnectOptions(ack_mode="manual", max_unacked=200),
    )
    got_some = asyncio.Event()
    greedy_seen: list[int] = []

    async def hold() -> None:
        async for message in greedy.messages():
            greedy_seen.append(message.payload)
            got_some.set()

    holding = asyncio.create_task(hold())
    sender = await make_agent("sender")
    await send_all(sender, "pool", 1_000)
    await asyncio.wait_for(got_some.wait(), 30)
    steady = await make_agent("pool")
    steady_seen: list[int] = []
    collecting = asyncio.create_task(take(steady, 1_000, steady_seen))
    await assert_eventually(lambda: len(steady_seen) >= 500, timeout=30)
    holding.cancel()
    await greedy.close()  # leaves holding unacknowledged messages
    await asyncio.wait_for(collecting, 60)
    assert sorted(steady_seen) == list(range(1_000))
    assert greedy_seen  # the greedy replica had its share before it died


async def test_a_retried_send_with_the_same_key_is_stored_once(target, make_agent):
    async with agentpost.Client(target) as client:
        await client.register_agent("ledger")
        sender = await make_agent("sender")
        first = await sender.send("ledger", "pay 10", idempotency_key="invoice-7")
        again = await sender.send("ledger", "pay 10", idempotency_key="invoice-7")
        retried = await client.send("ledger", "pay 10", idempotency_key="invoice-7")
        assert first == again
        assert retried != first  # a key is per sender: the unary client is "anonymous"
        assert (await client.get_mailbox("ledger")).depth == 2


async def test_broadcasts_missed_while_offline_arrive_on_reconnect(target, make_agent):
    napper = await make_agent("napper")
    await napper.close()
    announcer = await make_agent("announcer")
    for n in range(3):
        await announcer.broadcast({"notice": n})
    napper = await make_agent("napper")
    seen: list[object] = []
    await asyncio.wait_for(take(napper, 3, seen), 10)
    assert seen == [{"notice": 0}, {"notice": 1}, {"notice": 2}]


async def test_durable_subscription_through_the_sdk(target, make_agent):
    follower = await make_agent("follower")
    await follower.subscribe("builds.>", durable="builds")
    await follower.close()
    publisher = await make_agent("publisher")
    await publisher.publish("builds.main", {"ok": True})
    await publisher.publish("other.topic", "ignored")
    follower = await make_agent("follower")
    seen: list[object] = []
    await asyncio.wait_for(take(follower, 1, seen), 10)
    assert seen == [{"ok": True}]


async def test_expired_messages_are_swept_to_the_dead_letters(start_server):
    app = await start_server(worker=True, sweep_interval=1.0)
    target = f"127.0.0.1:{app.port}"
    async with agentpost.Client(target) as client:
        await client.register_agent("never-comes")
        message_id = await client.send("never-comes", "too late", ttl=0.2)

        async def swept() -> bool:
            letters = await client.list_dead_letters("never-comes")
            return [(d.message.id, d.reason) for d in letters] == [(message_id, "ttl expired")]

        await assert_eventually(swept, timeout=15)
        assert (await client.get_mailbox("never-comes")).depth == 0


@pytest.mark.timeout(300)
async def test_a_stuck_consumer_does_not_grow_the_server(spawn):
    server = await spawn()
    process = psutil.Process(server.process.pid)
    async with (
        agentpost.connect(server.target, agent_id="stuck") as stuck,
        agentpost.connect(server.target, agent_id="flood") as flood,
        agentpost.connect(server.target, agent_id="asker") as asker,
        agentpost.connect(server.target, agent_id="answerer") as answerer,
    ):

        @answerer.on_request
        async def answer(message: agentpost.Message) -> object:
            return message.payload

        del stuck  # connected, never reads: the server holds at most its window
        rss_before = process.memory_info().rss
        payload = "x" * 200
        sending = asyncio.create_task(_flood(flood, payload, 100_000))
        answered = 0
        while not sending.done():  # other agents keep being served meanwhile
            assert (await asker.request("answerer", answered, timeout=10)).payload == answered
            answered += 1
            await asyncio.sleep(0.05)
        await sending
        rss_after = process.memory_info().rss
        async with agentpost.Client(server.target) as client:
            box = await client.get_mailbox("stuck")
        assert box.depth == 100_000  # all kept, in Redis
        assert box.unacknowledged <= 1_000  # only a window delivered
        assert answered > 0
        assert rss_after - rss_before < 150 * 2**20, (rss_before, rss_after)


async def _flood(agent: agentpost.Agent, payload: str, count: int) -> None:
    for start in range(0, count, 2_000):
        await asyncio.gather(*(agent.send("stuck", payload) for _ in range(start, start + 2_000)))
