"""The naming rules for agent ids, capabilities and topics, and the checks that enforce them."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from agentpost.errors import InvalidAgentIdError, InvalidArgumentError, InvalidTopicError

AGENT_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit"
TOPIC_RULE = (
    "dot-separated tokens of A-Z a-z 0-9 _ -, at most 255 characters"
    " (patterns may use * for one token and a final > for the rest)"
)
SYSTEM_PREFIX = "_agentpost."
MAX_CAPABILITIES = 64

_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_CAPABILITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_MAX_TOPIC = 255


@functools.lru_cache(maxsize=65_536)
def _valid_agent_id(value: str) -> bool:
    return _AGENT_ID.fullmatch(value) is not None


def check_agent_id(value: str, field: str = "agent_id") -> str:
    if not _valid_agent_id(value):
        shown = value if len(value) <= 64 else value[:61] + "..."
        what = "is empty" if not value else f"{shown!r} is not valid"
        raise InvalidAgentIdError(f"{field} {what}: use {AGENT_ID_RULE}", metadata={"field": field})
    return value


def check_capabilities(values: Iterable[str]) -> list[str]:
    result = list(dict.fromkeys(values))
    if len(result) > MAX_CAPABILITIES:
        raise InvalidArgumentError(
            f"too many capabilities ({len(result)}); the limit is {MAX_CAPABILITIES}",
            metadata={"field": "capabilities"},
        )
    for value in result:
        if not _CAPABILITY.fullmatch(value):
            raise InvalidArgumentError(
                f"capability {value[:64]!r} is not valid: use 1-64 characters of"
                " A-Z a-z 0-9 . _ : -, starting with a letter or digit",
                metadata={"field": "capabilities"},
            )
    return result


def check_topic(value: str, *, field: str = "topic", allow_system: bool = False) -> str:
    """A concrete topic name (no wildcards), as used to publish."""
    _check_tokens(value, field, wildcards=False)
    if not allow_system and value.startswith(SYSTEM_PREFIX):
        raise InvalidTopicError(
            f"{field} {value!r} is reserved: topics starting with {SYSTEM_PREFIX!r}"
            " are published by the server only",
            metadata={"field": field},
        )
    return value


def check_pattern(value: str, field: str = "pattern") -> str:
    """A subscription: an exact topic or a pattern with `*` and a final `>`."""
    _check_tokens(value, field, wildcards=True)
    return value


def _check_tokens(value: str, field: str, *, wildcards: bool) -> None:
    problem = _token_problem(value, wildcards)
    if problem:
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise InvalidTopicError(
            f"{field} {shown!r} is not valid: {problem}; use {TOPIC_RULE}",
            metadata={"field": field},
        )


def _token_problem(value: str, wildcards: bool) -> str:
    if not value:
        return "it is empty"
    if len(value) > _MAX_TOPIC:
        return f"it is {len(value)} characters long"
    tokens = value.split(".")
    for index, token in enumerate(tokens):
        if token in ("*", ">"):
            if not wildcards:
                return "wildcards (* and >) are only allowed in subscriptions"
            if token == ">" and index != len(tokens) - 1:
                return "> may only be the last token"
        elif not _TOKEN.fullmatch(token):
            return f"token {token!r} is empty or has a character outside A-Z a-z 0-9 _ -"
    return ""
