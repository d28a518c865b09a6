"""Rollouts: a release version delivered to a selection of agents in waves.

The updater calls ``advance_rollout`` again and again (an RQ job every few
seconds). Each call is one transaction on the rollout row, locked with
``FOR UPDATE``, so two workers never advance the same rollout at once and a
worker killed mid-call leaves the previous committed state behind. Agents are
notified only when they move from ``pending`` to ``notified``, which happens
once per agent and rollout.

Waves are cumulative percentages of the selected agents: with ``5,25,100``
the first wave contains the first 5 %, the second the next 20 %, the third the
rest. Agents are ordered by id, so the split is stable across calls.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg2.extensions
from psycopg2.extras import Json, RealDictCursor

from services.core.errors import FailedPrecondition, InvalidArgument, InvalidState, NotFound
from services.core.fleet import audit
from services.core.fleet.models import as_utc, utc_now
from services.core.fleet.releases import Release, release_from_row
from services.core.fleet.releases import COLUMNS as RELEASE_COLUMNS
from services.core.fleet.validation import validate_group, validate_labels, validate_range

logger = logging.getLogger(__name__)

MAX_WAVES = 10
MAX_AGENT_TIMEOUT_SECONDS = 7 * 86400


class RolloutState(str, enum.Enum):
    """Lifecycle of a rollout."""

    # PENDING -> RUNNING -> COMPLETED
    # RUNNING -> PAUSED (failure threshold reached, or an operator) -> RUNNING (resume)
    # PENDING | RUNNING | PAUSED -> ABORTED
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE_ROLLOUT_STATES = frozenset({RolloutState.PENDING, RolloutState.RUNNING})
"""Rollout states in which the updater advances the rollout."""
FINAL_ROLLOUT_STATES = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED})


class AgentUpdateState(str, enum.Enum):
    """Progress of one agent in one rollout."""

    # PENDING -> NOTIFIED -> DOWNLOADING -> INSTALLING -> SUCCEEDED
    # NOTIFIED | DOWNLOADING | INSTALLING -> FAILED | ROLLED_BACK (reported by the agent)
    # NOTIFIED | DOWNLOADING | INSTALLING -> TIMED_OUT (no final report before the deadline)
    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    TIMED_OUT = "timed_out"


IN_FLIGHT_STATES = frozenset({AgentUpdateState.NOTIFIED, AgentUpdateState.DOWNLOADING, AgentUpdateState.INSTALLING})
"""Agent states between the notice and the final report; they count against max_parallel."""
FAILURE_STATES = frozenset({AgentUpdateState.FAILED, AgentUpdateState.ROLLED_BACK, AgentUpdateState.TIMED_OUT})
FINAL_AGENT_STATES = FAILURE_STATES | {AgentUpdateState.SUCCEEDED}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """Agents a rollout targets; every part that is set must match."""

    group: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    agent_ids: tuple[uuid.UUID, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "labels": self.labels, "agent_ids": [str(i) for i in self.agent_ids]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rollout:
    """A rollout and its settings."""

    id: uuid.UUID
    target_version: str
    selection: dict[str, Any]
    waves: tuple[int, ...]
    max_parallel: int
    failure_threshold_percent: float
    agent_timeout_seconds: int
    state: RolloutState
    state_reason: str
    current_wave: int
    """Index into ``waves`` of the wave being delivered."""
    created_by: str
    created_at: datetime.datetime
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    updated_at: datetime.datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutAgent:
    """One agent's progress in a rollout."""

    rollout_id: uuid.UUID
    agent_id: uuid.UUID
    wave: int
    state: AgentUpdateState
    from_version: str
    error: str
    notified_at: datetime.datetime | None
    deadline_at: datetime.datetime | None
    updated_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class UpdateNotice:
    """An agent to tell about a release, produced by ``advance_rollout``."""

    rollout_id: uuid.UUID
    agent_id: uuid.UUID
    release: Release
    deadline_at: datetime.datetime


