"""States and records of the fleet: enrollment tokens, agents, commands, API tokens, audit entries.

The records are frozen dataclasses built from database rows. Ids are
``uuid.UUID`` (the audit log's is an integer) and datetimes are timezone-aware UTC.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import uuid
from collections.abc import Mapping
from typing import Any

# Importing the pool module registers the uuid adapter for every connection.
import services.core.database  # noqa: F401


class CommandState(str, enum.Enum):
    """Lifecycle of an operator command."""

    # QUEUED -> SENT -> RUNNING -> SUCCEEDED | FAILED | TIMED_OUT
    # QUEUED | SENT -> EXPIRED (expires_at passed before the agent started it)
    # QUEUED | SENT | RUNNING -> CANCELLED (by an operator, or when the agent is revoked)
    QUEUED = "queued"
    SENT = "sent"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


CommandState.PENDING_STATES = frozenset({CommandState.QUEUED, CommandState.SENT, CommandState.RUNNING})  # type: ignore[attr-defined]
CommandState.UNSTARTED_STATES = frozenset({CommandState.QUEUED, CommandState.SENT})  # type: ignore[attr-defined]
CommandState.FINAL_STATES = frozenset(  # type: ignore[attr-defined]
    {
        CommandState.SUCCEEDED,
        CommandState.FAILED,
        CommandState.TIMED_OUT,
        CommandState.EXPIRED,
        CommandState.CANCELLED,
    }
)

PENDING_STATES: frozenset[CommandState] = CommandState.PENDING_STATES  # type: ignore[attr-defined]
"""Command states that can still change: the command may yet run or report."""
UNSTARTED_STATES: frozenset[CommandState] = CommandState.UNSTARTED_STATES  # type: ignore[attr-defined]
"""Command states before the agent reported that it started the command."""
FINAL_STATES: frozenset[CommandState] = CommandState.FINAL_STATES  # type: ignore[attr-defined]
"""Command states that never change again."""


class AgentStatus(str, enum.Enum):
    """Connection status of an agent, derived from its last-seen time and revocation."""

    ONLINE = "online"
    OFFLINE = "offline"
    NEVER_CONNECTED = "never_connected"
    REVOKED = "revoked"


class ApiRole(str, enum.Enum):
    """Role of an operator API token. Each role may do everything the roles below it may."""

    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"

    @property
    def rank(self) -> int:
        """Position of the role in the order viewer < operator < admin."""
        return _ROLE_RANKS[self]


_ROLE_RANKS = {ApiRole.VIEWER: 0, ApiRole.OPERATOR: 1, ApiRole.ADMIN: 2}


class TokenState(str, enum.Enum):
    """State of an enrollment token: active, or the reason it no longer admits agents."""

    ACTIVE = "active"
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"
    REVOKED = "revoked"


def utc_now() -> datetime.datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.datetime.now(datetime.timezone.utc)


def as_utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """Return ``value`` converted to UTC; a naive datetime is rejected with ValueError."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()}: expected a timezone-aware datetime")
    return value.astimezone(datetime.timezone.utc)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnrollmentToken:
    """An enrollment token as stored; the secret itself is never stored."""

    id: uuid.UUID
    prefix: str
    """First characters of the secret, safe to show so operators can tell tokens apart."""
    description: str
    group: str
    """Group that agents enrolled with this token join."""
    labels: dict[str, str]
    """Labels that agents enrolled with this token get, on top of their own."""
    max_uses: int | None
    """Maximum number of registrations; None means unlimited."""
    use_count: int
    expires_at: datetime.datetime | None
    created_at: datetime.datetime
    created_by: str
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None

    def state_at(self, now: datetime.datetime) -> TokenState:
        """Return the token's state at ``now``; revocation wins over expiry, expiry over use count."""
        if self.revoked_at is not None:
            return TokenState.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return TokenState.EXPIRED
        if self.max_uses is not None and self.use_count >= self.max_uses:
            return TokenState.EXHAUSTED
        return TokenState.ACTIVE

    @property
    def state(self) -> TokenState:
        """State of the token now: active, expired, exhausted or revoked."""
        return self.state_at(utc_now())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agent:
    """An enrolled agent as stored; the agent key itself is never stored."""

    id: uuid.UUID
    machine_id: str
    hostname: str
    os_name: str
    os_version: str
    architecture: str
    agent_version: str
    addresses: tuple[str, ...]
    labels: dict[str, str]
    group: str
    created_at: datetime.datetime
    first_connected_at: datetime.datetime | None
    last_seen_at: datetime.datetime | None
    """Last sign of life written to PostgreSQL; Redis may contain a newer one."""
    revoked_at: datetime.datetime | None
    revoked_reason: str | None
    replaced_by: uuid.UUID | None = None
    """Agent that replaced this one when the same machine enrolled again."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """An operator command, with its result once the agent reported one."""

    id: uuid.UUID
    agent_id: uuid.UUID
    command_line: str
    reason: str
    requested_by: str
    state: CommandState
    timeout_seconds: int
    expires_at: datetime.datetime
    created_at: datetime.datetime
    sent_at: datetime.datetime | None
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    exit_code: int | None
    stdout: bytes | None
    stderr: bytes | None
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int | None
    error: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiToken:
    """An operator API token as stored; the secret itself is never stored."""

    id: uuid.UUID
    name: str
    prefix: str
    role: ApiRole
    created_at: datetime.datetime
    created_by: str
    expires_at: datetime.datetime | None
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One row of the append-only audit log."""

    id: int
    at: datetime.datetime
    actor: str
    action: str
    """Dotted action name such as ``agent.delete`` or ``command.create``."""
    target_type: str
    target_id: str
    outcome: str
    """``success``, ``failure`` or ``denied``."""
    details: dict[str, Any]


