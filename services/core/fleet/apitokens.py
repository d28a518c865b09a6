"""Operator API tokens: creation, authentication, roles and revocation.

Only the SHA-256 digest of a token is stored; ``create_api_token`` returns the
secret once. Roles are ordered viewer < operator < admin, and a role may do
everything that the roles below it may.
"""

from __future__ import annotations

import datetime
import uuid

import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from services.core import credentials
from services.core.errors import InvalidArgument, InvalidState, NotFound, PermissionDenied, Unauthenticated
from services.core.fleet import audit
from services.core.fleet.listing import ListingSpec, Page, PageRequest, SortField, fetch_page
from services.core.fleet.models import ApiRole, ApiToken, api_token_from_row, utc_now
from services.core.fleet.validation import NAME_MAX_LENGTH, validate_future_time, validate_text

COLUMNS = "id, name, token_prefix, role, created_at, created_by, expires_at, last_used_at, revoked_at"

_SPEC = ListingSpec(
    entity="API tokens",
    table="api_tokens",
    columns=COLUMNS,
    id_column="id",
    id_type="uuid",
    sort_fields={
        "created_at": SortField("created_at", "timestamptz"),
        "name": SortField("name", "text"),
        "role": SortField("role", "text"),
        "last_used_at": SortField("COALESCE(last_used_at, '-infinity'::timestamptz)", "timestamptz"),
    },
    default_sort="created_at",
)

LAST_USED_PRECISION = datetime.timedelta(minutes=1)
"""``last_used_at`` is rewritten at most this often, so each call does not write a row."""

INVALID_TOKEN_MESSAGE = "invalid API token"


def create_api_token(
    conn: psycopg2.extensions.connection,
    *,
    name: str,
    role: ApiRole,
    created_by: str,
    expires_at: datetime.datetime | None = None,
) -> tuple[ApiToken, str]:
    """Create an API token and return it with its secret, which is not stored.

    Raises:
        InvalidArgument: a field is invalid; ``field`` names it.
    """
    validate_text(name, "name", NAME_MAX_LENGTH, required=True)
    validate_text(created_by, "created_by", NAME_MAX_LENGTH, required=True)
    role = _parse_role(role)
    expires_at = validate_future_time(expires_at, "expires_at", utc_now())

    secret = credentials.new_secret(credentials.API_TOKEN_PREFIX)
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"INSERT INTO api_tokens (name, token_hash, token_prefix, role, created_by, expires_at) "
            f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
            (
                name,
                credentials.hash_secret(secret),
                credentials.display_prefix(secret),
                role.value,
                created_by,
                expires_at,
            ),
        )
        token = api_token_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=created_by,
        action="apikey.create",
        target_type="api_token",
        target_id=str(token.id),
        details={"name": name, "role": role.value, "prefix": token.prefix},
    )
    return token, secret


def list_api_tokens(
    conn: psycopg2.extensions.connection, *, include_revoked: bool = False, page: PageRequest
) -> Page[ApiToken]:
    """Return one page of API tokens, without revoked ones unless ``include_revoked``.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    where = [] if include_revoked else [sql.SQL("revoked_at IS NULL")]
    rows, next_token, total = fetch_page(conn, _SPEC, page, where=where, parameters=[])
    return Page([api_token_from_row(row) for row in rows], next_token, total)


def get_api_token(conn: psycopg2.extensions.connection, token_id: uuid.UUID) -> ApiToken:
    """Return the API token ``token_id``.

    Raises:
        NotFound: no such token.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM api_tokens WHERE id = %s", (token_id,))
        row = cursor.fetchone()
    if row is None:
        raise NotFound("API token", token_id)
    return api_token_from_row(row)


def revoke_api_token(conn: psycopg2.extensions.connection, token_id: uuid.UUID, *, actor: str) -> ApiToken:
    """Revoke the API token ``token_id``; its next call is rejected as unauthenticated.

    Raises:
        NotFound: no such token.
        InvalidState: the token is already revoked.
    """
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(f"SELECT {COLUMNS} FROM api_tokens WHERE id = %s FOR UPDATE", (token_id,))
        row = cursor.fetchone()
        if row is None:
            raise NotFound("API token", token_id)
        if row["revoked_at"] is not None:
            raise InvalidState(f"API token {token_id}", "revoked", ("active", "expired"))
        cursor.execute(f"UPDATE api_tokens SET revoked_at = now() WHERE id = %s RETURNING {COLUMNS}", (token_id,))
        token = api_token_from_row(cursor.fetchone())

    audit.record(
        conn,
        actor=actor,
        action="apikey.revoke",
        target_type="api_token",
        target_id=str(token_id),
        details={"name": token.name, "prefix": token.prefix},
    )
    return token


def authenticate_api_token(
    conn: psycopg2.extensions.connection, secret: str, *, now: datetime.datetime | None = None
) -> ApiToken:
    """Return the API token whose secret is ``secret`` and record its use.

    ``last_used_at`` is updated only when it is older than one minute.

    Raises:
        Unauthenticated: the token is unknown, revoked or expired; the message
            is the same in all three cases.
    """
    now = now or utc_now()
    with conn.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM api_tokens WHERE token_hash = %s", (credentials.hash_secret(secret),)
        )
        row = cursor.fetchone()
        if row is None:
            raise Unauthenticated(INVALID_TOKEN_MESSAGE)
        token = api_token_from_row(row)
        if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
            raise Unauthenticated(INVALID_TOKEN_MESSAGE)

        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_PRECISION:
            # The condition repeats in SQL, so concurrent calls write the row once.
            cursor.execute(
                f"UPDATE api_tokens SET last_used_at = %s WHERE id = %s "
                f"AND (last_used_at IS NULL OR last_used_at <= %s) RETURNING {COLUMNS}",
                (now, token.id, now - LAST_USED_PRECISION),
            )
            updated = cursor.fetchone()
            if updated is not None:
                token = api_token_from_row(updated)
    return token


def require_role(token: ApiToken, needed: ApiRole) -> None:
    """Return if the token's role is ``needed`` or above it.

    Raises:
        PermissionDenied: the role is below ``needed``.
    """
    needed = ApiRole(needed)
    if token.role.rank < needed.rank:
        raise PermissionDenied(
            f"API token {token.name!r} has role {token.role.value}; this request needs role {needed.value} or higher"
        )


def _parse_role(role: ApiRole | str) -> ApiRole:
    try:
        return ApiRole(role)
    except ValueError:
        raise InvalidArgument(
            "role", f"invalid role {role!r}: expected one of {', '.join(r.value for r in ApiRole)}"
        ) from None
