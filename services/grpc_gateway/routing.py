"""Command routing and revocation between gateway processes over Redis.

``agentmgr:session:{agent_id}`` names the gateway instance that has the
agent's stream open. A stored command is published on that gateway's channel
``agentmgr:gateway:{instance_id}``, and that gateway writes it to the stream. When
no gateway has the stream open, the command waits in PostgreSQL and is sent on
the next connect. Revocations go to every gateway on ``agentmgr:revocations``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import grpc
import redis.exceptions

from agentmanager.v1 import agent_pb2
from services.core.fleet import agents, commands, rollouts
from services.core.fleet.agents import HostFacts
from services.core.fleet.models import UNSTARTED_STATES, Command, utc_now
from services.core.fleet.rollouts import UpdateNotice
from services.core.logs import bind_context
from services.grpc_gateway import convert
from services.grpc_gateway.auth import Authenticator
from services.core.keys import COMMAND_FINISHED_CHANNEL, REVOCATIONS_CHANNEL, gateway_channel, session_key
from services.grpc_gateway.runtime import GatewayRuntime
from services.grpc_gateway.sessions import REVOKED_DETAILS, SUPERSEDED_DETAILS, AgentSession, SessionRegistry

logger = logging.getLogger("agentmgr.grpc_gateway.routing")

RECONNECT_DELAY_SECONDS = 0.5
RECONNECT_DELAY_MAX_SECONDS = 5.0
REVOCATION_RETRY_SECONDS = 60.0
"""How long a gateway retries publishing a revocation while Redis fails."""

# Delete the session key only while it names this gateway.
_DELETE_IF_HOLDER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CommandWaiters:
    """RunCommand calls of this process waiting for a command to finish."""

    def __init__(self) -> None:
        self._events: dict[uuid.UUID, set[asyncio.Event]] = {}

    def add(self, command_id: uuid.UUID) -> asyncio.Event:
        event = asyncio.Event()
        self._events.setdefault(command_id, set()).add(event)
        return event

    def remove(self, command_id: uuid.UUID, event: asyncio.Event) -> None:
        events = self._events.get(command_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[command_id]

    def notify(self, command_id: uuid.UUID) -> None:
        for event in self._events.get(command_id, ()):
            event.set()


def take_pending(connection: Any, agent_id: uuid.UUID) -> list[Command]:
    """Return the agent's commands to send now, marked sent (expired ones are marked expired first)."""
    pending = commands.pending_for_agent(connection, agent_id)
    for command in pending:
        commands.mark_sent(connection, command.id, agent_id)
    return pending


def take_deliverables(
    connection: Any, agent_id: uuid.UUID, facts: HostFacts | None = None
) -> tuple[list[UpdateNotice], list[Command]]:
    """Return the agent's in-flight update notices and its pending commands (marked sent) in one transaction.

    A new session's Hello ``facts``, when given, are stored first, so that one
    transaction does all of the database work of opening a session.
    """
    if facts is not None:
        agents.update_reported_facts(connection, agent_id, facts)
    return rollouts.in_flight_notices(connection, agent_id), take_pending(connection, agent_id)


def take_one(connection: Any, command_id: uuid.UUID, agent_id: uuid.UUID) -> Command | None:
    """Return the command marked sent if it may still be sent to ``agent_id``, else None."""
    command = commands.get_command(connection, command_id)
    if command.agent_id != agent_id or command.state not in UNSTARTED_STATES or command.expires_at <= utc_now():
        return None
    commands.mark_sent(connection, command_id, agent_id)
    return command


