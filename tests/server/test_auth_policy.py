"""The authorization policy (core.auth), the rate limiter and the credential checks, without a
server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agentpost.errors import RateLimitedError, UnauthenticatedError
from agentpost_server.auth import jwts
from agentpost_server.auth import tokens as tokens_file
from agentpost_server.auth.authenticator import Authenticator
from agentpost_server.core.auth import Principal, covers
from agentpost_server.core.ratelimit import RateLimiter


@pytest.mark.parametrize(
    ("allowed", "wanted", "expected"),
    [
        ("builds.>", "builds.>", True),
        ("builds.>", "builds.*", True),
        ("builds.>", "builds.a.b", True),
        ("builds.>", "builds", False),
        ("builds.*", "builds.>", False),
        ("builds.*", "builds.x", True),
        ("builds.*", "builds.*", True),
        ("builds.x", "builds.*", False),
        ("*.done", "builds.done", True),
        ("*.done", "*.*", False),
        (">", "anything.at.all", True),
        (">", "_agentpost.agents.online", False),
        ("_agentpost.>", "_agentpost.agents.*", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_covers(allowed: str, wanted: str, expected: bool) -> None:
    assert covers(allowed.split("."), wanted.split(".")) is expected


def test_principal_rules() -> None:
    alice = Principal(
        agent_id="alice",
        capabilities=frozenset({"code"}),
        publish=("builds.>",),
        subscribe=("builds.*",),
    )
    assert alice.may_act_as("alice") and not alice.may_act_as("bob")
    assert alice.may_read("alice") and not alice.may_read("bob")
    assert alice.may_advertise(["code"]) and not alice.may_advertise(["code", "deploy"])
    assert alice.may_publish("builds.x.y") and not alice.may_publish("deploys.x")
    assert alice.may_subscribe("builds.x") and not alice.may_subscribe("builds.>")
    assert not alice.may_broadcast() and not alice.is_admin
    root = Principal(agent_id="root", roles=frozenset({"admin"}))
    assert root.is_admin and root.may_read("bob") and root.may_broadcast()
    assert not root.may_act_as("bob")  # an admin reads anyone's, but is still itself
    anyone = Principal.open("whoever")
    assert anyone.may_act_as("bob") and anyone.may_publish("x") and anyone.may_subscribe(">")


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(rate=1000, burst=2)
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(RateLimitedError) as limited:
        limiter.take("a")
    assert int(limited.value.metadata["retry_after_ms"]) >= 1
    limiter.take("b")  # per agent
    time.sleep(0.01)
    limiter.take("a")
    RateLimiter(rate=0, burst=1).take("a")  # off


def test_tokens_file_and_jwt(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    good, old = tokens_file.new_token(), tokens_file.new_token()
    alice = Principal(agent_id="alice", capabilities=frozenset({"code"}))
    tokens_file.append_entry(path, tokens_file.entry_json(good, alice))
    tokens_file.append_entry(path, tokens_file.entry_json(old, alice, expires_at=time.time() - 1))
    assert good not in path.read_text()
    secret = "k" * 32
    auth = Authenticator(
        tokens=tokens_file.TokensFile.load(path),
        jwt=jwts.JwtVerifier(secret, jwts.HMAC),
    )
    principal = auth.authenticate(f"Bearer {good}", None)
    assert principal is not None and principal.agent_id == "alice"
    assert principal.capabilities == {"code"}
    signed = jwts.create(secret, alice, 60)
    assert auth.authenticate(f"Bearer {signed}", None) == principal
    for bad in (None, "", "Bearer", f"Basic {good}", f"Bearer {old}", "Bearer x.y.z"):
        with pytest.raises(UnauthenticatedError) as refused:
            auth.authenticate(bad, None)
        assert refused.value.message == "missing or invalid credentials"
    with pytest.raises(UnauthenticatedError):  # the certificate names another agent
        auth.authenticate(f"Bearer {good}", "bob")
    other = jwts.create("z" * 32, alice, 60)
    with pytest.raises(UnauthenticatedError):
        auth.authenticate(f"Bearer {other}", None)


def test_tokens_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"sha256": "0" * 64, "agent_id": "bad id!"}]}))
    with pytest.raises(tokens_file.TokensFileError, match=r"tokens\[0\]"):
        tokens_file.TokensFile.load(path)
    path.write_text("[]")
    with pytest.raises(tokens_file.TokensFileError, match="list `tokens`"):
        tokens_file.TokensFile.load(path)
    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[[tokens]]\nsha256 = "{"a" * 64}"\nagent_id = "x"\npublish = ["a.>"]\n')
    assert len(tokens_file.TokensFile.load(toml)) == 1
