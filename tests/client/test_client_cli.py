"""The `agentpost` console script: help, argument parsing, output, errors (no server needed)."""

from __future__ import annotations

import builtins
import io
import json
import subprocess
import sys
from typing import Any

import pytest

import agentpost
from agentpost import cli
from agentpost.mailbox import DeadLetter, MailboxInfo
from agentpost.message import AgentInfo, Message
from agentpost.v1 import envelope_pb2

COMMANDS = [
    "serve",
    "worker",
    "send",
    "publish",
    "request",
    "listen",
    "agents",
    "agents register",
    "mailbox",
    "deadletters",
]


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command.split()[0] in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command.split(), "--help"])
    assert exited.value.code == 0
    assert f"agentpost {command}" in capsys.readouterr().out


def test_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from agentpost.cli import main; raise SystemExit(main())", "-h"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "usage: agentpost" in done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["send"],
        ["send", "a"],
        ["send", "a", "1", "--header", "novalue"],
        ["request", "a", "1", "--timeout", "-1"],
        ["listen", "--count", "0"],
        ["agents", "--online", "--offline"],
        ["agents", "register"],
        ["agents", "bogus"],
        ["mailbox"],
        ["deadletters", "--limit", "0"],
        ["send", "a", "1", "--ttl", "0"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "agentpost" in capsys.readouterr().err


def test_global_options_work_before_and_after_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTPOST_SERVER", "env-host:1")
    parser = cli.build_parser()
    args = parser.parse_args(["send", "coder", "{}"])
    assert (args.server, args.json, args.agent_id) == ("env-host:1", False, None)
    args = parser.parse_args(["--server", "a:1", "--as", "me", "send", "coder", "{}", "--json"])
    assert (args.server, args.json, args.agent_id) == ("a:1", True, "me")
    args = parser.parse_args(["send", "coder", "{}", "--server", "b:2", "--as", "you"])
    assert (args.server, args.agent_id) == ("b:2", "you")
    args = parser.parse_args(["send", "x", "1", "--header", "a=b", "--header", "c=d=e"])
    assert args.header == [("a", "b"), ("c", "d=e")]


def test_default_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTPOST_SERVER", raising=False)
    assert cli.build_parser().parse_args(["agents"]).server == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("text", "raw", "expected"),
    [
        ('{"a": 1}', False, {"a": 1}),
        ("[1, 2]", False, [1, 2]),
        ("42", False, 42),
        ("42", True, "42"),
        ("hello world", False, "hello world"),
        ('"quoted"', False, "quoted"),
        ("null", False, None),
    ],
)
def test_payload_parsing(text: str, raw: bool, expected: Any) -> None:
    assert cli.parse_payload(text, raw=raw) == expected


def test_payload_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"from": "stdin"}'))
    assert cli.parse_payload("-") == {"from": "stdin"}


def test_publish_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, Any]] = []

    async def publish(self: Any, topic: str, payload: Any, **kw: Any) -> str:
        calls.append((topic, payload))
        return "id-1"

    async def broadcast(self: Any, payload: Any, **kw: Any) -> str:
        calls.append(("*", payload))
        return "id-2"

    monkeypatch.setattr(agentpost.Client, "publish", publish)
    monkeypatch.setattr(agentpost.Client, "broadcast", broadcast)
    assert cli.main(["publish", "builds.done", '{"ok": true}']) == 0
    assert cli.main(["publish", "--broadcast", "hi"]) == 0
    assert calls == [("builds.done", {"ok": True}), ("*", "hi")]
    assert capsys.readouterr().out.split() == ["id-1", "id-2"]
    assert cli.main(["publish", "--broadcast", "a", "b"]) == 2
    assert cli.main(["publish", "only-a-topic"]) == 2
    assert "publish takes TOPIC PAYLOAD" in capsys.readouterr().err


