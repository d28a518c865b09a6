"""The heartbeat batcher against a real Redis: last-seen times, session keys and outages."""

from __future__ import annotations

import asyncio
import socket
import uuid

import grpc
import redis
import redis.asyncio

from services.core.keys import LAST_SEEN_KEY, session_key
from services.core.settings import Settings
from services.grpc_gateway.heartbeats import BATCH_MAX_AGENTS, REDIS_DOWN_DETAILS, HeartbeatBatcher
from services.grpc_gateway.routing import CommandWaiters, Router
from services.grpc_gateway.runtime import GatewayRuntime
from services.grpc_gateway.sessions import AgentSession, SessionRegistry

INSTANCE_ID = "gateway-under-test"


def make_batcher(url: str) -> tuple[HeartbeatBatcher, Router]:
    # No PostgreSQL: these paths never reach it, and a call would fail the test loudly.
    settings = Settings.from_env({"AGENTMGR_OFFLINE_AFTER_SECONDS": "45"})
    client = redis.asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    runtime = GatewayRuntime(settings=settings, database=None, redis=client, instance_id=INSTANCE_ID)  # type: ignore[arg-type]
    router = Router(runtime, SessionRegistry(), authenticator=None, waiters=CommandWaiters())  # type: ignore[arg-type]
    return HeartbeatBatcher(runtime, router), router


def open_sessions(router: Router, count: int) -> list[AgentSession]:
    sessions = [AgentSession(uuid.uuid4(), peer="ipv4:127.0.0.1:1") for _ in range(count)]
    for session in sessions:
        router.sessions.add(session)
    return sessions


def test_batch_sets_last_seen_and_keys(redis_url: str) -> None:
    count = BATCH_MAX_AGENTS + 250  # more than one script call
    plain = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[int, list[AgentSession]]:
        batcher, router = make_batcher(redis_url)
        sessions = open_sessions(router, count)
        for session in sessions[:10]:
            plain.set(session_key(session.agent_id), INSTANCE_ID, ex=5)
        for session in sessions:
            batcher.beat(session)
            batcher.beat(session)  # a second beat before the write is one entry
        written = await batcher.write()
        await batcher.runtime.redis.aclose()
        return written, sessions

    written, sessions = asyncio.run(scenario())

    assert written == count
    assert plain.zcard(LAST_SEEN_KEY) == count
    for session in sessions[:10] + sessions[-10:]:
        assert plain.get(session_key(session.agent_id)) == INSTANCE_ID.encode()
        assert 40 < plain.ttl(session_key(session.agent_id)) <= 45


def test_key_of_another_gateway_left_alone(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)

    async def scenario() -> AgentSession:
        batcher, router = make_batcher(redis_url)
        (session,) = open_sessions(router, 1)
        plain.set(session_key(session.agent_id), "newer-gateway", ex=30)
        batcher.beat(session)
        await batcher.write()
        await batcher.runtime.redis.aclose()
        return session

    session = asyncio.run(scenario())

    assert plain.get(session_key(session.agent_id)) == b"newer-gateway"
    assert plain.zscore(LAST_SEEN_KEY, str(session.agent_id)) is not None


def test_ended_session_key_not_set_again(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)

    async def scenario() -> tuple[AgentSession, AgentSession]:
        batcher, router = make_batcher(redis_url)
        ended, closed = open_sessions(router, 2)
        batcher.beat(ended)
        batcher.beat(closed)
        router.sessions.remove(ended)
        closed.close(grpc.StatusCode.OK, "")
        written = await batcher.write()
        await batcher.runtime.redis.aclose()
        assert written == 0
        return ended, closed

    ended, closed = asyncio.run(scenario())

    assert plain.exists(session_key(ended.agent_id), session_key(closed.agent_id)) == 0


def test_redis_outage_closes_batched_sessions(redis_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def scenario() -> list[AgentSession]:
        batcher, router = make_batcher(f"redis://127.0.0.1:{closed_port}/0")
        sessions = open_sessions(router, 3)
        for session in sessions:
            batcher.beat(session)
        await batcher.write()
        await batcher.runtime.redis.aclose()
        return sessions

    sessions = asyncio.run(scenario())

    for session in sessions:
        assert session.closing is not None
        assert session.closing.code is grpc.StatusCode.UNAVAILABLE
        assert session.closing.details == REDIS_DOWN_DETAILS
