"""Heartbeats of one gateway process, written to Redis in batches.

A heartbeat does two things in Redis: it sets the agent's last-seen time in the
sorted set ``agentmgr:last-seen`` and extends the session key that names this
gateway as the holder of the agent's stream. Done one heartbeat at a time, these
were two round trips per message and most of the gateway's ingest cost. The
batcher collects heartbeats for up to BATCH_SECONDS (or BATCH_MAX_AGENTS agents)
and does both for the whole batch in one Lua script call.

The delay is small next to the session key's lifetime, which is the offline
threshold (45 s by default) against a heartbeat interval of 15 s.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import redis.exceptions

from services.core.keys import LAST_SEEN_KEY, session_key
from services.grpc_gateway.routing import Router
from services.grpc_gateway.runtime import GatewayRuntime
from services.grpc_gateway.sessions import AgentSession

logger = logging.getLogger("agentmgr.grpc_gateway.heartbeats")

BATCH_SECONDS = 0.2
"""Maximum time a heartbeat waits before it is written to Redis."""
BATCH_MAX_AGENTS = 1000
"""Agents per script call; a larger backlog is written in several calls at once."""

REDIS_DOWN_DETAILS = "the manager's Redis is unavailable; reconnect"

# KEYS[1] is the last-seen set, KEYS[2..] the agents' session keys.
# ARGV[1] is this gateway's id, ARGV[2] the key lifetime, ARGV[3] the time, ARGV[4..] the agent ids.
# For each session key the reply contains 1 (extended), 2 (it had expired and was set again) or
# 0 (the key names another gateway, where a newer session exists, so it is left alone).
_RECORD_HEARTBEATS = """
local reply = {}
for i = 2, #KEYS do
  local agent = ARGV[i + 2]
  redis.call('ZADD', KEYS[1], ARGV[3], agent)
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('EXPIRE', KEYS[i], ARGV[2])
    reply[i - 1] = 1
  elseif not holder then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
    reply[i - 1] = 2
  else
    reply[i - 1] = 0
  end
end
return reply
"""


class HeartbeatBatcher:
    """Collects the heartbeats of this process's sessions and records them in Redis in batches."""

    def __init__(self, runtime: GatewayRuntime, router: Router) -> None:
        self.runtime = runtime
        self.router = router
        self._pending: dict[uuid.UUID, AgentSession] = {}
        self._full = asyncio.Event()
        self._script = runtime.redis.register_script(_RECORD_HEARTBEATS)

    def beat(self, session: AgentSession) -> None:
        """Note a heartbeat of ``session``; the next batch writes it."""
        self._pending[session.agent_id] = session
        if len(self._pending) >= BATCH_MAX_AGENTS:
            self._full.set()

    async def run(self) -> None:
        """Write a batch every BATCH_SECONDS, or sooner when one is full, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), BATCH_SECONDS)
            except asyncio.TimeoutError:
                pass
            try:
                await self.write()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad batch
                logger.exception("failed: writing a heartbeat batch (unexpected error; the next batch is tried)")

    async def write(self) -> int:
        """Write every pending heartbeat now and return how many sessions it covered."""
        self._full.clear()
        pending, self._pending = self._pending, {}
        # A session that ended after its heartbeat has released its key; refreshing would set it again.
        sessions = [s for s in pending.values() if s.closing is None and self.router.sessions.get(s.agent_id) is s]
        if not sessions:
            return 0
        batches = [sessions[i:i + BATCH_MAX_AGENTS] for i in range(0, len(sessions), BATCH_MAX_AGENTS)]
        await asyncio.gather(*(self._write_batch(batch) for batch in batches))
        return len(sessions)

    async def _write_batch(self, sessions: list[AgentSession]) -> None:
        keys = [LAST_SEEN_KEY, *(session_key(session.agent_id) for session in sessions)]
        args = [self.runtime.instance_id, self.router.session_ttl_seconds, time.time(),
                *(str(session.agent_id) for session in sessions)]
        try:
            replies = await self._script(keys=keys, args=args)
        except redis.exceptions.RedisError as error:
            # Without its key, commands for the agent cannot be routed here, so the
            # session ends and the agent reconnects once Redis is back.
            logger.warning(
                "failed: recording %d heartbeat(s) (%s; closing those sessions)", len(sessions), error,
                extra={"agents": len(sessions), "error_type": type(error).__name__},
            )
            for session in sessions:
                session.close(grpc.StatusCode.UNAVAILABLE, REDIS_DOWN_DETAILS)
            return
        for session, reply in zip(sessions, replies):
            if reply == 2:
                self.router.reclaimed(session)
