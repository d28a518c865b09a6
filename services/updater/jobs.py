"""RQ jobs of the updater: fetching releases from upstream.

Jobs run in RQ's work horse, a child of the worker, so a job that raises or
crashes is recorded as failed and the worker goes on. Each job opens what it
needs from the settings, because the worker process shares nothing with it.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue, Retry, get_current_job
from rq.job import Job

from services.core.database import Database
from services.core import metrics, routing
from services.core.fleet import releases, rollouts
from services.core.logs import bind_context
from services.core.redis_client import connect_redis
from services.core.settings import Settings
from services.updater.upstream import Upstream

logger = logging.getLogger("agentmgr.updater.jobs")

FETCH_HISTORY_KEY = "agentmgr:updates:fetches"
"""Redis list of the latest fetch outcomes (JSON), newest first."""
FETCH_HISTORY_LENGTH = 50
FETCH_DUE_KEY = "agentmgr:updates:fetch-due"
"""Redis key that exists until the next scheduled upstream check is due."""
FETCH_RETRY = Retry(max=3, interval=[10, 60, 300])
"""Retries of a failed fetch: after 10 s, 1 min and 5 min."""
ACTOR = "updater"


def counted(function: Callable[..., Any]) -> Callable[..., Any]:
    """Count the job's outcome in ``agentmgr_jobs_total``; the job's result and errors pass through."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except BaseException:
            metrics.JOBS.labels(function=function.__name__, outcome="failed").inc()
            raise
        metrics.JOBS.labels(function=function.__name__, outcome="succeeded").inc()
        return result

    return wrapper


@counted
def fetch_upstream() -> dict[str, Any]:
    """Add every release listed upstream that is not stored yet; return a summary.

    Raises:
        UpstreamError: the index could not be read.
        FailedPrecondition: a release failed verification or did not fit on disk.
    """
    settings = Settings.from_env()
    job = get_current_job()
    job_id = job.id if job else ""
    connection = connect_redis(settings.redis_url)
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
"""Time between two steps of an active rollout."""


def rollout_step_key(rollout_id: uuid.UUID) -> str:
    return f"agentmgr:rollout:{rollout_id}:step-queued"


def enqueue_rollout_step(queue: Queue, rollout_id: uuid.UUID) -> Job | None:
    """Queue one step of a rollout unless a step was queued within the last tick.

    Steps of one rollout are serialised by a row lock, so an extra step does no
    harm; the Redis key only keeps several updater processes from queueing one each.
    """
    if not queue.connection.set(rollout_step_key(rollout_id), "1", nx=True, ex=int(ROLLOUT_TICK_SECONDS)):
        return None
    return queue.enqueue(advance_rollout_job, str(rollout_id), description=f"rollout {rollout_id} step")


def enqueue_fetch_if_due(queue: Queue, settings: Settings) -> Job | None:
    """Queue the scheduled upstream check when its interval has passed (or never ran)."""
    if not settings.updates_upstream:
        return None
    if not queue.connection.set(FETCH_DUE_KEY, "1", nx=True, ex=int(settings.updates_fetch_interval_seconds)):
        return None
    return queue.enqueue(fetch_upstream, retry=FETCH_RETRY, description="scheduled upstream release check")


@counted
def advance_rollout_job(rollout_id: str) -> dict[str, Any]:
    """Run one step of a rollout and notify the agents it picked."""
    settings = Settings.from_env()
    job = get_current_job()
    identifier = uuid.UUID(rollout_id)
    connection = connect_redis(settings.redis_url)
    with bind_context(rollout_id=rollout_id, job_id=job.id if job else ""):
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
        return {"state": rollout.state.value, "wave": rollout.current_wave, "notified": len(notices)}
