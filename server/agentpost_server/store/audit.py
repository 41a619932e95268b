"""The audit stream (`<prefix>:audit`, a Redis stream trimmed to about `retention` records).

Each record: actor, action, subject, time, and the details as a JSON object of strings. Task
transitions append their records from their own Lua scripts (atomically with the transition, see
`store.tasks`); everything else comes through `RedisAudit.append`. Records are validated on the
way out: a malformed one is skipped, never evaluated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from redis.asyncio import Redis

from agentpost_server.core.ports import AuditRecord
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys

_SCAN_BATCH = 500


class RedisAudit:
    def __init__(self, redis: Redis, keys: Keys, *, retention: int) -> None:
        self._redis = redis
        self._key = keys.audit
        self._retention = retention

    async def append(
        self, actor: str, action: str, subject: str, details: Mapping[str, str] | None = None
    ) -> None:
        fields = {
            "actor": actor,
            "action": action,
            "subject": subject,
            "t": str(int(time.time() * 1000)),
            "d": json.dumps(dict(details or {})),
        }
        with unavailable_on_redis_error("writing the audit stream"):
            await _wait(
                self._redis.xadd(
                    self._key,
                    fields,  # type: ignore[arg-type]
                    maxlen=self._retention,
                    approximate=True,
                )
            )

    async def list(self, subject: str, limit: int) -> list[AuditRecord]:
        found: list[AuditRecord] = []
        upper = "+"
        with unavailable_on_redis_error("reading the audit stream"):
            while len(found) < limit:
                raw = await _wait(self._redis.xrevrange(self._key, upper, "-", count=_SCAN_BATCH))
                for entry_id, fields in raw:
                    record = _record(_text(entry_id), fields)
                    if record is not None and (not subject or record.subject == subject):
                        found.append(record)
                        if len(found) >= limit:
                            break
                if len(raw) < _SCAN_BATCH:
                    break
                upper = "(" + _text(raw[-1][0])
        return found


def _record(entry_id: str, fields: Mapping[bytes, bytes]) -> AuditRecord | None:
    try:
        get = {_text(k): _text(v) for k, v in fields.items()}
        details = json.loads(get.get("d", "{}"))
        if not isinstance(details, dict):
            return None
        return AuditRecord(
            id=entry_id,
            time_ms=int(get.get("t") or entry_id.split("-", 1)[0]),
            actor=get.get("actor", ""),
            action=get.get("action", ""),
            subject=get.get("subject", ""),
            details={str(k): str(v) for k, v in details.items()},
        )
    except (ValueError, UnicodeDecodeError):
        return None
