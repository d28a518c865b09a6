"""The updater's clock: queues rollout steps and scheduled upstream checks.

It runs as a thread in the worker's main process, so it ends with that
process: a worker killed with SIGKILL leaves no timer behind, and the worker
that replaces it starts a new one which picks every active rollout up from
PostgreSQL. Work itself always runs as RQ jobs.
"""

from __future__ import annotations

import logging
import threading

from rq import Queue

from services.core.database import Database
from services.core.fleet import rollouts
from services.core.settings import Settings
from services.updater.jobs import ROLLOUT_TICK_SECONDS, enqueue_fetch_if_due, enqueue_rollout_step

logger = logging.getLogger("agentmgr.updater.ticker")


class Ticker:
    """Queue due work every ``ROLLOUT_TICK_SECONDS`` until ``stop()``."""

    def __init__(self, *, settings: Settings, queue: Queue) -> None:
        self.settings = settings
        self.queue = queue
        self.stop_requested = threading.Event()
        self.database = Database(settings.database_url, max_connections=1, application_name="agentmgr-updater-ticker")
        self.thread = threading.Thread(target=self.main_loop, name="updater-ticker", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop the loop and close the database pool; safe to call twice."""
        self.stop_requested.set()
        if self.thread.is_alive():
            self.thread.join(timeout=ROLLOUT_TICK_SECONDS * 5)
        self.database.close()

    def main_loop(self) -> None:
        while not self.stop_requested.is_set():
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - the clock must keep going
                self.failures += 1
                if self.failures == 1 or self.failures % 30 == 0:
                    logger.error("failed: updater tick (%s; %d in a row)", error, self.failures,
                                 extra={"error": str(error), "failures": self.failures})
            else:
                if self.failures:
                    logger.info("recovered: updater tick after %d failure(s)", self.failures)
                self.failures = 0
            self.stop_requested.wait(ROLLOUT_TICK_SECONDS)

    def tick(self) -> None:
        """Queue a step for each active rollout and the upstream check when it is due."""
        with self.database.transaction() as connection:
            active = rollouts.active_rollout_ids(connection)
        for rollout_id in active:
            enqueue_rollout_step(self.queue, rollout_id)
        enqueue_fetch_if_due(self.queue, self.settings)
