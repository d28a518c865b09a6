"""The migrate program against a real PostgreSQL: applying, failing, locking."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

from services.core.schema import bundled_migration_ids
from tests.support import PROJECT_ROOT, json_lines, run_program, wait_until

MIGRATE = "services.migrate"


def query(url: str, sql: str, *params: object) -> list[tuple]:
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()


def table_exists(url: str, name: str) -> bool:
    return query(url, "SELECT to_regclass(%s) IS NOT NULL", name)[0][0]


def applied_ids(url: str) -> list[str]:
    return [row[0] for row in query(url, "SELECT migration_id FROM _yoyo_migration ORDER BY migration_id")]


def test_migrate_applies_bundled_migrations(service_env):
    result = run_program(MIGRATE, service_env)

    assert result.returncode == 0, result.stderr
    assert applied_ids(service_env["AGENTMGR_DATABASE_URL"]) == bundled_migration_ids()
    for table in ("agents", "enrollment_tokens", "api_tokens", "commands", "releases", "rollouts", "rollout_agents", "audit_log"):
        assert table_exists(service_env["AGENTMGR_DATABASE_URL"], table), table
    records = json_lines(result.stderr)
    assert records[-1]["message"] == "exiting: migrate (status 0)"


def test_migrate_twice_applies_nothing_new(service_env):
    first = run_program(MIGRATE, service_env)
    second = run_program(MIGRATE, service_env)

    assert first.returncode == 0
    assert second.returncode == 0
    done = [r for r in json_lines(second.stderr) if r["message"].startswith("migrated:")]
    assert done[0]["applied"] == []
