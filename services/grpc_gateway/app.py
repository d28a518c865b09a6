"""Assemble one gateway process: runtime, servicers, routing and background tasks."""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.core import metrics
from services.core.fleet import commands
from services.core.settings import Settings
from services.core.tls import TLSMaterial
from services.grpc_gateway.agent_service import AgentServicer
from services.grpc_gateway.auth import Authenticator
from services.grpc_gateway.heartbeats import HeartbeatBatcher
from services.grpc_gateway.liveness import Liveness
from services.grpc_gateway.panel_service import PanelServicer
from services.grpc_gateway.routing import CommandWaiters, Router
from services.grpc_gateway.runtime import GatewayRuntime
from services.grpc_gateway.server import Gateway
from services.grpc_gateway.sessions import SHUTDOWN_DETAILS, SessionRegistry

logger = logging.getLogger("agentmgr.grpc_gateway")

EXPIRY_INTERVAL_SECONDS = 5.0
"""Interval at which overdue queued commands are marked expired, so listings show it."""


async def run_expiry(runtime: GatewayRuntime) -> None:
    """Mark overdue commands expired every EXPIRY_INTERVAL_SECONDS until cancelled."""
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL_SECONDS)
        try:
            expired = await runtime.db(commands.expire_due)
        except Exception as error:  # noqa: BLE001 - retried on the next round
            logger.warning("failed: expiring commands (%s; retrying in %.0fs)", error, EXPIRY_INTERVAL_SECONDS)
            continue
        if expired:
            logger.info("expired: %d command(s)", len(expired), extra={"commands": len(expired)})


def build_gateway(settings: Settings, tls: TLSMaterial, runtime: GatewayRuntime) -> Gateway:
    """Return a Gateway that serves AgentService and PanelService with ``runtime``."""
    sessions = SessionRegistry()
    metrics.CONNECTED_AGENTS.set_function(lambda: len(sessions))
    authenticator = Authenticator(runtime)
    waiters = CommandWaiters()
    router = Router(runtime, sessions, authenticator, waiters)
    liveness = Liveness(runtime)
    heartbeats = HeartbeatBatcher(runtime, router)
    agent_servicer = AgentServicer(
        runtime, authenticator=authenticator, router=router, liveness=liveness, heartbeats=heartbeats
    )
    panel_servicer = PanelServicer(
        runtime,
        authenticator=authenticator,
        router=router,
        liveness=liveness,
        waiters=waiters,
        ca_fingerprint=tls.ca_fingerprint,
    )

    async def close_sessions() -> None:
        closed = sessions.close_all(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
        logger.info("closing: %d agent session(s)", closed, extra={"sessions": closed})

    async def final_flush() -> None:
        await liveness.flush()

    return Gateway(
        settings=settings,
        tls=tls,
        registrars=(agent_servicer.register, panel_servicer.register),
        prepare=(router.subscribe,),
        background=(router.run, heartbeats.run, liveness.run_flusher, lambda: run_expiry(runtime)),
        drain=(close_sessions, final_flush),
    )


async def serve(settings: Settings, tls: TLSMaterial) -> None:
    """Run one gateway process until a stop signal, then release its resources."""
    runtime = GatewayRuntime.create(settings)
    metrics.serve_metrics(settings.gateway_metrics_address, "AGENTMGR_GATEWAY_METRICS_ADDRESS")
    logger.info("starting: gateway instance %s", runtime.instance_id, extra={"instance_id": runtime.instance_id})
    try:
        await build_gateway(settings, tls, runtime).serve()
    finally:
        await runtime.close()
