"""Redis failures become UnavailableError here; nothing from redis-py leaves the store package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

from agentpost.errors import UnavailableError


@contextmanager
def unavailable_on_redis_error(what: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise UnavailableError(
            f"storage is unavailable ({what} failed: {type(exc).__name__}); retry later"
        ) from exc
