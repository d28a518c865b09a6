"""AgentService: Register, the Session stream and artifact download."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import grpc
import grpc.aio

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from services.core import metrics
from services.core.errors import FailedPrecondition, InvalidArgument, RequestError
from services.core.fleet import agents, commands, releases, rollouts
from services.core.logs import bind_context
from services.core.settings import Settings
from services.grpc_gateway import convert
from services.grpc_gateway.auth import AgentCaller, Authenticator, RegisterRateLimiter, peer_host
from services.grpc_gateway.heartbeats import HeartbeatBatcher
from services.grpc_gateway.liveness import Liveness
from services.grpc_gateway.routing import Router
from services.grpc_gateway.rpc import UNAVAILABLE_ERRORS, agent_rpc, enrollment_rpc
from services.grpc_gateway.runtime import GatewayRuntime
from services.grpc_gateway.server import MIN_CLIENT_PING_INTERVAL_SECONDS
from services.grpc_gateway.sessions import AgentSession, CloseRequest

logger = logging.getLogger("agentmgr.grpc_gateway.agent_service")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

HELLO_TIMEOUT_MIN_SECONDS = 10.0
"""Shortest time a new stream has to send Hello (the actual limit is two heartbeat intervals, if longer)."""


class HelloTimeout(RequestError):
    grpc_code_name = "DEADLINE_EXCEEDED"


class TooManyDownloads(RequestError):
    grpc_code_name = "RESOURCE_EXHAUSTED"


ARTIFACT_CHUNK_BYTES = 256 * 1024
"""Bytes per ArtifactChunk, lowered to fit AGENTMGR_GRPC_MAX_MESSAGE_BYTES when that is smaller."""
CHUNK_OVERHEAD_BYTES = 1024
"""Room left in each message for the chunk's other fields and protobuf framing."""
DOWNLOAD_SLOT_WAIT_SECONDS = 10.0
"""How long a download waits for a free slot before RESOURCE_EXHAUSTED."""


def result_state(result: agent_pb2.CommandResult) -> str:
    """Return the final command state a stored result leads to, for the metrics label."""
    if result.timed_out:
        return "timed_out"
    if result.HasField("exit_code") and result.exit_code == 0 and not result.error:
        return "succeeded"
    return "failed"


