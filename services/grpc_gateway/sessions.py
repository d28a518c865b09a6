"""Live agent streams held by this gateway process, one per agent.

A session's handler writes what it takes from ``outbox`` to the stream. Other
parts of the process (command routing, revocation, a newer session, shutdown)
send to the agent by putting a message there, or end the stream with ``close``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import grpc

from agentmanager.v1 import agent_pb2

logger = logging.getLogger("agentmgr.grpc_gateway.sessions")

OUTBOX_MAX_MESSAGES = 1000
"""Messages queued for one agent before the gateway gives up on it as too slow."""

SUPERSEDED_DETAILS = "superseded by a newer session"
REVOKED_DETAILS = "agent revoked"
SHUTDOWN_DETAILS = "gateway shutting down; reconnect"


@dataclasses.dataclass(frozen=True)
class CloseRequest:
    """The status a session ends with."""

    code: grpc.StatusCode
    details: str


class Outbox:
    """Messages waiting for one session's handler, which is the only reader.

    ``asyncio.Queue`` would do, but it keeps four deques and an Event, about 3 KiB
    even when empty, which adds up over ten thousand sessions per process.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[agent_pb2.ServerMessage | CloseRequest] = []
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: agent_pb2.ServerMessage | CloseRequest) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> agent_pb2.ServerMessage | CloseRequest:
        """Return the oldest item, waiting for one if there is none."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class AgentSession:
    """One agent's open Session stream in this process."""

    __slots__ = ("agent_id", "peer", "session_id", "started_at", "outbox", "delivered_command_ids",
                 "delivered_rollout_ids", "closing")

    def __init__(self, agent_id: uuid.UUID, *, peer: str) -> None:
        self.agent_id = agent_id
        self.peer = peer
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        """Unix time the session started, sent in supersede messages for diagnostics."""
        self.outbox = Outbox()
        self.delivered_command_ids: set[uuid.UUID] = set()
        """Commands written to this stream, so a routed command and the reconnect scan never send one twice."""
        self.delivered_rollout_ids: set[uuid.UUID] = set()
        """Rollouts whose update notice was written to this stream."""
        self.closing: CloseRequest | None = None

    def send(self, message: agent_pb2.ServerMessage) -> None:
        """Queue ``message`` for the agent. A full outbox ends the session with RESOURCE_EXHAUSTED."""
        if self.closing is not None:
            return
        if len(self.outbox) >= OUTBOX_MAX_MESSAGES:
            logger.warning(
                "closing: session of agent %s (outbox full)", self.agent_id, extra={"agent_id": str(self.agent_id)}
            )
            self.close(grpc.StatusCode.RESOURCE_EXHAUSTED, "agent reads too slowly; reconnect")
            return
        self.outbox.put(message)

    def close(self, code: grpc.StatusCode, details: str) -> None:
        """Ask the handler to end the stream with ``code``. Later calls are ignored."""
        if self.closing is not None:
            return
        self.closing = CloseRequest(code, details)
        self.outbox.put(self.closing)


class SessionRegistry:
    """Sessions of this process by agent id, used only from the event loop thread."""

    def __init__(self) -> None:
        self._sessions: dict[uuid.UUID, AgentSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, agent_id: uuid.UUID) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def all(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def add(self, session: AgentSession) -> None:
        """Make ``session`` the agent's current one, closing an older one with ABORTED."""
        older = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        if older is not None:
            logger.info(
                "superseded: session %s of agent %s", older.session_id, session.agent_id,
                extra={"agent_id": str(session.agent_id), "session_id": older.session_id},
            )
            older.close(grpc.StatusCode.ABORTED, SUPERSEDED_DETAILS)

    def remove(self, session: AgentSession) -> bool:
        """Forget ``session`` if it is still the agent's current one, and return whether it was."""
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            return True
        return False

    def close_agent(self, agent_id: uuid.UUID, code: grpc.StatusCode, details: str) -> bool:
        """Close the agent's session, if this process has one, and return whether it had."""
        session = self._sessions.get(agent_id)
        if session is None:
            return False
        session.close(code, details)
        return True

    def close_all(self, code: grpc.StatusCode, details: str) -> int:
        """Close every session and return how many there were."""
        sessions = list(self._sessions.values())
        for session in sessions:
            session.close(code, details)
        return len(sessions)
