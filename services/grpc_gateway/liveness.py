"""Agent last-seen times: kept in Redis, flushed to PostgreSQL in batches.

Each heartbeat sets the agent's score in the sorted set ``agentmgr:last-seen``
to the Unix time it was written (``heartbeats`` writes them in batches). Every gateway process flushes the entries that
changed since its previous flush (with one interval of overlap, because
``record_seen`` keeps the later of two times, so writing an entry twice does
no harm). A restarted or surviving gateway starts its first flush one offline
threshold back, so times written by a gateway killed before its flush still
reach PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import Iterable

from services.core.fleet import agents
from services.core.keys import LAST_SEEN_KEY
from services.grpc_gateway.runtime import GatewayRuntime

logger = logging.getLogger("agentmgr.grpc_gateway.liveness")

RETENTION_SECONDS = 7 * 24 * 3600
"""Age after which a last-seen entry is dropped from Redis. PostgreSQL keeps the time."""


def as_datetime(unix_time: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix_time, datetime.timezone.utc)


class Liveness:
    """Records heartbeats in Redis and flushes them to PostgreSQL."""

    def __init__(self, runtime: GatewayRuntime) -> None:
        self.runtime = runtime
        self.flushed_until = time.time() - runtime.settings.offline_after_seconds

    async def record(self, agent_id: uuid.UUID) -> None:
        """Store now as the agent's last-seen time (one ZADD)."""
        await self.runtime.redis.zadd(LAST_SEEN_KEY, {str(agent_id): time.time()})

    async def seen_at(self, agent_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, datetime.datetime]:
        """Return the last-seen times in Redis of those ``agent_ids`` that have one."""
        ids = list(agent_ids)
        if not ids:
            return {}
        scores = await self.runtime.redis.zmscore(LAST_SEEN_KEY, [str(agent_id) for agent_id in ids])
        return {agent_id: as_datetime(score) for agent_id, score in zip(ids, scores) if score is not None}

    async def flush(self) -> int:
        """Write the last-seen times that changed since the previous flush and return the rows updated."""
        started = time.time()
        since = self.flushed_until - self.runtime.settings.liveness_flush_seconds
        entries = await self.runtime.redis.zrangebyscore(LAST_SEEN_KEY, since, "+inf", withscores=True)
        seen: dict[uuid.UUID, datetime.datetime] = {}
        for member, score in entries:
            try:
                seen[uuid.UUID(member.decode() if isinstance(member, bytes) else member)] = as_datetime(score)
            except ValueError:
                logger.warning("skipped: invalid agent id %r in %s", member, LAST_SEEN_KEY)
        updated = await self.runtime.db(agents.record_seen, seen) if seen else 0
        await self.runtime.redis.zremrangebyscore(LAST_SEEN_KEY, "-inf", started - RETENTION_SECONDS)
        self.flushed_until = started
        if seen:
            logger.debug("flushed: %d last-seen time(s)", len(seen), extra={"agents": len(seen), "updated": updated})
        return updated

    async def run_flusher(self) -> None:
        """Flush every AGENTMGR_LIVENESS_FLUSH_SECONDS until cancelled, logging and retrying failures."""
        interval = self.runtime.settings.liveness_flush_seconds
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except Exception as error:  # noqa: BLE001 - the loop must outlive outages
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.warning(
                        "failed: liveness flush (%s; retrying every %.1fs, %d failure(s) in a row)",
                        error, interval, failures, extra={"error_type": type(error).__name__, "failures": failures},
                    )
                continue
            if failures:
                logger.info("recovered: liveness flush after %d failure(s)", failures)
                failures = 0
