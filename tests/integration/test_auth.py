"""Authentication and authorization against a real server: tokens-file and JWT credentials, the
identity a credential fixes, and every refusal found in the audit stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

import agentpost
from agentpost import ConnectOptions
from agentpost.errors import PermissionDeniedError, UnauthenticatedError
from agentpost_server.app import App
from agentpost_server.auth import tokens as tokens_file
from agentpost_server.core.auth import Principal
from agentpost_server.store.audit import RedisAudit
from agentpost_server.store.keys import Keys
from tests.conftest import StartServer
from tests.helpers import assert_eventually

SECRET = "s" * 40


def _principal(agent_id: str, **claims: Any) -> Principal:
    return Principal(
        agent_id=agent_id,
        roles=frozenset(claims.get("roles", ())),
        capabilities=frozenset(claims.get("capabilities", ())),
        publish=tuple(claims.get("publish", ())),
        subscribe=tuple(claims.get("subscribe", ())),
    )


PEOPLE = {
    "alice": {"capabilities": ["code"], "publish": ["builds.>"], "subscribe": ["builds.>"]},
    "bob": {"capabilities": ["review"], "publish": [">"], "subscribe": [">"]},
    "root": {"roles": ["admin"], "capabilities": ["*"], "publish": [">"], "subscribe": [">"]},
}


@pytest.fixture
def issued(tmp_path: Path) -> dict[str, str]:
    """A tokens file with alice, bob, root and an expired token: agent id -> token."""
    path = tmp_path / "tokens.json"
    made: dict[str, str] = {}
    for agent_id, claims in PEOPLE.items():
        made[agent_id] = tokens_file.new_token()
        tokens_file.append_entry(
            path, tokens_file.entry_json(made[agent_id], _principal(agent_id, **claims))
        )
    made["expired"] = tokens_file.new_token()
    tokens_file.append_entry(
        path,
        tokens_file.entry_json(made["expired"], _principal("alice"), expires_at=time.time() - 5),
    )
    made["path"] = str(path)
    return made


@pytest.fixture
async def secured(start_server: StartServer, issued: dict[str, str]) -> App:
    return await start_server(tokens_file=issued["path"], jwt_secret=SECRET)


@pytest.fixture
async def audit(redis_url: str, key_prefix: str) -> AsyncIterator[RedisAudit]:
    client = Redis.from_url(redis_url)
    yield RedisAudit(client, Keys(key_prefix), retention=1000)
    await client.aclose()


def _target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


def _opts(token: str | None) -> ConnectOptions:
    return ConnectOptions(token=token, connect_timeout=3, request_timeout=5)


async def _denied_in_audit(app: App, audit: RedisAudit, actor: str, subject: str) -> dict[str, str]:
    assert app.guard is not None
    await app.guard.flush()
    records = [
        r
        for r in await audit.list("", 100)
        if r.actor == actor and r.action == "auth.denied" and r.subject == subject
    ]
    assert records, f"no auth.denied record of {actor} on {subject}"
    return dict(records[0].details)


@pytest.mark.parametrize("which", ["none", "wrong", "expired", "garbage-jwt", "expired-jwt"])
async def test_bad_credentials_are_unauthenticated_on_unary_and_stream(
    secured: App, issued: dict[str, str], which: str
) -> None:
    token = {
        "none": None,
        "wrong": tokens_file.new_token(),
        "expired": issued["expired"],
        "garbage-jwt": "a.b.c",
        "expired-jwt": pyjwt.encode(
            {"sub": "alice", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"
        ),
    }[which]
    async with agentpost.Client(_target(secured), options=_opts(token)) as client:
        with pytest.raises(UnauthenticatedError) as unary:
            await client.list_agents()
    with pytest.raises(UnauthenticatedError) as stream:
        await agentpost.connect(_target(secured), agent_id="alice", options=_opts(token))
    # The same words whatever was wrong: nothing is revealed.
    assert unary.value.message == stream.value.message == "missing or invalid credentials"


async def test_health_and_reflection_need_no_token(secured: App) -> None:
    async with grpc.aio.insecure_channel(_target(secured)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        async for answer in reflection.ServerReflectionInfo(iter([ask]), timeout=5):
            listed = {s.name for s in answer.list_services_response.service}
            assert "agentpost.v1.AgentMessaging" in listed
            break


async def test_a_token_sends_as_its_agent_and_jwt_works_too(
    secured: App, issued: dict[str, str]
) -> None:
    bob = await agentpost.connect(_target(secured), agent_id="bob", options=_opts(issued["bob"]))
    try:
        jwt_token = pyjwt.encode(
            {"sub": "carol", "exp": int(time.time()) + 60, "caps": ["x"]}, SECRET, algorithm="HS256"
        )
        async with agentpost.Client(_target(secured), options=_opts(jwt_token)) as client:
            await client.send("bob", {"hi": 1})
        async with agentpost.Client(_target(secured), options=_opts(issued["alice"])) as client:
            await client.send("bob", {"hi": 2})
        senders = []
        async for message in bob.messages():
            senders.append(message.sender)
            if len(senders) == 2:
                break
        assert senders == ["carol", "alice"]
    finally:
        await bob.close()


async def test_connecting_as_another_agent_is_denied_and_audited(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    with pytest.raises(PermissionDeniedError):
        await agentpost.connect(_target(secured), agent_id="bob", options=_opts(issued["alice"]))
    details = await _denied_in_audit(secured, audit, "alice", "bob")
    assert details["attempt"] == "connect_as"


async def test_reading_another_mailbox_is_denied_but_admin_may(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    async with agentpost.Client(_target(secured), options=_opts(issued["root"])) as root:
        await root.register_agent("bob")
        assert (await root.get_mailbox("bob")).agent_id == "bob"
    async with agentpost.Client(_target(secured), options=_opts(issued["alice"])) as alice:
        with pytest.raises(PermissionDeniedError):
            await alice.get_mailbox("bob")
        with pytest.raises(PermissionDeniedError):
            await alice.list_dead_letters(agent_id="bob")
        assert await alice.list_dead_letters() == []  # its own
    assert (await _denied_in_audit(secured, audit, "alice", "bob"))["attempt"] in (
        "read_mailbox",
        "read_dead_letters",
    )


async def test_sending_as_another_agent_by_metadata_is_denied(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    async with agentpost.Client(
        _target(secured), agent_id="bob", options=_opts(issued["alice"])
    ) as client:
        with pytest.raises(PermissionDeniedError):
            await client.send("bob", "from bob, honest")
    assert (await _denied_in_audit(secured, audit, "alice", "bob"))["attempt"] == "act_as"
    async with agentpost.Client(
        _target(secured), agent_id="alice", options=_opts(issued["alice"])
    ) as client:  # naming itself is fine
        await client.list_agents()


async def test_claiming_a_capability_not_granted_is_denied(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    with pytest.raises(PermissionDeniedError):
        await agentpost.connect(
            _target(secured),
            agent_id="alice",
            capabilities=["deploy"],
            options=_opts(issued["alice"]),
        )
    assert (await _denied_in_audit(secured, audit, "alice", "alice"))["capabilities"] == "deploy"
    async with agentpost.Client(_target(secured), options=_opts(issued["alice"])) as client:
        with pytest.raises(PermissionDeniedError):
            await client.register_agent("alice", capabilities=["deploy"])
        with pytest.raises(PermissionDeniedError):
            await client.register_agent("mallory", capabilities=["code"])
        await client.register_agent("alice", capabilities=["code"])
    agent = await agentpost.connect(
        _target(secured), agent_id="alice", capabilities=["code"], options=_opts(issued["alice"])
    )
    await agent.close()


async def test_topic_permissions_on_a_session_and_unary(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    alice = await agentpost.connect(
        _target(secured), agent_id="alice", options=_opts(issued["alice"])
    )
    try:
        await alice.publish("builds.done", {"ok": True})
        with pytest.raises(PermissionDeniedError):
            await alice.publish("secrets.leak", {"x": 1})
        await alice.subscribe("builds.*.linux")
        with pytest.raises(PermissionDeniedError):
            await alice.subscribe(">")
        with pytest.raises(PermissionDeniedError):
            await alice.subscribe("*.done")
        with pytest.raises(PermissionDeniedError):
            await alice.subscribe("secrets.>", durable="leaks")
        with pytest.raises(PermissionDeniedError):
            await alice.broadcast("hello everyone")
        await alice.send("alice", "session still up")  # per-operation refusals keep the session
    finally:
        await alice.close()
    assert (await _denied_in_audit(secured, audit, "alice", "secrets.leak"))["attempt"] == "publish"
    assert (await _denied_in_audit(secured, audit, "alice", ">"))["pattern"] == ">"
    assert (await _denied_in_audit(secured, audit, "alice", "*"))["attempt"] == "broadcast"
    async with agentpost.Client(_target(secured), options=_opts(issued["alice"])) as client:
        with pytest.raises(PermissionDeniedError):
            await client.publish("secrets.leak", 1)
        stream = client.subscribe(["secrets.>"])
        with pytest.raises(PermissionDeniedError):
            await anext(stream)
        await stream.aclose()
    with pytest.raises(PermissionDeniedError):
        await agentpost.connect(
            _target(secured),
            agent_id="alice",
            subscriptions=["_agentpost.agents.*"],
            options=_opts(issued["alice"]),
        )
    await _denied_in_audit(secured, audit, "alice", "secrets.>")


async def test_admin_and_broadcast_role(secured: App, issued: dict[str, str]) -> None:
    root = await agentpost.connect(_target(secured), agent_id="root", options=_opts(issued["root"]))
    bob = await agentpost.connect(_target(secured), agent_id="bob", options=_opts(issued["bob"]))
    try:
        await root.broadcast("maintenance at five")
        received = []

        async def first() -> bool:
            async for message in bob.messages():
                received.append(message.payload)
                return True
            return False

        await assert_eventually(first)
        assert received == ["maintenance at five"]
    finally:
        await root.close()
        await bob.close()


async def test_token_create_round_trip_through_the_cli(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_cli import cli

    path = tmp_path / "tokens.json"
    code, out, err = await cli(
        "unused:1",
        "token",
        "create",
        "alice",
        "--capability",
        "code",
        "--publish",
        "builds.>",
        "--subscribe",
        "builds.>",
        "--tokens-file",
        str(path),
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("apt_") and token not in path.read_text()  # only its hash is kept
    monkeypatch.setenv("AGENTPOST_JWT_SECRET", SECRET)
    code, out, err = await cli("unused:1", "token", "create", "root", "--role", "admin", "--jwt")
    assert code == 0, err
    admin_jwt = out.strip()
    monkeypatch.delenv("AGENTPOST_JWT_SECRET")
    app = await start_server(tokens_file=path, jwt_secret=SECRET)
    target = _target(app)

    code, out, err = await cli(target, "--token", token, "publish", "builds.done", "{}")
    assert code == 0, err
    code, out, err = await cli(target, "--token", token, "publish", "deploys.done", "{}")
    assert code == 1 and "not allowed to publish" in err
    code, out, err = await cli(target, "--token", admin_jwt, "agents", "register", "bob")
    assert code == 0, err
    code, out, err = await cli(target, "--token", token, "mailbox", "bob")
    assert code == 1 and "not allowed" in err, err
    code, out, err = await cli(target, "mailbox", "bob")  # no token
    assert (code, err.strip()) == (1, "agentpost: error: missing or invalid credentials")
    monkeypatch.setenv("AGENTPOST_TOKEN", admin_jwt)
    code, out, err = await cli(target, "--json", "mailbox", "bob")
    assert code == 0 and json.loads(out)["agent_id"] == "bob", err


async def test_jwt_signed_with_a_private_key(start_server: StartServer, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "jwt.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    app = await start_server(jwt_public_key_file=public, jwt_audience="agentpost")
    claims = {"sub": "idp-agent", "exp": int(time.time()) + 60, "aud": "agentpost"}
    good = pyjwt.encode(claims, key, algorithm="ES256")
    async with agentpost.Client(_target(app), options=_opts(good)) as client:
        await client.list_agents()
    for bad in (
        pyjwt.encode({**claims, "aud": "elsewhere"}, key, algorithm="ES256"),
        pyjwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
        pyjwt.encode(claims, SECRET, algorithm="HS256"),  # no algorithm confusion
    ):
        async with agentpost.Client(_target(app), options=_opts(bad)) as client:
            with pytest.raises(UnauthenticatedError):
                await client.list_agents()


async def test_another_agents_task_and_workflow_are_out_of_reach_but_admin_may(
    secured: App, issued: dict[str, str], audit: RedisAudit
) -> None:
    """bob hands a task to alice and starts a run; alice may work on the task but neither
    cancel it nor see bob's run; root (admin) may cancel both."""
    target = _target(secured)
    async with (
        agentpost.connect(target, agent_id="alice", options=_opts(issued["alice"])),
        agentpost.Client(target, options=_opts(issued["bob"])) as bob,
        agentpost.Client(target, options=_opts(issued["alice"])) as alice,
        agentpost.Client(target, options=_opts(issued["root"])) as root,
    ):
        handle = await bob.handoff("alice", title="bob's task")
        with pytest.raises(PermissionDeniedError):
            await alice.cancel_task(handle.id, "not mine to cancel")
        assert (await _denied_in_audit(secured, audit, "alice", handle.id))["attempt"] == (
            "cancel_task"
        )
        assert (await alice.get_task(handle.id)).originator == "bob"  # its assignee may look
        run = await bob.coordinate(
            {
                "run_id": "bobs-run",
                "steps": [{"id": "s", "capability": "nobody-has-it", "title": "waits"}],
            }
        )
        assert run.id == "bobs-run"
        with pytest.raises(PermissionDeniedError):
            await alice.get_workflow("bobs-run")
        with pytest.raises(PermissionDeniedError):
            await alice.cancel_workflow("bobs-run")
        assert (await _denied_in_audit(secured, audit, "alice", "bobs-run"))["attempt"] in (
            "get_workflow",
            "cancel_workflow",
        )
        assert (await root.cancel_task(handle.id, "admin")).state.value == "canceled"
        assert (await root.cancel_workflow("bobs-run", "admin")).state.value == "canceled"


async def test_the_audit_stream_is_admin_only_beyond_the_callers_own_records(
    secured: App, issued: dict[str, str]
) -> None:
    target = _target(secured)
    async with (
        agentpost.Client(target, options=_opts(issued["alice"])) as alice,
        agentpost.Client(target, options=_opts(issued["root"])) as root,
    ):
        with pytest.raises(PermissionDeniedError):
            await alice.audit()
        with pytest.raises(PermissionDeniedError):
            await alice.audit("bob")
        assert await alice.audit("alice") is not None
        assert isinstance(await root.audit(), list)
