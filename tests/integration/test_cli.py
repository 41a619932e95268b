"""The `agentpost` console script against a real server: send, publish, request, listen, agents."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import agentpost
from tests.helpers import assert_eventually

AGENTPOST = str(Path(sys.executable).parent / "agentpost")


async def cli(target: str, *args: str, timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        AGENTPOST,
        "--server",
        target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_send_publish_and_request_from_the_shell(target, make_agent, inbox):
    agent = await make_agent("coder", subscriptions=["builds.*"])

    @agent.on_request
    async def answer(message: agentpost.Message) -> dict[str, object]:
        return {"got": message.payload}

    box = inbox(agent)
    code, out, err = await cli(target, "--as", "shell", "send", "coder", '{"task": "x"}')
    assert code == 0, err
    message_id = out.strip()
    code, _, err = await cli(target, "--as", "shell", "publish", "builds.done", "plain text")
    assert code == 0, err
    await assert_eventually(lambda: len(box.messages) == 2)
    by_id = {m.id: m for m in box.messages}
    assert by_id[message_id].payload == {"task": "x"}
    assert by_id[message_id].sender == "shell"
    assert {m.payload for m in box.messages if m.id != message_id} == {"plain text"}
    code, out, err = await cli(target, "--json", "request", "coder", "[1, 2]", "--timeout", "5")
    assert code == 0, err
    assert json.loads(out)["payload"] == {"got": [1, 2]}


async def test_listen_prints_what_arrives(target, make_agent):
    listener = asyncio.create_task(
        cli(target, "--json", "--as", "ear", "listen", "--topic", "news.>", "--count", "2")
    )
    sender = await make_agent("sender")

    async def ear_online() -> bool:
        try:
            return (await client.get_agent("ear")).online
        except agentpost.AgentNotFoundError:
            return False

    async with agentpost.Client(target) as client:
        await assert_eventually(ear_online, timeout=10)
    await sender.send("ear", {"n": 1})
    await sender.publish("news.world", {"n": 2})
    code, out, err = await listener
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(line["payload"]["n"] for line in lines) == [1, 2]


async def test_agents_lists_and_errors_are_one_line(target, make_agent):
    await make_agent("lister", capabilities=["code"])
    code, out, err = await cli(target, "--json", "agents", "--online")
    assert code == 0, err
    assert [a["agent_id"] for a in json.loads(out)] == ["lister"]
    code, out, err = await cli(target, "send", "nobody", "hi")
    assert code == 1
    assert err.strip().count("\n") == 0 and "nobody" in err and "agentpost: error:" in err
