"""Agents: registration with an enrollment token, authentication, liveness and revocation.

Only the SHA-256 digest of an agent key is stored; ``register_agent`` returns
the key once. One machine id has at most one active agent, which the partial
unique index ``agents_active_machine_id`` enforces as well.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import uuid
from collections.abc import Mapping

import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import Json, RealDictCursor

from services.core import credentials
from services.core.errors import AlreadyExists, InvalidState, NotFound, Unauthenticated
from services.core.fleet import audit, enrollment
from services.core.fleet.listing import AgentFilters, ListingSpec, Page, PageRequest, SortField, escape_like, fetch_page
from services.core.fleet.models import (
    PENDING_STATES,
    Agent,
    AgentStatus,
    CommandState,
    agent_from_row,
    as_utc,
)
from services.core.fleet.validation import (
    FACT_MAX_LENGTH,
    GROUP_MAX_LENGTH,
    HOSTNAME_MAX_LENGTH,
    validate_addresses,
    validate_group,
    validate_hostname,
    validate_labels,
    validate_machine_id,
    validate_text,
)
from services.core.settings import Settings

logger = logging.getLogger(__name__)

COLUMNS = (
    "id, machine_id, hostname, os_name, os_version, architecture, agent_version, addresses, labels, "
    "group_name, created_at, first_connected_at, last_seen_at, revoked_at, revoked_reason, replaced_by"
)

_SPEC = ListingSpec(
    entity="agents",
    table="agents",
    columns=COLUMNS,
    id_column="id",
    id_type="uuid",
    sort_fields={
        "hostname": SortField("hostname", "text"),
        "created_at": SortField("created_at", "timestamptz"),
        "last_seen_at": SortField("COALESCE(last_seen_at, '-infinity'::timestamptz)", "timestamptz"),
        "group": SortField("group_name", "text"),
        "machine_id": SortField("machine_id", "text"),
        "os_name": SortField("os_name", "text"),
        "agent_version": SortField("agent_version", "text"),
    },
    default_sort="hostname",
)

INVALID_CREDENTIALS_MESSAGE = "invalid agent credentials"

# Compared against when the agent id is unknown, so that case costs the same
# time as a wrong key and the timing does not reveal which agent ids exist.
_UNKNOWN_AGENT_DIGEST = credentials.hash_secret("unknown agent")


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """Facts about its host that an agent reports when it registers."""

    hostname: str
    machine_id: str
    """Stable id of the machine (such as /etc/machine-id), kept across reinstalls of the agent."""
    os_name: str = ""
    os_version: str = ""
    architecture: str = ""
    agent_version: str = ""
    addresses: tuple[str, ...] = ()
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LivenessThresholds:
    """When an agent counts as offline."""

    offline_after_seconds: float
    """An agent not seen for longer than this is offline."""

    @classmethod
    def from_settings(cls, settings: Settings) -> LivenessThresholds:
        return cls(offline_after_seconds=settings.offline_after_seconds)


def validate_host_facts(facts: HostFacts) -> HostFacts:
    """Check every field of ``facts`` and return a normalised copy.

    The hostname is lower-cased and the addresses are put in canonical form.

    Raises:
        InvalidArgument: a field is invalid; ``field`` names it.
    """
    for field in ("os_name", "os_version", "architecture", "agent_version"):
        validate_text(getattr(facts, field), field, FACT_MAX_LENGTH)
    return dataclasses.replace(
        facts,
        hostname=validate_hostname(facts.hostname),
        machine_id=validate_machine_id(facts.machine_id),
        addresses=validate_addresses(facts.addresses),
        labels=validate_labels(facts.labels),
    )


def register_agent(
    conn: psycopg2.extensions.connection,
    *,
    token_secret: str,
    facts: HostFacts,
    replace: bool = False,
    actor_peer: str = "",
) -> tuple[Agent, str]:
    """Enroll a new agent with an enrollment token and return it with its key.

    The token's group is the agent's group, and its labels are merged over the
    agent's own (the token's value wins for a key both set). If the machine id
    already has an active agent, ``replace`` revokes that agent (reason
    ``replaced``) and cancels its pending commands; ``find_replaced_agent``
    returns it afterwards. Everything happens in the caller's transaction, so
    a failure stores nothing, not even the token use.

    Raises:
        InvalidArgument: a host fact is invalid; ``field`` names it.
        Unauthenticated: the enrollment token is unknown.
        FailedPrecondition: the enrollment token is revoked, expired or exhausted.
        AlreadyExists: the machine has an active agent and ``replace`` is false.
    """
    facts = validate_host_facts(facts)
    token = enrollment.consume_token(conn, token_secret)
    labels = {**facts.labels, **token.labels}
    validate_group(token.group)

    replaced = _lock_active_agent_by_machine(conn, facts.machine_id)
    if replaced is not None and not replace:
        raise AlreadyExists(
            f"machine {facts.machine_id} already has an active agent {replaced.id} "
            f"(hostname {replaced.hostname}); register with replace set to revoke it and enroll again"
        )
    if replaced is not None:
        _revoke(conn, replaced.id, reason="replaced")

    key = credentials.new_secret(credentials.AGENT_KEY_PREFIX)
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        try:
            cursor.execute("SAVEPOINT register_agent")
            cursor.execute(
                f"INSERT INTO agents (key_hash, machine_id, hostname, os_name, os_version, architecture, "
                f"agent_version, addresses, labels, group_name, enrollment_token_id) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text[], %s, %s, %s) RETURNING {COLUMNS}",
                (
                    credentials.hash_secret(key),
                    facts.machine_id,
                    facts.hostname,
                    facts.os_name,
                    facts.os_version,
                    facts.architecture,
                    facts.agent_version,
                    list(facts.addresses),
                    Json(labels),
                    token.group,
                    token.id,
                ),
            )
        except psycopg2.errors.UniqueViolation:
            # Another registration of the same machine committed between the lock and the insert.
            cursor.execute("ROLLBACK TO SAVEPOINT register_agent")
            raise AlreadyExists(
                f"machine {facts.machine_id} already has an active agent; "
                "register with replace set to revoke it and enroll again"
            ) from None
        agent = agent_from_row(cursor.fetchone())
        if replaced is not None:
            cursor.execute("UPDATE agents SET replaced_by = %s WHERE id = %s", (agent.id, replaced.id))

    actor = f"agent:{actor_peer}" if actor_peer else "agent"
    if replaced is not None:
        audit.record(
            conn,
            actor=actor,
            action="agent.replace",
            target_type="agent",
            target_id=str(replaced.id),
            details={"machine_id": facts.machine_id, "replaced_by": str(agent.id), "hostname": facts.hostname},
        )
    audit.record(
        conn,
        actor=actor,
        action="agent.register",
        target_type="agent",
        target_id=str(agent.id),
        details={
            "machine_id": facts.machine_id,
            "hostname": facts.hostname,
            "enrollment_token_id": str(token.id),
            "enrollment_token_prefix": token.prefix,
            "peer": actor_peer,
        },
    )
    logger.info(
        "registered: agent %s (%s)",
        agent.id,
        facts.hostname,
        extra={"agent_id": str(agent.id), "replaced_agent_id": str(replaced.id) if replaced else None},
    )
    return agent, key


def find_replaced_agent(conn: psycopg2.extensions.connection, agent_id: uuid.UUID) -> Agent | None:
    """Return the agent that ``agent_id`` replaced when it registered, or None."""
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM agents WHERE replaced_by = %s", (agent_id,))
        row = cursor.fetchone()
    return None if row is None else agent_from_row(row)


def authenticate_agent(conn: psycopg2.extensions.connection, agent_id: uuid.UUID, key: str) -> Agent:
    """Return the agent if ``key`` is its key and it is not revoked.

    Raises:
        Unauthenticated: the id is unknown, the key is wrong or the agent is
            revoked; the message is the same in all three cases.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS}, key_hash FROM agents WHERE id = %s", (agent_id,))
        row = cursor.fetchone()
    digest = _UNKNOWN_AGENT_DIGEST if row is None else bytes(row["key_hash"])
    matches = credentials.secret_matches(key, digest)
    if row is None or not matches or row["revoked_at"] is not None:
        raise Unauthenticated(INVALID_CREDENTIALS_MESSAGE)
    return agent_from_row(row)


