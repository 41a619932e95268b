"""Request/response: replies, handler errors, deadlines, no responder, late replies."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import agentpost
from tests.helpers import assert_eventually


async def test_handler_return_value_is_the_reply(make_agent):
    responder = await make_agent("calc")

    @responder.on_request
    async def add(message: agentpost.Message) -> dict[str, int]:
        return {"sum": sum(message.payload["numbers"]), "asked_by": message.sender}

    asker = await make_agent("asker")
    reply = await asker.request("calc", {"numbers": [1, 2, 3]}, timeout=5)
    assert reply.payload == {"sum": 6, "asked_by": "asker"}
    assert reply.kind == agentpost.MessageKind.REPLY
    assert reply.sender == "calc"


async def test_requests_without_a_handler_arrive_as_messages_and_can_be_replied(make_agent):
    responder = await make_agent("manual")

    async def serve_one() -> None:
        async for message in responder.messages():
            if message.kind == agentpost.MessageKind.REQUEST:
                await message.reply(f"got {message.payload}")
                return

    task = asyncio.create_task(serve_one())
    asker = await make_agent("asker")
    reply = await asker.request("manual", "ping", timeout=5)
    assert reply.payload == "got ping"
    await task


async def test_a_handler_that_raises_becomes_an_error_reply(make_agent):
    responder = await make_agent("fragile")

    @responder.on_request
    async def explode(message: agentpost.Message) -> None:
        raise ValueError("cannot parse the plan")

    asker = await make_agent("asker")
    with pytest.raises(agentpost.HandlerError, match="cannot parse the plan"):
        await asker.request("fragile", "plan", timeout=5)


async def test_no_responder_fails_at_once_not_after_the_timeout(make_agent):
    asker = await make_agent("asker")
    started = time.monotonic()
    with pytest.raises(agentpost.NoResponderError):
        await asker.request("nobody-home", "hello", timeout=30)
    assert time.monotonic() - started < 5  # far from the 30 s timeout


async def test_timeout_then_the_late_reply_is_dropped(make_agent, inbox):
    release = asyncio.Event()
    responder = await make_agent("slow")

    @responder.on_request
    async def slow(message: agentpost.Message) -> str:
        if message.payload == "slow":
            await release.wait()
        return f"answer to {message.payload}"

    asker = await make_agent("asker")
    asker_box = inbox(asker)
    with pytest.raises(agentpost.RequestTimeoutError):
        await asker.request("slow", "slow", timeout=0.3)
    release.set()  # the late reply now goes out, and must vanish
    reply = await asker.request("slow", "fast", timeout=5)
    assert reply.payload == "answer to fast"
    await asyncio.sleep(0.2)
    assert asker_box.messages == []  # no stray late reply


async def test_a_responder_that_disconnects_fails_the_request_quickly(make_agent):
    responder = await make_agent("quitter")
    got_it = asyncio.Event()

    @responder.on_request
    async def hang(message: agentpost.Message) -> None:
        got_it.set()
        await asyncio.Event().wait()

    asker = await make_agent("asker")
    pending = asyncio.create_task(asker.request("quitter", "x", timeout=30))
    await got_it.wait()
    started = time.monotonic()
    await responder.close()
    with pytest.raises(agentpost.NoResponderError, match="disconnected"):
        await pending
    assert time.monotonic() - started < 5


async def test_many_concurrent_requests_each_get_their_own_reply(make_agent):
    responder = await make_agent("echo")

    @responder.on_request
    async def echo(message: agentpost.Message) -> object:
        return message.payload

    asker = await make_agent("asker")
    replies = await asyncio.gather(*(asker.request("echo", i, timeout=10) for i in range(200)))
    assert [r.payload for r in replies] == list(range(200))


async def test_unary_request_through_the_client(target, make_agent):
    responder = await make_agent("oracle")

    @responder.on_request
    async def answer(message: agentpost.Message) -> dict[str, str]:
        return {"caller": message.sender}

    async with agentpost.Client(target, agent_id="script") as client:
        reply = await client.request("oracle", "who am i", timeout=5)
        assert reply.payload == {"caller": "script"}
        with pytest.raises(agentpost.NoResponderError):
            await client.request("nobody", "x", timeout=5)
    await assert_eventually(lambda: True)


async def test_replying_after_the_timeout_is_refused(make_agent, caplog):
    responder = await make_agent("late")
    asker = await make_agent("asker")
    pending = asyncio.create_task(asker.request("late", "q", timeout=0.2))
    messages = responder.messages()
    request = await anext(messages)
    with pytest.raises(agentpost.RequestTimeoutError):
        await pending
    await asyncio.sleep(0.05)  # a little past the deadline on the server's clock too
    with caplog.at_level(logging.WARNING, logger="agentpost"):
        await request.reply("too late")  # queued; the server answers a reply only to refuse it

        def refused() -> bool:
            return any(
                f"reply to request {request.id}" in r.getMessage() and "timed out" in r.getMessage()
                for r in caplog.records
            )

        await assert_eventually(refused)
