"""Pagination, sorting and filters shared by every fleet listing.

Listings use keyset pagination: the page token records the sort key and id of
the last row returned, so rows added or removed between two calls never shift
a page. Tokens are opaque to callers (URL-safe base64 of a small JSON object)
and are validated before use. Sort columns come from a per-entity allow-list,
so no request text ever becomes part of the SQL.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from services.core.errors import InvalidArgument
from services.core.fleet.models import AgentStatus, CommandState

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
PAGE_TOKEN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PageRequest:
    """Position, size and sort order of one requested page of a listing."""

    page_size: int = DEFAULT_PAGE_SIZE
    """Rows per page, 1 to 500; 0 means the default of 50."""
    page_token: str = ""
    """``next_page_token`` of the previous page; empty for the first page."""
    sort: str = ""
    """Name of an allow-listed sort field; empty means the listing's default."""
    descending: bool = False


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing."""

    items: list[T]
    next_page_token: str
    """Token for the next page; empty on the last page."""
    total: int | None
    """Rows that match the filters across all pages, or None where not counted."""


@dataclasses.dataclass(frozen=True)
class AgentFilters:
    """Filters of an agent listing; each one that is set must match."""

    status: AgentStatus | None = None
    group: str | None = None
    label: dict[str, str] = dataclasses.field(default_factory=dict)
    """Labels that an agent must have with exactly these values."""
    hostname_contains: str = ""
    """Case-insensitive substring of the hostname."""
    include_revoked: bool = False
    """List revoked agents too; implied by ``status=REVOKED``."""


@dataclasses.dataclass(frozen=True)
class CommandFilters:
    """Filters of a command listing; each one that is set must match."""

    agent_id: uuid.UUID | None = None
    state: CommandState | None = None
    requested_by: str | None = None


@dataclasses.dataclass(frozen=True)
class AuditFilters:
    """Filters of an audit log listing; each one that is set must match."""

    actor: str | None = None
    action: str | None = None
    target_id: str | None = None
    since: datetime.datetime | None = None
    """Only entries at or after this time."""
    target_type: str | None = None


@dataclasses.dataclass(frozen=True)
class SortField:
    """A column that a listing may be sorted by.

    ``expression`` must never be NULL, so that row comparisons on it work for
    keyset pagination; nullable columns are wrapped in COALESCE. ``sql_type``
    casts the page token's text form of the key back to the column's type.
    """

    expression: str
    sql_type: str


@dataclasses.dataclass(frozen=True)
class ListingSpec:
    """Listing settings of one entity: its table, row id and allowed sort fields."""

    entity: str
    """Plural name used in error messages, such as ``agents``."""
    table: str
    columns: str
    """Column list of the SELECT, without the sort key."""
    id_column: str
    id_type: str
    """SQL type of the id column, used to cast the page token's id."""
    sort_fields: Mapping[str, SortField]
    default_sort: str


@dataclasses.dataclass(frozen=True)
class _Cursor:
    sort: str
    descending: bool
    key: str
    id: str


