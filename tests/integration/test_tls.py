"""TLS and mutual TLS end to end, with certificates made by the test; the refusal to serve
plaintext unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import agentpost
from agentpost import ConnectOptions
from agentpost.errors import ConnectionLostError, PermissionDeniedError, UnauthenticatedError
from agentpost_server.auth import tokens as tokens_file
from agentpost_server.core.auth import Principal
from tests.certs import Authority
from tests.conftest import StartServer
from tests.helpers import ROOT


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def _tls(ca: Authority, **extra: object) -> ConnectOptions:
    return ConnectOptions(tls_ca=str(ca.pem), connect_timeout=3, request_timeout=5, **extra)  # type: ignore[arg-type]


async def test_tls_end_to_end(start_server: StartServer, ca: Authority) -> None:
    pair = ca.issue("localhost", server=True)
    app = await start_server(tls_cert=pair.cert, tls_key=pair.key, plaintext=False)
    target = f"localhost:{app.port}"
    async with agentpost.connect(target, agent_id="coder", options=_tls(ca)) as coder:

        @coder.on_request
        async def answer(message: agentpost.Message) -> str:
            return "over TLS"

        async with agentpost.Client(target, agent_id="planner", options=_tls(ca)) as client:
            reply = await client.request("coder", "hello", timeout=5)
            assert reply.payload == "over TLS"
    # A plaintext client cannot talk to it.
    options = ConnectOptions(connect_timeout=1, request_timeout=1)
    async with agentpost.Client(target, options=options) as plain:
        with pytest.raises(ConnectionLostError):
            await plain.list_agents()


async def test_mutual_tls_takes_the_identity_from_the_client_certificate(
    start_server: StartServer, ca: Authority
) -> None:
    pair = ca.issue("localhost", server=True)
    app = await start_server(
        tls_cert=pair.cert, tls_key=pair.key, tls_client_ca=ca.pem, plaintext=False
    )
    target = f"localhost:{app.port}"
    alice = ca.issue("alice", server=False)
    mine = _tls(ca, tls_cert=str(alice.cert), tls_key=str(alice.key))
    async with agentpost.connect(target, agent_id="alice", options=mine) as agent:
        async with agentpost.Client(target, options=mine) as client:
            message_id = await client.send("alice", "to myself")
        async for message in agent.messages():
            assert (message.id, message.sender) == (message_id, "alice")  # stamped from the cert
            break
    with pytest.raises(PermissionDeniedError):
        await agentpost.connect(target, agent_id="bob", options=mine)
    # Without a client certificate the handshake fails.
    async with agentpost.Client(target, options=_tls(ca)) as anonymous:
        with pytest.raises((ConnectionLostError, UnauthenticatedError)):
            await anonymous.list_agents()
    # A certificate from another CA is refused too.
    other = Authority(ca.directory / "..", name="another CA").issue("alice", server=False)
    theirs = _tls(ca, tls_cert=str(other.cert), tls_key=str(other.key))
    async with agentpost.Client(target, options=theirs) as stranger:
        with pytest.raises((ConnectionLostError, UnauthenticatedError)):
            await stranger.list_agents()


async def test_mutual_tls_with_tokens_needs_both_to_agree(
    start_server: StartServer, ca: Authority, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    token = tokens_file.new_token()
    principal = Principal(agent_id="bob", capabilities=frozenset({"*"}))
    tokens_file.append_entry(path, tokens_file.entry_json(token, principal))
    pair = ca.issue("localhost", server=True)
    app = await start_server(
        tls_cert=pair.cert,
        tls_key=pair.key,
        tls_client_ca=ca.pem,
        tokens_file=path,
        plaintext=False,
    )
    target = f"localhost:{app.port}"
    bob = ca.issue("bob", server=False)
    alice = ca.issue("alice", server=False)
    as_bob = _tls(ca, tls_cert=str(bob.cert), tls_key=str(bob.key), token=token)
    async with agentpost.Client(target, options=as_bob) as client:
        await client.list_agents()
    as_alice = _tls(ca, tls_cert=str(alice.cert), tls_key=str(alice.key), token=token)
    async with agentpost.Client(target, options=as_alice) as client:
        with pytest.raises(UnauthenticatedError):
            await client.list_agents()


def test_serve_refuses_to_start_without_tls_or_plaintext(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "AGENTPOST_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(
        [sys.executable, "-m", "agentpost_server"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "AGENTPOST_TLS_CERT" in lines[0] and "AGENTPOST_PLAINTEXT=true" in lines[0]
    assert (ROOT / "Makefile").read_text().count("agentpost serve --plaintext") == 1


async def test_plaintext_warns(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")
    await start_server()
    text = caplog.text
    assert "serving PLAINTEXT on 127.0.0.1:0 (loopback only)" in text
    assert "authentication is OFF" in text


async def test_cli_over_mutual_tls(start_server: StartServer, ca: Authority) -> None:
    from tests.integration.test_cli import cli

    pair = ca.issue("localhost", server=True)
    app = await start_server(
        tls_cert=pair.cert, tls_key=pair.key, tls_client_ca=ca.pem, plaintext=False
    )
    target = f"localhost:{app.port}"
    shell = ca.issue("shell", server=False)
    tls = ["--tls-ca", str(ca.pem), "--tls-cert", str(shell.cert), "--tls-key", str(shell.key)]
    code, out, err = await cli(target, *tls, "agents", "register", "shell")
    assert code == 0, err
    code, out, err = await cli(target, *tls, "--json", "send", "shell", '"to myself"')
    assert code == 0 and json.loads(out)["message_id"], err
    code, out, err = await cli(target, *tls, "--as", "other", "send", "shell", '"forged"')
    assert code == 1 and "not allowed" in err, err
    code, out, err = await cli(target, "--tls-ca", str(ca.pem), "agents")  # no client cert
    assert code == 1, out