ROLLOUT_COLUMNS = (
    "id, target_version, selection, waves, max_parallel, failure_threshold_percent, "
    "agent_timeout_seconds, state, state_reason, current_wave, created_by, created_at, "
    "started_at, finished_at, updated_at"
)
AGENT_COLUMNS = "rollout_id, agent_id, wave, state, from_version, error, notified_at, deadline_at, updated_at"


def rollout_from_row(row: Mapping[str, Any]) -> Rollout:
    return Rollout(
        id=row["id"],
        target_version=row["target_version"],
        selection=row["selection"],
        waves=tuple(row["waves"]),
        max_parallel=row["max_parallel"],
        failure_threshold_percent=float(row["failure_threshold_percent"]),
        agent_timeout_seconds=row["agent_timeout_seconds"],
        state=RolloutState(row["state"]),
        state_reason=row["state_reason"],
        current_wave=row["current_wave"],
        created_by=row["created_by"],
        created_at=as_utc(row["created_at"]),
        started_at=as_utc(row["started_at"]),
        finished_at=as_utc(row["finished_at"]),
        updated_at=as_utc(row["updated_at"]),
    )


def rollout_agent_from_row(row: Mapping[str, Any]) -> RolloutAgent:
    return RolloutAgent(
        rollout_id=row["rollout_id"],
        agent_id=row["agent_id"],
        wave=row["wave"],
        state=AgentUpdateState(row["state"]),
        from_version=row["from_version"],
        error=row["error"],
        notified_at=as_utc(row["notified_at"]),
        deadline_at=as_utc(row["deadline_at"]),
        updated_at=as_utc(row["updated_at"]),
    )


def validate_waves(waves: Sequence[int]) -> tuple[int, ...]:
    """Check that ``waves`` are increasing percentages ending at 100.

    Raises:
        InvalidArgument: they are not.
    """
    waves = tuple(waves)
    valid = (
        0 < len(waves) <= MAX_WAVES
        and all(0 < value <= 100 for value in waves)
        and all(a < b for a, b in zip(waves, waves[1:]))
        and waves[-1] == 100
    )
    if not valid:
        raise InvalidArgument(
            "waves",
            f"invalid waves {','.join(map(str, waves))}: expected up to {MAX_WAVES} increasing "
            "percentages ending at 100, such as 5,25,100",
        )
    return waves


def assign_waves(agent_ids: Sequence[uuid.UUID], waves: Sequence[int]) -> dict[uuid.UUID, int]:
    """Split ``agent_ids`` (in a stable order) into waves of cumulative percentages."""
    ordered = sorted(agent_ids)
    assignment: dict[uuid.UUID, int] = {}
    start = 0
    for index, percent in enumerate(waves):
        end = len(ordered) if percent == 100 else max(start, math.ceil(len(ordered) * percent / 100))
        for agent_id in ordered[start:end]:
            assignment[agent_id] = index
        start = end
    return assignment


