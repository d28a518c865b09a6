"""Fixtures: one private PostgreSQL and one Redis per test run, a database and a
Redis database number per test.

Servers are started from the binaries on this machine (the same ones `make run`
uses for its private servers) and never touch a server someone else runs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import PostgresCluster, RedisServer, make_shared_dir

_redis_databases = itertools.count(1)


@pytest.fixture(scope="session")
def test_root() -> Iterator[Path]:
    """A folder for everything this run creates; removed at the end unless KEEP_TEST_FILES is set."""
    root = make_shared_dir("agentmgr-test-")
    yield root
    if not os.environ.get("KEEP_TEST_FILES"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(test_root: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(test_root / "postgres")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server(test_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(test_root)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(postgres: PostgresCluster) -> Iterator[str]:
    """URL of an empty database of its own for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of a Redis database number of its own for one test, flushed before and after."""
    number = next(_redis_databases) % RedisServer.DATABASES or 1
    url = redis_server.url_for(number)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def home(test_root: Path) -> Path:
    """A state folder of its own for one test, enterable by the private servers' account."""
    path = test_root / f"home-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    path.chmod(0o755)
    return path


@pytest.fixture
def service_env(home: Path, database_url: str, redis_url: str) -> dict[str, str]:
    """AGENTMGR_ settings that point the programs at this test's servers."""
    from tests.support import free_port

    return {
        "AGENTMGR_HOME": str(home),
        "AGENTMGR_DATABASE_URL": database_url,
        "AGENTMGR_REDIS_URL": redis_url,
        "AGENTMGR_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "AGENTMGR_LOG_LEVEL": "INFO",
        # Each test that checks metrics sets its own free ports.
        "AGENTMGR_GATEWAY_METRICS_ADDRESS": "",
        "AGENTMGR_UPDATER_METRICS_ADDRESS": "",
    }
