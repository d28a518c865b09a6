"""The ``migrate`` program: wait for PostgreSQL, apply pending migrations, exit.

Concurrency: migrators serialise on a session-scoped PostgreSQL advisory lock.
PostgreSQL releases it when the holder's connection ends, including after
SIGKILL, so it cannot go stale. yoyo's own lock row (table ``yoyo_lock``) does
survive a killed process; whoever holds the advisory lock knows that no other
migrator is running, so it deletes any such row before taking yoyo's lock.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import yoyo
from yoyo.exceptions import LockTimeout

from services.core.db import wait_for_database
from services.core.errors import DatabaseError, MigrationError, MigrationLockTimeout
from services.core.logs import bind_context
from services.core.program import run_program
from services.core.schema import MIGRATIONS_DIR, bundled_migration_ids
from services.core.settings import Settings

logger = logging.getLogger("agentmgr.migrate")

SERVICE = "migrate"

ADVISORY_LOCK_KEY = 0x61676D5F6D696772
"""Key of the advisory lock that serialises migrators ("agm_migr" as bytes)."""

LOCK_POLL_SECONDS = 0.5


def acquire_migration_lock(connection: psycopg2.extensions.connection, timeout_seconds: float) -> None:
    """Take the migrators' advisory lock on ``connection``, waiting up to ``timeout_seconds``.

    Raises:
        MigrationLockTimeout: another migrator held the lock for the whole wait.
    """
    deadline = time.monotonic() + timeout_seconds
    announced = False
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            if cursor.fetchone()[0]:
                logger.debug("acquired: migration lock")
                return
            if time.monotonic() >= deadline:
                raise MigrationLockTimeout(
                    f"another migrator held the migration lock for {timeout_seconds:g}s; "
                    "check for a running migrate (pg_stat_activity, application_name "
                    "'agentmgr-migrate') or raise AGENTMGR_MIGRATE_LOCK_TIMEOUT_SECONDS"
                )
            if not announced:
                logger.info("waiting: migration lock held by another migrator")
                announced = True
            time.sleep(LOCK_POLL_SECONDS)


def clear_stale_yoyo_lock(backend: yoyo.backends.DatabaseBackend) -> None:
    """Delete yoyo lock rows left by a killed migrator; call only under the advisory lock.

    Raises:
        psycopg2.Error: yoyo's lock table is missing and cannot be created.
    """
    if not backend.execute("SELECT to_regclass('yoyo_lock') IS NOT NULL").fetchone()[0]:
        # yoyo ignores any error when it creates this table; running the
        # statement again surfaces the cause (usually a missing permission).
        with backend.transaction():
            backend.execute(backend.format_sql(backend.create_lock_table_sql))
    rows = backend.execute("SELECT pid, ctime FROM yoyo_lock").fetchall()
    backend.rollback()
    if not rows:
        return
    logger.warning(
        "clearing: stale yoyo lock (left by pid %s)",
        rows[0][0],
        extra={"stale_pid": rows[0][0], "locked_at": str(rows[0][1])},
    )
    backend.break_lock()


def apply_pending(backend: yoyo.backends.DatabaseBackend, folder: Path, lock_timeout_seconds: float) -> list[str]:
    """Apply the migrations of ``folder`` that are not yet applied; return their ids.

    Each migration runs in its own transaction, so a failing one leaves the
    schema as the previous migration left it.

    Raises:
        MigrationError: a migration failed; it was rolled back.
    """
    migrations = yoyo.read_migrations(str(folder))
    applied: list[str] = []
    try:
        with backend.lock(timeout=lock_timeout_seconds):
            pending = backend.to_apply(migrations)
            if not pending:
                return applied
            logger.info("applying: %d migration(s)", len(pending), extra={"pending": [m.id for m in pending]})
            for migration in pending:
                with bind_context(migration_id=migration.id):
                    _apply_one(backend, migration)
                applied.append(migration.id)
    except LockTimeout as error:
        raise MigrationLockTimeout(str(error)) from error
    return applied


def _apply_one(backend: yoyo.backends.DatabaseBackend, migration: yoyo.migrations.Migration) -> None:
    started = time.monotonic()
    try:
        backend.apply_one(migration)
    except psycopg2.errors.InsufficientPrivilege as error:
        raise MigrationError(migration.id, _first_line(error), cause=MigrationError.PERMISSION_DENIED) from error
    except Exception as error:
        raise MigrationError(migration.id, _first_line(error)) from error
    logger.info(
        "applied: migration %s",
        migration.id,
        extra={"duration_ms": round((time.monotonic() - started) * 1000)},
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def migrate(settings: Settings, folder: Path = MIGRATIONS_DIR) -> list[str]:
    """Bring the database at ``settings.database_url`` to the migrations in ``folder``.

    Returns the ids applied by this run (empty when the schema was current).

    Raises:
        DatabaseError: the database is unreachable or rejects the connection.
        MigrationLockTimeout: another migrator kept the lock too long.
        MigrationError: a migration failed and was rolled back.
    """
    lock_connection = wait_for_database(
        settings.database_url,
        timeout_seconds=settings.db_wait_seconds,
        application_name="agentmgr-migrate",
    )
    lock_connection.autocommit = True
    try:
        acquire_migration_lock(lock_connection, settings.migrate_lock_timeout_seconds)
        backend = yoyo.get_backend(settings.database_url)
        try:
            clear_stale_yoyo_lock(backend)
            return apply_pending(backend, folder, settings.migrate_lock_timeout_seconds)
        finally:
            backend.connection.close()
    except psycopg2.errors.InsufficientPrivilege as error:
        # yoyo's own tables (yoyo_lock, _yoyo_migration) could not be created or read.
        raise DatabaseError(DatabaseError.PERMISSION_DENIED, _first_line(error)) from error
    finally:
        # Closing the session releases the advisory lock.
        lock_connection.close()


def main(argv: list[str] | None = None) -> int:
    """Run the migrator; see ``python -m services.migrate --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.migrate",
        description="Apply pending database migrations, then exit.",
    )
    parser.add_argument(
        "--migrations",
        type=Path,
        default=MIGRATIONS_DIR,
        help="folder of yoyo SQL migrations (default: the ones shipped with the manager)",
    )
    arguments = parser.parse_args(argv)

    def run(settings: Settings) -> int:
        folder = arguments.migrations.resolve()
        applied = migrate(settings, folder)
        bundled = bundled_migration_ids(folder)
        logger.info(
            "migrated: schema at %s (%d applied by this run)",
            bundled[-1] if bundled else "-",
            len(applied),
            extra={"applied": applied, "schema_version": bundled[-1] if bundled else ""},
        )
        return 0

    return run_program(SERVICE, run)


if __name__ == "__main__":
    sys.exit(main())