def create_rollout(
    conn: psycopg2.extensions.connection,
    *,
    target_version: str,
    selection: Selection,
    waves: Sequence[int],
    max_parallel: int,
    failure_threshold_percent: float,
    agent_timeout_seconds: int,
    created_by: str,
) -> tuple[Rollout, int]:
    """Create a pending rollout and its per-agent rows; return it and the number of agents.

    Agents already on ``target_version`` and revoked agents are left out.

    Raises:
        InvalidArgument: a setting is out of range.
        NotFound: no release has this version.
        FailedPrecondition: the selection matches no agent that needs the update.
    """
    waves = validate_waves(waves)
    validate_range(max_parallel, "max_parallel", 1, 100_000)
    validate_range(agent_timeout_seconds, "agent_timeout_seconds", 10, MAX_AGENT_TIMEOUT_SECONDS, "seconds")
    if not 0 <= failure_threshold_percent <= 100:
        raise InvalidArgument("failure_threshold", f"invalid failure threshold {failure_threshold_percent}: expected 0 to 100 (percent)")
    validate_group(selection.group)
    labels = validate_labels(selection.labels)
    if not _releases_of_version(conn, target_version):
        raise NotFound("release version", target_version)

    conditions = ["revoked_at IS NULL", "agent_version <> %s"]
    parameters: list[Any] = [target_version]
    if selection.group:
        conditions.append("group_name = %s")
        parameters.append(selection.group)
    if labels:
        conditions.append("labels @> %s")
        parameters.append(Json(labels))
    if selection.agent_ids:
        conditions.append("id = ANY(%s::uuid[])")
        parameters.append([str(agent_id) for agent_id in selection.agent_ids])
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT id, agent_version FROM agents WHERE {' AND '.join(conditions)}", parameters)
        agents = {row[0]: row[1] for row in cursor.fetchall()}
    if not agents:
        raise FailedPrecondition(f"no active agent in the selection needs version {target_version}")

    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"""
            INSERT INTO rollouts (target_version, selection, waves, max_parallel,
                                  failure_threshold_percent, agent_timeout_seconds, created_by)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            RETURNING {ROLLOUT_COLUMNS}
            """,
            (target_version, Json(selection.to_json()), list(waves), max_parallel,
             Decimal(str(failure_threshold_percent)), agent_timeout_seconds, created_by),
        )
        rollout = rollout_from_row(cursor.fetchone())
        assignment = assign_waves(list(agents), waves)
        cursor.executemany(
            "INSERT INTO rollout_agents (rollout_id, agent_id, wave, from_version) VALUES (%s, %s, %s, %s)",
            [(rollout.id, agent_id, wave, agents[agent_id]) for agent_id, wave in assignment.items()],
        )
    audit.record(
        conn, actor=created_by, action="rollout.create", target_type="rollout", target_id=str(rollout.id),
        details={"target_version": target_version, "agents": len(agents), "waves": list(waves)},
    )
    return rollout, len(agents)


def get_rollout(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID, *, for_update: bool = False) -> Rollout:
    """Return the rollout ``rollout_id``.

    Raises:
        NotFound: no such rollout.
    """
    lock = " FOR UPDATE" if for_update else ""
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = %s{lock}", (rollout_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("rollout", rollout_id)
    return rollout_from_row(row)


def list_rollout_agents(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID) -> list[RolloutAgent]:
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {AGENT_COLUMNS} FROM rollout_agents WHERE rollout_id = %s ORDER BY wave, agent_id",
            (rollout_id,),
        )
        return [rollout_agent_from_row(row) for row in cursor.fetchall()]


def active_rollout_ids(conn: psycopg2.extensions.connection) -> list[uuid.UUID]:
    """Return the rollouts that the updater must keep advancing."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT id FROM rollouts WHERE state IN ('pending', 'running') ORDER BY created_at")
        return [row[0] for row in cursor.fetchall()]


def progress(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID) -> dict[str, int]:
    """Return how many agents of the rollout are in each state."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT state, count(*) FROM rollout_agents WHERE rollout_id = %s GROUP BY state", (rollout_id,)
        )
        counts = {state.value: 0 for state in AgentUpdateState}
        counts.update({row[0]: row[1] for row in cursor.fetchall()})
    return counts


