"""Shared resources of one gateway process: settings, PostgreSQL pool, Redis client, identity."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2.extensions
import redis.asyncio

from services.core.database import Database
from services.core.fleet.agents import LivenessThresholds
from services.core.redis_client import SOCKET_TIMEOUT_SECONDS
from services.core.settings import Settings

T = TypeVar("T")

REDIS_MAX_CONNECTIONS = 100
"""Redis connections per gateway process; more concurrent commands wait up to the socket timeout."""


def new_instance_id() -> str:
    """Return an id for this gateway process that no other process, here or elsewhere, shares."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclasses.dataclass(kw_only=True)
class GatewayRuntime:
    """Resources shared by every servicer and background task of one gateway process."""

    settings: Settings
    database: Database
    redis: redis.asyncio.Redis
    instance_id: str

    @classmethod
    def create(cls, settings: Settings) -> GatewayRuntime:
        """Open the PostgreSQL pool and create the Redis client (connected on first use).

        Raises:
            DatabaseError: the first pooled connection failed.
        """
        database = Database(
            settings.database_url,
            min_connections=1,
            max_connections=settings.gateway_db_connections,
            application_name="agentmgr-grpc_gateway",
        )
        # A blocking pool makes a burst of commands wait for a free connection. The default
        # pool of redis-py 8 raises MaxConnectionsError past 100 connections instead, which
        # closed thousands of sessions when many agents heartbeat or disconnect at once.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        client = redis.asyncio.Redis.from_pool(pool)
        return cls(settings=settings, database=database, redis=client, instance_id=new_instance_id())

    @property
    def thresholds(self) -> LivenessThresholds:
        return LivenessThresholds.from_settings(self.settings)

    async def db(self, operation: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``operation(conn, *args, **kwargs)`` in one transaction on a worker thread.

        Raises:
            DatabaseError: PostgreSQL is unreachable.
            RequestError: raised by ``operation``; the transaction is rolled back.
        """

        def run() -> T:
            connection: psycopg2.extensions.connection
            with self.database.transaction() as connection:
                return operation(connection, *args, **kwargs)

        return await asyncio.to_thread(run)

    async def close(self) -> None:
        """Close the Redis client and the PostgreSQL pool. Safe to call twice."""
        await self.redis.aclose()
        await asyncio.to_thread(self.database.close)
