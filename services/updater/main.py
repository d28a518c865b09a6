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

from rq import Queue, Worker

from services.core import defaults
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


def run(settings: Settings) -> int:
    """Verify the schema, then work the updates queue until a signal stops the worker."""
    verify_schema(settings, SERVICE)
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