def _set_state(
    conn: psycopg2.extensions.connection,
    rollout: Rollout,
    state: RolloutState,
    *,
    allowed: Iterable[RolloutState],
    reason: str,
    actor: str | None,
    action: str | None,
) -> Rollout:
    allowed = tuple(allowed)
    if rollout.state not in allowed:
        raise InvalidState(f"rollout {rollout.id}", rollout.state.value, [s.value for s in allowed])
    finished = "now()" if state in FINAL_ROLLOUT_STATES else "finished_at"
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"""
            UPDATE rollouts SET state = %s, state_reason = %s, updated_at = now(), finished_at = {finished}
            WHERE id = %s RETURNING {ROLLOUT_COLUMNS}
            """,
            (state.value, reason, rollout.id),
        )
        updated = rollout_from_row(cursor.fetchone())
    if actor and action:
        audit.record(conn, actor=actor, action=action, target_type="rollout", target_id=str(rollout.id),
                     details={"from": rollout.state.value, "to": state.value, "reason": reason})
    logger.info(
        "changed: rollout %s %s -> %s (%s)", rollout.id, rollout.state.value, state.value, reason,
        extra={"rollout_id": str(rollout.id), "state": state.value, "reason": reason},
    )
    return updated


def pause_rollout(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID, *, actor: str, reason: str = "paused by an operator") -> Rollout:
    """Stop notifying agents; in-flight agents still report and may time out.

    Raises:
        NotFound: no such rollout.
        InvalidState: the rollout is not pending or running.
    """
    rollout = get_rollout(conn, rollout_id, for_update=True)
    return _set_state(conn, rollout, RolloutState.PAUSED, allowed=ACTIVE_ROLLOUT_STATES, reason=reason,
                      actor=actor, action="rollout.pause")


def resume_rollout(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID, *, actor: str) -> Rollout:
    """Continue a paused rollout from its current wave.

    Raises:
        NotFound: no such rollout.
        InvalidState: the rollout is not paused.
    """
    rollout = get_rollout(conn, rollout_id, for_update=True)
    return _set_state(conn, rollout, RolloutState.RUNNING, allowed=[RolloutState.PAUSED], reason="resumed",
                      actor=actor, action="rollout.resume")


def abort_rollout(conn: psycopg2.extensions.connection, rollout_id: uuid.UUID, *, actor: str) -> Rollout:
    """End a rollout for good; agents not yet notified stay on their version.

    Raises:
        NotFound: no such rollout.
        InvalidState: the rollout already ended.
    """
    rollout = get_rollout(conn, rollout_id, for_update=True)
    return _set_state(conn, rollout, RolloutState.ABORTED,
                      allowed=[RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED],
                      reason="aborted by an operator", actor=actor, action="rollout.abort")


