"""Operator commands: creation, delivery state, results, cancellation and expiry.

A command is stored first and then delivered at least once: ``pending_for_agent``
returns queued and sent commands again after a reconnect. Results are stored
only while the command is pending, so a repeated result changes nothing.
"""

from __future__ import annotations

import datetime
import logging
import uuid

import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from services.core import defaults
from services.core.errors import FailedPrecondition, InvalidState, NotFound
from services.core.fleet import audit
from services.core.fleet.listing import CommandFilters, ListingSpec, Page, PageRequest, SortField, fetch_page
from services.core.fleet.models import (
    PENDING_STATES,
    UNSTARTED_STATES,
    Command,
    CommandState,
    as_utc,
    command_from_row,
)
from services.core.fleet.validation import (
    COMMAND_EXPIRY_MAX_SECONDS,
    COMMAND_TIMEOUT_MAX_SECONDS,
    NAME_MAX_LENGTH,
    REASON_MAX_LENGTH,
    validate_command_line,
    validate_range,
    validate_text,
)

logger = logging.getLogger(__name__)

COLUMNS = (
    "id, agent_id, command_line, reason, requested_by, state, timeout_seconds, expires_at, created_at, "
    "sent_at, started_at, finished_at, exit_code, stdout, stderr, stdout_truncated, stderr_truncated, "
    "duration_ms, error"
)

_SPEC = ListingSpec(
    entity="commands",
    table="commands",
    columns=COLUMNS,
    id_column="id",
    id_type="uuid",
    sort_fields={
        "created_at": SortField("created_at", "timestamptz"),
        "expires_at": SortField("expires_at", "timestamptz"),
        "finished_at": SortField("COALESCE(finished_at, 'infinity'::timestamptz)", "timestamptz"),
        "state": SortField("state", "text"),
        "requested_by": SortField("requested_by", "text"),
    },
    default_sort="created_at",
)

ERROR_MAX_LENGTH = 4096
"""Longer error texts reported by an agent are cut to this many characters."""

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Values for SQL "state = ANY(%s)".
_PENDING = [state.value for state in PENDING_STATES]
_UNSTARTED = [state.value for state in UNSTARTED_STATES]
_PENDING_ORDERED = (CommandState.QUEUED.value, CommandState.SENT.value, CommandState.RUNNING.value)


def create_command(
    conn: psycopg2.extensions.connection,
    *,
    agent_id: uuid.UUID,
    command_line: str,
    timeout_seconds: int,
    expires_in_seconds: int,
    reason: str,
    requested_by: str,
) -> Command:
    """Store a command for the agent in state queued and return it.

    Raises:
        InvalidArgument: a field is invalid; ``field`` names it.
        NotFound: no such agent.
        FailedPrecondition: the agent is revoked.
    """
    validate_command_line(command_line)
    validate_range(timeout_seconds, "timeout_seconds", 1, COMMAND_TIMEOUT_MAX_SECONDS, "seconds")
    validate_range(expires_in_seconds, "expires_in_seconds", 1, COMMAND_EXPIRY_MAX_SECONDS, "seconds")
    validate_text(reason, "reason", REASON_MAX_LENGTH)
    validate_text(requested_by, "requested_by", NAME_MAX_LENGTH, required=True)

    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        # FOR SHARE keeps a concurrent revoke_agent waiting until this command is stored,
        # so the revocation then cancels it too.
        cursor.execute("SELECT revoked_at FROM agents WHERE id = %s FOR SHARE", (agent_id,))
        agent = cursor.fetchone()
        if agent is None:
            raise NotFound("agent", agent_id)
        if agent["revoked_at"] is not None:
            raise FailedPrecondition(f"agent {agent_id} is revoked; commands can only go to active agents")
        # clock_timestamp(), unlike now(), differs between commands created in one
        # transaction, so they are delivered in the order they were created.
        cursor.execute(
            f"INSERT INTO commands (agent_id, command_line, reason, requested_by, timeout_seconds, created_at, "
            f"expires_at) SELECT %s, %s, %s, %s, %s, clock.at, clock.at + make_interval(secs => %s) "
            f"FROM (SELECT clock_timestamp() AS at) AS clock RETURNING {COLUMNS}",
            (agent_id, command_line, reason, requested_by, timeout_seconds, expires_in_seconds),
        )
        command = command_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=requested_by,
        action="command.create",
        target_type="command",
        target_id=str(command.id),
        details={
            "agent_id": str(agent_id),
            "command_line": command_line,
            "reason": reason,
            "timeout_seconds": timeout_seconds,
            "expires_at": command.expires_at.isoformat(),
        },
    )
    return command