class Router:
    """Publisher and receiver of routing messages, which delivers commands to local sessions."""

    def __init__(
        self,
        runtime: GatewayRuntime,
        sessions: SessionRegistry,
        authenticator: Authenticator,
        waiters: CommandWaiters,
    ) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.authenticator = authenticator
        self.waiters = waiters
        self.channel = gateway_channel(runtime.instance_id)
        self.pubsub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def session_ttl_seconds(self) -> int:
        return max(1, int(self.runtime.settings.offline_after_seconds + 0.999))

    # Publishing.

    async def publish_command(self, command: Command) -> None:
        """Tell the gateway that has the agent's stream open, if any, to send ``command``.

        The command is already stored, so a Redis failure is logged and not raised:
        the agent gets the command on its next connect instead.
        """
        try:
            holder = await self.runtime.redis.get(session_key(command.agent_id))
            if holder is None:
                logger.info("queued: command %s (agent not connected)", command.id)
                return
            message = {"kind": "command", "agent_id": str(command.agent_id), "command_id": str(command.id)}
            await self.runtime.redis.publish(gateway_channel(holder.decode()), json.dumps(message))
        except redis.exceptions.RedisError as error:
            logger.warning(
                "failed: routing command %s (%s; it is sent when the agent reconnects)", command.id, error,
                extra={"error_type": type(error).__name__},
            )

    async def publish_cancel(self, command: Command) -> None:
        """Tell the gateway that has the agent's stream open to stop ``command`` on the agent.

        Best effort: when no gateway has the stream or Redis fails, a command that
        is running goes on until its timeout, and its result is ignored.
        """
        try:
            holder = await self.runtime.redis.get(session_key(command.agent_id))
            if holder is None:
                return
            message = {"kind": "cancel_command", "agent_id": str(command.agent_id), "command_id": str(command.id)}
            await self.runtime.redis.publish(gateway_channel(holder.decode()), json.dumps(message))
        except redis.exceptions.RedisError as error:
            logger.warning("failed: routing the cancellation of command %s (%s)", command.id, error,
                           extra={"error_type": type(error).__name__})

    async def publish_revocation(self, agent_id: uuid.UUID) -> None:
        """Drop the agent's cached key here and tell every gateway to close its stream.

        The revocation is already stored, so when Redis fails the publish is retried in
        the background for up to REVOCATION_RETRY_SECONDS instead of failing the call.
        """
        self.authenticator.agent_keys.drop(agent_id)
        self.sessions.close_agent(agent_id, grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
        try:
            await self.runtime.redis.publish(REVOCATIONS_CHANNEL, json.dumps({"agent_id": str(agent_id)}))
        except redis.exceptions.RedisError as error:
            logger.warning(
                "failed: publishing revocation of agent %s (%s; retrying in the background)", agent_id, error,
                extra={"error_type": type(error).__name__},
            )
            self._spawn(self._retry_revocation(agent_id), agent_id=str(agent_id))

    async def _retry_revocation(self, agent_id: uuid.UUID) -> None:
        delay = RECONNECT_DELAY_SECONDS
        deadline = asyncio.get_running_loop().time() + REVOCATION_RETRY_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(delay)
            try:
                await self.runtime.redis.publish(REVOCATIONS_CHANNEL, json.dumps({"agent_id": str(agent_id)}))
            except redis.exceptions.RedisError:
                delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)
                continue
            logger.info("published: revocation of agent %s after a retry", agent_id)
            return
        # Gateways still close the stream when their subscription comes back (see ``_resync``).
        logger.error(
            "failed: publishing revocation of agent %s for %.0fs; other gateways may keep its stream open "
            "until it reconnects", agent_id, REVOCATION_RETRY_SECONDS,
        )

    async def publish_finished(self, command_id: uuid.UUID) -> None:
        await self.runtime.redis.publish(COMMAND_FINISHED_CHANNEL, json.dumps({"command_id": str(command_id)}))

    # The session key.

    async def claim_session(self, session: AgentSession) -> None:
        """Name this gateway as the holder of the agent's stream and supersede any other holder."""
        self.sessions.add(session)
        previous = await self.runtime.redis.set(
            session_key(session.agent_id), self.runtime.instance_id, ex=self.session_ttl_seconds, get=True
        )
        if previous is not None and previous.decode() != self.runtime.instance_id:
            message = {
                "kind": "supersede",
                "agent_id": str(session.agent_id),
                "session_id": session.session_id,
                "started_at": session.started_at,
            }
            await self.runtime.redis.publish(gateway_channel(previous.decode()), json.dumps(message))

    def reclaimed(self, session: AgentSession) -> None:
        """Handle a session key that expired before a heartbeat set it again (see ``heartbeats``).

        Commands stored while the key was missing were not routed here, so they are
        sent now. If the session ended meanwhile, the key it no longer needs is cleared.
        """
        if self.sessions.get(session.agent_id) is not session:
            self._spawn(self._clear_key(session), agent_id=str(session.agent_id))
            return
        logger.info("reclaimed: session key of agent %s after it expired", session.agent_id)
        self._spawn(self._resync(session), agent_id=str(session.agent_id))

    async def _clear_key(self, session: AgentSession) -> None:
        try:
            await self._delete_key(session)
        except redis.exceptions.RedisError as error:
            logger.warning("failed: clearing the session key of agent %s (%s; it expires by itself)",
                           session.agent_id, error, extra={"error_type": type(error).__name__})

    async def release_session(self, session: AgentSession) -> None:
        """Forget the session, and clear the key unless a newer session of the agent took over."""
        if self.sessions.remove(session):
            await self._delete_key(session)

    async def _delete_key(self, session: AgentSession) -> None:
        await self.runtime.redis.eval(_DELETE_IF_HOLDER, 1, session_key(session.agent_id), self.runtime.instance_id)

    # Delivery to local sessions.

    async def deliver_pending(self, session: AgentSession, *, facts: HostFacts | None = None) -> int:
        """Send every queued or sent, unexpired command and every in-flight update notice of the agent.

        A new session passes the ``facts`` from its Hello, which are stored in the
        same transaction. Returns how many commands were sent.
        """
        notices, pending = await self.runtime.db(take_deliverables, session.agent_id, facts)
        self._send_notices(session, notices)
        sent = 0
        for command in pending:
            if command.id not in session.delivered_command_ids:
                session.delivered_command_ids.add(command.id)
                session.send(convert.command_request(command))
                sent += 1
        if sent:
            logger.info("sent: %d pending command(s) on connect", sent, extra={"commands": sent})
        return sent

    async def deliver(self, session: AgentSession, command_id: uuid.UUID) -> None:
        """Send one routed command to ``session`` unless it was sent already, expired or ended."""
        if command_id in session.delivered_command_ids:
            return
        session.delivered_command_ids.add(command_id)
        command = await self.runtime.db(take_one, command_id, session.agent_id)
        if command is None:
            logger.info("skipped: command %s (no longer sendable)", command_id)
            return
        session.send(convert.command_request(command))
        logger.info("sent: command %s", command_id)

    async def deliver_update_notices(self, session: AgentSession, rollout_id: uuid.UUID) -> int:
        """Send the agent's in-flight update notice of ``rollout_id`` unless this stream had it."""
        notices = await self.runtime.db(rollouts.in_flight_notices, session.agent_id)
        return self._send_notices(session, [notice for notice in notices if notice.rollout_id == rollout_id])

    def _send_notices(self, session: AgentSession, notices: list[UpdateNotice]) -> int:
        sent = 0
        for notice in notices:
            if notice.rollout_id in session.delivered_rollout_ids:
                continue
            session.delivered_rollout_ids.add(notice.rollout_id)
            session.send(convert.update_notice(notice))
            sent += 1
            logger.info(
                "sent: update notice of release %s", notice.release.version,
                extra={"rollout_id": str(notice.rollout_id), "release_id": str(notice.release.id)},
            )
        return sent

    # Receiving.

    async def subscribe(self) -> None:
        """Subscribe to this gateway's channel, revocations and finished commands."""
        self.pubsub = self.runtime.redis.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.subscribe(self.channel, REVOCATIONS_CHANNEL, COMMAND_FINISHED_CHANNEL)
        logger.info("subscribed: %s", self.channel, extra={"channel": self.channel})

    async def run(self) -> None:
        """Handle routing messages until cancelled, resubscribing after a Redis outage."""
        delay = RECONNECT_DELAY_SECONDS
        try:
            while True:
                try:
                    if self.pubsub is None:
                        await self.subscribe()
                        # Messages published during the outage are lost: send what is pending.
                        await self.redeliver_all()
                    message = await self.pubsub.get_message(timeout=1.0)
                    delay = RECONNECT_DELAY_SECONDS
                except (redis.exceptions.RedisError, OSError) as error:
                    logger.warning(
                        "failed: routing subscription (%s; retrying in %.1fs)", error, delay,
                        extra={"error_type": type(error).__name__, "retry_seconds": delay},
                    )
                    await self._drop_pubsub()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_DELAY_MAX_SECONDS)
                    continue
                if message is not None:
                    self.handle(message)
        finally:
            await self._drop_pubsub()
            for task in list(self._tasks):
                task.cancel()

    async def _drop_pubsub(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (redis.exceptions.RedisError, OSError) as error:
                logger.debug("failed: closing the routing subscription (%s)", error)

    def handle(self, message: dict[str, Any]) -> None:
        """Act on one pub/sub message. A malformed one is logged and dropped."""
        channel = message["channel"].decode()
        try:
            payload = json.loads(message["data"])
            if channel == REVOCATIONS_CHANNEL:
                self.on_revocation(uuid.UUID(payload["agent_id"]))
            elif channel == COMMAND_FINISHED_CHANNEL:
                self.waiters.notify(uuid.UUID(payload["command_id"]))
            elif payload.get("kind") == "command":
                self.on_command(uuid.UUID(payload["agent_id"]), uuid.UUID(payload["command_id"]))
            elif payload.get("kind") == "cancel_command":
                self.on_cancel(uuid.UUID(payload["agent_id"]), uuid.UUID(payload["command_id"]))
            elif payload.get("kind") == "update_notice":
                agent_id = uuid.UUID(payload["agent_id"])
                self.on_update_notice(agent_id, uuid.UUID(payload["rollout_id"]))
            elif payload.get("kind") == "supersede":
                agent_id = uuid.UUID(payload["agent_id"])
                self._spawn(self.on_supersede(agent_id), agent_id=str(agent_id))
            else:
                raise ValueError(f"unknown kind {payload.get('kind')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("skipped: invalid message on %s (%s)", channel, error, extra={"channel": channel})

    def on_revocation(self, agent_id: uuid.UUID) -> None:
        self.authenticator.agent_keys.drop(agent_id)
        if self.sessions.close_agent(agent_id, grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS):
            logger.info("closed: session of revoked agent %s", agent_id, extra={"agent_id": str(agent_id)})

    async def on_supersede(self, agent_id: uuid.UUID) -> None:
        """Close the local session of an agent that connected to another gateway.

        The session key decides, not the clocks of two hosts. If the key names this
        gateway again, the local session is newer than the one that sent the message.
        """
        session = self.sessions.get(agent_id)
        if session is None:
            return
        try:
            holder = await self.runtime.redis.get(session_key(agent_id))
        except redis.exceptions.RedisError as error:
            logger.warning("failed: reading the session key (%s; closing the local session)", error)
            holder = None
        if holder is not None and holder.decode() == self.runtime.instance_id and self.sessions.get(agent_id) is session:
            return
        session.close(grpc.StatusCode.ABORTED, SUPERSEDED_DETAILS)

    def on_command(self, agent_id: uuid.UUID, command_id: uuid.UUID) -> None:
        session = self.sessions.get(agent_id)
        if session is None:
            # The agent left, so the command is sent from PostgreSQL when it reconnects.
            return
        self._spawn(self._deliver_logged(session, command_id), agent_id=str(agent_id), command_id=str(command_id))

    def on_cancel(self, agent_id: uuid.UUID, command_id: uuid.UUID) -> None:
        session = self.sessions.get(agent_id)
        if session is None:
            return
        session.send(agent_pb2.ServerMessage(cancel_command=agent_pb2.CancelCommand(command_id=str(command_id))))
        logger.info("sent: cancellation of command %s", command_id, extra={"command_id": str(command_id)})

    def on_update_notice(self, agent_id: uuid.UUID, rollout_id: uuid.UUID) -> None:
        session = self.sessions.get(agent_id)
        if session is None:
            # The agent left; its in-flight notice is sent again when it reconnects.
            return
        self._spawn(self._deliver_notices_logged(session, rollout_id), agent_id=str(agent_id), rollout_id=str(rollout_id))

    async def _deliver_notices_logged(self, session: AgentSession, rollout_id: uuid.UUID) -> None:
        try:
            await self.deliver_update_notices(session, rollout_id)
        except Exception as error:  # noqa: BLE001 - the agent gets the notice on reconnect
            logger.warning("failed: sending update notice of rollout %s (%s)", rollout_id, error,
                           extra={"rollout_id": str(rollout_id), "error": str(error)})

    async def redeliver_all(self) -> None:
        """Resynchronise every local session after messages may have been lost in a Redis outage."""
        for session in self.sessions.all():
            self._spawn(self._resync(session), agent_id=str(session.agent_id))

    async def _deliver_logged(self, session: AgentSession, command_id: uuid.UUID) -> None:
        try:
            await self.deliver(session, command_id)
        except Exception as error:  # noqa: BLE001 - the agent gets it on reconnect
            session.delivered_command_ids.discard(command_id)
            logger.warning(
                "failed: sending command %s (%s; it is sent on the next connect)", command_id, error,
                extra={"error_type": type(error).__name__},
            )

    async def _resync(self, session: AgentSession) -> None:
        """Close the session if its agent was revoked meanwhile, else send its pending commands."""
        try:
            agent = await self.runtime.db(agents.get_agent, session.agent_id)
            if agent.revoked_at is not None:
                self.on_revocation(session.agent_id)
                return
            await self.deliver_pending(session)
        except Exception as error:  # noqa: BLE001 - the agent gets them on reconnect
            logger.warning("failed: resynchronising the session (%s)", error, extra={"error_type": type(error).__name__})

    def _spawn(self, coroutine: Any, **ids: str) -> None:
        with bind_context(**ids):
            task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
