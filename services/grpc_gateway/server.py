"""The gateway's grpc.aio server: TLS, health, reflection and a bounded lifecycle.

``Gateway.serve()`` runs ``startup()``, ``main_loop()`` and ``shutdown()``.
Signal handlers only set flags: the first SIGTERM or SIGINT starts a graceful
drain (health NOT_SERVING, ``server.stop(grace)`` refusing new calls, then the
drain hooks), a second one cancels the RPCs still running.

Callers extend the lifecycle with three kinds of hooks. ``prepare`` hooks run
before the server starts. ``background`` tasks start with the server and are
cancelled after it stops. ``drain`` hooks run once the server refuses new calls,
for example to close long-lived streams so that their peers reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core.errors import AddressInUseError
from services.core.settings import Settings
from services.core.tls import TLSMaterial

logger = logging.getLogger("agentmgr.grpc_gateway")

ServiceRegistrar = Callable[[grpc.aio.Server], list[str]]
"""Adds servicers to a server and returns their full service names (for health and reflection)."""

Hook = Callable[[], Awaitable[None]]
"""An async callable without arguments: a prepare or drain step, or a background task's body."""

MIN_CLIENT_PING_INTERVAL_SECONDS = 10.0
"""Minimum interval between keepalive pings from a client. Faster clients get GOAWAY."""

BACKGROUND_STOP_SECONDS = 5.0
"""Time cancelled background tasks get to finish their cleanup at shutdown."""


class Gateway:
    """One gateway process: a grpc.aio server with the health and reflection services."""

    def __init__(
        self,
        *,
        settings: Settings,
        tls: TLSMaterial,
        registrars: tuple[ServiceRegistrar, ...] = (),
        prepare: tuple[Hook, ...] = (),
        background: tuple[Hook, ...] = (),
        drain: tuple[Hook, ...] = (),
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.registrars = registrars
        self.prepare = prepare
        self.background = background
        self.drain = drain
        self.background_tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.service_names: list[str] = []
        self.port: int | None = None
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()

    async def serve(self) -> None:
        """Start, serve until a stop signal, then shut down."""
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
        """Record a stop request; a second request forces the stop."""
        if self.should_exit.is_set():
            self.force_exit.set()
        self.should_exit.set()
        logger.info("received: %s", signal.Signals(signum).name, extra={"signal": signal.Signals(signum).name})

    async def startup(self) -> None:
        """Build the server, bind the listen address and start serving.

        Raises:
            AddressInUseError: the address is invalid or taken.
        """
        options = [
            ("grpc.so_reuseport", 1 if self.settings.grpc_reuse_port else 0),
            ("grpc.max_receive_message_length", self.settings.grpc_max_message_bytes),
            ("grpc.max_send_message_length", self.settings.grpc_max_message_bytes),
            *keepalive_options(self.settings),
        ]
        self.server = grpc.aio.server(options=options)

        # Services: the project's own, then health and reflection for all of them.
        for registrar in self.registrars:
            self.service_names.extend(registrar(self.server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )

        # TLS listener.
        credentials = grpc.ssl_server_credentials([(self.tls.private_key, served_chain(self.tls))])
        address = self.settings.grpc_address
        try:
            self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise AddressInUseError(
                f"cannot listen on {address}: the address is invalid or already in use "
                "(another gateway? set AGENTMGR_GRPC_ADDRESS, or AGENTMGR_GRPC_REUSE_PORT=true "
                "to share the port on purpose)"
            ) from error

        # Prepare (subscriptions and the like), start the background tasks, then serve.
        for hook in self.prepare:
            await hook()
        for body in self.background:
            self.background_tasks.append(asyncio.create_task(body(), name=getattr(body, "__qualname__", None)))

        # Serve, then report healthy; the "listening" line is the last start-up line.
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "listening: %s (TLS)",
            address,
            extra={"address": address, "port": self.port, "ca_fingerprint": self.tls.ca_fingerprint},
        )

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Drain and stop; safe to call twice or before ``startup`` finished."""
        server, self.server = self.server, None
        if server is None:
            await self.stop_background()
            return

        # Tell load balancers and health checkers to stop sending new calls.
        await self.health.enter_graceful_shutdown()

        # Refuse new calls first: peers whose streams the drain ends reconnect at once, and
        # if this server still took their calls, the stop would wait out the whole grace period.
        grace = self.settings.grpc_shutdown_grace_seconds
        logger.info("stopping: gateway (grace %.1fs)", grace, extra={"grace_seconds": grace})
        stopping = asyncio.ensure_future(server.stop(grace))
        await asyncio.sleep(0)

        # End long-lived streams, so their peers reconnect elsewhere instead of waiting.
        for hook in self.drain:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - shutdown goes on, and the log has the cause
                logger.exception("failed: drain step %s", getattr(hook, "__qualname__", hook))

        # In-flight calls have the grace period; a second signal cuts it short.
        forced = asyncio.ensure_future(self.force_exit.wait())
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not stopping.done():
            logger.warning("stopping: gateway now (second signal; cancelling in-flight calls)")
            await server.stop(0)
        # NOTE: with 5,000 sessions a process took 8 to 10 s past the grace period to get here and
        # stop its background tasks. Which step takes that time is not known yet.
        await stopping

        # Background tasks last, because in-flight calls may still have needed them.
        await self.stop_background()
        logger.info("stopped: gateway")

    async def stop_background(self) -> None:
        """Cancel the background tasks and wait a bounded time for them. Safe to call twice."""
        tasks, self.background_tasks = self.background_tasks, []
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        done, pending = await asyncio.wait(tasks, timeout=BACKGROUND_STOP_SECONDS)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("failed: background task %s", task.get_name(), exc_info=task.exception())
        logger.info(
            "cancelled: %d background task(s)%s", len(tasks),
            f", {len(pending)} still running after {BACKGROUND_STOP_SECONDS:g}s" if pending else "",
            extra={"tasks": len(tasks), "still_running": len(pending)},
        )


def served_chain(tls: TLSMaterial) -> bytes:
    """Return the server certificate chain with the CA certificate at its end.

    Agents pin the CA by fingerprint on first contact and read it from the
    handshake, so the gateway sends it. TLS lets a server send the trust anchor
    or omit it (RFC 8446, section 4.4.2), and clients that already trust the CA ignore it.
    """
    chain = tls.certificate_chain
    if tls.ca_certificate.strip() in chain:
        return chain
    return chain.rstrip(b"\n") + b"\n" + tls.ca_certificate


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """Return the HTTP/2 keepalive options that find dead peers within about a minute.

    The gateway pings an idle connection every AGENTMGR_GRPC_KEEPALIVE_TIME_SECONDS and
    drops it when no acknowledgement comes within AGENTMGR_GRPC_KEEPALIVE_TIMEOUT_SECONDS.
    Clients may ping too, but not more often than MIN_CLIENT_PING_INTERVAL_SECONDS;
    docs/protocol.md lists these limits for agent authors.
    """
    return [
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.grpc_keepalive_timeout_seconds * 1000)),
        # grpcio 1.85 waits for a ping acknowledgement up to this separate limit instead of
        # keepalive_timeout_ms; without it a stopped client kept its stream for minutes.
        ("grpc.http2.ping_timeout_ms", int(settings.grpc_keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Without this, gRPC stops pinging after two pings with no data sent in between,
        # so a silent stream to a dead peer would never be checked again.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_CLIENT_PING_INTERVAL_SECONDS * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
