"""Fixtures for the fleet tests: a migrated database per test and a connection pool on it.

The schema is migrated once per run into a template database; each test gets
a copy of it (CREATE DATABASE ... TEMPLATE), which is much faster than
migrating again.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from psycopg2 import sql
import pytest

from services.core.database import Database
from services.core.settings import Settings
from services.migrate.main import migrate
from tests.support import PostgresCluster

TEMPLATE_DATABASE = "fleet_template"


@pytest.fixture(scope="session")
def fleet_template(postgres: PostgresCluster) -> str:
    """Name of a database that contains the migrated schema and no rows."""
    postgres.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DATABASE}"')
    url = postgres.create_database(TEMPLATE_DATABASE)
    migrate(Settings.from_env({"AGENTMGR_DATABASE_URL": url}))
    return TEMPLATE_DATABASE


@pytest.fixture
def fleet_url(postgres: PostgresCluster, fleet_template: str) -> Iterator[str]:
    """URL of a migrated, empty database of its own for one test."""
    name = f"f_{uuid.uuid4().hex[:12]}"
    postgres.execute(f'CREATE DATABASE "{name}" TEMPLATE "{fleet_template}"')
    yield postgres.url_for(name)
    postgres.drop_database(name)


@pytest.fixture
def database(fleet_url: str) -> Iterator[Database]:
    """A connection pool on this test's migrated database."""
    pool = Database(fleet_url, max_connections=4, application_name="agentmgr-test")
    yield pool
    pool.close()


def count_rows(database: Database, table: str) -> int:
    """Return the number of rows in ``table``."""
    with database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return cursor.fetchone()[0]