def pending_for_agent(
    conn: psycopg2.extensions.connection, agent_id: uuid.UUID, *, now: datetime.datetime | None = None
) -> list[Command]:
    """Expire the agent's overdue commands, then return its queued and sent ones, oldest first.

    Sent commands are included because the agent may not have received them
    before its last stream ended; the agent skips ids it already ran.
    """
    _expire(conn, now=now, agent_id=agent_id)
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM commands WHERE agent_id = %s AND state = ANY(%s) ORDER BY created_at, id",
            (agent_id, _UNSTARTED),
        )
        return [command_from_row(row) for row in cursor.fetchall()]


def mark_sent(conn: psycopg2.extensions.connection, command_id: uuid.UUID, agent_id: uuid.UUID) -> bool:
    """Move the command from queued to sent; return False if it was not queued for this agent."""
    with conn.cursor() as cursor:
        # QUEUED -> SENT
        cursor.execute(
            "UPDATE commands SET state = %s, sent_at = now() WHERE id = %s AND agent_id = %s AND state = %s",
            (CommandState.SENT.value, command_id, agent_id, CommandState.QUEUED.value),
        )
        return cursor.rowcount == 1


def mark_running(conn: psycopg2.extensions.connection, command_id: uuid.UUID, agent_id: uuid.UUID) -> bool:
    """Move the command from queued or sent to running; return False if it was in another state."""
    with conn.cursor() as cursor:
        # QUEUED | SENT -> RUNNING
        cursor.execute(
            "UPDATE commands SET state = %s, started_at = now(), sent_at = COALESCE(sent_at, now()) "
            "WHERE id = %s AND agent_id = %s AND state = ANY(%s)",
            (CommandState.RUNNING.value, command_id, agent_id, _UNSTARTED),
        )
        return cursor.rowcount == 1


def store_result(
    conn: psycopg2.extensions.connection,
    command_id: uuid.UUID,
    agent_id: uuid.UUID,
    *,
    exit_code: int | None,
    stdout: bytes,
    stderr: bytes,
    stdout_truncated: bool,
    stderr_truncated: bool,
    duration_ms: int,
    timed_out: bool,
    error: str = "",
    max_output_bytes: int = defaults.DEFAULT_COMMAND_OUTPUT_MAX_BYTES,
) -> bool:
    """Store the agent's result of a pending command and return True.

    The state becomes timed_out if ``timed_out``, succeeded for exit code 0
    without ``error``, and failed otherwise. Output longer than
    ``max_output_bytes`` (pass the AGENTMGR_COMMAND_OUTPUT_MAX_BYTES setting)
    is cut and flagged. A command already in a final state, such as after a
    repeated result or a cancellation, is left unchanged and False is returned.

    Raises:
        NotFound: no command ``command_id`` belongs to ``agent_id``.
        InvalidArgument: ``exit_code`` or ``duration_ms`` is out of range.
    """
    if exit_code is not None:
        validate_range(exit_code, "exit_code", INT32_MIN, INT32_MAX)
    validate_range(duration_ms, "duration_ms", 0, 2**63 - 1, "milliseconds")

    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute("SELECT agent_id, state FROM commands WHERE id = %s FOR UPDATE", (command_id,))
        row = cursor.fetchone()
        if row is None or row["agent_id"] != agent_id:
            # Another agent's command is reported as unknown, so ids of other agents cannot be probed.
            raise NotFound("command", command_id)
        state = CommandState(row["state"])
        if state not in PENDING_STATES:
            logger.info(
                "ignored: result of command %s (state %s)",
                command_id,
                state.value,
                extra={"command_id": str(command_id), "agent_id": str(agent_id)},
            )
            return False

        if timed_out:
            new_state = CommandState.TIMED_OUT
        elif exit_code == 0 and not error:
            new_state = CommandState.SUCCEEDED
        else:
            new_state = CommandState.FAILED
        stdout, stdout_truncated = _cap(stdout, stdout_truncated, max_output_bytes)
        stderr, stderr_truncated = _cap(stderr, stderr_truncated, max_output_bytes)
        error_text = error[:ERROR_MAX_LENGTH].replace("\x00", "\ufffd") if error else None

        # QUEUED | SENT | RUNNING -> SUCCEEDED | FAILED | TIMED_OUT
        cursor.execute(
            "UPDATE commands SET state = %s, exit_code = %s, stdout = %s, stderr = %s, "
            "stdout_truncated = %s, stderr_truncated = %s, duration_ms = %s, error = %s, "
            "finished_at = now(), sent_at = COALESCE(sent_at, now()), "
            "started_at = COALESCE(started_at, now() - make_interval(secs => %s / 1000.0)) "
            "WHERE id = %s",
            (
                new_state.value,
                exit_code,
                psycopg2.Binary(stdout),
                psycopg2.Binary(stderr),
                stdout_truncated,
                stderr_truncated,
                duration_ms,
                error_text,
                duration_ms,
                command_id,
            ),
        )
    return True