def parse_uuid(text: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidArgument(field, f"invalid {field} {text[:64]!r}: expected a UUID") from None


def parse_command_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidArgument("command_id", f"invalid command_id {text[:64]!r}: expected a UUID") from None


def trusted_publisher_key_lines(settings: Settings) -> list[str]:
    """Read the manager's trusted publisher keys as ``ed25519 BASE64 [comment]`` lines, for agents to pin.

    A missing file means no key is trusted, and then agents reject every update.

    Raises:
        FailedPrecondition: the file exists but cannot be read or contains an invalid line.
    """
    path = settings.trusted_keys_file
    if not releases.trusted_keys_from_settings(settings):
        return []
    try:
        text = path.read_text()
    except OSError as error:
        raise FailedPrecondition(f"failed to read the trusted publisher keys file {path}: {error.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """AgentService handlers, one instance per gateway process."""

    def __init__(
        self,
        runtime: GatewayRuntime,
        *,
        authenticator: Authenticator,
        router: Router,
        liveness: Liveness,
        heartbeats: HeartbeatBatcher,
    ) -> None:
        self.runtime = runtime
        self.authenticator = authenticator
        self.router = router
        self.sessions = router.sessions
        self.liveness = liveness
        self.heartbeats = heartbeats
        self.rate_limiter = RegisterRateLimiter(runtime)
        self.release_store = releases.store_from_settings(runtime.settings)
        self.downloads = asyncio.Semaphore(runtime.settings.gateway_max_downloads)

    def register(self, server: grpc.aio.Server) -> list[str]:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self, server)
        return [SERVICE_NAME]

    def session_settings(self) -> common_pb2.SessionSettings:
        settings = self.runtime.settings
        return common_pb2.SessionSettings(
            heartbeat_interval=convert.duration(settings.heartbeat_interval_seconds),
            offline_threshold=convert.duration(settings.offline_after_seconds),
            max_output_bytes=settings.command_output_max_bytes,
            max_message_bytes=settings.grpc_max_message_bytes,
            min_keepalive_ping_interval=convert.duration(MIN_CLIENT_PING_INTERVAL_SECONDS),
            gateway_instance_id=self.runtime.instance_id,
        )

    # Register.

    @enrollment_rpc
    async def Register(self, request: agent_pb2.RegisterRequest, context: grpc.aio.ServicerContext, caller: None) -> agent_pb2.RegisterResponse:
        host = peer_host(context.peer())
        await self.rate_limiter.check(host)
        # Read before the agent is created, so a broken key file fails the call and enrolls nothing.
        publisher_keys = await asyncio.to_thread(trusted_publisher_key_lines, self.runtime.settings)
        try:
            if not request.enrollment_token:
                raise InvalidArgument("enrollment_token", "missing enrollment_token: pass the token from `agentmgr token create`")
            if not request.HasField("facts"):
                raise InvalidArgument("facts", "missing facts: the request must describe the host")
            agent, key = await self.runtime.db(
                agents.register_agent,
                token_secret=request.enrollment_token,
                facts=convert.host_facts_from_proto(request.facts),
                replace=request.replace,
                actor_peer=host,
            )
        except RequestError:
            await self.rate_limiter.record_failure(host)
            raise
        if request.replace:
            await self.revoke_replaced(agent.id)
        return agent_pb2.RegisterResponse(
            agent_id=str(agent.id),
            agent_key=key,
            settings=self.session_settings(),
            group=agent.group,
            labels=agent.labels,
            trusted_publisher_keys=publisher_keys,
        )

    async def revoke_replaced(self, agent_id: uuid.UUID) -> None:
        """Close the stream of the agent that ``agent_id`` replaced, on whichever gateway has it open."""
        replaced = await self.runtime.db(agents.find_replaced_agent, agent_id)
        if replaced is not None:
            await self.router.publish_revocation(replaced.id)

    # Session.

    # NOTE: at 10,000 agents each open session costs about 100 KiB of gateway RSS, 1.33 times an
    # idle stream on a bare grpc.aio server, which keeps 10,000 agents above 1 GiB (docs/benchmarks.md).
    @agent_rpc
    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext, caller: AgentCaller) -> None:
        hello = await self.read_hello(context)
        if hello is None:
            return
        session = AgentSession(caller.agent_id, peer=context.peer())
        with bind_context(session_id=session.session_id):
            reader: asyncio.Task[None] | None = None
            try:
                await self.router.claim_session(session)
                logger.info(
                    "connected: agent %s (version %s)", caller.agent_id, hello.agent_version,
                    extra={"agent_version": hello.agent_version, "peer": session.peer},
                )
                await self.liveness.record(caller.agent_id)
                await context.write(agent_pb2.ServerMessage(settings=self.session_settings()))
                # A new version reports its facts here after a self-update, which rollouts check.
                facts = convert.host_facts_from_proto(hello.facts) if hello.HasField("facts") else None
                await self.router.deliver_pending(session, facts=facts)
                reader = asyncio.create_task(self.read_messages(session, context))
                await self.write_messages(session, context)
            finally:
                if reader is not None:
                    reader.cancel()
                await self.end_session(session)

    async def read_hello(self, context: grpc.aio.ServicerContext) -> agent_pb2.Hello | None:
        """Return the stream's first message, which must be Hello, or None if the agent hung up."""
        timeout = max(HELLO_TIMEOUT_MIN_SECONDS, 2 * self.runtime.settings.heartbeat_interval_seconds)
        try:
            message = await asyncio.wait_for(context.read(), timeout)
        except asyncio.TimeoutError:
            raise HelloTimeout(f"no hello within {timeout:g} seconds of opening the session") from None
        if message is grpc.aio.EOF:
            return None
        if message.WhichOneof("body") != "hello":
            raise InvalidArgument("hello", "the first message of a session must be hello")
        if message.hello.HasField("facts"):
            agents.validate_host_facts(convert.host_facts_from_proto(message.hello.facts))
        return message.hello

    async def write_messages(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        """Write the session's outbox to the stream until a close request arrives."""
        while True:
            item = await session.outbox.get()
            if isinstance(item, CloseRequest):
                if item.code is grpc.StatusCode.OK:
                    logger.info("disconnected: agent %s (stream closed)", session.agent_id)
                    return
                logger.info(
                    "closed: session of agent %s (%s: %s)", session.agent_id, item.code.name, item.details,
                    extra={"grpc_code": item.code.name},
                )
                await context.abort(item.code, item.details)
            await context.write(item)

    async def read_messages(self, session: AgentSession, context: grpc.aio.ServicerContext) -> None:
        """Handle the agent's messages. A bad message is logged and skipped, and an outage ends the session."""
        while True:
            try:
                message = await context.read()
            except (grpc.aio.AioRpcError, ConnectionError) as error:
                logger.info("disconnected: agent %s (%s)", session.agent_id, error)
                session.close(grpc.StatusCode.CANCELLED, "stream read failed")
                return
            if message is grpc.aio.EOF:
                session.close(grpc.StatusCode.OK, "")
                return
            kind = message.WhichOneof("body")
            try:
                await self.handle_message(session, message, kind)
            except RequestError as error:
                logger.warning(
                    "rejected: %s message from agent %s (%s)", kind, session.agent_id, error,
                    extra={"grpc_code": error.grpc_code_name, "message_kind": kind},
                )
            except UNAVAILABLE_ERRORS as error:
                logger.warning("failed: %s message (%s; closing the session)", kind, error, extra={"message_kind": kind})
                session.close(grpc.StatusCode.UNAVAILABLE, "the manager's database or Redis is unavailable; reconnect")
                return
            except Exception:  # noqa: BLE001 - logged with traceback, the agent reconnects
                logger.exception("failed: %s message (unexpected error)", kind, extra={"message_kind": kind})
                session.close(grpc.StatusCode.INTERNAL, "internal error; the gateway log has the details")
                return

    async def handle_message(self, session: AgentSession, message: agent_pb2.AgentMessage, kind: str | None) -> None:
        agent_id = session.agent_id
        if kind == "heartbeat":
            metrics.HEARTBEATS.inc()
            self.heartbeats.beat(session)
        elif kind == "command_ack":
            command_id = parse_command_id(message.command_ack.command_id)
            with bind_context(command_id=str(command_id)):
                started = await self.runtime.db(commands.mark_running, command_id, agent_id)
                logger.info("started: command %s%s", command_id, "" if started else " (already reported or final)")
        elif kind == "command_result":
            await self.store_result(session, message.command_result)
        elif kind == "update_status":
            await self.store_update_status(agent_id, message.update_status)
        elif kind == "hello":
            raise InvalidArgument("hello", "hello is only allowed as the first message of a session")
        else:
            raise InvalidArgument("body", "empty message: set one field of the body")

    async def store_result(self, session: AgentSession, result: agent_pb2.CommandResult) -> None:
        command_id = parse_command_id(result.command_id)
        with bind_context(command_id=str(command_id)):
            stored = await self.runtime.db(
                commands.store_result,
                command_id,
                session.agent_id,
                exit_code=result.exit_code if result.HasField("exit_code") else None,
                stdout=result.stdout,
                stderr=result.stderr,
                stdout_truncated=result.stdout_truncated,
                stderr_truncated=result.stderr_truncated,
                duration_ms=int(convert.seconds_of(result.duration) * 1000),
                timed_out=result.timed_out,
                error=result.error,
                max_output_bytes=self.runtime.settings.command_output_max_bytes,
            )
            if stored:
                metrics.COMMAND_RESULTS.labels(state=result_state(result)).inc()
                logger.info("finished: command %s", command_id, extra={"exit_code": result.exit_code, "timed_out": result.timed_out})
                await self.router.publish_finished(command_id)
            else:
                logger.info("ignored: duplicate result of command %s", command_id)
            session.send(agent_pb2.ServerMessage(result_stored=agent_pb2.ResultStored(command_id=str(command_id))))

    async def store_update_status(self, agent_id: uuid.UUID, status: agent_pb2.UpdateStatus) -> None:
        if status.state not in convert.UPDATE_STATE_FROM_PROTO:
            raise InvalidArgument("update_status.state", f"invalid update state {status.state}: set a reported state")
        rollout_id = parse_uuid(status.rollout_id, "update_status.rollout_id")
        state = convert.UPDATE_STATE_FROM_PROTO[status.state]
        with bind_context(rollout_id=str(rollout_id)):
            changed = await self.runtime.db(
                rollouts.record_agent_update, rollout_id, agent_id,
                state=state, agent_version=status.agent_version, reason=status.reason[:1000],
            )
            logger.info(
                "update: %s on agent %s%s", state.value, agent_id, "" if changed else " (already recorded)",
                extra={"release_id": status.release_id, "agent_version": status.agent_version, "reason": status.reason[:200]},
            )

    async def end_session(self, session: AgentSession) -> None:
        """Release the session key and record the last sign of life, logging errors without raising them."""
        try:
            await self.router.release_session(session)
            await self.liveness.record(session.agent_id)
        except UNAVAILABLE_ERRORS as error:
            logger.warning("failed: releasing session of agent %s (%s)", session.agent_id, error)

    # Artifact download.

    @agent_rpc
    async def DownloadArtifact(
        self, request: agent_pb2.DownloadArtifactRequest, context: grpc.aio.ServicerContext, caller: AgentCaller
    ) -> None:
        release_id = parse_uuid(request.release_id, "release_id")
        release = await self.runtime.db(releases.get_release, release_id)
        if not 0 <= request.offset <= release.size_bytes:
            raise InvalidArgument("offset", f"invalid offset {request.offset}: expected 0 to {release.size_bytes}")
        # The path comes from the stored digest, never from the request.
        path = self.release_store.path_for(release.sha256)
        try:
            await asyncio.wait_for(self.downloads.acquire(), DOWNLOAD_SLOT_WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise TooManyDownloads(
                f"all {self.runtime.settings.gateway_max_downloads} download slots are busy; retry later"
            ) from None
        try:
            with bind_context(release_id=str(release_id)):
                logger.info("serving: release %s from byte %d", release.version, request.offset)
                with open(path, "rb") as artifact:
                    artifact.seek(request.offset)
                    offset = request.offset
                    chunk_bytes = min(ARTIFACT_CHUNK_BYTES, self.runtime.settings.grpc_max_message_bytes - CHUNK_OVERHEAD_BYTES)
                    while chunk := await asyncio.to_thread(artifact.read, chunk_bytes):
                        await context.write(agent_pb2.ArtifactChunk(offset=offset, data=chunk, total_size=release.size_bytes))
                        metrics.ARTIFACT_BYTES.inc(len(chunk))
                        offset += len(chunk)
        finally:
            self.downloads.release()
