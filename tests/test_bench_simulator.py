"""The benchmark's simulated agents against a real gateway: online, commands, one connection each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.simulator import Fleet, established_connections, execute
from services.core import routing
from services.core.fleet import commands
from services.core.fleet.models import Command, CommandState
from tests.gateway_client import GatewayStack
from tests.support import wait_until

AGENT_COUNT = 20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(postgres, redis_server, test_root) -> Iterator[GatewayStack]:
    stack = GatewayStack(postgres, redis_server, test_root)
    stack.start_gateway()
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def fleet(stack) -> Iterator[Fleet]:
    gateway = stack.gateways[0]
    fleet = Fleet(gateway.address, gateway.ca_certificate, agents_per_worker=AGENT_COUNT)
    try:
        credentials, errors, _ = fleet.register(stack.enrollment_token(), AGENT_COUNT, workers=1, concurrency=4)
        assert errors == {}
        fleet.connect(credentials)
        fleet.wait_online(AGENT_COUNT, timeout=60)
        yield fleet
    finally:
        fleet.stop()


def test_executor_spawns_nothing() -> None:
    assert execute("echo hello world") == (0, b"hello world\n", b"")
    assert execute("false") == (1, b"", b"")
    assert execute("uname -a")[0] == 127


def test_all_agents_online(stack, fleet) -> None:
    status = fleet.status()

    assert status["agents"] == AGENT_COUNT
    assert status["online"] == AGENT_COUNT
    assert stack.count("agents", "revoked_at IS NULL") >= AGENT_COUNT


def test_each_agent_own_connection(stack, fleet) -> None:
    port = int(stack.gateways[0].address.rsplit(":", 1)[1])

    [worker_pid] = fleet.pids

    assert established_connections(worker_pid, port) == AGENT_COUNT


def test_heartbeats_sent(fleet) -> None:
    wait_until(lambda: fleet.status()["heartbeats_sent"] >= AGENT_COUNT, timeout=30, what="one heartbeat per agent")


def test_command_result_stored(stack, fleet) -> None:
    with stack.database.transaction() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT id FROM agents WHERE revoked_at IS NULL ORDER BY created_at DESC LIMIT 1")
        agent_id = cursor.fetchone()[0]
    command = stack.run(
        commands.create_command, agent_id=agent_id, command_line="echo simulated", timeout_seconds=30,
        expires_in_seconds=60, reason="bench simulator test", requested_by="test",
    )
    routing.publish_to_agent(stack.redis, agent_id, {"kind": "command", "command_id": str(command.id)})

    def finished() -> Command | None:
        stored = stack.run(commands.get_command, command.id)
        return stored if stored.state == CommandState.SUCCEEDED else None

    stored = wait_until(finished, timeout=30, what=f"command {command.id} to succeed")

    assert stored.stdout == b"simulated\n"
    assert stored.exit_code == 0
    assert stored.agent_id == agent_id
