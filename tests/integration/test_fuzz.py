"""Hostile input against every RPC of agentpost.v1.AgentMessaging, with hypothesis: random bytes,
and well-formed messages built to hurt (huge and odd strings, invalid ids, empty oneofs, JSON
nested near the decoders' depth limit, negative and absurd durations, unknown enum numbers, many
operations per frame, hostile replies from a responder).

It runs twice: with authentication off, and with a tokens file and a JWT secret, where each input
also carries a credential drawn from valid ones (an admin, a narrow agent), unknown, malformed and
expired ones, or none.

One in-process server takes it all while a well-behaved pair of SDK agents exchanges requests,
replies and direct messages. Every call must end with a status within a few seconds (a hang is
a failure), never INTERNAL (bad input is the caller's fault, not a server bug), every frame the
server sends must decode, nothing may log an ERROR (the server logs every unexpected exception
there, gRPC every frame it cannot decode), the server must still be SERVING at the end, and the
pair's traffic must have stayed correct: every reply right, every message delivered. Fixed
inputs that once got through run first.

Hypothesis runs in a worker thread and hands each example to the event loop that runs the
server and the agents; batches of examples run until the time budget is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, reject, seed, settings
from hypothesis import strategies as st

import agentpost
from agentpost.v1 import envelope_pb2, errors_pb2, messaging_pb2, payload_pb2, tasks_pb2
from agentpost_server.auth import tokens as tokens_file
from agentpost_server.core.auth import Principal
from tests.conftest import StartServer
from tests.helpers import assert_eventually

pytestmark = pytest.mark.timeout(180)

BUDGET = 25.0  # seconds of fuzzing
# Runs are the same every time; set another seed to explore further.
FUZZ_SEED = int(os.environ.get("AGENTPOST_FUZZ_SEED", "0"))
BATCH = 20  # examples per hypothesis run (each run has its own seed)
CALL_WATCHDOG = 6.0  # a call without a status after this long hangs: a failure
REQUEST_DEADLINE = 1.0  # gRPC deadline of fuzzed Request calls (the server honours it)
SUBSCRIBE_LISTEN = 0.3  # how long a fuzzed Subscribe stream that stays open is read
SERVICE = "/agentpost.v1.AgentMessaging/"
UNARY = (
    "Send",
    "Publish",
    "Request",
    "ListAgents",
    "GetAgent",
    "RegisterAgent",
    "GetMailbox",
    "ListDeadLetters",
    "Handoff",
    "GetTask",
    "CancelTask",
    "UpdateTask",
    "ListTasks",
    "ListAudit",
)
WELL_BEHAVED = ("alice", "bob")  # the SDK pair: fuzzed sessions never take these names
EVIL = "evil"  # a raw responder that answers every request with a hostile reply
INTERNAL = grpc.StatusCode.INTERNAL
_CLIENT_WRITE_FAILED = "Internal error from Core"

# ---------------------------------------------------------------------------------- strategies

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_huge = st.sampled_from([127, 128, 129, 255, 256, 4096, 65_536, 1 << 20, (1 << 20) + 1]).map(
    lambda n: "x" * n
)
_odd = st.sampled_from(
    [
        "",
        " ",
        "a b",
        "\x00",
        "a\x00b",
        "é",
        "日本",
        "\U0001f600",
        "a\nb",
        "alice\n",
        "-a",
        ".a",
        "a..b",
        "a.",
        "*",
        ">",
        "a.*",
        "a.>",
        "a.>.b",
        "_agentpost.agents.online",
        "_agentpost.>",
        "~retry",
        "m:",
        "b:",
        "t:",
        "t::",
        "t:x:",
        "m:0-0",
        "m:1-1",
        "b:1-1",
        "t:d:1-1",
        "b:99999999999999999999-1",
        "m:-1--1",
        "b:x-y",
        "t:no:such:1",
    ]
)
_valid_ids = st.one_of(
    st.sampled_from(["ghost", "nobody", "fz1", "fz2"]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True),
)
_agent_ids = st.one_of(
    st.sampled_from(["alice", "bob", EVIL]),  # the live ones, often
    st.sampled_from(["alice", "bob", "ghost"]),
    _valid_ids,
    _odd,
    _text,
    _huge,
)


def _not_ours(agent_id: str) -> bool:
    """Fuzzed sessions must not become replicas of the well-behaved agents or of EVIL."""
    return agent_id not in (*WELL_BEHAVED, EVIL)


_fuzz_ids = st.one_of(_valid_ids, _valid_ids, _agent_ids).filter(_not_ours)
_strings = st.one_of(_text, _odd, _huge, _agent_ids)
_patterns = st.one_of(
    st.sampled_from(["fuzz.topic", "fuzz.*", "fuzz.>", ">", "*", "_agentpost.agents.*"]),
    _strings,
)
_maybe_valid_lists = st.one_of(
    st.just([]), st.lists(st.sampled_from(["code", "fuzz.topic", "fuzz.>"]), max_size=3)
)
_int32 = st.integers(-(2**31), 2**31 - 1)
_int64 = st.integers(-(2**63), 2**63 - 1)


def _copy(target: Message, source: Message) -> None:
    """`target.CopyFrom(source)`; input too deep for protobuf to build here is not drawn."""
    try:
        target.CopyFrom(source)
    except DecodeError:
        reject()


def _nested_list(depth: int) -> struct_pb2.Value:
    value = struct_pb2.Value(string_value="leaf")
    for _ in range(depth):
        outer = struct_pb2.Value()
        outer.list_value.values.append(value)
        value = outer
    return value


def _nested_struct(depth: int) -> struct_pb2.Struct:
    inner = struct_pb2.Struct()
    inner.fields["leaf"].string_value = "x"
    for _ in range(depth):
        outer = struct_pb2.Struct()
        outer.fields["k"].struct_value.CopyFrom(inner)
        inner = outer
    return inner


def _json_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.values.extend(_json_value(item) for item in data)
    else:
        for key, item in data.items():
            value.struct_value.fields[key].CopyFrom(_json_value(item))
    return value


_json = st.recursive(
    st.none() | st.booleans() | st.floats() | _strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
).map(_json_value)
_values = st.one_of(
    _json,
    # around the depth where a delivery frame can no longer be decoded (100 message levels)
    st.integers(0, 49).map(_nested_list),
    st.integers(0, 31).map(lambda d: struct_pb2.Value(struct_value=_nested_struct(d))),
    st.just(struct_pb2.Value()),  # no kind set
)
_structs = st.one_of(
    st.builds(lambda v: v.struct_value, _json.filter(lambda v: v.HasField("struct_value"))),
    st.integers(0, 32).map(_nested_struct),
    st.just(struct_pb2.Struct()),
)


@st.composite
def _payloads(draw: st.DrawFn) -> payload_pb2.Payload:
    payload = payload_pb2.Payload()
    body = draw(st.sampled_from(["json", "data", "none"]))
    if body == "json":
        _copy(payload.json, draw(_values))
    elif body == "data":
        payload.data = draw(st.binary(max_size=64) | _huge.map(str.encode))
    if draw(st.booleans()):
        payload.content_type = draw(_strings)
    return payload


_headers = st.dictionaries(_strings, _strings, max_size=4)


@st.composite
def _durations(draw: st.DrawFn) -> tuple[int, int] | None:
    """None (unset), or (seconds, nanos), in range or not, signs agreeing or not."""
    if draw(st.booleans()):
        return None
    seconds = draw(st.one_of(st.integers(-5, 5), st.integers(-(10**12), 10**12), _int64))
    nanos = draw(st.one_of(st.just(0), st.integers(-(10**9), 10**9), _int32))
    return seconds, nanos


def _set_duration(message: Any, spec: tuple[int, int] | None) -> None:
    if spec is not None:
        message.seconds, message.nanos = spec


def _fill(message: Any, draw: st.DrawFn, *, to: bool = True, ttl: str = "") -> None:
    """The fields SendRequest, PublishRequest, RequestRequest and their stream twins share."""
    if to:
        message.to = draw(_agent_ids)
    _copy(message.payload, draw(_payloads()))
    message.headers.update(draw(_headers))
    if ttl:
        _set_duration(getattr(message, ttl), draw(_durations()))


def _publish_target(message: Any, draw: st.DrawFn) -> None:
    target = draw(st.sampled_from(["topic", "broadcast", "none"]))
    if target == "topic":
        message.topic = draw(st.one_of(_strings, st.sampled_from(["fuzz.topic", "fuzz.a.b"])))
    elif target == "broadcast":
        message.broadcast.SetInParent()
    _copy(message.payload, draw(_payloads()))
    message.headers.update(draw(_headers))
    message.include_self = draw(st.booleans())


@st.composite
def _unary_requests(draw: st.DrawFn, method: str) -> bytes:
    if method == "Send":
        send = messaging_pb2.SendRequest()
        _fill(send, draw, ttl="ttl")
        send.idempotency_key = draw(_strings)
        return send.SerializeToString()
    if method == "Publish":
        publish = messaging_pb2.PublishRequest()
        _publish_target(publish, draw)
        return publish.SerializeToString()
    if method == "Request":
        request = messaging_pb2.RequestRequest()
        _fill(request, draw, ttl="timeout")
        return request.SerializeToString()
    if method == "ListAgents":
        listing = messaging_pb2.ListAgentsRequest(presence=draw(_int32))  # type: ignore[arg-type]
        listing.capability = draw(_strings)
        return listing.SerializeToString()
    if method == "GetAgent":
        return messaging_pb2.GetAgentRequest(agent_id=draw(_agent_ids)).SerializeToString()
    if method == "RegisterAgent":
        register = messaging_pb2.RegisterAgentRequest(agent_id=draw(_fuzz_ids))
        register.capabilities.extend(draw(st.lists(_strings, max_size=70)))
        _copy(register.metadata, draw(_structs))
        return register.SerializeToString()
    if method == "GetMailbox":
        return messaging_pb2.GetMailboxRequest(agent_id=draw(_agent_ids)).SerializeToString()
    if method.endswith("Task") or method in ("Handoff", "ListTasks", "ListAudit"):
        return draw(_task_requests(method))
    limit = draw(_int32)
    dead = messaging_pb2.ListDeadLettersRequest(agent_id=draw(_agent_ids), limit=limit)
    return dead.SerializeToString()


_task_ids = st.one_of(st.sampled_from(["", "01JZZZZZZZZZZZZZZZZZZZZZZZ", "x"]), _strings)


@st.composite
def _task_specs(draw: st.DrawFn) -> tasks_pb2.TaskSpec:
    spec = tasks_pb2.TaskSpec()
    target = draw(st.sampled_from(["agent", "capability", "none"]))
    if target == "agent":  # never the well-behaved pair: offers would land in their mailboxes
        spec.agent_id = draw(_fuzz_ids)
    elif target == "capability":
        spec.capability = draw(st.one_of(_strings, st.just("fuzzcap")))
    spec.title = draw(st.one_of(st.just("a task"), _strings))
    spec.description = draw(_strings)
    _copy(spec.input, draw(_payloads()))
    _copy(spec.context, draw(_structs))
    spec.references.update(draw(_headers))
    spec.priority = draw(_int32)
    spec.max_attempts = draw(_int32)
    if draw(st.booleans()):
        spec.deadline.seconds = draw(st.integers(-(2**40), 2**40))
    _set_duration(spec.accept_timeout, draw(_durations()))
    return spec


@st.composite
def _task_requests(draw: st.DrawFn, method: str) -> bytes:
    message: Message
    if method == "Handoff":
        message = tasks_pb2.HandoffRequest(idempotency_key=draw(_strings))
        _copy(message.spec, draw(_task_specs()))
    elif method == "GetTask":
        message = tasks_pb2.GetTaskRequest(task_id=draw(_task_ids), history=draw(st.booleans()))
    elif method == "CancelTask":
        message = tasks_pb2.CancelTaskRequest(task_id=draw(_task_ids), reason=draw(_strings))
    elif method == "UpdateTask":
        message = tasks_pb2.UpdateTaskRequest(task_id=draw(_task_ids), attempt=draw(_int32))
        action = draw(
            st.sampled_from(
                ["accept", "reject", "progress", "request_input", "complete", "fail", "input", ""]
            )
        )
        if action == "progress":
            message.progress.message = draw(_strings)
            message.progress.percent = draw(_int32)
            message.progress.has_percent = draw(st.booleans())
        elif action == "complete":
            _copy(message.complete.result, draw(_payloads()))
        elif action == "input":
            _copy(message.input.payload, draw(_payloads()))
        elif action == "request_input":
            _copy(message.request_input.payload, draw(_payloads()))
        elif action:
            getattr(message, action).SetInParent()
    elif method == "ListTasks":
        message = tasks_pb2.ListTasksRequest(
            dead=draw(st.booleans()), limit=draw(_int32), originator=draw(_strings)
        )
        message.states.extend(draw(st.lists(st.integers(-5, 20), max_size=3)))  # type: ignore[arg-type]
    else:
        message = tasks_pb2.ListAuditRequest(subject=draw(_strings), limit=draw(_int32))
    return message.SerializeToString()


@st.composite
def _operations(draw: st.DrawFn) -> messaging_pb2.ClientOperation:
    op = messaging_pb2.ClientOperation(operation_id=draw(st.one_of(_text, _huge, _odd)))
    kind = draw(
        st.sampled_from(
            [
                "introduce",
                "send",
                "publish",
                "request",
                "reply",
                "subscribe",
                "unsubscribe",
                "keep_alive",
                "ack",
                "none",
            ]
        )
    )
    if kind == "introduce":
        _copy(op.introduce, draw(_introductions()))
    elif kind == "send":
        _fill(op.send, draw, ttl="ttl")
        op.send.idempotency_key = draw(_strings)
    elif kind == "publish":
        _publish_target(op.publish, draw)
    elif kind == "request":
        _fill(op.request, draw, ttl="timeout")
    elif kind == "reply":
        op.reply.correlation_id = draw(_strings)
        _copy(op.reply.payload, draw(_payloads()))
        if draw(st.booleans()):
            op.reply.error.CopyFrom(draw(_errors()))
    elif kind in ("subscribe", "unsubscribe"):
        body = getattr(op, kind)
        body.patterns.extend(draw(st.one_of(_maybe_valid_lists, st.lists(_patterns, max_size=5))))
        body.durable_name = draw(st.one_of(st.just(""), st.just("dur"), _strings))
    elif kind == "keep_alive":
        op.keep_alive.SetInParent()
    elif kind == "ack":
        op.ack.delivery_ids.extend(draw(st.lists(st.one_of(_odd, _strings), max_size=5)))
    return op


@st.composite
def _introductions(draw: st.DrawFn) -> messaging_pb2.Introduce:
    """Most of them acceptable (so the operations after them are tried too), some hostile."""
    if draw(st.integers(0, 2)):
        intro = messaging_pb2.Introduce(agent_id=draw(_valid_ids.filter(_not_ours)))
        intro.max_unacked = draw(st.integers(0, 20_000))
        intro.capabilities.extend(draw(_maybe_valid_lists))
        intro.subscriptions.extend(draw(_maybe_valid_lists))
        intro.instance_id = draw(st.one_of(st.just(""), _valid_ids))
    else:
        intro = messaging_pb2.Introduce(agent_id=draw(_fuzz_ids), max_unacked=draw(_int32))
        intro.capabilities.extend(draw(st.lists(_strings, max_size=5)))
        intro.subscriptions.extend(draw(st.lists(_patterns, max_size=3)))
        intro.instance_id = draw(_strings)
    _copy(intro.metadata, draw(_structs))
    return intro


@st.composite
def _errors(draw: st.DrawFn) -> errors_pb2.Error:
    """A hostile Error in a reply: any code, any reason but INTERNAL (a responder that says
    INTERNAL is relayed as such, on purpose; unknown reasons become HANDLER_FAILED)."""
    reasons = st.one_of(st.sampled_from(errors_pb2.ErrorReason.values()), _int32)
    error = errors_pb2.Error(
        code=draw(_int32),
        reason=draw(reasons.filter(lambda r: r != errors_pb2.ERROR_REASON_INTERNAL)),
        message=draw(_strings),
    )
    error.metadata.update(draw(_headers))
    return error


def _frame(ops: list[messaging_pb2.ClientOperation]) -> bytes:
    """A serialized ConnectRequest of `ops`, put together from their bytes (building it as a
    message would copy them, which fails for the deepest)."""
    return b"".join(_field(1, op.SerializeToString()) for op in ops)


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def _connect_frames(draw: st.DrawFn) -> list[bytes]:
    frames: list[bytes] = []
    first = draw(st.sampled_from(["introduce"] * 4 + ["intro+more", "ops", "bytes", "empty"]))
    if first in ("introduce", "intro+more"):
        op = messaging_pb2.ClientOperation(operation_id="intro")
        _copy(op.introduce, draw(_introductions()))
        ops = [op]
        if first == "intro+more":
            ops += draw(st.lists(_operations(), min_size=1, max_size=3))
        frames.append(_frame(ops))
    elif first == "ops":
        frames.append(_frame(draw(st.lists(_operations(), max_size=3))))
    elif first == "bytes":
        frames.append(draw(st.binary(max_size=200)))
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.sampled_from(["ops", "many", "bytes", "empty"]))
        if shape == "ops":
            ops = draw(st.lists(_operations(), max_size=4))
        elif shape == "many":  # many operations in one frame
            template = draw(_operations())
            # up to a little over the server's 4 MiB frame limit
            most = max(1, (5 << 20) // (template.ByteSize() + 4))
            ops = [template] * min(draw(st.integers(50, 2000)), most)
        elif shape == "bytes":
            frames.append(draw(st.binary(max_size=200)))
            continue
        else:
            ops = []
        frames.append(_frame(ops))
    return frames


# ---- credentials (auth mode): fixed, so that hypothesis can draw them
JWT_SECRET = "fuzz-" * 10
TOKENS = {
    # agent id -> (token, roles, capabilities, publish, subscribe)
    "fuzzer": ("apt_fuzz-admin", ("admin", "broadcast"), ("*",), (">",), (">", "_agentpost.>")),
    "alice": ("apt_fuzz-alice", (), ("*",), (">",), (">",)),
    "bob": ("apt_fuzz-bob", (), (), (">",), (">",)),
    "evil": ("apt_fuzz-evil", (), (), (), ()),
    "narrow": ("apt_fuzz-narrow", (), ("code",), ("a.>",), ("a.*",)),
}
EXPIRED = "apt_fuzz-expired"


def _bearer(agent_id: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[agent_id][0]}"),)


def _write_tokens(path: Any) -> None:
    for agent_id, (token, roles, caps, pub, sub) in TOKENS.items():
        principal = Principal(
            agent_id=agent_id,
            roles=frozenset(roles),
            capabilities=frozenset(caps),
            publish=pub,
            subscribe=sub,
        )
        tokens_file.append_entry(path, tokens_file.entry_json(token, principal))
    tokens_file.append_entry(
        path, tokens_file.entry_json(EXPIRED, Principal(agent_id="old"), expires_at=1.0)
    )


def _jwt(claims: dict[str, Any]) -> str:
    import jwt

    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


_FAR = 4_000_000_000
_authorization = st.one_of(
    st.sampled_from(
        [f"Bearer {t[0]}" for t in TOKENS.values()]
        + [
            f"Bearer {EXPIRED}",
            "Bearer apt_unknown",
            "Bearer",
            "bearer  apt_fuzz-admin",
            "Basic YWxpY2U6cHc=",
            "Bearer a.b.c",
            "Bearer " + _jwt({"sub": "jwt-agent", "exp": _FAR, "caps": ["*"], "pub": [">"]}),
            "Bearer " + _jwt({"sub": "jwt-agent", "exp": 1}),
            "Bearer " + _jwt({"sub": "../bad id", "exp": _FAR}),
            "Bearer " + _jwt({"sub": "x", "exp": _FAR, "roles": "admin"}),
            "Bearer " + _jwt({"exp": _FAR}),
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJmdXp6ZXIifQ.",  # alg none
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
).map(lambda value: (("authorization", value),))
_credentials = st.one_of(
    st.just(_bearer("fuzzer")),
    st.just(_bearer("fuzzer")),
    st.just(_bearer("narrow")),
    st.just(()),
    _authorization,
)


_metadata = st.one_of(
    st.just(()),
    st.tuples(
        st.tuples(
            st.just("agentpost-agent-id"),
            st.one_of(
                st.sampled_from(["alice", "fz1", "", "a b", "x" * 200]),
                st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
            ),
        )
    ),
)


@dataclass(frozen=True)
class Input:
    """One fuzz input: a call of `method` with raw `body` (a unary request, a Subscribe request,
    or the frames of a Connect stream); for Request to EVIL, the reply EVIL answers with."""

    method: str
    body: bytes | list[bytes]
    metadata: tuple[tuple[str, str], ...] = ()
    evil_reply: messaging_pb2.ReplyMessage | None = None
    expect: str | None = None  # the status it must end with, for the fixed cases

    def __repr__(self) -> str:  # short: bodies reach megabytes
        bodies = self.body if isinstance(self.body, list) else [self.body]
        shown = ", ".join(f"{len(b)}B {b[:120]!r}" for b in bodies)
        reply = self.evil_reply.SerializeToString()[:120] if self.evil_reply else None
        return f"Input({self.method}, [{shown}], {self.metadata!r}, evil_reply={reply!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what hypothesis prints
        printer.text(repr(self))


@st.composite
def _evil_replies(draw: st.DrawFn) -> messaging_pb2.ReplyMessage:
    reply = messaging_pb2.ReplyMessage(payload=draw(_payloads()))
    reply.headers.update(draw(_headers))
    if draw(st.booleans()):
        reply.error.CopyFrom(draw(_errors()))
    return reply


@st.composite
def _inputs(draw: st.DrawFn, auth: bool = False) -> Input:
    method = draw(st.sampled_from([*UNARY, "Subscribe", "WatchTask", "Connect", "RequestEvil"]))
    metadata = draw(_metadata)
    if auth:
        metadata = draw(_credentials) + metadata
    if draw(st.integers(0, 9)) == 0:  # raw bytes, whatever the method
        noise = draw(st.binary(max_size=300))
        body: bytes | list[bytes] = [noise] if method == "Connect" else noise
        return Input("Request" if method == "RequestEvil" else method, body, metadata)
    if method == "Connect":
        return Input(method, draw(_connect_frames()), metadata)
    if method == "WatchTask":
        watch = tasks_pb2.WatchTaskRequest(task_id=draw(_task_ids), after_seq=draw(_int64.map(abs)))
        return Input(method, watch.SerializeToString(), metadata)
    if method == "Subscribe":
        subscribe = messaging_pb2.SubscribeRequest(broadcasts=draw(st.booleans()))
        subscribe.topics.extend(
            draw(st.one_of(_maybe_valid_lists, st.lists(_patterns, max_size=4)))
        )
        return Input(method, subscribe.SerializeToString(), metadata)
    if method == "RequestEvil":
        request = messaging_pb2.RequestRequest(to=EVIL)
        _copy(request.payload, draw(_payloads()))
        return Input("Request", request.SerializeToString(), metadata, draw(_evil_replies()))
    return Input(method, draw(_unary_requests(method)), metadata)


# ---------------------------------------------------------------------------- the actors


@dataclass
class Evil:
    """A raw Connect session as EVIL: answers every request with `next_reply`."""

    target: str
    metadata: tuple[tuple[str, str], ...] = ()
    next_reply: messaging_pb2.ReplyMessage = field(default_factory=messaging_pb2.ReplyMessage)
    answered: int = 0
    _outbox: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    async def run(self, welcomed: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            connect = channel.stream_stream(SERVICE + "Connect", None, None)
            call = connect(self._frames(), metadata=self.metadata or None)
            async for raw in call:
                for event in messaging_pb2.ConnectResponse.FromString(raw).events:
                    if event.HasField("welcome"):
                        welcomed.set()
                    elif event.HasField("keep_alive"):
                        await self._put(messaging_pb2.ClientOperation(keep_alive={}))
                    elif event.HasField("delivery"):
                        await self._answer(event)

    async def _answer(self, event: messaging_pb2.ServerEvent) -> None:
        if event.delivery.kind == envelope_pb2.MESSAGE_KIND_REQUEST:
            op = messaging_pb2.ClientOperation(operation_id=f"r{self.answered}")
            try:
                op.reply.CopyFrom(self.next_reply)
            except DecodeError:  # too deep for a Connect frame: no payload then
                op.reply.CopyFrom(messaging_pb2.ReplyMessage(error=self.next_reply.error))
            op.reply.correlation_id = event.delivery.id
            self.answered += 1
            await self._put(op)
        if event.delivery_id:
            await self._put(
                messaging_pb2.ClientOperation(ack={"delivery_ids": [event.delivery_id]})
            )

    async def _put(self, op: messaging_pb2.ClientOperation) -> None:
        await self._outbox.put(messaging_pb2.ConnectRequest(operations=[op]).SerializeToString())

    async def _frames(self) -> AsyncIterator[bytes]:
        intro = messaging_pb2.ClientOperation(operation_id="intro")
        intro.introduce.agent_id = EVIL
        yield messaging_pb2.ConnectRequest(operations=[intro]).SerializeToString()
        while (frame := await self._outbox.get()) is not None:
            yield frame


@dataclass
class Traffic:
    """The well-behaved pair: bob asks alice and writes to her, alice writes to bob; every
    answer is checked, every accepted id is expected on the other side."""

    alice: agentpost.Agent
    bob: agentpost.Agent
    asked: int = 0
    sent_to_alice: set[str] = field(default_factory=set)
    sent_to_bob: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                reply = await self.bob.request("alice", {"i": i}, timeout=10)
                if reply.payload != {"echo": {"i": i}}:
                    self.errors.append(f"request {i}: wrong reply {reply.payload!r}")
                self.asked += 1
                self.sent_to_alice.add(await self.bob.send("alice", {"from": "bob", "i": i}))
                self.sent_to_bob.add(await self.alice.send("bob", {"from": "alice", "i": i}))
            except agentpost.AgentpostError as exc:
                self.errors.append(f"round {i}: {exc!r}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await self.stop.wait()


class Collector:
    def __init__(self, agent: agentpost.Agent) -> None:
        self.ids: list[str] = []
        self.task = asyncio.create_task(self._run(agent))

    async def _run(self, agent: agentpost.Agent) -> None:
        async for message in agent.messages():
            self.ids.append(message.id)


# ------------------------------------------------------------------------------ the checks


def _check_frame(raw: bytes) -> list[messaging_pb2.ServerEvent]:
    """Every frame the server sends must decode; no event may report INTERNAL."""
    events = list(messaging_pb2.ConnectResponse.FromString(raw).events)
    for event in events:
        if event.HasField("error"):
            assert event.error.reason != errors_pb2.ERROR_REASON_INTERNAL, event.error
            assert event.error.code != 13, event.error
    return events


def _reason(trailing: Any) -> str | None:
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == "agentpost":
                    return info.reason
    return None


def _check_status(code: grpc.StatusCode, details: str, trailing: Any, what: Input) -> str:
    """Bad input may fail any way but INTERNAL; an UNKNOWN must be a handler's failure (not an
    exception that escaped the servicer). The status name, for the tally."""
    assert code != INTERNAL, f"INTERNAL ({details!r}) for {what}"
    if code == grpc.StatusCode.UNKNOWN:
        assert _reason(trailing) == "HANDLER_FAILED", f"UNKNOWN ({details!r}) for {what}"
    return code.name


async def _call(channel: grpc.aio.Channel, what: Input, evil: Evil) -> str:
    """Make the call; the status it ended with."""
    metadata = what.metadata
    if what.method == "Connect":
        assert isinstance(what.body, list)
        call = channel.stream_stream(SERVICE + "Connect", None, None)(metadata=metadata)
        # Written one by one: once the server ended the call, a write fails.
        for frame in what.body:
            try:
                await call.write(frame)
            except asyncio.InvalidStateError:
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == INTERNAL and exc.details() == _CLIENT_WRITE_FAILED:
                    # grpc's client marks a call INTERNAL itself when a write fails because
                    # the server just ended it: the server's status is lost (the server log
                    # is checked for its errors instead).
                    return "ENDED_WHILE_WRITING"
                break
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (raw := await call.read()) is not grpc.aio.EOF:
                _check_frame(raw)
        code = await call.code()
        trailing = await call.trailing_metadata()
        return _check_status(code, await call.details() or "", trailing, what)
    assert isinstance(what.body, bytes)
    if what.method in ("Subscribe", "WatchTask"):
        stream = channel.unary_stream(SERVICE + what.method, None, None)(
            what.body, metadata=metadata
        )
        frame_type = (
            messaging_pb2.SubscribeResponse
            if what.method == "Subscribe"
            else tasks_pb2.WatchTaskResponse
        )
        try:
            async with asyncio.timeout(SUBSCRIBE_LISTEN):
                async for raw in stream:
                    frame_type.FromString(raw)
        except TimeoutError:
            stream.cancel()
            return "OPEN"
        except grpc.aio.AioRpcError as exc:
            return _check_status(exc.code(), exc.details() or "", exc.trailing_metadata(), what)
        return "OK"
    if what.evil_reply is not None:
        evil.next_reply = what.evil_reply
    timeout = REQUEST_DEADLINE if what.method == "Request" else None
    unary = channel.unary_unary(SERVICE + what.method, None, None)
    try:
        await unary(what.body, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return _check_status(exc.code(), exc.details() or "", exc.trailing_metadata(), what)
    return "OK"


@dataclass
class Tally:
    inputs: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, method: str, status: str) -> None:
        self.inputs += 1
        key = f"{method}:{status}"
        self.statuses[key] = self.statuses.get(key, 0) + 1


def _regressions() -> list[Input]:
    """Fixed inputs that once got through (tried first, every run)."""

    def send(to: str, value: struct_pb2.Value, expect: str) -> Input:
        request = messaging_pb2.SendRequest(to=to)
        request.payload.json.CopyFrom(value)
        return Input("Send", request.SerializeToString(), expect=expect)

    broadcast = messaging_pb2.PublishRequest(broadcast={})
    broadcast.payload.json.CopyFrom(_nested_list(49))
    intro = messaging_pb2.ClientOperation(operation_id="intro")
    intro.introduce.agent_id = "deep"
    intro.introduce.metadata.CopyFrom(_nested_struct(31))
    register = messaging_pb2.RegisterAgentRequest(agent_id="deep", metadata=_nested_struct(32))
    infinite = messaging_pb2.RegisterAgentRequest(agent_id="inf")
    infinite.metadata.fields["x"].number_value = float("inf")
    nan = messaging_pb2.ClientOperation(operation_id="intro")
    nan.introduce.agent_id = "nan"
    nan.introduce.metadata.fields["x"].number_value = float("nan")
    unknown_reason = messaging_pb2.ReplyMessage(error={"code": 0, "reason": 999, "message": "?"})
    return [
        # Deliverable as deep as it gets; one level more, and the delivery frame would not
        # decode: accepted, it would fail every delivery to alice (and to all, broadcast).
        send("alice", _nested_list(48), "OK"),
        send("alice", _nested_list(49), "INVALID_ARGUMENT"),
        Input("Publish", broadcast.SerializeToString(), expect="INVALID_ARGUMENT"),
        # Metadata that the agent.online event could not carry.
        Input(
            "Connect",
            [_frame([intro])],
            expect="INVALID_ARGUMENT",
        ),
        Input("RegisterAgent", register.SerializeToString(), expect="INVALID_ARGUMENT"),
        # Metadata numbers that JSON has no form for.
        Input("RegisterAgent", infinite.SerializeToString(), expect="INVALID_ARGUMENT"),
        Input("Connect", [_frame([nan])], expect="INVALID_ARGUMENT"),
        # A reply error with a reason the server does not know: the handler failed.
        Input(
            "Request",
            messaging_pb2.RequestRequest(to=EVIL).SerializeToString(),
            evil_reply=unknown_reason,
            expect="UNKNOWN",
        ),
        Input(
            "Request",
            messaging_pb2.RequestRequest(to=EVIL).SerializeToString(),
            evil_reply=messaging_pb2.ReplyMessage(
                error={"reason": errors_pb2.ERROR_REASON_HANDLER_FAILED, "message": "x" * (1 << 20)}
            ),
            expect="UNKNOWN",
        ),
    ]


def _fuzz(run_on_loop: Callable[[Input], str], tally: Tally, deadline: float, auth: bool) -> None:
    """The fixed cases, then batches of hypothesis runs (in this worker thread) until the
    deadline."""
    for what in _regressions():
        if auth:
            what = dataclasses.replace(what, metadata=_bearer("fuzzer") + what.metadata)
        status = run_on_loop(what)
        assert status == what.expect, f"{status} for {what}"
        tally.add(what.method, status)
    batch_seed = FUZZ_SEED
    while time.monotonic() < deadline:
        batch_seed += 1

        @seed(batch_seed)
        @settings(
            max_examples=BATCH,
            deadline=None,
            database=None,
            phases=(Phase.generate,),
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        @given(what=_inputs(auth))
        def one(what: Input) -> None:
            tally.add(what.method, run_on_loop(what))

        one()


def _server_errors(records: list[logging.LogRecord]) -> list[str]:
    """ERROR log records: the server logs every unexpected exception at ERROR."""
    return [
        f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}"
        for r in records
        if r.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
async def test_hostile_input_gets_statuses_and_spares_well_behaved_agents(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, tmp_path: Any, auth: bool
) -> None:
    caplog.set_level(logging.WARNING)
    # Depth as deep as a delivery frame can carry (the regressions probe that edge).
    settings: dict[str, Any] = {"max_payload_depth": 100}
    if auth:
        _write_tokens(tmp_path / "tokens.json")
        settings.update(tokens_file=tmp_path / "tokens.json", jwt_secret=JWT_SECRET)
    app = await start_server(**settings)
    target = f"127.0.0.1:{app.port}"
    loop = asyncio.get_running_loop()

    def options(agent_id: str) -> agentpost.ConnectOptions:
        return agentpost.ConnectOptions(token=TOKENS[agent_id][0] if auth else None)

    async with agentpost.Client(target, options=options("fuzzer")) as client:
        await client.register_agent("ghost")
    async with (
        agentpost.connect(target, agent_id="alice", options=options("alice")) as alice,
        agentpost.connect(target, agent_id="bob", options=options("bob")) as bob,
        grpc.aio.insecure_channel(target) as channel,
    ):

        @alice.on_request
        async def echo(message: agentpost.Message) -> Any:
            return {"echo": message.payload}

        evil = Evil(target, _bearer("evil") if auth else ())
        welcomed = asyncio.Event()
        evil_task = asyncio.create_task(evil.run(welcomed))
        await asyncio.wait_for(welcomed.wait(), 10)
        alice_inbox, bob_inbox = Collector(alice), Collector(bob)
        traffic = Traffic(alice, bob)
        traffic_task = asyncio.create_task(traffic.run())
        tally = Tally()

        async def watched(what: Input) -> str:
            try:
                async with asyncio.timeout(CALL_WATCHDOG):
                    return await _call(channel, what, evil)
            except TimeoutError:
                raise AssertionError(f"no status within {CALL_WATCHDOG}s: {what}") from None

        stopped = threading.Event()

        def run_on_loop(what: Input) -> str:
            if stopped.is_set():
                raise RuntimeError("the test is over")
            seen = len(caplog.records)
            status = asyncio.run_coroutine_threadsafe(watched(what), loop).result(CALL_WATCHDOG + 5)
            errors = _server_errors(caplog.records[seen:])
            assert not errors, f"the server logged errors after {what}:\n{errors[0]}"
            return status

        started = time.monotonic()
        try:
            budget = BUDGET * (0.6 if auth else 1.0)
            await asyncio.to_thread(_fuzz, run_on_loop, tally, started + budget, auth)
        finally:
            stopped.set()
            traffic.stop.set()
            await traffic_task
            evil_task.cancel()
            await asyncio.gather(evil_task, return_exceptions=True)
        elapsed = time.monotonic() - started

        async with grpc.aio.insecure_channel(target) as health_channel:
            health = health_pb2_grpc.HealthStub(health_channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        assert not _server_errors(caplog.records), _server_errors(caplog.records)[:3]
        assert not traffic.errors, traffic.errors[:5]
        assert traffic.asked > 0
        await assert_eventually(
            lambda: (
                traffic.sent_to_alice <= set(alice_inbox.ids)
                and traffic.sent_to_bob <= set(bob_inbox.ids)
            ),
            timeout=15.0,
        )
        for inbox in (alice_inbox, bob_inbox):
            assert len(inbox.ids) == len(set(inbox.ids)), "a message reached an agent twice"
            assert not inbox.task.done(), inbox.task
            inbox.task.cancel()
        # The pair is still fully usable.
        assert (await bob.request("alice", "last", timeout=5)).payload == {"echo": "last"}

    summary = ", ".join(f"{k} {v}" for k, v in sorted(tally.statuses.items()))
    print(
        f"\nfuzz (auth {'on' if auth else 'off'}, AGENTPOST_FUZZ_SEED={FUZZ_SEED}):"
        f" {tally.inputs} inputs in {elapsed:.1f}s;"
        f" evil answered {evil.answered};"
        f" the pair made {traffic.asked} requests and {len(traffic.sent_to_alice)}"
        f" + {len(traffic.sent_to_bob)} sends\n{summary}"
    )
    assert tally.inputs > 100
