"""Typed errors raised inside the services, and the exit codes they map to.

Code deep inside raises one of these; only a program's entry point turns them
into an exit code (``exit_code_for``), so callers and tests can catch them.
"""

import enum
from collections.abc import Iterable


class ExitCode(enum.IntEnum):
    """Process exit statuses shared by every program of the manager."""

    OK = 0
    FAILURE = 1
    """An unexpected error; the log contains the traceback."""
    CONFIG = 2
    """A setting or a command-line argument is invalid."""
    DATABASE = 3
    """The database is unreachable, rejects our credentials or lacks a permission."""
    SCHEMA = 4
    """The database schema is not at the version this code expects."""
    MIGRATION = 5
    """A migration failed and was rolled back."""
    LOCK = 6
    """Another migrator held the migration lock for too long."""
    TLS = 7
    """TLS files are missing, unreadable or inconsistent."""
    ADDRESS_IN_USE = 8
    """The listen address is invalid or taken by another process."""
    REDIS = 9
    """Redis is unreachable or rejects our credentials."""


class AgentManagerError(Exception):
    """Base class of the errors that the manager raises on purpose."""

    exit_code = ExitCode.FAILURE


class SettingsError(AgentManagerError):
    """An ``AGENTMGR_`` setting has a value of the wrong form."""

    exit_code = ExitCode.CONFIG

    def __init__(self, variable: str, value: str, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {variable}={value!r}: expected {expected}")


class DatabaseError(AgentManagerError):
    """The database cannot be used; ``cause`` is a short machine-readable reason."""

    exit_code = ExitCode.DATABASE

    # Values of ``cause``.
    UNREACHABLE = "unreachable"
    AUTHENTICATION_FAILED = "authentication_failed"
    PERMISSION_DENIED = "permission_denied"
    DATABASE_MISSING = "database_missing"

    def __init__(self, cause: str, message: str) -> None:
        self.cause = cause
        super().__init__(message)


class RedisError(AgentManagerError):
    """Redis cannot be used; ``cause`` is ``unreachable`` or ``authentication_failed``."""

    exit_code = ExitCode.REDIS

    def __init__(self, cause: str, message: str) -> None:
        self.cause = cause
        super().__init__(message)


class SchemaError(AgentManagerError):
    """The schema lacks migrations that this code needs."""

    exit_code = ExitCode.SCHEMA

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"database schema is behind this code: {len(missing)} migration(s) not applied "
            f"(first: {missing[0]}); run `supervisorctl start migrate` or "
            "`python -m services.migrate`"
        )


class MigrationError(AgentManagerError):
    """A migration failed; its transaction was rolled back."""

    exit_code = ExitCode.MIGRATION

    # Values of ``cause``.
    FAILED = "migration_failed"
    PERMISSION_DENIED = "permission_denied"

    def __init__(self, migration_id: str, message: str, *, cause: str = FAILED) -> None:
        self.migration_id = migration_id
        self.cause = cause
        super().__init__(f"migration {migration_id} failed and was rolled back: {message}")


class MigrationLockTimeout(AgentManagerError):
    """Another migrator kept the migration lock past the timeout."""

    exit_code = ExitCode.LOCK
    cause = "lock_timeout"


class TLSError(AgentManagerError):
    """The gateway's TLS files cannot be loaded or created."""

    exit_code = ExitCode.TLS


class AddressInUseError(AgentManagerError):
    """The gateway cannot bind its listen address."""

    exit_code = ExitCode.ADDRESS_IN_USE


class RequestError(AgentManagerError):
    """A request that the manager rejects because of its content or the target's state.

    ``grpc_code_name`` is the name of the ``grpc.StatusCode`` member that the
    gateway returns, so the mapping to gRPC is data kept on each class.
    """

    grpc_code_name = "UNKNOWN"


class InvalidArgument(RequestError):
    """A request field contains a value of the wrong form, and ``field`` names it."""

    grpc_code_name = "INVALID_ARGUMENT"
    exit_code = ExitCode.CONFIG

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class NotFound(RequestError):
    """No ``kind`` (agent, command, enrollment token, ...) with id ``id`` exists."""

    grpc_code_name = "NOT_FOUND"

    def __init__(self, kind: str, id: object) -> None:  # noqa: A002 - the contract names it id
        self.kind = kind
        self.id = id
        super().__init__(f"{kind} {id} not found")


class AlreadyExists(RequestError):
    """The request would create a second copy of something that must be unique."""

    grpc_code_name = "ALREADY_EXISTS"


class FailedPrecondition(RequestError):
    """The request is valid, but the current state of its target does not allow it."""

    grpc_code_name = "FAILED_PRECONDITION"


class InvalidState(FailedPrecondition):
    """An entity is in a state that does not allow the requested transition."""

    def __init__(self, entity: str, state: str, allowed: Iterable[str]) -> None:
        self.entity = entity
        self.state = state
        self.allowed = tuple(allowed)
        super().__init__(f"{entity} is in state {state}; allowed states: {', '.join(self.allowed)}")


class Unauthenticated(RequestError):
    """The caller's credentials are missing, unknown, expired or revoked."""

    grpc_code_name = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    """The caller is authenticated but its role does not allow the request."""

    grpc_code_name = "PERMISSION_DENIED"


def exit_code_for(error: BaseException) -> int:
    """Return the process exit status for ``error``."""
    if isinstance(error, AgentManagerError):
        return int(error.exit_code)
    return int(ExitCode.FAILURE)