def test_send_prints_the_id_as_text_or_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    async def send(self: Any, to: str, payload: Any, *, headers: Any = None, **kw: Any) -> str:
        seen.update(agent=self.agent_id, to=to, payload=payload, headers=headers, **kw)
        return "01XYZ"

    monkeypatch.setattr(agentpost.Client, "send", send)
    assert cli.main(["--as", "me", "send", "coder", "[1]", "--header", "k=v"]) == 0
    assert capsys.readouterr().out == "01XYZ\n"
    # A key of its own (one the retry hint can offer), not the SDK's short-lived "~" key.
    key = seen.pop("idempotency_key")
    assert len(key) >= 16 and not key.startswith("~")
    assert seen == {
        "agent": "me",
        "to": "coder",
        "payload": [1],
        "headers": {"k": "v"},
        "ttl": None,
    }
    assert cli.main(["--json", "send", "coder", "x", "--raw"]) == 0
    assert json.loads(capsys.readouterr().out) == {"message_id": "01XYZ"}


def test_agentpost_errors_are_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def send(self: Any, to: str, payload: Any, **kw: Any) -> str:
        raise agentpost.AgentOfflineError(f"agent {to!r} is not connected")

    monkeypatch.setattr(agentpost.Client, "send", send)
    assert cli.main(["send", "coder", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "agentpost: error: agent 'coder' is not connected\n"
    assert captured.out == ""


def test_unreachable_server_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--server", "127.0.0.1:1", "send", "coder", "1", "--timeout", "0.3"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentpost: error: ")
    assert err.count("\n") == 1
    assert "(to retry safely: --idempotency-key " in err  # sends are retried, then give up
    offered = err.rsplit("--idempotency-key ", 1)[1].rstrip(")\n")
    assert offered and not offered.startswith("~")  # a key the SDK takes from a caller
    assert cli.main(["--server", "127.0.0.1:1", "agents"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentpost: error: ")
    assert err.count("\n") == 1


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    async def send(self: Any, to: str, payload: Any, **kw: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(agentpost.Client, "send", send)
    assert cli.main(["send", "coder", "1"]) == 130


def test_listen_needs_an_identity_or_a_topic(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["listen"]) == 2
    assert "listen needs --as" in capsys.readouterr().err


def test_serve_without_the_server_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("agentpost_server"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert cli.main(["serve"]) == 1
    assert cli.main(["worker"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        err
        == ["agentpost: error: the server is not installed: pip install 'agentpost[server]'"] * 2
    )


def test_serve_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("agentpost_server.app")
    import agentpost_server.app as app

    seen: dict[str, Any] = {}

    def serve_main(**kwargs: Any) -> int:
        seen.update(kwargs)
        return 7

    monkeypatch.setattr(app, "serve_main", serve_main)
    assert cli.main(["serve", "--listen", "0.0.0.0:1", "--no-worker"]) == 7
    assert seen == {"listen": "0.0.0.0:1", "redis_url": None, "worker": False, "plaintext": None}
    assert cli.main(["serve", "--redis-url", "redis://x", "--plaintext"]) == 7
    assert seen == {"listen": None, "redis_url": "redis://x", "worker": None, "plaintext": True}


def _message(payload: Any, **recipient: str) -> Message:
    env = envelope_pb2.Envelope(id="01A", sender="planner", kind=envelope_pb2.MESSAGE_KIND_MESSAGE)
    for name, value in recipient.items():
        setattr(env.recipient, name, value)
    env.created_at.FromSeconds(1_700_000_000)
    from agentpost.payload import fill_payload

    fill_payload(env.payload, payload)
    return Message.from_envelope(env)


def test_message_output() -> None:
    line = cli.message_line(_message({"a": 1}, agent_id="coder"))
    assert line == '2023-11-14T22:13:20.000+00:00  planner -> coder  message  {"a": 1}'
    assert "planner -> #builds.done" in cli.message_line(_message(1, topic="builds.done"))
    assert "<3 bytes application/octet-stream>" in cli.message_line(_message(b"abc"))
    data = cli.message_json(_message(b"abc", topic="t"))
    assert data["payload"] == "YWJj"
    assert data["payload_encoding"] == "base64"
    assert data["topic"] == "t"
    assert json.loads(json.dumps(cli.message_json(_message([1], agent_id="x"))))["payload"] == [1]


def test_send_options_and_a_retry_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    async def send(self: Any, to: str, payload: Any, **kw: Any) -> str:
        seen.update(kw, timeout=self.options.request_timeout)
        if kw["idempotency_key"] == "down":
            raise agentpost.ConnectionLostError("gone", metadata={"idempotency_key": "down"})
        return "01XYZ"

    monkeypatch.setattr(agentpost.Client, "send", send)
    argv = ["send", "coder", "1", "--ttl", "30", "--idempotency-key", "k1", "--timeout", "2"]
    assert cli.main(argv) == 0
    assert (seen["ttl"], seen["idempotency_key"], seen["timeout"]) == (30.0, "k1", 2.0)
    assert cli.main(["send", "coder", "1", "--idempotency-key", "down"]) == 1
    assert capsys.readouterr().err == (
        "agentpost: error: gone (to retry safely: --idempotency-key down)\n"
    )


def _agent(agent_id: str, pending: int) -> AgentInfo:
    return AgentInfo(
        agent_id=agent_id,
        capabilities=("code",),
        metadata={},
        online=False,
        sessions=0,
        connected_since=None,
        last_seen=None,
        first_seen=None,
        pending=pending,
    )


def test_agents_show_pending_and_register(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registered: list[tuple[str, Any]] = []

    async def list_agents(self: Any, **kw: Any) -> list[AgentInfo]:
        return [_agent("coder", 4)]

    async def register_agent(self: Any, agent_id: str, *, capabilities: Any = ()) -> AgentInfo:
        registered.append((agent_id, capabilities))
        return _agent(agent_id, 0)

    monkeypatch.setattr(agentpost.Client, "list_agents", list_agents)
    monkeypatch.setattr(agentpost.Client, "register_agent", register_agent)
    assert cli.main(["agents"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "ONLINE", "SESSIONS", "PENDING", "CAPABILITIES", "LAST", "SEEN"]
    assert row.split() == ["coder", "no", "0", "4", "code", "-"]
    assert cli.main(["--json", "agents"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["pending"] == 4

    argv = ["agents", "register", "reviewer", "--capability", "code", "--capability", "review"]
    assert cli.main(argv) == 0
    assert registered == [("reviewer", ["code", "review"])]
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "reviewer"
    assert cli.main(["agents", "register", "x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agent_id"] == "x"


def test_mailbox_and_dead_letters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stamp = _message(1).created_at
    asked: dict[str, Any] = {}

    async def get_mailbox(self: Any, agent_id: str) -> MailboxInfo:
        if agent_id == "ghost":
            raise agentpost.AgentNotFoundError("no agent 'ghost'")
        return MailboxInfo(
            agent_id=agent_id, depth=3, unacknowledged=1, oldest_at=stamp, dead_lettered=2
        )

    async def list_dead_letters(self: Any, agent_id: Any = None, limit: int = 100) -> Any:
        asked.update(agent_id=agent_id, limit=limit)
        return [
            DeadLetter(
                message=_message({"a": 1}, agent_id="coder"), reason="ttl expired", dead_at=stamp
            )
        ]

    monkeypatch.setattr(agentpost.Client, "get_mailbox", get_mailbox)
    monkeypatch.setattr(agentpost.Client, "list_dead_letters", list_dead_letters)
    assert cli.main(["mailbox", "coder"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["AGENT", "DEPTH", "UNACKED", "OLDEST", "DEAD", "LETTERS"]
    assert row.split() == ["coder", "3", "1", "2023-11-14T22:13:20+00:00", "2"]
    assert cli.main(["mailbox", "coder", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["oldest_at"] == "2023-11-14T22:13:20+00:00"
    assert cli.main(["mailbox", "ghost"]) == 1
    assert capsys.readouterr().err == "agentpost: error: no agent 'ghost'\n"

    assert cli.main(["deadletters", "--agent", "coder", "--limit", "5"]) == 0
    assert asked == {"agent_id": "coder", "limit": 5}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEAD", "AT", "ID", "SENDER", "TO", "REASON"]
    assert "01A  planner  coder  ttl expired" in lines[1]
    assert cli.main(["deadletters", "--json"]) == 0
    letter = json.loads(capsys.readouterr().out)[0]
    assert (letter["reason"], letter["message"]["payload"]) == ("ttl expired", {"a": 1})