def enrollment_token_from_row(row: Mapping[str, Any]) -> EnrollmentToken:
    return EnrollmentToken(
        id=row["id"],
        prefix=row["token_prefix"],
        description=row["description"],
        group=row["group_name"],
        labels=dict(row["labels"]),
        max_uses=row["max_uses"],
        use_count=row["use_count"],
        expires_at=as_utc(row["expires_at"]),
        created_at=as_utc(row["created_at"]),
        created_by=row["created_by"],
        last_used_at=as_utc(row["last_used_at"]),
        revoked_at=as_utc(row["revoked_at"]),
    )


def agent_from_row(row: Mapping[str, Any]) -> Agent:
    return Agent(
        id=row["id"],
        machine_id=row["machine_id"],
        hostname=row["hostname"],
        os_name=row["os_name"],
        os_version=row["os_version"],
        architecture=row["architecture"],
        agent_version=row["agent_version"],
        addresses=tuple(row["addresses"]),
        labels=dict(row["labels"]),
        group=row["group_name"],
        created_at=as_utc(row["created_at"]),
        first_connected_at=as_utc(row["first_connected_at"]),
        last_seen_at=as_utc(row["last_seen_at"]),
        revoked_at=as_utc(row["revoked_at"]),
        revoked_reason=row["revoked_reason"],
        replaced_by=row["replaced_by"],
    )


def command_from_row(row: Mapping[str, Any]) -> Command:
    return Command(
        id=row["id"],
        agent_id=row["agent_id"],
        command_line=row["command_line"],
        reason=row["reason"],
        requested_by=row["requested_by"],
        state=CommandState(row["state"]),
        timeout_seconds=row["timeout_seconds"],
        expires_at=as_utc(row["expires_at"]),
        created_at=as_utc(row["created_at"]),
        sent_at=as_utc(row["sent_at"]),
        started_at=as_utc(row["started_at"]),
        finished_at=as_utc(row["finished_at"]),
        exit_code=row["exit_code"],
        stdout=None if row["stdout"] is None else bytes(row["stdout"]),
        stderr=None if row["stderr"] is None else bytes(row["stderr"]),
        stdout_truncated=row["stdout_truncated"],
        stderr_truncated=row["stderr_truncated"],
        duration_ms=row["duration_ms"],
        error=row["error"],
    )


def api_token_from_row(row: Mapping[str, Any]) -> ApiToken:
    return ApiToken(
        id=row["id"],
        name=row["name"],
        prefix=row["token_prefix"],
        role=ApiRole(row["role"]),
        created_at=as_utc(row["created_at"]),
        created_by=row["created_by"],
        expires_at=as_utc(row["expires_at"]),
        last_used_at=as_utc(row["last_used_at"]),
        revoked_at=as_utc(row["revoked_at"]),
    )


def audit_entry_from_row(row: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        at=as_utc(row["at"]),
        actor=row["actor"],
        action=row["action"],
        target_type=row["target_type"],
        target_id=row["target_id"],
        outcome=row["outcome"],
        details=dict(row["details"]),
    )
