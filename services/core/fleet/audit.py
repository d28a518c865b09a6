"""The append-only audit log of operator actions: who, when, what, on which target, outcome.

A trigger in the schema rejects UPDATE, DELETE and TRUNCATE on ``audit_log``,
so entries written here cannot be changed later, even by the manager's own role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extras import Json

from services.core.fleet.listing import AuditFilters, ListingSpec, Page, PageRequest, SortField, fetch_page
from services.core.fleet.models import AuditEntry, audit_entry_from_row

OUTCOMES = ("success", "failure", "denied")

_SPEC = ListingSpec(
    entity="audit entries",
    table="audit_log",
    columns="id, at, actor, action, target_type, target_id, outcome, details",
    id_column="id",
    id_type="bigint",
    sort_fields={
        "at": SortField("at", "timestamptz"),
        "actor": SortField("actor", "text"),
        "action": SortField("action", "text"),
    },
    default_sort="at",
)


def record(
    conn: psycopg2.extensions.connection,
    *,
    actor: str,
    action: str,
    target_type: str = "",
    target_id: str = "",
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one entry in the caller's transaction, so it is kept only if the action is.

    ``details`` must be JSON-serialisable and must never contain a secret.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"invalid audit outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
    with conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO audit_log (actor, action, target_type, target_id, outcome, details) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (actor, action, target_type, str(target_id), outcome, Json(dict(details or {}))),
        )


def list_entries(
    conn: psycopg2.extensions.connection, *, filters: AuditFilters, page: PageRequest
) -> Page[AuditEntry]:
    """Return one page of audit entries that match ``filters``, oldest first by default.

    Raises:
        InvalidArgument: the page request is invalid.
    """
    where: list[Any] = []
    parameters: list[Any] = []
    for column, value in (
        ("actor", filters.actor),
        ("action", filters.action),
        ("target_type", filters.target_type),
        ("target_id", filters.target_id),
    ):
        if value:
            where.append(sql.SQL(f"{column} = %s"))
            parameters.append(value)
    if filters.since is not None:
        where.append(sql.SQL("at >= %s"))
        parameters.append(filters.since)

    rows, next_token, total = fetch_page(conn, _SPEC, page, where=where, parameters=parameters)
    return Page([audit_entry_from_row(row) for row in rows], next_token, total)
