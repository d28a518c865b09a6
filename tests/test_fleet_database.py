"""The connection pool and its transactions against a real PostgreSQL."""

from __future__ import annotations

import datetime
import threading
import uuid

import psycopg2
import pytest

from services.core.database import Database
from services.core.errors import DatabaseError
from tests.fleet_support import count_rows, database, fleet_template, fleet_url  # noqa: F401 - fixtures


def test_transaction_commits_on_success(database):
    with database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute("INSERT INTO audit_log (actor, action, outcome) VALUES ('test', 'x', 'success')")

    assert count_rows(database, "audit_log") == 1


def test_transaction_rolls_back_on_error(database):
    with pytest.raises(RuntimeError):
        with database.transaction() as connection, connection.cursor() as cursor:
            cursor.execute("INSERT INTO audit_log (actor, action, outcome) VALUES ('test', 'x', 'success')")
            raise RuntimeError("fail after the insert")

    assert count_rows(database, "audit_log") == 0


def test_transaction_returns_uuid_and_utc(database):
    with database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT gen_random_uuid(), now()")
        value, now = cursor.fetchone()

    assert isinstance(value, uuid.UUID)
    assert now.utcoffset() == datetime.timedelta(0)


def test_broken_connection_is_replaced(database, fleet_url):
    with database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        first_pid = cursor.fetchone()[0]

    killer = psycopg2.connect(fleet_url)
    try:
        with killer.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
    finally:
        killer.close()

    with pytest.raises(DatabaseError) as raised:
        with database.transaction() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    assert raised.value.cause == DatabaseError.UNREACHABLE
    with database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != first_pid


def test_unreachable_server_raises_database_error():
    from tests.support import free_port

    with pytest.raises(DatabaseError) as raised:
        Database(f"postgresql://postgres@127.0.0.1:{free_port()}/none")

    assert raised.value.cause == DatabaseError.UNREACHABLE


def test_threads_share_the_pool(database):
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                with database.transaction() as connection, connection.cursor() as cursor:
                    cursor.execute("INSERT INTO audit_log (actor, action, outcome) VALUES ('t', 'x', 'success')")
                    cursor.execute("SELECT pg_sleep(0.01)")
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert count_rows(database, "audit_log") == 50


def test_close_twice_is_safe(fleet_url):
    pool = Database(fleet_url)
    pool.close()
    pool.close()

    with pytest.raises(DatabaseError):
        with pool.transaction():
            pass


def test_programming_error_is_not_database_error(database):
    with pytest.raises(psycopg2.errors.UndefinedTable):
        with database.transaction() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")
