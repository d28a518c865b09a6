"""The migrate program against a real PostgreSQL: applying, failing, locking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from services.core.errors import ExitCode
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


def copy_bundled_with(folder: Path, extra: dict[str, str]) -> Path:
    """Fill ``folder`` with the shipped migrations plus ``extra`` (file name -> SQL)."""
    from services.core.schema import MIGRATIONS_DIR

    folder.mkdir(parents=True, exist_ok=True)
    for path in MIGRATIONS_DIR.glob("*.sql"):
        (folder / path.name).write_text(path.read_text())
    for name, sql in extra.items():
        (folder / name).write_text(sql)
    return folder


def public_tables(url: str) -> list[str]:
    rows = query(url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")
    return [row[0] for row in rows]


def test_failing_migration_leaves_schema_unchanged(service_env, tmp_path):
    url = service_env["AGENTMGR_DATABASE_URL"]
    assert run_program(MIGRATE, service_env).returncode == 0
    tables_before = public_tables(url)
    folder = copy_bundled_with(
        tmp_path / "migrations",
        {"9000_broken.sql": "CREATE TABLE half_done (id int);\nALTER TABLE no_such_table ADD COLUMN x int;\n"},
    )

    result = run_program(MIGRATE, service_env, "--migrations", str(folder))

    assert result.returncode == ExitCode.MIGRATION
    errors = [r for r in json_lines(result.stderr) if r["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["migration_id"] == "9000_broken"
    assert errors[0]["cause"] == "migration_failed"
    assert "no_such_table" in errors[0]["error"]
    assert public_tables(url) == tables_before
    assert "9000_broken" not in applied_ids(url)


def test_two_migrators_apply_each_migration_once(service_env):
    url = service_env["AGENTMGR_DATABASE_URL"]
    env = {**os.environ, **service_env}
    processes = [
        subprocess.Popen([sys.executable, "-m", MIGRATE], env=env, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[1] for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    assert applied_ids(url) == bundled_migration_ids()
    applies = query(url, "SELECT migration_id, count(*) FROM _yoyo_log WHERE operation = 'apply' GROUP BY 1 ORDER BY 1")
    assert applies == [(migration_id, 1) for migration_id in bundled_migration_ids()]


def test_killed_migrator_does_not_block_next_run(service_env, tmp_path):
    url = service_env["AGENTMGR_DATABASE_URL"]
    folder = copy_bundled_with(tmp_path / "migrations", {"9000_slow.sql": "SELECT pg_sleep(3);\n"})
    env = {**os.environ, **service_env}
    victim = subprocess.Popen(
        [sys.executable, "-m", MIGRATE, "--migrations", str(folder)],
        env=env, cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        # yoyo's lock row exists once the migrator is inside its lock.
        wait_until(lambda: table_exists(url, "yoyo_lock") and query(url, "SELECT count(*) FROM yoyo_lock")[0][0] == 1,
                   timeout=60, interval=0.05, what="the migrator to take its lock")
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    assert query(url, "SELECT count(*) FROM yoyo_lock")[0][0] == 1

    result = run_program(MIGRATE, service_env, "--migrations", str(folder))

    assert result.returncode == 0, result.stderr
    assert "9000_slow" in applied_ids(url)
    assert query(url, "SELECT count(*) FROM yoyo_lock")[0][0] == 0
    assert any(r["message"].startswith("clearing: stale yoyo lock") for r in json_lines(result.stderr))


@pytest.mark.parametrize(
    ("rewrite", "cause"),
    [
        (lambda url: url.replace("postgres@", "no_such_role@"), "authentication_failed"),
        (lambda url: url.rsplit("/", 1)[0] + "/no_such_database", "database_missing"),
    ],
    ids=["unknown-role", "missing-database"],
)
def test_connection_errors_name_their_cause(service_env, rewrite, cause):
    env = {**service_env, "AGENTMGR_DATABASE_URL": rewrite(service_env["AGENTMGR_DATABASE_URL"])}

    result = run_program(MIGRATE, env)

    assert result.returncode == ExitCode.DATABASE
    records = json_lines(result.stderr)
    errors = [r for r in records if r["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["cause"] == cause
    assert not any(r["message"].startswith("retrying:") for r in records)


def test_role_without_create_permission_is_reported(service_env, postgres):
    url = service_env["AGENTMGR_DATABASE_URL"]
    role = f"limited_{url.rsplit('/', 1)[1]}"
    postgres.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        env = {**service_env, "AGENTMGR_DATABASE_URL": url.replace("postgres@", f"{role}@")}

        result = run_program(MIGRATE, env)

        assert result.returncode == ExitCode.DATABASE
        errors = [r for r in json_lines(result.stderr) if r["level"] == "ERROR"]
        assert errors[0]["cause"] == "permission_denied"
        assert public_tables(url) == []
    finally:
        postgres.drop_database(url.rsplit("/", 1)[1])
        postgres.execute(f'DROP ROLE "{role}"')


def test_password_in_url_is_never_logged(service_env):
    env = {**service_env, "AGENTMGR_DATABASE_URL": "postgresql://someone:s3cret-value@127.0.0.1:1/db",
           "AGENTMGR_DB_WAIT_SECONDS": "0.5"}

    result = run_program(MIGRATE, env)

    assert result.returncode == ExitCode.DATABASE
    assert "s3cret-value" not in result.stderr
    assert "[redacted]" in result.stderr


@pytest.mark.parametrize("module", ["services.grpc_gateway", "services.updater"])
def test_service_refuses_schema_behind(service_env, tmp_path, module):
    from services.core.schema import MIGRATIONS_DIR

    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[12]_*.sql")):
        (partial / path.name).write_text(path.read_text())
    assert run_program(MIGRATE, service_env, "--migrations", str(partial)).returncode == 0

    result = run_program(module, service_env)

    assert result.returncode == ExitCode.SCHEMA
    errors = [r for r in json_lines(result.stderr) if r["level"] == "ERROR"]
    assert errors[0]["missing"][0] == "0003_releases_and_rollouts"
    assert "schema is behind" in errors[0]["error"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AGENTMGR_GRPC_ADDRESS", "no-port"),
        ("AGENTMGR_GRPC_ADDRESS", "0.0.0.0:70000"),
        ("AGENTMGR_DB_WAIT_SECONDS", "soon"),
        ("AGENTMGR_LOG_LEVEL", "LOUD"),
        ("AGENTMGR_HOME", "relative/path"),
        ("AGENTMGR_DATABASE_URL", "mysql://u:hunter2@h/db"),
    ],
)
def test_invalid_setting_stops_program(service_env, variable, value):
    result = run_program(MIGRATE, {**service_env, variable: value})

    assert result.returncode == ExitCode.CONFIG
    errors = [r for r in json_lines(result.stderr) if r["level"] == "ERROR"]
    assert errors[0]["variable"] == variable
    assert variable in errors[0]["message"]
    assert "hunter2" not in result.stderr


def test_gateway_refuses_taken_port(service_env):
    assert run_program(MIGRATE, service_env).returncode == 0
    host, port = service_env["AGENTMGR_GRPC_ADDRESS"].rsplit(":", 1)
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()

        result = run_program("services.grpc_gateway", service_env)

    assert result.returncode == ExitCode.ADDRESS_IN_USE
    assert "already in use" in json_lines(result.stderr)[-1]["message"]
