"""Enrollment tokens: created by operators, consumed by agents when they register.

Only the SHA-256 digest of a token is stored. The secret is returned once, by
``create_token``; later listings show only its first characters.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Mapping

import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import Json, RealDictCursor

from services.core import credentials
from services.core.errors import FailedPrecondition, InvalidState, NotFound, Unauthenticated
from services.core.fleet import audit
from services.core.fleet.listing import ListingSpec, Page, PageRequest, SortField, fetch_page
from services.core.fleet.models import EnrollmentToken, TokenState, enrollment_token_from_row, utc_now
from services.core.fleet.validation import (
    DESCRIPTION_MAX_LENGTH,
    MAX_USES_LIMIT,
    NAME_MAX_LENGTH,
    validate_future_time,
    validate_group,
    validate_labels,
    validate_range,
    validate_text,
)

logger = logging.getLogger(__name__)

COLUMNS = (
    "id, token_prefix, description, group_name, labels, max_uses, use_count, expires_at, "
    "created_at, created_by, last_used_at, revoked_at"
)

_SPEC = ListingSpec(
    entity="enrollment tokens",
    table="enrollment_tokens",
    columns=COLUMNS,
    id_column="id",
    id_type="uuid",
    sort_fields={
        "created_at": SortField("created_at", "timestamptz"),
        "expires_at": SortField("COALESCE(expires_at, 'infinity'::timestamptz)", "timestamptz"),
        "last_used_at": SortField("COALESCE(last_used_at, '-infinity'::timestamptz)", "timestamptz"),
        "description": SortField("description", "text"),
        "group": SortField("group_name", "text"),
    },
    default_sort="created_at",
)

INVALID_TOKEN_MESSAGE = "invalid enrollment token"


def create_token(
    conn: psycopg2.extensions.connection,
    *,
    created_by: str,
    description: str = "",
    group: str = "",
    labels: Mapping[str, str] | None = None,
    max_uses: int | None = None,
    expires_at: datetime.datetime | None = None,
) -> tuple[EnrollmentToken, str]:
    """Create an enrollment token and return it with its secret, which is not stored.

    Raises:
        InvalidArgument: a field is invalid; the error names it.
    """
    validate_text(created_by, "created_by", NAME_MAX_LENGTH, required=True)
    validate_text(description, "description", DESCRIPTION_MAX_LENGTH)
    validate_group(group)
    checked_labels = validate_labels(labels)
    if max_uses is not None:
        validate_range(max_uses, "max_uses", 1, MAX_USES_LIMIT, "uses")
    expires_at = validate_future_time(expires_at, "expires_at", utc_now())

    secret = credentials.new_secret(credentials.ENROLLMENT_TOKEN_PREFIX)
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"INSERT INTO enrollment_tokens (token_hash, token_prefix, description, group_name, labels, "
            f"max_uses, expires_at, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
            (
                credentials.hash_secret(secret),
                credentials.display_prefix(secret),
                description,
                group,
                Json(checked_labels),
                max_uses,
                expires_at,
                created_by,
            ),
        )
        token = enrollment_token_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=created_by,
        action="token.create",
        target_type="enrollment_token",
        target_id=str(token.id),
        details={"prefix": token.prefix, "group": group, "max_uses": max_uses,
                 "expires_at": expires_at.isoformat() if expires_at else None},
    )
    return token, secret


def list_tokens(
    conn: psycopg2.extensions.connection, *, include_revoked: bool = False, page: PageRequest
) -> Page[EnrollmentToken]:
    """Return one page of enrollment tokens, without revoked ones unless ``include_revoked``.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    where = [] if include_revoked else [sql.SQL("revoked_at IS NULL")]
    rows, next_token, total = fetch_page(conn, _SPEC, page, where=where, parameters=[])
    return Page([enrollment_token_from_row(row) for row in rows], next_token, total)


def get_token(conn: psycopg2.extensions.connection, token_id: uuid.UUID) -> EnrollmentToken:
    """Return the enrollment token ``token_id``.

    Raises:
        NotFound: no such token.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM enrollment_tokens WHERE id = %s", (token_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("enrollment token", token_id)
    return enrollment_token_from_row(row)


def revoke_token(conn: psycopg2.extensions.connection, token_id: uuid.UUID, *, actor: str) -> EnrollmentToken:
    """Revoke the enrollment token ``token_id``, so no agent can register with it any more.

    Agents already enrolled with the token keep working.

    Raises:
        NotFound: no such token.
        InvalidState: the token is already revoked.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM enrollment_tokens WHERE id = %s FOR UPDATE", (token_id,))
        row = cursor.fetchone()
        if row is None:
            raise NotFound("enrollment token", token_id)
        if row["revoked_at"] is not None:
            raise InvalidState(
                f"enrollment token {token_id}",
                TokenState.REVOKED.value,
                (TokenState.ACTIVE.value, TokenState.EXPIRED.value, TokenState.EXHAUSTED.value),
            )
        cursor.execute(
            f"UPDATE enrollment_tokens SET revoked_at = now() WHERE id = %s RETURNING {COLUMNS}", (token_id,)
        )
        token = enrollment_token_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=actor,
        action="token.revoke",
        target_type="enrollment_token",
        target_id=str(token_id),
        details={"prefix": token.prefix},
    )
    return token


def consume_token(
    conn: psycopg2.extensions.connection, secret: str, *, now: datetime.datetime | None = None
) -> EnrollmentToken:
    """Count one use of the enrollment token ``secret`` and return it updated.

    The row is locked until the caller's transaction ends, so concurrent
    registrations cannot use a token beyond its ``max_uses``.

    Raises:
        Unauthenticated: no token has this secret.
        FailedPrecondition: the token is revoked, expired or exhausted, and the message names which.
    """
    now = now or utc_now()
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM enrollment_tokens WHERE token_hash = %s FOR UPDATE",
            (credentials.hash_secret(secret),),
        )
        row = cursor.fetchone()
        if row is None:
            raise Unauthenticated(INVALID_TOKEN_MESSAGE)
        token = enrollment_token_from_row(row)

        state = token.state_at(now)
        if state is not TokenState.ACTIVE:
            logger.info(
                "rejected: enrollment token %s (%s)",
                token.prefix,
                state.value,
                extra={"enrollment_token_id": str(token.id)},
            )
            raise FailedPrecondition(_inactive_message(token, state))

        cursor.execute(
            f"UPDATE enrollment_tokens SET use_count = use_count + 1, last_used_at = %s "
            f"WHERE id = %s RETURNING {COLUMNS}",
            (now, token.id),
        )
        return enrollment_token_from_row(cursor.fetchone())


def _inactive_message(token: EnrollmentToken, state: TokenState) -> str:
    if state is TokenState.REVOKED:
        return f"enrollment token {token.prefix}... is revoked; ask an operator for a new token"
    if state is TokenState.EXPIRED:
        return (
            f"enrollment token {token.prefix}... expired at {token.expires_at.isoformat()}; "
            "ask an operator for a new token"
        )
    return (
        f"enrollment token {token.prefix}... is exhausted: all {token.max_uses} uses are spent; "
        "ask an operator for a new token"
    )