def cancel_command(conn: psycopg2.extensions.connection, command_id: uuid.UUID, *, actor: str) -> Command:
    """Cancel a pending command and return it.

    A command that is already running on the agent is marked cancelled too,
    and its later result is ignored. The caller routes a ``cancel_command``
    message to the agent's gateway, which stops the process on the host.

    Raises:
        NotFound: no such command.
        InvalidState: the command is already in a final state.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute("SELECT agent_id, state FROM commands WHERE id = %s FOR UPDATE", (command_id,))
        row = cursor.fetchone()
        if row is None:
            raise NotFound("command", command_id)
        state = CommandState(row["state"])
        if state not in PENDING_STATES:
            raise InvalidState(f"command {command_id}", state.value, _PENDING_ORDERED)
        # QUEUED | SENT | RUNNING -> CANCELLED
        cursor.execute(
            f"UPDATE commands SET state = %s, finished_at = now(), error = %s WHERE id = %s RETURNING {COLUMNS}",
            (CommandState.CANCELLED.value, f"cancelled by {actor}", command_id),
        )
        command = command_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=actor,
        action="command.cancel",
        target_type="command",
        target_id=str(command_id),
        details={"agent_id": str(command.agent_id), "previous_state": state.value},
    )
    return command


def get_command(conn: psycopg2.extensions.connection, command_id: uuid.UUID) -> Command:
    """Return the command ``command_id`` with its result, if any.

    Raises:
        NotFound: no such command.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM commands WHERE id = %s", (command_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("command", command_id)
    return command_from_row(row)


def list_commands(
    conn: psycopg2.extensions.connection, *, filters: CommandFilters, page: PageRequest
) -> Page[Command]:
    """Return one page of commands that match ``filters``, oldest first by default.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    where: list[sql.Composable] = []
    parameters: list[object] = []
    if filters.agent_id is not None:
        where.append(sql.SQL("agent_id = %s"))
        parameters.append(filters.agent_id)
    if filters.state is not None:
        where.append(sql.SQL("state = %s"))
        parameters.append(CommandState(filters.state).value)
    if filters.requested_by:
        where.append(sql.SQL("requested_by = %s"))
        parameters.append(filters.requested_by)

    rows, next_token, total = fetch_page(conn, _SPEC, page, where=where, parameters=parameters)
    return Page([command_from_row(row) for row in rows], next_token, total)


def expire_due(conn: psycopg2.extensions.connection, *, now: datetime.datetime | None = None) -> list[uuid.UUID]:
    """Mark every queued or sent command past its expiry as expired and return their ids."""
    return _expire(conn, now=now)


def _expire(
    conn: psycopg2.extensions.connection, *, now: datetime.datetime | None, agent_id: uuid.UUID | None = None
) -> list[uuid.UUID]:
    conditions = ["state = ANY(%s)", "expires_at <= COALESCE(%s::timestamptz, now())"]
    parameters: list[object] = [_UNSTARTED, as_utc(now)]
    if agent_id is not None:
        conditions.append("agent_id = %s")
        parameters.append(agent_id)
    with conn.cursor() as cursor:
        # QUEUED | SENT -> EXPIRED
        cursor.execute(
            f"UPDATE commands SET state = %s, finished_at = COALESCE(%s::timestamptz, now()) "
            f"WHERE {' AND '.join(conditions)} RETURNING id",
            [CommandState.EXPIRED.value, as_utc(now), *parameters],
        )
        expired = [row[0] for row in cursor.fetchall()]
    if expired:
        logger.info("expired: %d command(s)", len(expired), extra={"command_ids": [str(c) for c in expired]})
    return expired


def _cap(output: bytes, truncated: bool, max_bytes: int) -> tuple[bytes, bool]:
    """Cut ``output`` to ``max_bytes``; the flag stays set if the agent had already cut it."""
    output = bytes(output or b"")
    if len(output) > max_bytes:
        return output[:max_bytes], True
    return output, bool(truncated)