def advance_rollout(
    conn: psycopg2.extensions.connection,
    rollout_id: uuid.UUID,
    *,
    is_online: Callable[[uuid.UUID], bool],
    now: datetime.datetime | None = None,
) -> tuple[Rollout, list[UpdateNotice]]:
    """Move a rollout one step and return it with the agents to notify now.

    The step times out silent agents, closes the current wave when none of its
    agents is in flight or waiting while online, pauses the rollout when the
    failures so far pass the threshold, and notifies online pending agents of
    the current wave up to ``max_parallel`` in flight. Offline pending agents
    wait; they are notified once they are online while the rollout runs.

    Raises:
        NotFound: no such rollout.
    """
    now = now or utc_now()
    rollout = get_rollout(conn, rollout_id, for_update=True)
    if rollout.state not in ACTIVE_ROLLOUT_STATES:
        return rollout, []
    if rollout.state == RolloutState.PENDING:
        with conn.cursor() as cursor:
            cursor.execute("UPDATE rollouts SET started_at = now() WHERE id = %s", (rollout.id,))
        rollout = _set_state(conn, rollout, RolloutState.RUNNING, allowed=[RolloutState.PENDING],
                             reason="started", actor=None, action=None)

    # Agents silent past their deadline.
    with conn.cursor() as cursor:
        cursor.execute(
            """
            UPDATE rollout_agents SET state = 'timed_out', updated_at = now(),
                   error = 'no final report before the agent timeout'
            WHERE rollout_id = %s AND state IN ('notified', 'downloading', 'installing') AND deadline_at < %s
            RETURNING agent_id
            """,
            (rollout.id, now),
        )
        for (agent_id,) in cursor.fetchall():
            logger.warning("timed out: agent %s in rollout %s", agent_id, rollout.id,
                           extra={"rollout_id": str(rollout.id), "agent_id": str(agent_id)})

    agents = list_rollout_agents(conn, rollout.id)
    wave_count = len(rollout.waves)

    # Close finished waves, checking the failure threshold after each.
    while True:
        wave_agents = [a for a in agents if a.wave == rollout.current_wave]
        waiting_online = [a for a in wave_agents if a.state == AgentUpdateState.PENDING and is_online(a.agent_id)]
        in_flight = [a for a in wave_agents if a.state in IN_FLIGHT_STATES]
        if waiting_online or in_flight:
            break
        done = [a for a in agents if a.wave <= rollout.current_wave and a.state in FINAL_AGENT_STATES]
        failed = [a for a in done if a.state in FAILURE_STATES]
        if done and len(failed) * 100 > rollout.failure_threshold_percent * len(done):
            reason = (
                f"failure threshold reached: {len(failed)} of {len(done)} agents failed "
                f"({len(failed) * 100 / len(done):.1f}% > {rollout.failure_threshold_percent:g}%)"
            )
            return _set_state(conn, rollout, RolloutState.PAUSED, allowed=[RolloutState.RUNNING],
                              reason=reason, actor="updater", action="rollout.pause"), []
        if rollout.current_wave + 1 >= wave_count:
            if all(a.state in FINAL_AGENT_STATES for a in agents):
                succeeded = sum(a.state == AgentUpdateState.SUCCEEDED for a in agents)
                rollout = _set_state(conn, rollout, RolloutState.COMPLETED, allowed=[RolloutState.RUNNING],
                                     reason=f"{succeeded} of {len(agents)} agents updated", actor=None, action=None)
            return rollout, []
        with conn.cursor(cursor_factory=RealDictCursor) as cursor:
            cursor.execute(
                f"UPDATE rollouts SET current_wave = current_wave + 1, updated_at = now() WHERE id = %s RETURNING {ROLLOUT_COLUMNS}",
                (rollout.id,),
            )
            rollout = rollout_from_row(cursor.fetchone())
        logger.info("started: wave %d of rollout %s", rollout.current_wave + 1, rollout.id,
                    extra={"rollout_id": str(rollout.id), "wave": rollout.current_wave})

    # Notify online pending agents of the current wave, up to max_parallel in flight.
    capacity = rollout.max_parallel - sum(a.state in IN_FLIGHT_STATES for a in agents)
    candidates = waiting_online[: max(capacity, 0)]
    if not candidates:
        return rollout, []
    deadline = now + datetime.timedelta(seconds=rollout.agent_timeout_seconds)
    platform = _agent_platforms(conn, [a.agent_id for a in candidates])
    releases = _releases_of_version(conn, rollout.target_version)
    notices = []
    with conn.cursor() as cursor:
        for candidate in candidates:
            release = _release_for(releases, platform.get(candidate.agent_id, ("", "")))
            if release is None:
                cursor.execute(
                    "UPDATE rollout_agents SET state = 'failed', error = %s, updated_at = now() "
                    "WHERE rollout_id = %s AND agent_id = %s",
                    (f"no release {rollout.target_version} for this agent's platform", rollout.id, candidate.agent_id),
                )
                continue
            cursor.execute(
                "UPDATE rollout_agents SET state = 'notified', notified_at = %s, deadline_at = %s, updated_at = now() "
                "WHERE rollout_id = %s AND agent_id = %s AND state = 'pending'",
                (now, deadline, rollout.id, candidate.agent_id),
            )
            if cursor.rowcount == 1:
                notices.append(UpdateNotice(rollout.id, candidate.agent_id, release, deadline))
    return rollout, notices


