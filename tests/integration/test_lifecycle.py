"""Server lifecycle: SIGTERM drains gracefully; a crashed server's agents are reaped offline."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import agentpost
from tests.helpers import assert_eventually

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_lets_calls_finish_tells_sessions_and_exits_zero(spawn):
    edge, back = await spawn(AGENTPOST_SHUTDOWN_GRACE="5"), await spawn()
    answering = asyncio.Event()
    async with (
        agentpost.connect(back.target, agent_id="slow") as slow,
        agentpost.connect(edge.target, agent_id="watcher") as watcher,
    ):

        @slow.on_request
        async def take_time(message: agentpost.Message) -> str:
            answering.set()
            await asyncio.sleep(1.0)
            return "finished"

        async with agentpost.Client(edge.target) as client:
            call = asyncio.create_task(client.request("slow", "work", timeout=10))
            await answering.wait()
            edge.process.terminate()  # SIGTERM while the call is in flight
            async with grpc.aio.insecure_channel(edge.target) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def not_serving() -> bool:
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    except grpc.aio.AioRpcError:
                        return True  # already gone
                    return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

                await assert_eventually(not_serving)
            reply = await call
            assert reply.payload == "finished"
        assert await asyncio.to_thread(edge.process.wait, 20) == 0
        assert "shutting down" in edge.log()
        del watcher  # its session was told to go away; the SDK reconnects on its own


async def test_agents_of_a_killed_server_are_reaped_offline(spawn, start_server):
    doomed = await spawn(AGENTPOST_KEEPALIVE_INTERVAL="0.5")
    survivor = await start_server(worker=True, reap_interval=1.0)
    agent = await agentpost.connect(doomed.target, agent_id="orphan")
    try:
        async with agentpost.Client(f"127.0.0.1:{survivor.port}") as client:
            assert (await client.get_agent("orphan")).online
            doomed.kill()  # SIGKILL: no goodbye, no presence update
            started = time.monotonic()

            async def offline() -> bool:
                return not (await client.get_agent("orphan")).online

            await assert_eventually(offline, timeout=20)
            assert time.monotonic() - started < 20
    finally:
        await agent.close()