def escape_like(text: str) -> str:
    """Escape the LIKE metacharacters in ``text`` (with the default escape character \\)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def validate_page_request(page: PageRequest, spec: ListingSpec) -> tuple[str, int, _Cursor | None]:
    """Return the sort name, page size and decoded cursor of ``page``.

    Raises:
        InvalidArgument: the page size, sort field or page token is invalid.
    """
    page_size = page.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page_size", f"invalid page_size {page.page_size}: expected 1 to {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})"
        )
    sort = page.sort or spec.default_sort
    if sort not in spec.sort_fields:
        raise InvalidArgument(
            "sort",
            f"invalid sort field {page.sort!r} for {spec.entity}: expected one of {', '.join(sorted(spec.sort_fields))}",
        )
    cursor = _decode_token(page.page_token, spec) if page.page_token else None
    if cursor is not None and (cursor.sort != sort or cursor.descending != page.descending):
        raise InvalidArgument(
            "page_token",
            "page_token was issued for another sort order; repeat the request with the same sort "
            "and descending values, or without page_token to start again",
        )
    return sort, page_size, cursor


def fetch_page(
    connection: Any,
    spec: ListingSpec,
    page: PageRequest,
    *,
    where: Sequence[sql.Composable],
    parameters: Sequence[Any],
) -> tuple[list[dict[str, Any]], str, int]:
    """Run a listing query and return its rows, the next page token and the total count.

    ``where`` contains SQL conditions with ``%s`` placeholders, all joined with
    AND; ``parameters`` are their values in order. Only allow-listed names and
    fixed SQL from the fleet modules may appear in ``where``.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    sort, page_size, cursor = validate_page_request(page, spec)
    field = spec.sort_fields[sort]
    direction = sql.SQL("DESC" if page.descending else "ASC")
    comparison = sql.SQL("<" if page.descending else ">")
    sort_expression = sql.SQL(field.expression)
    id_column = sql.SQL(spec.id_column)
    filter_sql = sql.SQL(" AND ").join(where) if where else sql.SQL("TRUE")

    with connection.cursor(cursor_factory=RealDictCursor) as db_cursor:
        db_cursor.execute(
            sql.SQL("SELECT count(*) AS total FROM {table} WHERE {filters}").format(
                table=sql.SQL(spec.table), filters=filter_sql
            ),
            list(parameters),
        )
        total = db_cursor.fetchone()["total"]

        conditions = [filter_sql]
        query_parameters = list(parameters)
        if cursor is not None:
            conditions.append(
                sql.SQL("({sort}, {id}) {comparison} (%s::{sort_type}, %s::{id_type})").format(
                    sort=sort_expression,
                    id=id_column,
                    comparison=comparison,
                    sort_type=sql.SQL(field.sql_type),
                    id_type=sql.SQL(spec.id_type),
                )
            )
            query_parameters += [cursor.key, cursor.id]
        query = sql.SQL(
            "SELECT {columns}, ({sort})::text AS sort_key FROM {table} WHERE {conditions} "
            "ORDER BY {sort} {direction}, {id} {direction} LIMIT %s"
        ).format(
            columns=sql.SQL(spec.columns),
            sort=sort_expression,
            table=sql.SQL(spec.table),
            conditions=sql.SQL(" AND ").join(conditions),
            direction=direction,
            id=id_column,
        )
        # One row more than the page shows whether a next page exists.
        db_cursor.execute(query, query_parameters + [page_size + 1])
        rows = db_cursor.fetchall()

    next_token = ""
    if len(rows) > page_size:
        rows = rows[:page_size]
        last = rows[-1]
        next_token = _encode_token(_Cursor(sort, page.descending, last["sort_key"], str(last[spec.id_column])))
    return rows, next_token, total


def _encode_token(cursor: _Cursor) -> str:
    payload = {"v": PAGE_TOKEN_VERSION, "s": cursor.sort, "d": cursor.descending, "k": cursor.key, "i": cursor.id}
    data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _decode_token(token: str, spec: ListingSpec) -> _Cursor:
    invalid = InvalidArgument(
        "page_token", "invalid page_token: pass the next_page_token of the previous page unchanged"
    )
    if len(token) > 4096:
        raise invalid
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(data)
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(payload, dict) or payload.get("v") != PAGE_TOKEN_VERSION:
        raise invalid
    sort, descending, key, row_id = payload.get("s"), payload.get("d"), payload.get("k"), payload.get("i")
    if not (isinstance(sort, str) and isinstance(descending, bool) and isinstance(key, str) and isinstance(row_id, str)):
        raise invalid
    if sort not in spec.sort_fields or "\x00" in key:
        raise invalid
    # The key and id are cast in SQL, so values of the wrong form must be rejected here.
    try:
        _check_castable(key, spec.sort_fields[sort].sql_type)
        _check_castable(row_id, spec.id_type)
    except ValueError:
        raise invalid from None
    return _Cursor(sort, descending, key, row_id)


def _check_castable(text: str, sql_type: str) -> None:
    """Raise ValueError unless PostgreSQL can cast ``text`` to ``sql_type``."""
    if sql_type == "uuid":
        uuid.UUID(text)
    elif sql_type in ("bigint", "integer"):
        limit = 2**63 if sql_type == "bigint" else 2**31
        if not -limit <= int(text) < limit:
            raise ValueError(text)
    elif sql_type == "timestamptz":
        if text not in ("infinity", "-infinity"):
            datetime.datetime.fromisoformat(text)
    elif sql_type != "text":
        raise ValueError(f"no check for SQL type {sql_type}")