def in_flight_notices(conn: psycopg2.extensions.connection, agent_id: uuid.UUID) -> list[UpdateNotice]:
    """Return the notices an agent should (re)receive when it connects: its in-flight updates."""
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT ra.rollout_id, r.target_version, ra.deadline_at
            FROM rollout_agents ra JOIN rollouts r ON r.id = ra.rollout_id
            WHERE ra.agent_id = %s AND ra.state IN ('notified', 'downloading', 'installing')
              AND r.state IN ('running', 'paused')
            """,
            (agent_id,),
        )
        rows = cursor.fetchall()
    platform = _agent_platforms(conn, [agent_id]).get(agent_id, ("", ""))
    notices = []
    for rollout_id, version, deadline in rows:
        release = _release_for(_releases_of_version(conn, version), platform)
        if release is not None:
            notices.append(UpdateNotice(rollout_id, agent_id, release, as_utc(deadline)))
    return notices


def record_agent_update(
    conn: psycopg2.extensions.connection,
    rollout_id: uuid.UUID,
    agent_id: uuid.UUID,
    *,
    state: AgentUpdateState,
    agent_version: str = "",
    reason: str = "",
) -> bool:
    """Store an agent's progress report; return False when it changes nothing.

    A report for an agent that already reached a final state, or that moves
    backwards, is ignored, so repeated reports are harmless. A success that
    names another version than the target is stored as a failure.

    Raises:
        NotFound: the agent is not part of this rollout.
    """
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT ra.state, r.target_version FROM rollout_agents ra JOIN rollouts r ON r.id = ra.rollout_id
            WHERE ra.rollout_id = %s AND ra.agent_id = %s FOR UPDATE OF ra
            """,
            (rollout_id, agent_id),
        )
        row = cursor.fetchone()
        if row is None:
            raise NotFound("rollout agent", f"{rollout_id}/{agent_id}")
        current, target_version = AgentUpdateState(row[0]), row[1]
        order = [AgentUpdateState.PENDING, AgentUpdateState.NOTIFIED, AgentUpdateState.DOWNLOADING,
                 AgentUpdateState.INSTALLING]
        if current in FINAL_AGENT_STATES or (state in order and order.index(state) <= order.index(current)):
            return False
        if state == AgentUpdateState.SUCCEEDED and agent_version and agent_version != target_version:
            state, reason = AgentUpdateState.FAILED, f"agent reports version {agent_version}, expected {target_version}"
        cursor.execute(
            "UPDATE rollout_agents SET state = %s, error = %s, updated_at = now() WHERE rollout_id = %s AND agent_id = %s",
            (state.value, reason, rollout_id, agent_id),
        )
        if state == AgentUpdateState.SUCCEEDED:
            cursor.execute("UPDATE agents SET agent_version = %s WHERE id = %s", (target_version, agent_id))
    logger.info("reported: agent %s %s in rollout %s", agent_id, state.value, rollout_id,
                extra={"rollout_id": str(rollout_id), "agent_id": str(agent_id), "state": state.value, "reason": reason})
    return True


def _releases_of_version(conn: psycopg2.extensions.connection, version: str) -> list[Release]:
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {RELEASE_COLUMNS} FROM releases WHERE version = %s", (version,))
        return [release_from_row(row) for row in cursor.fetchall()]


def _agent_platforms(conn: psycopg2.extensions.connection, agent_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, str]]:
    with conn.cursor() as cursor:
        cursor.execute("SELECT id, os_name, architecture FROM agents WHERE id = ANY(%s::uuid[])",
                       ([str(agent_id) for agent_id in agent_ids],))
        return {row[0]: (row[1], row[2]) for row in cursor.fetchall()}


def _release_for(releases: list[Release], platform: tuple[str, str]) -> Release | None:
    """Pick the release built for the agent's architecture, else one built for any."""
    _, architecture = platform
    exact = [r for r in releases if r.architecture == architecture.lower()]
    generic = [r for r in releases if r.architecture == "any"]
    return (exact or generic or [None])[0]