def get_agent(conn: psycopg2.extensions.connection, agent_id: uuid.UUID) -> Agent:
    """Return the agent ``agent_id``, revoked or not.

    Raises:
        NotFound: no such agent.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM agents WHERE id = %s", (agent_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("agent", agent_id)
    return agent_from_row(row)


def list_agents(
    conn: psycopg2.extensions.connection,
    *,
    filters: AgentFilters,
    page: PageRequest,
    now: datetime.datetime,
    thresholds: LivenessThresholds,
) -> Page[Agent]:
    """Return one page of agents that match ``filters``, sorted by hostname by default.

    The status filter compares ``last_seen_at`` in PostgreSQL with ``now``, so
    a sign of life still waiting in Redis for the next flush is not counted.

    Raises:
        InvalidArgument: a filter or the page request is invalid.
    """
    where: list[sql.Composable] = []
    parameters: list[object] = []
    status = AgentStatus(filters.status) if filters.status is not None else None

    if status is AgentStatus.REVOKED:
        where.append(sql.SQL("revoked_at IS NOT NULL"))
    elif not filters.include_revoked or status is not None:
        where.append(sql.SQL("revoked_at IS NULL"))
    online_since = as_utc(now) - datetime.timedelta(seconds=thresholds.offline_after_seconds)
    if status is AgentStatus.NEVER_CONNECTED:
        where.append(sql.SQL("last_seen_at IS NULL"))
    elif status is AgentStatus.ONLINE:
        where.append(sql.SQL("last_seen_at >= %s"))
        parameters.append(online_since)
    elif status is AgentStatus.OFFLINE:
        where.append(sql.SQL("last_seen_at < %s"))
        parameters.append(online_since)

    if filters.group:
        where.append(sql.SQL("group_name = %s"))
        parameters.append(validate_text(filters.group, "group", GROUP_MAX_LENGTH))
    if filters.label:
        where.append(sql.SQL("labels @> %s::jsonb"))
        parameters.append(Json(validate_labels(filters.label, "label")))
    if filters.hostname_contains:
        validate_text(filters.hostname_contains, "hostname_contains", HOSTNAME_MAX_LENGTH)
        # NOTE: no index serves a substring match, so this scans the agents table; a pg_trgm
        # GIN index on hostname would remove the scan for large fleets.
        where.append(sql.SQL("hostname ILIKE '%%' || %s || '%%'"))
        parameters.append(escape_like(filters.hostname_contains))

    rows, next_token, total = fetch_page(conn, _SPEC, page, where=where, parameters=parameters)
    return Page([agent_from_row(row) for row in rows], next_token, total)


def revoke_agent(
    conn: psycopg2.extensions.connection, agent_id: uuid.UUID, *, actor: str, reason: str = "deleted"
) -> tuple[Agent, list[uuid.UUID]]:
    """Revoke the agent's key and cancel its pending commands.

    Returns the revoked agent and the ids of the cancelled commands. The
    caller must still close the agent's live stream.

    Raises:
        NotFound: no such agent.
        InvalidState: the agent is already revoked.
    """
    validate_text(reason, "reason", FACT_MAX_LENGTH, required=True)
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM agents WHERE id = %s FOR UPDATE", (agent_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("agent", agent_id)
    if row["revoked_at"] is not None:
        raise InvalidState(f"agent {agent_id}", AgentStatus.REVOKED.value, ("online", "offline", "never_connected"))

    agent, cancelled = _revoke(conn, agent_id, reason=reason)
    audit.record(
        conn,
        actor=actor,
        action="agent.delete",
        target_type="agent",
        target_id=str(agent_id),
        details={"reason": reason, "hostname": agent.hostname, "cancelled_commands": [str(c) for c in cancelled]},
    )
    return agent, cancelled


def record_seen(conn: psycopg2.extensions.connection, seen: Mapping[uuid.UUID, datetime.datetime]) -> int:
    """Write last-seen times in one UPDATE and return the number of agents updated.

    ``last_seen_at`` never moves back, ``first_connected_at`` is set on the
    first sign of life, and revoked or unknown agents are skipped.
    """
    if not seen:
        return 0
    agent_ids = list(seen)
    times = [as_utc(seen[agent_id]) for agent_id in agent_ids]
    with conn.cursor() as cursor:
        # Rows are locked in id order first: every gateway flushes overlapping sets of agents,
        # and two UPDATEs that lock the same rows in different orders deadlock.
        cursor.execute(
            "WITH seen AS (SELECT * FROM unnest(%s::uuid[], %s::timestamptz[]) AS seen (agent_id, at)), "
            "locked AS (SELECT agents.id FROM agents JOIN seen ON agents.id = seen.agent_id "
            "WHERE agents.revoked_at IS NULL ORDER BY agents.id FOR NO KEY UPDATE OF agents) "
            "UPDATE agents SET last_seen_at = GREATEST(agents.last_seen_at, seen.at), "
            "first_connected_at = COALESCE(agents.first_connected_at, seen.at) "
            "FROM seen, locked WHERE agents.id = locked.id AND seen.agent_id = locked.id",
            (agent_ids, times),
        )
        return cursor.rowcount


def derive_status(
    agent: Agent,
    *,
    now: datetime.datetime,
    thresholds: LivenessThresholds,
    live_seen_at: datetime.datetime | None = None,
) -> AgentStatus:
    """Return the agent's status at ``now``.

    ``live_seen_at`` is a newer last-seen time from Redis, if the caller has one.
    An agent is online while its last sign of life is at most
    ``offline_after_seconds`` old, the same rule that ``list_agents`` applies.
    """
    if agent.revoked_at is not None:
        return AgentStatus.REVOKED
    candidates = [time for time in (agent.last_seen_at, as_utc(live_seen_at)) if time is not None]
    if not candidates:
        return AgentStatus.NEVER_CONNECTED
    age = as_utc(now) - max(candidates)
    if age <= datetime.timedelta(seconds=thresholds.offline_after_seconds):
        return AgentStatus.ONLINE
    return AgentStatus.OFFLINE


def _lock_active_agent_by_machine(conn: psycopg2.extensions.connection, machine_id: str) -> Agent | None:
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM agents WHERE machine_id = %s AND revoked_at IS NULL FOR UPDATE", (machine_id,)
        )
        row = cursor.fetchone()
    return None if row is None else agent_from_row(row)


def _revoke(conn: psycopg2.extensions.connection, agent_id: uuid.UUID, *, reason: str) -> tuple[Agent, list[uuid.UUID]]:
    """Mark the agent revoked and cancel its pending commands; the row must be locked."""
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"UPDATE agents SET revoked_at = now(), revoked_reason = %s WHERE id = %s RETURNING {COLUMNS}",
            (reason, agent_id),
        )
        agent = agent_from_row(cursor.fetchone())
        cursor.execute(
            "UPDATE commands SET state = %s, finished_at = now(), error = %s "
            "WHERE agent_id = %s AND state = ANY(%s) RETURNING id",
            (
                CommandState.CANCELLED.value,
                f"agent revoked ({reason})",
                agent_id,
                [state.value for state in PENDING_STATES],
            ),
        )
        cancelled = [row["id"] for row in cursor.fetchall()]
    logger.info(
        "revoked: agent %s (%s)",
        agent_id,
        reason,
        extra={"agent_id": str(agent_id), "cancelled_commands": len(cancelled)},
    )
    return agent, cancelled


def count_by_status(
    conn: psycopg2.extensions.connection, *, now: datetime.datetime, thresholds: LivenessThresholds
) -> dict[AgentStatus, int]:
    """Count agents per status, with the same rule as ``list_agents``'s status filter."""
    online_since = as_utc(now) - datetime.timedelta(seconds=thresholds.offline_after_seconds)
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT CASE
                     WHEN revoked_at IS NOT NULL THEN 'revoked'
                     WHEN last_seen_at IS NULL THEN 'never_connected'
                     WHEN last_seen_at >= %s THEN 'online'
                     ELSE 'offline'
                   END AS status, count(*)
            FROM agents GROUP BY 1
            """,
            (online_since,),
        )
        counts = {status: 0 for status in AgentStatus}
        counts.update({AgentStatus(row[0]): row[1] for row in cursor.fetchall()})
    return counts


def update_reported_facts(conn: psycopg2.extensions.connection, agent_id: uuid.UUID, facts: HostFacts) -> None:
    """Store the host facts an agent reports when its session opens (version, OS, addresses).

    The machine id and the labels stay as enrolled: a changed machine id needs a
    new enrollment, and labels belong to the operator.

    Raises:
        InvalidArgument: a fact is invalid; ``field`` names it.
    """
    checked = validate_host_facts(facts)
    reported = (checked.hostname, checked.os_name, checked.os_version, checked.architecture,
                checked.agent_version, list(checked.addresses))
    with conn.cursor() as cursor:
        # Unchanged facts, the usual case on a reconnect, write no new row version.
        cursor.execute(
            """
            UPDATE agents SET (hostname, os_name, os_version, architecture, agent_version, addresses)
                            = (%s, %s, %s, %s, %s, %s::text[])
            WHERE id = %s AND revoked_at IS NULL
              AND (hostname, os_name, os_version, architecture, agent_version, addresses)
                  IS DISTINCT FROM (%s, %s, %s, %s, %s, %s::text[])
            """,
            (*reported, agent_id, *reported),
        )
