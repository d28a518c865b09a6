"""PostgreSQL access: connecting, waiting for the server, and naming failures.

Every failure to connect becomes a ``DatabaseError`` whose ``cause`` says what
an operator has to fix: the server is unreachable, the credentials are wrong,
the database does not exist, or the role lacks a permission.
"""

from __future__ import annotations

import logging

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from services.core.errors import DatabaseError
from services.core.logs import redact_url
from services.core.retry import retry_until_deadline

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
"""Bound on one connection attempt, so an unroutable host cannot hang a start."""

# Fragments of libpq's connection messages (PostgreSQL 12 to 17) that waiting cannot fix.
_AUTHENTICATION_MARKERS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "authentication failed",
    "no password supplied",
    "role \"",
)


def classify_connect_error(error: psycopg2.Error) -> DatabaseError:
    """Turn a psycopg2 connection error into a ``DatabaseError`` with a cause."""
    message = " ".join(str(error).split())
    lowered = message.lower()
    if isinstance(error, psycopg2.errors.InsufficientPrivilege) or "permission denied" in lowered:
        return DatabaseError(DatabaseError.PERMISSION_DENIED, message)
    if 'database "' in lowered and "does not exist" in lowered:
        return DatabaseError(DatabaseError.DATABASE_MISSING, message)
    if any(marker in lowered for marker in _AUTHENTICATION_MARKERS):
        return DatabaseError(DatabaseError.AUTHENTICATION_FAILED, message)
    return DatabaseError(DatabaseError.UNREACHABLE, message)


def is_retryable(error: DatabaseError) -> bool:
    """Tell whether waiting may fix ``error`` (a server that is down or starting)."""
    return error.cause == DatabaseError.UNREACHABLE


def connect(url: str, *, application_name: str = "agentmgr") -> psycopg2.extensions.connection:
    """Open one connection to ``url``.

    Raises:
        DatabaseError: the connection failed; ``cause`` tells why.
    """
    try:
        return psycopg2.connect(
            url, connect_timeout=CONNECT_TIMEOUT_SECONDS, application_name=application_name
        )
    except psycopg2.Error as error:
        raise classify_connect_error(error) from error


def wait_for_database(
    url: str,
    *,
    timeout_seconds: float,
    application_name: str = "agentmgr",
) -> psycopg2.extensions.connection:
    """Connect to ``url``, retrying with backoff while the server is unreachable.

    Errors that waiting cannot fix (wrong password, missing database) are
    raised at once; an unreachable server is retried until ``timeout_seconds``.

    Raises:
        DatabaseError: the last failure, once the wait is over or not worth it.
    """
    return retry_until_deadline(
        lambda: connect(url, application_name=application_name),
        what="database",
        timeout_seconds=timeout_seconds,
        is_retryable=lambda error: isinstance(error, DatabaseError) and is_retryable(error),
        log_fields={"database": redact_url(url)},
    )
