"""Another language: a Node.js agent (@grpc/grpc-js + @grpc/proto-loader, loading the same .proto
files) exchanges direct messages and requests/replies with Python agents over Connect."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import pytest

import agentpost
from tests.helpers import ROOT, assert_eventually

NODE_DIR = ROOT / "tests" / "node"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def node_modules() -> None:
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("run `make node-deps` (npm ci in tests/node) first", pytrace=False)


class NodeAgent:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    async def next_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"node agent exited before {name!r}: {self.lines}")
                line = json.loads(raw)
                self.lines.append(line)
                if line.get("event") == name:
                    return line


async def start_node(target: str, *args: str) -> NodeAgent:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(NODE_DIR / "agent.mjs"),
        "--server",
        target,
        *args,
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
    )
    return NodeAgent(process)


async def test_node_agent_messages_and_asks_a_python_agent(target, make_agent, inbox):
    python = await make_agent("py-agent")

    @python.on_request
    async def answer(message: agentpost.Message) -> dict[str, Any]:
        return {"pong": message.payload, "from": "python"}

    box = inbox(python)
    node = await start_node(
        target, "--agent-id", "node-asker", "--script", "ask", "--to", "py-agent"
    )
    sent = await node.next_event("sent")
    reply = await node.next_event("reply")
    assert await node.process.wait() == 0
    assert reply["payload"] == {"pong": {"question": "ping"}, "from": "python"}
    await assert_eventually(lambda: len(box.messages) == 2)
    first, second = box.messages
    assert [first.id, second.id] == sent["message_ids"]
    assert first.sender == "node-asker"
    assert first.payload == {
        "hello": "from node",
        "n": 1,
        "nested": {"list": [1, "two", True, None]},
    }
    assert second.payload == b"raw-bytes" and second.content_type == "text/plain"


async def test_python_agent_messages_and_asks_a_node_agent(target, make_agent):
    node = await start_node(target, "--agent-id", "node-echo", "--script", "echo", "--max", "2")
    try:
        await node.next_event("ready")
        python = await make_agent("py-asker")
        payload = {"text": "héllo", "numbers": [1, 2.5, -3], "flag": False, "none": None}
        reply = await python.request("node-echo", payload, timeout=10)
        assert reply.payload == {"echo": payload, "from": "node"}
        assert reply.sender == "node-echo"
        await python.send("node-echo", {"direct": "message"}, headers={"k": "v"})
        message = await node.next_event("message")
        assert message["sender"] == "py-asker"
        assert message["payload"] == {"direct": "message"}
        assert message["headers"] == {"k": "v"}
        assert await node.process.wait() == 0
    finally:
        if node.process.returncode is None:
            node.process.kill()
            await node.process.wait()
