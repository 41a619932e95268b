"""Idempotency keys: the SDK's short-lived transport-retry keys (`RetryKeys`) and the check of a
caller's own keys. A send and a handoff carry one, so that a call repeated after a lost
connection is carried out once."""

from __future__ import annotations

import itertools
import secrets

from agentpost.errors import InvalidArgumentError

__all__ = ["RETRY_KEY_PREFIX", "RetryKeys", "idempotency_key"]

#: Starts the idempotency keys the SDK makes up; a caller's own keys must not.
RETRY_KEY_PREFIX = "~"


class RetryKeys:
    """Makes up transport-retry idempotency keys: "~", 12 random characters drawn once, and a
    counter. The server scopes keys by sender and forgets "~" keys after its retry window, so
    a key only has to differ from the sender's other keys of the last minutes: the counter
    sees to that within a process, 72 random bits between processes (replicas, restarts)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = RETRY_KEY_PREFIX + secrets.token_urlsafe(9)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


def idempotency_key(key: str | None, retry_keys: RetryKeys) -> str:
    """The key to send: the caller's own `key` (checked), or a new retry key when None."""
    if key is None:
        return retry_keys()
    if not isinstance(key, str) or not key or key.startswith(RETRY_KEY_PREFIX):
        why = (
            f"must not start with {RETRY_KEY_PREFIX!r}, the mark of the SDK's own short-lived"
            " retry keys"
            if isinstance(key, str) and key
            else "must not be empty (None: the SDK makes one up)"
        )
        raise InvalidArgumentError(f"idempotency_key {why}", metadata={"field": "idempotency_key"})
    return key
