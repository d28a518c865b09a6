"""RQ jobs of the updater: fetching releases from upstream.

Jobs run in RQ's work horse, a child of the worker, so a job that raises or
crashes is recorded as failed and the worker goes on. Each job opens what it
needs from the settings, because the worker process shares nothing with it.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from services.core import defaults
from services.core.database import Database
from services.core.fleet import releases
from services.core.logs import bind_context
from services.core.redis_client import connect_redis
from services.core.settings import Settings
from services.updater.upstream import Upstream

logger = logging.getLogger("agentmgr.updater.jobs")

FETCH_HISTORY_KEY = "agentmgr:updates:fetches"
"""Redis list of the latest fetch outcomes (JSON), newest first."""
FETCH_HISTORY_LENGTH = 50
NEXT_FETCH_KEY = "agentmgr:updates:next_fetch_job"
"""Redis key naming the scheduled upstream check that is waiting to run."""
SCHEDULE_LOCK_KEY = "agentmgr:updates:schedule_lock"
FETCH_RETRY = Retry(max=3, interval=[10, 60, 300])
"""Retries of a failed fetch: after 10 s, 1 min and 5 min."""
ACTOR = "updater"


def fetch_upstream(*, reschedule: bool = False) -> dict[str, Any]:
    """Add every release listed upstream that is not stored yet; return a summary.

    With ``reschedule``, the next scheduled check is queued first, so a failing
    fetch does not stop the schedule.

    Raises:
        UpstreamError: the index could not be read.
        FailedPrecondition: a release failed verification or did not fit on disk.
    """
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job else ""
    connection = connect_redis(settings.redis_url)
    if reschedule:
        schedule_fetch(Queue(defaults.UPDATES_QUEUE, connection=connection), settings, current_job_id=job_id)
    started = _now()
    with bind_context(job_id=job_id, upstream=settings.updates_upstream):
        try:
            summary = _fetch(settings)
        except Exception as error:
            _record(connection, {"job_id": job_id, "started_at": started, "finished_at": _now(),
                                 "outcome": "failed", "error": str(error)})
            logger.error("failed: fetch upstream (%s)", error, extra={"error": str(error)})
            raise
        _record(connection, {"job_id": job_id, "started_at": started, "finished_at": _now(),
                             "outcome": "succeeded", **summary})
        logger.info("fetched: upstream (%d new release(s))", len(summary["added"]), extra=summary)
        return summary


def _fetch(settings: Settings) -> dict[str, Any]:
    if not settings.updates_upstream:
        return {"added": [], "known": 0, "note": "AGENTMGR_UPDATES_UPSTREAM is not set"}
    upstream = Upstream(settings.updates_upstream)
    store = releases.store_from_settings(settings)
    trusted = releases.trusted_keys_from_settings(settings)
    added: list[str] = []
    known = 0
    database = Database(settings.database_url, max_connections=1, application_name="agentmgr-updater")
    try:
        for entry in upstream.read_index():
            manifest_bytes, signature = upstream.read_manifest(entry)
            with database.transaction() as conn:
                release, new = releases.add_release(
                    conn,
                    store,
                    manifest_bytes=manifest_bytes,
                    signature=signature,
                    trusted_keys=trusted,
                    open_artifact=lambda entry=entry: upstream.open(entry.file),
                    source=f"upstream:{upstream.describe(entry.file)}",
                    actor=ACTOR,
                )
            if new:
                added.append(release.version)
            else:
                known += 1
    finally:
        database.close()
    return {"added": added, "known": known}


def schedule_fetch(queue: Queue, settings: Settings, *, current_job_id: str = "") -> Job | None:
    """Queue the next scheduled upstream check unless one is already waiting; return it.

    The id of the waiting check is kept in Redis, and a lock makes two workers
    starting together queue only one. ``current_job_id`` is the scheduled job
    that is running and asking for its successor.
    """
    connection = queue.connection
    with connection.lock(SCHEDULE_LOCK_KEY, timeout=30, blocking_timeout=30):
        waiting_id = connection.get(NEXT_FETCH_KEY)
        if waiting_id and waiting_id.decode() != current_job_id:
            try:
                status = Job.fetch(waiting_id.decode(), connection=connection).get_status()
            except NoSuchJobError:
                status = None
            if status in (JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.STARTED):
                return None
        job = queue.enqueue_in(
            datetime.timedelta(seconds=settings.updates_fetch_interval_seconds),
            fetch_upstream,
            reschedule=True,
            retry=FETCH_RETRY,
            description="scheduled upstream release check",
        )
        connection.set(NEXT_FETCH_KEY, job.id)
    logger.info(
        "scheduled: upstream check in %.0fs",
        settings.updates_fetch_interval_seconds,
        extra={"job_id": job.id},
    )
    return job


def enqueue_fetch_now(queue: Queue) -> Job:
    """Queue an upstream check to run at once (``agentmgr updates fetch``)."""
    return queue.enqueue(fetch_upstream, retry=FETCH_RETRY, description="upstream release check on demand")


def fetch_history(connection: redis.Redis, limit: int = 10) -> list[dict[str, Any]]:
    """Return the latest fetch outcomes, newest first."""
    return [json.loads(item) for item in connection.lrange(FETCH_HISTORY_KEY, 0, limit - 1)]


def _record(connection: redis.Redis, outcome: dict[str, Any]) -> None:
    try:
        pipeline = connection.pipeline()
        pipeline.lpush(FETCH_HISTORY_KEY, json.dumps(outcome, default=str))
        pipeline.ltrim(FETCH_HISTORY_KEY, 0, FETCH_HISTORY_LENGTH - 1)
        pipeline.execute()
    except redis.RedisError as error:
        logger.warning("failed: record fetch outcome (%s)", error, extra={"error": str(error)})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()
