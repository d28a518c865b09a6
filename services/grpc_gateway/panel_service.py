"""PanelService: enrollment tokens, agents and commands for operators.

Roles: viewer may read; operator may also manage enrollment tokens and
commands; admin may do everything, including deleting agents.
"""

from __future__ import annotations

import asyncio
import math
import datetime
import logging
import time
import uuid

import grpc
import grpc.aio

from agentmanager.v1 import common_pb2, panel_pb2, panel_pb2_grpc
from services.core.errors import InvalidArgument
from services.core.fleet import agents, commands, enrollment
from services.core.fleet.listing import AgentFilters, CommandFilters, PageRequest
from services.core.fleet.models import FINAL_STATES, Agent, AgentStatus, ApiRole, utc_now
from services.core.logs import bind_context
from services.grpc_gateway import convert
from services.grpc_gateway.auth import Authenticator, OperatorCaller
from services.grpc_gateway.liveness import Liveness
from services.grpc_gateway.routing import CommandWaiters, Router
from services.grpc_gateway.rpc import panel_rpc
from services.grpc_gateway.runtime import GatewayRuntime

logger = logging.getLogger("agentmgr.grpc_gateway.panel_service")

SERVICE_NAME = panel_pb2.DESCRIPTOR.services_by_name["PanelService"].full_name

WAIT_POLL_SECONDS = 1.0
"""Interval at which a waiting RunCommand reads the command again, in case a finish message was lost."""


