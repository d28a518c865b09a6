"""The run loop: one session stream to the manager at a time, reconnecting with backoff, and the
commands it delivers.

The agent uses grpc.aio rather than threads. The stream reader, the heartbeat
timer and every running command are coroutines on one event loop, so they
share the journal and the current stream without locks. Stopping is one
cancellation that reaches each of them, and a cancelled command kills its
process group.

``AgentRunner.serve()`` runs ``startup()``, ``main_loop()`` and ``shutdown()``.
Signal handlers only set ``should_exit``. ``agent.commands`` runs the
commands that sessions deliver.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import signal
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from agent import __version__
from agent.commands import CommandRunner, seconds_of, timestamp_now
from agent.config import AgentSettings, InstalledConfig, load_config
from agent.errors import NotInstalledError, RevokedError
from agent.hostfacts import collect_host_facts
from agent.journal import Journal
from agent.logs import bind_context
from agent.status import ConnectionState, StatusFile
from agent.update import Updater
from agent.versions import VersionStore

logger = logging.getLogger("agentmgr.agent.session")

DEFAULT_HEARTBEAT_SECONDS = 15.0
"""Heartbeat interval when the gateway announces none."""
MIN_HEARTBEAT_SECONDS = 0.1
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
"""Output cap, per stream, when the gateway announces none."""
MESSAGE_OVERHEAD_BYTES = 64 * 1024
"""Room kept in a message for everything besides stdout and stderr."""
KEEPALIVE_TIME_SECONDS = 30.0
"""Interval of HTTP/2 keepalive pings; the gateway rejects pings more often than every 10 s."""
KEEPALIVE_TIMEOUT_SECONDS = 10.0
SETTINGS_TIMEOUT_SECONDS = 30.0
"""Time the gateway has to send SessionSettings on a new session."""
FAILURE_SUMMARY_EVERY = 20
"""After the first failure is logged, every this many further failures log one summary line."""
REINSTALL_WAIT_SECONDS = 5.0
"""Time a revoked agent looks for a newer install in its config folder before it exits."""
REINSTALL_POLL_SECONDS = 0.2
DRAIN_TIMEOUT_SECONDS = 2.0
"""Time the last update reports get to leave the outbox before the agent exits for an update."""


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """Return a reconnect delay after ``failures`` failures in a row: exponential, capped, full jitter."""
    bound = min(cap, base * 2 ** min(failures - 1, 62))
    return random.uniform(0, bound)


class SessionEnded(Exception):
    """A session ended with a status other than UNAUTHENTICATED; the loop reconnects."""

    def __init__(self, reason: str, *, superseded: bool = False) -> None:
        super().__init__(reason)
        self.superseded = superseded


class AgentRunner:
    """The ``run`` command: keeps a session open and runs the commands it delivers."""

    def __init__(self, *, settings: AgentSettings, config: InstalledConfig, journal: Journal, status: StatusFile) -> None:
        self.settings = settings
        self.config = config
        self.journal = journal
        self.status = status
        self.should_exit = asyncio.Event()
        self.commands = CommandRunner(
            journal=journal,
            send=self.send,
            max_concurrent=settings.max_concurrent_commands,
            kill_grace_seconds=settings.kill_grace_seconds,
            max_output_bytes=lambda: self.max_output_bytes,
        )
        self.outbox: asyncio.Queue[agent_pb2.AgentMessage | None] | None = None
        """The current session's outgoing messages; None while disconnected."""
        self.session_settings = common_pb2.SessionSettings()
        self.failures = 0
        self.keepalive_seconds = KEEPALIVE_TIME_SECONDS
        self.updater = Updater(
            settings=settings,
            config=lambda: self.config,
            store=VersionStore(settings.state_dir),
            send=self.send,
            channel_options=self.channel_options,
            request_restart=self.request_restart,
        )
        self.restart_requested = False
        """Set when an update was installed; ``run`` then exits with ``ExitCode.UPDATE_INSTALLED``."""
        self.restart_task: asyncio.Task[None] | None = None

    # Lifecycle.

    async def serve(self) -> None:
        """Start, keep a session open until a stop signal, then shut down.

        Raises:
            RevokedError: the manager rejected the agent's credentials.
        """
        self.install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.handle_exit, signum)

    def handle_exit(self, signum: int) -> None:
        logger.info("received: %s", signal.Signals(signum).name)
        self.should_exit.set()

    async def startup(self) -> None:
        """Report commands that an earlier process left unfinished, and prune the journal."""
        self.commands.report_interrupted()
        pruned = self.journal.prune()
        if pruned:
            logger.info("pruned: %d old journal entries", pruned)
        pruned = self.updater.store.prune_records()
        if pruned:
            logger.info("pruned: %d old rollout records", pruned)

    async def main_loop(self) -> None:
        """Open sessions until a stop signal, waiting with backoff after each failure.

        Raises:
            RevokedError: the manager rejected the agent's credentials.
        """
        attempt = 0
        while not self.should_exit.is_set():
            attempt += 1
            logger.info("connecting: manager %s (attempt %d)", self.config.manager, attempt, extra={"attempt": attempt})
            if self.failures == 0:
                # During an outage the state stays disconnected, so its time is when the outage began.
                self.status.update(ConnectionState.CONNECTING, manager=self.config.manager, agent_id=self.config.agent_id)
            # The id is bound per session because a reinstall can change it while the loop runs.
            with bind_context(agent_id=self.config.agent_id):
                session = asyncio.create_task(self.run_session())
            stop = asyncio.create_task(self.should_exit.wait())
            await asyncio.wait({session, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not session.done():
                session.cancel()
                await asyncio.gather(session, return_exceptions=True)
                return

            try:
                session.result()
                reason, superseded = "the manager closed the session", False
            except RevokedError as error:
                if await self.wait_for_reinstall():
                    continue
                self.status.update(ConnectionState.REVOKED, last_error=str(error))
                raise
            except SessionEnded as error:
                reason, superseded = str(error), error.superseded
            except Exception as error:  # noqa: BLE001 - the loop must outlive any one session
                # The traceback once per outage; repeats are counted like other failures.
                if self.failures == 0:
                    logger.exception("failed: session with manager %s (unexpected error)", self.config.manager)
                reason, superseded = f"unexpected error: {error!r}", False

            self.failures += 1
            delay = backoff_delay(self.failures, base=self.settings.backoff_base_seconds, cap=self.settings.backoff_cap_seconds)
            self.status.update(ConnectionState.DISCONNECTED, last_error=reason, failed_attempts=self.failures)
            self.log_failure(reason, delay, superseded=superseded)
            try:
                await asyncio.wait_for(self.should_exit.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def wait_for_reinstall(self) -> bool:
        """Look for a newer install for ``REINSTALL_WAIT_SECONDS``; return whether one was loaded.

        ``install --replace`` revokes the old agent during Register, moments
        before it writes the new config, so one look right after the
        revocation would miss it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REINSTALL_WAIT_SECONDS
        while not self.reload_reinstalled_config():
            if loop.time() >= deadline or self.should_exit.is_set():
                return False
            await asyncio.sleep(REINSTALL_POLL_SECONDS)
        return True

    def reload_reinstalled_config(self) -> bool:
        """Switch to a newer install in the config folder (``install --replace`` while running); return whether one exists."""
        try:
            config = load_config(self.settings.config_dir)
        except NotInstalledError:
            return False
        if config.agent_id == self.config.agent_id:
            return False
        logger.info(
            "reloaded: config now names agent %s (reinstalled); agent %s was replaced",
            config.agent_id, self.config.agent_id, extra={"previous_agent_id": self.config.agent_id},
        )
        self.config = config
        return True

    def log_failure(self, reason: str, delay: float, *, superseded: bool) -> None:
        """Log the first failure in a row and then one summary every ``FAILURE_SUMMARY_EVERY``."""
        fields = {"failures": self.failures, "retry_seconds": round(delay, 3)}
        if superseded:
            logger.warning(
                "superseded: another session of agent %s took over (is a second agent running with this "
                "config?); reconnecting in %.1fs", self.config.agent_id, delay, extra=fields,
            )
        elif self.failures == 1:
            logger.warning(
                "failed: session with manager %s (%s); retrying in %.1fs, further failures are counted",
                self.config.manager, reason, delay, extra=fields,
            )
        elif self.failures % FAILURE_SUMMARY_EVERY == 0:
            logger.warning(
                "failing: session with manager %s, %d attempts in a row (last: %s); retrying in %.1fs",
                self.config.manager, self.failures, reason, delay, extra=fields,
            )
        else:
            logger.debug("failed: session with manager %s (%s); retrying in %.1fs", self.config.manager, reason, delay, extra=fields)

    async def shutdown(self) -> None:
        """Kill running commands (their entries report them as interrupted on the next start); safe to repeat."""
        self.should_exit.set()
        await self.updater.stop()
        await self.commands.stop()
        if self.status.document.get("state") != ConnectionState.REVOKED.value:
            self.status.update(ConnectionState.STOPPED)

    # One session.

    def channel_options(self) -> list[tuple[str, int]]:
        max_message = int(self.session_settings.max_message_bytes) or 4 * 1024 * 1024
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.enable_retries", 0),
        ]

    async def run_session(self) -> None:
        """Open one session and serve it until it ends.

        Raises:
            RevokedError: the manager returned UNAUTHENTICATED.
            SessionEnded: the session could not be opened or ended otherwise.
        """
        credentials = grpc.ssl_channel_credentials(root_certificates=self.config.ca_pem)
        metadata = (("x-agent-id", self.config.agent_id), ("x-agent-key", self.config.agent_key))
        facts = collect_host_facts(self.settings.config_dir, labels=self.config.labels, machine_id=self.settings.machine_id)
        outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        outbox.put_nowait(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_version=__version__, facts=facts)))

        async def requests() -> AsyncIterator[agent_pb2.AgentMessage]:
            while (message := await outbox.get()) is not None:
                yield message

        heartbeat: asyncio.Task[None] | None = None
        async with grpc.aio.secure_channel(self.config.manager, credentials, options=self.channel_options()) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Session(requests(), metadata=metadata)
            try:
                first = await asyncio.wait_for(call.read(), timeout=SETTINGS_TIMEOUT_SECONDS)
                if first is grpc.aio.EOF or first.WhichOneof("body") != "settings":
                    raise SessionEnded("the gateway did not start the session with its settings")
                self.apply_settings(first.settings)
                self.outbox = outbox
                self.commands.resend_unconfirmed()
                self.report_updates()
                heartbeat = asyncio.create_task(self.send_heartbeats(outbox))
                while (message := await call.read()) is not grpc.aio.EOF:
                    self.handle_server_message(message)
                code = await call.code()
                raise SessionEnded(f"the gateway ended the stream ({code.name})")
            except grpc.aio.AioRpcError as error:
                raise self.classify(error) from None
            except asyncio.TimeoutError:
                raise SessionEnded(f"no session settings from the gateway within {SETTINGS_TIMEOUT_SECONDS:g}s") from None
            finally:
                self.outbox = None
                outbox.put_nowait(None)
                if heartbeat is not None:
                    heartbeat.cancel()
                call.cancel()

    def classify(self, error: grpc.aio.AioRpcError) -> Exception:
        code, details = error.code(), error.details() or ""
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return RevokedError(
                f"the manager {self.config.manager} rejected the credentials of agent {self.config.agent_id} "
                f"({details}): the agent was deleted, or replaced by a newer install on this machine. "
                "Enroll again with `agentmgr-agent install ... --replace` and a new token"
            )
        return SessionEnded(f"{code.name}: {details}", superseded=code is grpc.StatusCode.ABORTED and "superseded" in details)

    def apply_settings(self, settings: common_pb2.SessionSettings) -> None:
        """Adopt the gateway's session settings and report the connection."""
        self.session_settings = settings
        announced_ping = seconds_of(settings.min_keepalive_ping_interval)
        if announced_ping > self.keepalive_seconds:
            # Channel options are fixed per connection, so this applies from the next one.
            logger.warning("adjusting: keepalive interval to %.1fs as the gateway requires", announced_ping)
            self.keepalive_seconds = announced_ping
        if self.failures:
            logger.info(
                "connected: manager %s after %d failed attempt(s) (gateway %s)",
                self.config.manager, self.failures, settings.gateway_instance_id,
                extra={"gateway_instance_id": settings.gateway_instance_id, "failures": self.failures},
            )
        else:
            logger.info(
                "connected: manager %s (gateway %s, heartbeat every %.1fs)",
                self.config.manager, settings.gateway_instance_id, self.heartbeat_seconds,
                extra={"gateway_instance_id": settings.gateway_instance_id},
            )
        self.failures = 0
        self.status.update(
            ConnectionState.CONNECTED,
            manager=self.config.manager,
            agent_id=self.config.agent_id,
            gateway_instance_id=settings.gateway_instance_id,
            last_connected_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            last_error="",
            failed_attempts=0,
        )

    @property
    def heartbeat_seconds(self) -> float:
        announced = seconds_of(self.session_settings.heartbeat_interval)
        return max(MIN_HEARTBEAT_SECONDS, announced or DEFAULT_HEARTBEAT_SECONDS)

    @property
    def max_output_bytes(self) -> int:
        """The announced output cap, lowered so that a result with both streams full fits in one message."""
        cap = int(self.session_settings.max_output_bytes) or DEFAULT_MAX_OUTPUT_BYTES
        max_message = int(self.session_settings.max_message_bytes)
        if max_message:
            cap = min(cap, max(0, (max_message - MESSAGE_OVERHEAD_BYTES) // 2))
        return cap

    async def send_heartbeats(self, outbox: asyncio.Queue[agent_pb2.AgentMessage | None]) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            heartbeat = agent_pb2.Heartbeat(sent_at=timestamp_now(), running_commands=self.commands.started_count)
            outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=heartbeat))

    def send(self, message: agent_pb2.AgentMessage) -> bool:
        """Queue ``message`` on the current session; return False while disconnected."""
        if self.outbox is None:
            return False
        self.outbox.put_nowait(message)
        return True

    # Updates.

    def report_updates(self) -> None:
        """Confirm a version on trial and send update outcomes not yet reported; logs write errors."""
        try:
            self.updater.confirm_trial()
        except OSError as error:
            logger.error("failed: recording the update state in %s (%s)", self.updater.store.root, error)

    def request_restart(self) -> None:
        """Exit soon with ``ExitCode.UPDATE_INSTALLED``, after the queued reports left the outbox."""
        if self.restart_task is None:
            self.restart_task = asyncio.create_task(self.restart_for_update())

    async def restart_for_update(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_SECONDS
        while self.outbox is not None and not self.outbox.empty() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # The stream writes a message shortly after taking it from the outbox.
        await asyncio.sleep(0.2)
        self.restart_requested = True
        self.should_exit.set()

    # Messages from the gateway.

    def handle_server_message(self, message: agent_pb2.ServerMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "command_request":
            self.commands.accept(message.command_request)
        elif kind == "cancel_command":
            self.commands.cancel(message.cancel_command.command_id)
        elif kind == "result_stored":
            self.commands.confirm_result(message.result_stored.command_id)
        elif kind == "settings":
            self.apply_settings(message.settings)
        elif kind == "update_notice":
            try:
                self.updater.handle_notice(message.update_notice)
            except OSError as error:
                logger.error("failed: reading the update state in %s (%s)", self.updater.store.root, error,
                             extra={"rollout_id": message.update_notice.rollout_id})
        else:
            logger.warning("skipped: server message of unknown kind %r (newer gateway?)", kind)
