"""Redis key and channel names shared by every gateway process.

Other programs (the CLI, the updater) publish on these channels too, so the
names and the JSON message shapes are part of the manager's interface.
"""

from __future__ import annotations

import uuid

REVOCATIONS_CHANNEL = "agentmgr:revocations"
"""Pub/sub channel of revoked agents: ``{"agent_id": "<uuid>"}``."""

COMMAND_FINISHED_CHANNEL = "agentmgr:commands:finished"
"""Pub/sub channel of commands whose result was stored: ``{"command_id": "<uuid>"}``."""

LAST_SEEN_KEY = "agentmgr:last-seen"
"""Sorted set of agent ids scored by the Unix time of their last heartbeat."""


def session_key(agent_id: uuid.UUID) -> str:
    """Return the key whose value is the instance id of the gateway holding the agent's stream."""
    return f"agentmgr:session:{agent_id}"


def gateway_channel(instance_id: str) -> str:
    """Return the pub/sub channel on which one gateway process receives routed messages.

    Messages are JSON objects: ``{"kind": "command", "agent_id", "command_id"}`` or
    ``{"kind": "supersede", "agent_id", "session_id", "started_at"}``.
    """
    return f"agentmgr:gateway:{instance_id}"


def register_failures_key(peer_host: str) -> str:
    """Return the counter of failed Register calls from one peer address."""
    return f"agentmgr:register-failures:{peer_host}"