def parse_id(text: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidArgument(field, f"invalid {field} {text[:64]!r}: expected a UUID") from None


def page_request(page: common_pb2.PageRequest) -> PageRequest:
    return PageRequest(page_size=page.page_size, page_token=page.page_token, sort=page.sort, descending=page.descending)


def positive_seconds(message: object, field: str, *, default: float | None = None) -> float | None:
    """Return a Duration field in seconds, or ``default`` when unset.

    Raises:
        InvalidArgument: the duration is negative.
    """
    if not message.HasField(field):  # type: ignore[attr-defined]
        return default
    seconds = convert.seconds_of(getattr(message, field))
    if seconds < 0:
        raise InvalidArgument(field, f"invalid {field}: {seconds:g}s is negative")
    return seconds


class PanelServicer(panel_pb2_grpc.PanelServiceServicer):
    """PanelService handlers, one instance per gateway process."""

    def __init__(
        self,
        runtime: GatewayRuntime,
        *,
        authenticator: Authenticator,
        router: Router,
        liveness: Liveness,
        waiters: CommandWaiters,
        ca_fingerprint: str,
    ) -> None:
        self.runtime = runtime
        self.authenticator = authenticator
        self.router = router
        self.liveness = liveness
        self.waiters = waiters
        self.ca_fingerprint = ca_fingerprint

    def register(self, server: grpc.aio.Server) -> list[str]:
        panel_pb2_grpc.add_PanelServiceServicer_to_server(self, server)
        return [SERVICE_NAME]

    # Enrollment tokens.

    @panel_rpc(ApiRole.OPERATOR)
    async def CreateEnrollmentToken(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        expires_in = positive_seconds(request, "expires_in")
        expires_at = None if expires_in is None else utc_now() + datetime.timedelta(seconds=expires_in)
        token, secret = await self.runtime.db(
            enrollment.create_token,
            created_by=caller.actor,
            description=request.description,
            group=request.group,
            labels=dict(request.labels),
            max_uses=request.max_uses if request.HasField("max_uses") else None,
            expires_at=expires_at,
        )
        logger.info("created: enrollment token %s", token.id, extra={"token_id": str(token.id), "actor": caller.actor})
        return panel_pb2.CreateEnrollmentTokenResponse(
            token=convert.token_to_proto(token), secret=secret, ca_fingerprint=self.ca_fingerprint
        )

    @panel_rpc(ApiRole.VIEWER)
    async def ListEnrollmentTokens(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        page = await self.runtime.db(
            enrollment.list_tokens, include_revoked=request.include_revoked, page=page_request(request.page)
        )
        return panel_pb2.ListEnrollmentTokensResponse(
            tokens=[convert.token_to_proto(token) for token in page.items], next_page_token=page.next_page_token
        )

    @panel_rpc(ApiRole.OPERATOR)
    async def RevokeEnrollmentToken(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        token_id = parse_id(request.token_id, "token_id")
        token = await self.runtime.db(enrollment.revoke_token, token_id, actor=caller.actor)
        logger.info("revoked: enrollment token %s", token_id, extra={"token_id": str(token_id), "actor": caller.actor})
        return convert.token_to_proto(token)

    # Agents.

    async def agents_to_proto(self, items: list[Agent]) -> list[panel_pb2.Agent]:
        """Convert agents, deriving each status with the newer last-seen time from Redis."""
        live = await self.liveness.seen_at(agent.id for agent in items)
        now = utc_now()
        return [
            convert.agent_to_proto(
                agent,
                agents.derive_status(agent, now=now, thresholds=self.runtime.thresholds, live_seen_at=live.get(agent.id)),
            )
            for agent in items
        ]

    @panel_rpc(ApiRole.VIEWER)
    async def ListAgents(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        status = None
        if request.status != common_pb2.AGENT_STATUS_UNSPECIFIED:
            if request.status not in convert.AGENT_STATUS_FROM_PROTO:
                raise InvalidArgument("status", f"invalid status {request.status}: expected an AgentStatus value")
            status = convert.AGENT_STATUS_FROM_PROTO[request.status]
        filters = AgentFilters(
            status=status,
            group=request.group or None,
            label=dict(request.labels),
            hostname_contains=request.hostname_contains,
            include_revoked=request.include_revoked,
        )
        # NOTE: the status filter runs in SQL on the flushed last-seen times, so it can lag the
        # shown status (which also reads Redis) by up to AGENTMGR_LIVENESS_FLUSH_SECONDS.
        page = await self.runtime.db(
            agents.list_agents, filters=filters, page=page_request(request.page), now=utc_now(),
            thresholds=self.runtime.thresholds,
        )
        return panel_pb2.ListAgentsResponse(
            agents=await self.agents_to_proto(page.items), next_page_token=page.next_page_token, total=page.total
        )

    @panel_rpc(ApiRole.VIEWER)
    async def GetAgent(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        agent_id = parse_id(request.agent_id, "agent_id")
        with bind_context(agent_id=str(agent_id)):
            agent = await self.runtime.db(agents.get_agent, agent_id)
            return (await self.agents_to_proto([agent]))[0]

    @panel_rpc(ApiRole.ADMIN)
    async def DeleteAgent(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        agent_id = parse_id(request.agent_id, "agent_id")
        with bind_context(agent_id=str(agent_id)):
            agent, cancelled = await self.runtime.db(
                agents.revoke_agent, agent_id, actor=caller.actor, reason=request.reason or "deleted"
            )
            await self.router.publish_revocation(agent_id)
            logger.info(
                "deleted: agent %s (%d pending command(s) cancelled)", agent_id, len(cancelled),
                extra={"actor": caller.actor, "cancelled_commands": len(cancelled)},
            )
            return panel_pb2.DeleteAgentResponse(
                agent=convert.agent_to_proto(agent, AgentStatus.REVOKED),
                cancelled_command_ids=[str(command_id) for command_id in cancelled],
            )

    # Commands.

    @panel_rpc(ApiRole.OPERATOR)
    async def RunCommand(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        agent_id = parse_id(request.agent_id, "agent_id")
        settings = self.runtime.settings
        timeout = positive_seconds(request, "timeout")
        if timeout is None:
            raise InvalidArgument("timeout", "missing timeout: set how long the command may run")
        expires_in = positive_seconds(request, "expires_in", default=settings.command_expires_seconds)
        wait = min(positive_seconds(request, "wait", default=0.0) or 0.0, settings.command_wait_max_seconds)

        with bind_context(agent_id=str(agent_id)):
            command = await self.runtime.db(
                commands.create_command,
                agent_id=agent_id,
                command_line=request.command_line,
                timeout_seconds=math.ceil(timeout),
                expires_in_seconds=math.ceil(expires_in),
                reason=request.reason,
                requested_by=caller.actor,
            )
            with bind_context(command_id=str(command.id)):
                logger.info("queued: command %s for agent %s", command.id, agent_id, extra={"actor": caller.actor})
                event = self.waiters.add(command.id)
                try:
                    await self.router.publish_command(command)
                    if wait > 0:
                        command = await self.wait_for_final(command.id, event, wait)
                finally:
                    self.waiters.remove(command.id, event)
                return convert.command_to_proto(command)

    async def wait_for_final(self, command_id: uuid.UUID, event: asyncio.Event, wait_seconds: float):  # type: ignore[no-untyped-def]
        """Return the command once it is final, or as it is when ``wait_seconds`` have passed."""
        deadline = time.monotonic() + wait_seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(event.wait(), max(0.0, min(remaining, WAIT_POLL_SECONDS)))
            except asyncio.TimeoutError:
                pass
            event.clear()
            command = await self.runtime.db(commands.get_command, command_id)
            if command.state in FINAL_STATES or time.monotonic() >= deadline:
                return command

    @panel_rpc(ApiRole.VIEWER)
    async def GetCommand(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        command_id = parse_id(request.command_id, "command_id")
        command = await self.runtime.db(commands.get_command, command_id)
        return convert.command_to_proto(command)

    @panel_rpc(ApiRole.VIEWER)
    async def ListCommands(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        state = None
        if request.state != common_pb2.COMMAND_STATE_UNSPECIFIED:
            if request.state not in convert.COMMAND_STATE_FROM_PROTO:
                raise InvalidArgument("state", f"invalid state {request.state}: expected a CommandState value")
            state = convert.COMMAND_STATE_FROM_PROTO[request.state]
        filters = CommandFilters(
            agent_id=parse_id(request.agent_id, "agent_id") if request.agent_id else None,
            state=state,
            requested_by=request.requested_by or None,
        )
        page = await self.runtime.db(commands.list_commands, filters=filters, page=page_request(request.page))
        return panel_pb2.ListCommandsResponse(
            commands=[convert.command_to_proto(command) for command in page.items],
            next_page_token=page.next_page_token,
            total=page.total,
        )

    @panel_rpc(ApiRole.OPERATOR)
    async def CancelCommand(self, request, context, caller: OperatorCaller):  # type: ignore[no-untyped-def]
        command_id = parse_id(request.command_id, "command_id")
        with bind_context(command_id=str(command_id)):
            command = await self.runtime.db(commands.cancel_command, command_id, actor=caller.actor)
            await self.router.publish_cancel(command)
            logger.info("cancelled: command %s", command_id, extra={"actor": caller.actor})
            return convert.command_to_proto(command)
