"""Publish a message to the gateway process that has an agent's stream open (synchronous side).

The CLI and the updater's jobs use this; the gateway's own asyncio code does
the same with redis.asyncio. Key and channel names live in
``services.core.keys``.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import redis

from services.core.keys import LAST_SEEN_KEY, REVOCATIONS_CHANNEL, gateway_channel, session_key


def is_connected(client: redis.Redis, agent_id: uuid.UUID) -> bool:
    """Tell whether some gateway has a live stream of ``agent_id``."""
    return bool(client.exists(session_key(agent_id)))


def publish_to_agent(client: redis.Redis, agent_id: uuid.UUID, message: dict[str, Any]) -> bool:
    """Send ``message`` to the gateway holding the agent's stream; return False when none does.

    Delivery is best effort: a message lost here is sent again from PostgreSQL
    when the agent reconnects.
    """
    holder = client.get(session_key(agent_id))
    if holder is None:
        return False
    client.publish(gateway_channel(holder.decode()), json.dumps({**message, "agent_id": str(agent_id)}))
    return True


def publish_revocation(client: redis.Redis, agent_id: uuid.UUID) -> None:
    """Tell every gateway process to drop the agent's cached credentials and close its stream."""
    client.publish(REVOCATIONS_CHANNEL, json.dumps({"agent_id": str(agent_id)}))


def live_seen_at(client: redis.Redis, agent_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime.datetime]:
    """Return the heartbeat times in Redis that the gateways have not flushed to PostgreSQL yet."""
    if not agent_ids:
        return {}
    scores = client.zmscore(LAST_SEEN_KEY, [str(agent_id) for agent_id in agent_ids])
    return {
        agent_id: datetime.datetime.fromtimestamp(score, tz=datetime.timezone.utc)
        for agent_id, score in zip(agent_ids, scores)
        if score is not None
    }
