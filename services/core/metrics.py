"""Prometheus metrics of the gateway and the updater, served over HTTP by each process.

Each process serves its own registry on its own address
(``AGENTMGR_GATEWAY_METRICS_ADDRESS``, ``AGENTMGR_UPDATER_METRICS_ADDRESS``).
With several gateway processes, give each its own port and let Prometheus sum
the series across instances; no figure is shared between processes, so none
is counted twice. An empty address turns the endpoint off.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# Gateway.

CONNECTED_AGENTS = Gauge("agentmgr_connected_agents", "Agent sessions open on this gateway process.")
HEARTBEATS = Counter("agentmgr_heartbeats_total", "Heartbeats received from agents.")
RPCS = Counter("agentmgr_rpc_requests_total", "Finished RPCs by method and status code.", ["method", "code"])
RPC_SECONDS = Histogram(
    "agentmgr_rpc_duration_seconds",
    "RPC duration by method; Session streams count from open to close.",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600, 3600),
)
AUTH_FAILURES = Counter("agentmgr_auth_failures_total", "Calls rejected as UNAUTHENTICATED, by method.", ["method"])
COMMAND_RESULTS = Counter("agentmgr_command_results_total", "Command results stored, by final state.", ["state"])
ARTIFACT_BYTES = Counter("agentmgr_artifact_bytes_served_total", "Release artifact bytes sent to agents.")

# Updater.

JOBS = Counter("agentmgr_jobs_total", "Updater jobs finished, by job function and outcome.", ["function", "outcome"])
"""Counted inside RQ's forked work horses, so the updater runs prometheus_client in
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by ``python -m services.updater``)."""


def serve_metrics(address: str, variable: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Start the metrics HTTP endpoint on ``HOST:PORT`` in a background thread.

    Returns False, after logging why, when the address is empty (turned off)
    or cannot be bound: metrics are not worth stopping the service for.
    ``variable`` names the setting, for the error message.
    """
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    except (OSError, ValueError) as error:
        logger.error(
            "failed: serving metrics on %s (%s); set %s to a free HOST:PORT", address, error, variable,
            extra={"address": address, "error": str(error)},
        )
        return False
    logger.info("serving: metrics on %s", address, extra={"address": address})
    return True
