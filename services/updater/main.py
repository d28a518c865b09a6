"""The ``updater`` program: an RQ worker on the ``updates`` queue, plus the ticker thread.

RQ handles the signals: the first SIGTERM or SIGINT is a warm shutdown that
lets the running job finish, a second one kills it. supervisord's
``stopwaitsecs`` for this program is longer than the job timeout for that
reason.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from rq import Queue, Worker

from services.core import defaults, metrics
from services.core.database import Database
from services.core.errors import AgentManagerError
from services.core.logs import bind_context
from services.core.program import run_program
from services.core.redis_client import wait_for_redis
from services.core.settings import Settings
from services.core.startup import verify_schema
from services.updater.ticker import Ticker

logger = logging.getLogger("agentmgr.updater")

SERVICE = "updater"


def worker_name() -> str:
    """Return a name unique to this process, so a restart is never refused as a duplicate."""
    return f"updater.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def create_worker(settings: Settings) -> Worker:
    """Connect to Redis and return a worker for the updates queue."""
    connection = wait_for_redis(settings.redis_url, timeout_seconds=settings.db_wait_seconds)
    queue = Queue(
        defaults.UPDATES_QUEUE,
        connection=connection,
        default_timeout=int(settings.updater_job_timeout_seconds),
    )
    return Worker([queue], connection=connection, name=worker_name())


class RolloutCollector:
    """Report agents of active rollouts per state, read from PostgreSQL at each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "agentmgr_rollout_agents", "Agents of active and paused rollouts by per-agent state.",
            labels=["rollout_id", "state"],
        )
        try:
            database = Database(self.settings.database_url, max_connections=1, application_name="agentmgr-metrics")
            try:
                with database.transaction() as connection, connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT ra.rollout_id, ra.state, count(*) FROM rollout_agents ra "
                        "JOIN rollouts r ON r.id = ra.rollout_id "
                        "WHERE r.state IN ('pending', 'running', 'paused') GROUP BY 1, 2"
                    )
                    for rollout_id, state, count in cursor.fetchall():
                        family.add_metric([str(rollout_id), state], count)
            finally:
                database.close()
        except AgentManagerError as error:
            logger.warning("failed: reading rollout progress for metrics (%s)", error)
        yield family


def serve_updater_metrics(settings: Settings) -> None:
    """Serve job counters from every work horse (multiprocess mode) and rollout progress."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(metrics.JOBS)
    registry.register(RolloutCollector(settings))
    metrics.serve_metrics(settings.updater_metrics_address, "AGENTMGR_UPDATER_METRICS_ADDRESS", registry)


def run(settings: Settings) -> int:
    """Verify the schema, then work the updates queue until a signal stops the worker."""
    verify_schema(settings, SERVICE)
    serve_updater_metrics(settings)
    worker = create_worker(settings)
    ticker = Ticker(settings=settings, queue=worker.queues[0])
    with bind_context(worker=worker.name):
        logger.info(
            "listening: queue %s",
            defaults.UPDATES_QUEUE,
            extra={"queue": defaults.UPDATES_QUEUE, "job_timeout_seconds": settings.updater_job_timeout_seconds},
        )
        ticker.start()
        try:
            # NOTE: RQ's scheduler only moves retried jobs back to the queue here. Its
            # process outlives a worker killed with SIGKILL and then holds the lock
            # without enqueueing (RQ 3.0), so periodic work lives in the ticker instead.
            worker.work(with_scheduler=True, logging_level=settings.log_level)
        finally:
            ticker.stop()
        logger.info("stopped: worker %s", worker.name)
    return 0


def main() -> int:
    return run_program(SERVICE, run)


if __name__ == "__main__":
    sys.exit(main())
