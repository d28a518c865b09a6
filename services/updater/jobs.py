"""RQ jobs of the updater: fetching releases from upstream.

Jobs run in RQ's work horse, a child of the worker, so a job that raises or
crashes is recorded as failed and the worker goes on. Each job opens what it
needs from the settings, because the worker process shares nothing with it.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from typing import Any

import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from services.core import defaults
from services.core.database import Database
from services.core import routing
from services.core.fleet import releases, rollouts
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
    """Queue the next scheduled upstream check unless one is already waiting; return it."""
    job = schedule_once(
        queue,
        NEXT_FETCH_KEY,
        settings.updates_fetch_interval_seconds,
        fetch_upstream,
        kwargs={"reschedule": True},
        current_job_id=current_job_id,
        retry=FETCH_RETRY,
        description="scheduled upstream release check",
    )
    if job is not None:
        logger.info("scheduled: upstream check in %.0fs", settings.updates_fetch_interval_seconds, extra={"job_id": job.id})
    return job


def schedule_once(
    queue: Queue,
    marker_key: str,
    delay_seconds: float,
    function: Any,
    *,
    kwargs: dict[str, Any],
    current_job_id: str = "",
    **options: Any,
) -> Job | None:
    """Queue ``function`` in ``delay_seconds`` unless the job named in ``marker_key`` still waits.

    This keeps one chain of a self-rescheduling job: the id of the waiting job
    is kept in Redis, and a lock makes two workers starting together queue
    only one. ``current_job_id`` is the running job that asks for its successor.
    """
    connection = queue.connection
    with connection.lock(f"{marker_key}:lock", timeout=30, blocking_timeout=30):
        waiting_id = connection.get(marker_key)
        if waiting_id and waiting_id.decode() != current_job_id:
            try:
                status = Job.fetch(waiting_id.decode(), connection=connection).get_status()
            except NoSuchJobError:
                status = None
            if status in (JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.STARTED):
                return None
        job = queue.enqueue_in(datetime.timedelta(seconds=delay_seconds), function, kwargs=kwargs, **options)
        connection.set(marker_key, job.id)
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


# Rollouts.

ROLLOUT_TICK_SECONDS = 2.0
"""Time between two steps of a running rollout."""


def rollout_marker_key(rollout_id: uuid.UUID) -> str:
    return f"agentmgr:rollout:{rollout_id}:next_job"


def schedule_rollout_step(queue: Queue, rollout_id: uuid.UUID, *, delay_seconds: float = ROLLOUT_TICK_SECONDS,
                          current_job_id: str = "") -> Job | None:
    """Queue the next step of a rollout unless one is already waiting."""
    return schedule_once(
        queue,
        rollout_marker_key(rollout_id),
        delay_seconds,
        advance_rollout_job,
        kwargs={"rollout_id": str(rollout_id)},
        current_job_id=current_job_id,
        description=f"rollout {rollout_id} step",
    )


def advance_rollout_job(rollout_id: str) -> dict[str, Any]:
    """Run one step of a rollout, notify the agents it picked, and queue the next step.

    The next step is queued before this one works, so a worker killed in the
    middle leaves a successor that picks up from the last committed state.
    """
    settings = Settings.from_env()
    job = get_current_job()
    identifier = uuid.UUID(rollout_id)
    connection = connect_redis(settings.redis_url)
    queue = Queue(defaults.UPDATES_QUEUE, connection=connection)
    with bind_context(rollout_id=rollout_id, job_id=job.id if job else ""):
        schedule_rollout_step(queue, identifier, current_job_id=job.id if job else "")
        database = Database(settings.database_url, max_connections=1, application_name="agentmgr-updater")
        try:
            with database.transaction() as conn:
                rollout, notices = rollouts.advance_rollout(
                    conn, identifier, is_online=lambda agent_id: routing.is_connected(connection, agent_id)
                )
        finally:
            database.close()
        for notice in notices:
            delivered = routing.publish_to_agent(
                connection,
                notice.agent_id,
                {"kind": "update_notice", "rollout_id": rollout_id, "release_id": str(notice.release.id)},
            )
            logger.info(
                "notified: agent %s of release %s", notice.agent_id, notice.release.version,
                extra={"agent_id": str(notice.agent_id), "release_id": str(notice.release.id), "published": delivered},
            )
        if rollout.state not in rollouts.ACTIVE_ROLLOUT_STATES:
            connection.delete(rollout_marker_key(identifier))
        return {"state": rollout.state.value, "wave": rollout.current_wave, "notified": len(notices)}


def resume_active_rollouts(queue: Queue, settings: Settings) -> list[uuid.UUID]:
    """Queue a step for every active rollout; run at updater start, after a crash too."""
    database = Database(settings.database_url, max_connections=1, application_name="agentmgr-updater")
    try:
        with database.transaction() as conn:
            active = rollouts.active_rollout_ids(conn)
    finally:
        database.close()
    for rollout_id in active:
        schedule_rollout_step(queue, rollout_id, delay_seconds=0)
    if active:
        logger.info("resumed: %d active rollout(s)", len(active), extra={"rollouts": [str(i) for i in active]})
    return active
