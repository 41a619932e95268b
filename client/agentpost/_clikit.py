"""What the commands of the `agentpost` console script share: the global options, argument types,
payload parsing and printing, tables, running a `Client`, and the one-line error."""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from agentpost.client import Client
from agentpost.config import ConnectOptions
from agentpost.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_SERVER",
    "Command",
    "add_globals",
    "fail",
    "header",
    "json_value",
    "parse_payload",
    "positive",
    "positive_int",
    "print_table",
    "print_value",
    "time_text",
    "with_client",
]

DEFAULT_SERVER = "127.0.0.1:50051"

#: Runs one command; returns the exit status.
Command = Callable[[argparse.Namespace], int]
T = TypeVar("T")


def add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before and after the command; a subcommand only overrides what it was given.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--server",
        metavar="ADDR",
        default=default(os.environ.get("AGENTPOST_SERVER") or DEFAULT_SERVER),
        help=f"server address (default: $AGENTPOST_SERVER or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--as",
        dest="agent_id",
        metavar="AGENT_ID",
        default=default(None),
        help="act as this agent (default: the token's, else anonymous)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(os.environ.get("AGENTPOST_TOKEN")),
        help="bearer token (default: $AGENTPOST_TOKEN)",
    )
    for flag, env, what in (
        ("--tls-ca", "AGENTPOST_TLS_CA", "PEM CA bundle that verifies the server"),
        ("--tls-cert", "AGENTPOST_TLS_CLIENT_CERT", "PEM client certificate (mutual TLS)"),
        ("--tls-key", "AGENTPOST_TLS_CLIENT_KEY", "PEM key of the client certificate"),
    ):
        parser.add_argument(
            flag, metavar="FILE", default=default(os.environ.get(env)), help=f"{what} (${env})"
        )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(os.environ.get("AGENTPOST_TLS", "").lower() in ("1", "true", "yes")),
        help="use TLS with the system's CAs (implied by --tls-ca/--tls-cert; $AGENTPOST_TLS)",
    )


def header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def parse_payload(text: str, *, raw: bool = False) -> Any:
    """The payload of a command line argument: JSON if it parses (and not `raw`), else the text."""
    if text == "-":
        text = sys.stdin.read()
    if raw:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def time_text(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def with_client(
    args: argparse.Namespace,
    run: Callable[[Client], Coroutine[Any, Any, T]],
    options: ConnectOptions | None = None,
) -> T:
    async def go() -> T:
        opts = options or cli_options(args)
        async with Client(args.server, agent_id=args.agent_id, options=opts) as client:
            return await run(client)

    return asyncio.run(go())


def cli_options(args: argparse.Namespace, **overrides: Any) -> ConnectOptions:
    """ConnectOptions with the credentials of the command line (or environment)."""
    try:
        return ConnectOptions(
            token=getattr(args, "token", None) or None,
            tls=getattr(args, "tls", False),
            tls_ca=getattr(args, "tls_ca", None) or None,
            tls_cert=getattr(args, "tls_cert", None) or None,
            tls_key=getattr(args, "tls_key", None) or None,
            **overrides,
        )
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


def fail(message: str, *, status: int = 1) -> int:
    print(f"agentpost: error: {message}", file=sys.stderr)
    return status


def print_value(value: Any) -> None:
    """Print a payload for a person: bytes as they are, a string as it is, else indented JSON."""
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        sys.stdout.flush()
    elif isinstance(value, str):
        print(value)
    else:
        print(json.dumps(value, ensure_ascii=False, indent=2))


def json_value(value: Any) -> Any:
    """A payload for JSON output: bytes base64-encoded, anything else as it is."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value
