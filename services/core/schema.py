"""Compare the migrations shipped with this code to those applied in the database.

Every service calls ``check_schema`` at start, so that code never runs on a
schema older than the one it was written for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg2
import psycopg2.extensions

from services.core.errors import SchemaError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrate" / "migrations"
"""Folder of the yoyo SQL migrations shipped inside the package."""

MIGRATION_TABLE = "_yoyo_migration"
"""Table in which yoyo records applied migrations (yoyo 9 default)."""


def bundled_migration_ids(folder: Path = MIGRATIONS_DIR) -> list[str]:
    """Return the ids of the migrations in ``folder``, in the order they apply."""
    return sorted(
        path.name.removesuffix(".sql")
        for path in folder.glob("*.sql")
        if not path.name.endswith(".rollback.sql")
    )


def applied_migration_ids(connection: psycopg2.extensions.connection) -> set[str]:
    """Return the ids that yoyo recorded as applied; empty on a new database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATION_TABLE,))
        if not cursor.fetchone()[0]:
            return set()
        cursor.execute(f"SELECT migration_id FROM {MIGRATION_TABLE}")
        return {row[0] for row in cursor.fetchall()}


def check_schema(connection: psycopg2.extensions.connection, folder: Path = MIGRATIONS_DIR) -> str:
    """Return the schema version (the newest bundled migration id) if all are applied.

    Raises:
        SchemaError: some bundled migrations are not applied.
    """
    bundled = bundled_migration_ids(folder)
    applied = applied_migration_ids(connection)
    connection.rollback()
    missing = [migration_id for migration_id in bundled if migration_id not in applied]
    if missing:
        raise SchemaError(missing)
    unknown = sorted(applied - set(bundled))
    if unknown:
        # A newer manager migrated this database; old code keeps working on
        # additive migrations, so this is a warning and not an error.
        logger.warning(
            "schema is newer than this code (%d unknown migration(s))",
            len(unknown),
            extra={"unknown_migrations": unknown},
        )
    return bundled[-1] if bundled else ""
