"""`agentpost`: run the server, and talk to it from a shell.

    agentpost serve                                   # gRPC server + worker (embedded Redis)
    agentpost send coder '{"task": "x"}'              # prints the message id
    agentpost --as me request coder '{"q": 1}'        # prints the reply payload
    agentpost --as me listen --count 1                # one line per message
    agentpost agents --online                         # a table (or --json)
    agentpost agents register coder --capability code # known before it first connects
    agentpost mailbox coder                           # messages waiting for coder
    agentpost deadletters --agent coder               # messages that expired undelivered
    agentpost --as me handoff --to coder --title T --wait  # a task; prints its result
    agentpost tasks --state working                   # tasks (see agentpost._taskcli)
    agentpost workflow run examples/review.yaml       # live (see agentpost._workflow_cli)
    agentpost token create coder --capability code --tokens-file tokens.json

Credentials: --token (or $AGENTPOST_TOKEN), --tls-ca, --tls-cert and --tls-key (or
$AGENTPOST_TLS_CA, $AGENTPOST_TLS_CLIENT_CERT, $AGENTPOST_TLS_CLIENT_KEY); --tls for TLS with the
system's roots.

Errors are one line on stderr and exit status 1 (2 for usage errors, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import pathlib
import secrets
import sys
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from agentpost import _taskcli, _workflow_cli
from agentpost._clikit import (
    DEFAULT_SERVER,
    Command,
    add_globals,
    cli_options,
    fail,
    header,
    parse_payload,
    positive,
    positive_int,
    print_table,
    print_value,
    time_text,
    with_client,
)
from agentpost.agent import connect
from agentpost.client import Client, Presence
from agentpost.errors import AgentpostError, UnavailableError
from agentpost.mailbox import DeadLetter, MailboxInfo
from agentpost.message import AgentInfo, Message

__all__ = ["DEFAULT_SERVER", "build_parser", "main", "parse_payload"]

_NOT_INSTALLED = "the server is not installed: pip install 'agentpost[server]'"


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    command: Command = args.command
    if command not in (_serve, _worker):  # the server configures its own logging
        logging.basicConfig(level=logging.WARNING, format="agentpost: %(levelname)s: %(message)s")
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except AgentpostError as exc:
        return fail(exc.message)
    except BrokenPipeError:  # `agentpost listen | head`
        sys.stderr.close()
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentpost", description="A gRPC message bus for AI agents."
    )
    add_globals(parser, suppress=False)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_globals(sub, suppress=True)
        sub.set_defaults(command=run)
        return sub

    serve = command("serve", _serve, "Run the server (gRPC + worker) until SIGTERM or Ctrl-C.")
    serve.add_argument("--listen", metavar="ADDR", help="address to listen on (host:port)")
    serve.add_argument("--redis-url", metavar="URL", help="Redis URL (default: embedded)")
    serve.add_argument("--no-worker", action="store_true", help="do not run the arq worker")
    serve.add_argument(
        "--plaintext",
        action="store_true",
        help="serve without TLS (development; AGENTPOST_TLS_CERT/_KEY are the alternative)",
    )

    worker = command("worker", _worker, "Run only the background worker (needs a Redis URL).")
    worker.add_argument("--redis-url", metavar="URL", help="Redis URL")

    send = command("send", _send, "Send a direct message; prints its id.")
    send.add_argument("to", metavar="TO", help="the recipient agent id")
    _add_payload(send)
    send.add_argument(
        "--ttl", type=positive, metavar="S", help="dead-letter it if not delivered within S s"
    )
    send.add_argument(
        "--idempotency-key",
        metavar="K",
        help="sending again with the same K stores the message once (default: a new key)",
    )
    send.add_argument(
        "--timeout",
        type=positive,
        default=10.0,
        metavar="S",
        help="give up after S seconds of trying while the server is unavailable (default 10)",
    )

    publish = command("publish", _publish, "Publish on a topic, or to everyone; prints the id.")
    publish.add_argument(
        "args", nargs="+", metavar="ARG", help="TOPIC PAYLOAD, or PAYLOAD with --broadcast"
    )
    publish.add_argument(
        "--broadcast", action="store_true", help="send to every connected agent (no TOPIC)"
    )
    _add_payload(publish, positional=False)

    request = command("request", _request, "Send a request and print the reply's payload.")
    request.add_argument("to", metavar="TO", help="the agent that should answer")
    _add_payload(request)
    request.add_argument("--timeout", type=positive, default=30.0, metavar="S", help="seconds")

    listen = command("listen", _listen, "Print messages as they arrive, one per line.")
    listen.add_argument(
        "--topic", action="append", default=[], metavar="PATTERN", help="topic pattern (repeat)"
    )
    listen.add_argument(
        "--broadcasts", action="store_true", help="receive broadcasts too (without --as)"
    )
    listen.add_argument("--count", type=positive_int, metavar="N", help="exit after N messages")

    agents = command("agents", _agents, "List the known agents, or register one.")
    agents.add_argument("--capability", metavar="C", help="only agents with this capability")
    presence = agents.add_mutually_exclusive_group()
    presence.add_argument("--online", action="store_true", help="only connected agents")
    presence.add_argument("--offline", action="store_true", help="only disconnected agents")
    agents_commands = agents.add_subparsers(title="commands", metavar="COMMAND")
    register_help = "Make an agent id known before it connects, so messages to it are kept."
    register = agents_commands.add_parser("register", help=register_help, description=register_help)
    add_globals(register, suppress=True)
    register.set_defaults(command=_register)
    register.add_argument("id", metavar="ID", help="the agent id")
    register.add_argument(
        "--capability",
        dest="capabilities",
        action="append",
        default=[],
        metavar="C",
        help="what it can do (repeat)",
    )

    mailbox = command("mailbox", _mailbox, "Show how many messages wait for an agent.")
    mailbox.add_argument("id", metavar="ID", help="the agent id")

    token_help = "Make credentials (run where the server's secrets are)."
    token = command("token", _no_subcommand, token_help)
    token_commands = token.add_subparsers(title="commands", metavar="COMMAND")
    create_help = (
        "Make a bearer token for an agent and print it; its hashed entry is appended to"
        " --tokens-file (or printed). With --jwt, a JWT signed with $AGENTPOST_JWT_SECRET."
    )
    create = token_commands.add_parser("create", help=create_help, description=create_help)
    add_globals(create, suppress=True)
    create.set_defaults(command=_token_create)
    create.add_argument("id", metavar="AGENT_ID", help="the agent the token names")
    for flag, dest, what in (
        ("--role", "roles", "role: admin (everything), broadcast"),
        ("--capability", "capabilities", "capability it may advertise (* for any)"),
        ("--publish", "publish", "topic pattern it may publish on"),
        ("--subscribe", "subscribe", "topic pattern it may subscribe to"),
    ):
        create.add_argument(
            flag, dest=dest, action="append", default=[], metavar="X", help=f"{what} (repeat)"
        )
    create.add_argument("--ttl", type=positive, metavar="S", help="expires after S seconds")
    create.add_argument("--tokens-file", metavar="PATH", help="append the entry to this JSON file")
    create.add_argument(
        "--jwt", action="store_true", help="make a JWT (HS256, $AGENTPOST_JWT_SECRET; --ttl 3600)"
    )

    dead = command("deadletters", _deadletters, "List messages that expired undelivered.")
    dead.add_argument("--agent", metavar="ID", help="only those for this agent")
    dead.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N (default 100)"
    )
    _taskcli.add_commands(command)
    _workflow_cli.add_commands(command)
    return parser


def _add_payload(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        parser.add_argument(
            "payload", metavar="PAYLOAD", help="JSON if it parses, else a string; - reads stdin"
        )
    parser.add_argument(
        "--header", action="append", default=[], metavar="K=V", type=header, help="(repeat)"
    )
    parser.add_argument("--raw", action="store_true", help="send PAYLOAD as a string, never JSON")


# ------------------------------------------------------------------------- commands


def _serve(args: argparse.Namespace) -> int:
    try:
        from agentpost_server.app import serve_main
    except ModuleNotFoundError:
        return fail(_NOT_INSTALLED)
    return serve_main(
        listen=args.listen,
        redis_url=args.redis_url,
        worker=False if args.no_worker else None,
        plaintext=True if args.plaintext else None,
    )


def _worker(args: argparse.Namespace) -> int:
    try:
        from agentpost_server.app import worker_main
    except ModuleNotFoundError:
        return fail(_NOT_INSTALLED)
    return worker_main(redis_url=args.redis_url)


def _no_subcommand(args: argparse.Namespace) -> int:
    return fail("token needs a command: token create AGENT_ID ...", status=2)


def _token_create(args: argparse.Namespace) -> int:
    try:
        from agentpost_server.auth import tokens
        from agentpost_server.core.auth import Principal
    except ModuleNotFoundError:
        return fail(_NOT_INSTALLED)
    try:
        principal = Principal(
            agent_id=args.id,
            roles=frozenset(args.roles),
            capabilities=frozenset(args.capabilities),
            publish=tuple(args.publish),
            subscribe=tuple(args.subscribe),
        )
        tokens.principal_from_claims(args.id, tokens.entry_json("", principal), "the token")
    except (ValueError, AgentpostError) as exc:
        return fail(getattr(exc, "message", str(exc)), status=2)
    if args.jwt:
        secret = os.environ.get("AGENTPOST_JWT_SECRET", "")
        if len(secret) < 32:
            return fail("--jwt signs with $AGENTPOST_JWT_SECRET (at least 32 characters)")
        from agentpost_server.auth import jwts

        token = jwts.create(
            secret,
            principal,
            args.ttl or 3600.0,
            issuer=os.environ.get("AGENTPOST_JWT_ISSUER"),
            audience=os.environ.get("AGENTPOST_JWT_AUDIENCE"),
        )
        print(json.dumps({"token": token}) if args.json else token)
        return 0
    token = tokens.new_token()
    expires = datetime.datetime.now().timestamp() + args.ttl if args.ttl else None
    entry = tokens.entry_json(token, principal, expires)
    if args.tokens_file:
        try:
            tokens.append_entry(pathlib.Path(args.tokens_file), entry)
        except (OSError, ValueError) as exc:
            return fail(f"cannot update {args.tokens_file}: {exc}")
    if args.json:
        print(json.dumps({"token": token, "entry": entry}))
        return 0
    print(token)
    if args.tokens_file:
        print(f"appended to {args.tokens_file} (restart the server to load it)", file=sys.stderr)
    else:
        print(f"tokens-file entry: {json.dumps(entry)}", file=sys.stderr)
    return 0


def _send(args: argparse.Namespace) -> int:
    payload = parse_payload(args.payload, raw=args.raw)
    options = cli_options(args, request_timeout=args.timeout)

    # A key of our own, not the SDK's short-lived retry key: the error below offers it for a
    # later retry (one stored key per CLI send is cheap).
    key = args.idempotency_key
    if key is None:
        key = secrets.token_urlsafe(16)

    async def run(client: Client) -> str:
        return await client.send(
            args.to, payload, headers=dict(args.header), ttl=args.ttl, idempotency_key=key
        )

    try:
        message_id = with_client(args, run, options)
    except UnavailableError as exc:
        key = exc.metadata.get("idempotency_key")
        if key is None:
            raise
        return fail(f"{exc.message} (to retry safely: --idempotency-key {key})")
    return _print_id(args, message_id)


def _publish(args: argparse.Namespace) -> int:
    expected = 1 if args.broadcast else 2
    if len(args.args) != expected:
        usage = "PAYLOAD with --broadcast" if args.broadcast else "TOPIC PAYLOAD"
        return fail(f"publish takes {usage}", status=2)
    payload = parse_payload(args.args[-1], raw=args.raw)
    headers = dict(args.header)

    async def run(client: Client) -> str:
        if args.broadcast:
            return await client.broadcast(payload, headers=headers)
        return await client.publish(args.args[0], payload, headers=headers)

    return _print_id(args, with_client(args, run))


def _request(args: argparse.Namespace) -> int:
    payload = parse_payload(args.payload, raw=args.raw)

    async def run(client: Client) -> Message:
        return await client.request(
            args.to, payload, timeout=args.timeout, headers=dict(args.header)
        )

    reply = with_client(args, run)
    if args.json:
        print(json.dumps(message_json(reply), ensure_ascii=False))
    else:
        print_value(reply.payload)
    return 0


def _listen(args: argparse.Namespace) -> int:
    if args.agent_id is None and not args.topic and not args.broadcasts:
        return fail("listen needs --as AGENT_ID, or --topic/--broadcasts", status=2)
    return asyncio.run(_listen_async(args))


async def _listen_async(args: argparse.Namespace) -> int:
    seen = 0
    async with contextlib.aclosing(_receive(args)) as messages:
        async for message in messages:
            if args.json:
                print(json.dumps(message_json(message), ensure_ascii=False), flush=True)
            else:
                print(message_line(message), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


async def _receive(args: argparse.Namespace) -> AsyncGenerator[Message, None]:
    if args.agent_id is not None:
        async with connect(
            args.server, agent_id=args.agent_id, subscriptions=args.topic, options=cli_options(args)
        ) as agent:
            async for message in agent.messages():
                yield message
        return
    async with Client(args.server, options=cli_options(args)) as client:
        stream = client.subscribe(args.topic, broadcasts=args.broadcasts)
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield message


def _agents(args: argparse.Namespace) -> int:
    presence: Presence = "online" if args.online else "offline" if args.offline else "all"

    async def run(client: Client) -> list[AgentInfo]:
        return await client.list_agents(capability=args.capability, presence=presence)

    agents = with_client(args, run)
    if args.json:
        print(json.dumps([agent_json(agent) for agent in agents], ensure_ascii=False))
        return 0
    _print_agents(agents)
    return 0


def _register(args: argparse.Namespace) -> int:
    async def run(client: Client) -> AgentInfo:
        return await client.register_agent(args.id, capabilities=args.capabilities)

    agent = with_client(args, run)
    if args.json:
        print(json.dumps(agent_json(agent), ensure_ascii=False))
    else:
        _print_agents([agent])
    return 0


def _mailbox(args: argparse.Namespace) -> int:
    async def run(client: Client) -> MailboxInfo:
        return await client.get_mailbox(args.id)

    mailbox = with_client(args, run)
    if args.json:
        print(json.dumps(mailbox_json(mailbox), ensure_ascii=False))
        return 0
    oldest = mailbox.oldest_at.isoformat(timespec="seconds") if mailbox.oldest_at else "-"
    print_table(
        [
            ("AGENT", "DEPTH", "UNACKED", "OLDEST", "DEAD LETTERS"),
            (
                mailbox.agent_id,
                str(mailbox.depth),
                str(mailbox.unacknowledged),
                oldest,
                str(mailbox.dead_lettered),
            ),
        ]
    )
    return 0


def _deadletters(args: argparse.Namespace) -> int:
    async def run(client: Client) -> list[DeadLetter]:
        return await client.list_dead_letters(agent_id=args.agent, limit=args.limit)

    letters = with_client(args, run)
    if args.json:
        print(json.dumps([dead_letter_json(letter) for letter in letters], ensure_ascii=False))
        return 0
    rows = [("DEAD AT", "ID", "SENDER", "TO", "REASON")]
    for letter in letters:
        message = letter.message
        dead_at = letter.dead_at.isoformat(timespec="seconds") if letter.dead_at else "-"
        rows.append((dead_at, message.id, message.sender, _target(message), letter.reason))
    print_table(rows)
    return 0


def _print_agents(agents: Sequence[AgentInfo]) -> None:
    rows = [("ID", "ONLINE", "SESSIONS", "PENDING", "CAPABILITIES", "LAST SEEN")]
    for agent in agents:
        seen = agent.last_seen.isoformat(timespec="seconds") if agent.last_seen else "-"
        caps = ",".join(agent.capabilities) or "-"
        online = "yes" if agent.online else "no"
        rows.append((agent.agent_id, online, str(agent.sessions), str(agent.pending), caps, seen))
    print_table(rows)


# ------------------------------------------------------------------------- output


def message_json(message: Message) -> dict[str, Any]:
    """A message as a JSON object (bytes payloads base64-encoded, `payload_encoding` says so)."""
    out: dict[str, Any] = {
        "id": message.id,
        "sender": message.sender,
        "kind": str(message.kind),
        "to": message.to,
        "topic": message.topic,
        "broadcast": message.broadcast,
        "correlation_id": message.correlation_id or None,
        "created_at": message.created_at.isoformat(),
        "headers": message.headers,
        "content_type": message.content_type,
        "payload": message.payload,
    }
    if isinstance(message.payload, bytes):
        out["payload"] = base64.b64encode(message.payload).decode("ascii")
        out["payload_encoding"] = "base64"
    return out


def message_line(message: Message) -> str:
    """One human line: time, sender -> target, kind, payload."""
    target = _target(message)
    if isinstance(message.payload, bytes):
        body = f"<{len(message.payload)} bytes {message.content_type}>"
    else:
        body = json.dumps(message.payload, ensure_ascii=False)
    stamp = message.created_at.isoformat(timespec="milliseconds")
    return f"{stamp}  {message.sender} -> {target}  {message.kind}  {body}"


def _target(message: Message) -> str:
    return message.to or (f"#{message.topic}" if message.topic else "*")


def agent_json(agent: AgentInfo) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id,
        "capabilities": list(agent.capabilities),
        "metadata": agent.metadata,
        "online": agent.online,
        "sessions": agent.sessions,
        "connected_since": time_text(agent.connected_since),
        "last_seen": time_text(agent.last_seen),
        "first_seen": time_text(agent.first_seen),
        "pending": agent.pending,
    }


def mailbox_json(mailbox: MailboxInfo) -> dict[str, Any]:
    return {
        "agent_id": mailbox.agent_id,
        "depth": mailbox.depth,
        "unacknowledged": mailbox.unacknowledged,
        "oldest_at": time_text(mailbox.oldest_at),
        "dead_lettered": mailbox.dead_lettered,
    }


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message": message_json(letter.message),
        "reason": letter.reason,
        "dead_at": time_text(letter.dead_at),
    }


def _print_id(args: argparse.Namespace, message_id: str) -> int:
    print(json.dumps({"message_id": message_id}) if args.json else message_id)
    return 0
