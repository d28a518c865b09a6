"""Several real gateway processes on one PostgreSQL and Redis: routing, replacement, crashes."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import grpc
import pytest

from agentmanager.v1 import common_pb2, panel_pb2
from services.core.fleet import agents as fleet_agents
from services.core.keys import LAST_SEEN_KEY, session_key
from tests.gateway_client import Agent, GatewayProcess, GatewayStack, bearer, panel_stub, seconds
from tests.gateway_client import stack  # noqa: F401 - fixture
from tests.support import PROJECT_ROOT, wait_until


@pytest.fixture(scope="module")
def first(stack: GatewayStack) -> GatewayProcess:
    return stack.start_gateway()


@pytest.fixture(scope="module")
def second(stack: GatewayStack) -> GatewayProcess:
    return stack.start_gateway()


@pytest.fixture(scope="module")
def admin(stack):
    return bearer(stack.api_token("admin"))


def session_holder(stack: GatewayStack, agent: Agent) -> str | None:
    value = stack.redis.get(f"agentmgr:session:{agent.agent_id}")
    return None if value is None else value.decode()


def test_command_routed_through_other_gateway(stack, first, second, admin) -> None:
    agent = Agent.register(first.channel(), stack.enrollment_token())
    session = agent.open_session()
    settings = session.wait_settings()
    panel = panel_stub(second.channel())

    command = panel.RunCommand(
        panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="hostname", timeout=seconds(10)),
        metadata=admin, timeout=10,
    )
    request = session.next_message(kind="command_request").command_request
    session.report_result(request.command_id, stdout=b"host\n")
    session.next_message(kind="result_stored")
    session.close()

    assert session_holder(stack, agent) is None
    assert settings.gateway_instance_id
    assert request.command_id == command.id
    finished = panel.GetCommand(panel_pb2.GetCommandRequest(command_id=command.id), metadata=admin, timeout=10)
    assert finished.state == common_pb2.COMMAND_STATE_SUCCEEDED


def test_run_command_waits_across_gateways(stack, first, second, admin) -> None:
    agent = Agent.register(first.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()
    panel = panel_stub(second.channel())
    future = panel.RunCommand.future(
        panel_pb2.RunCommandRequest(
            agent_id=agent.agent_id, command_line="date", timeout=seconds(10), wait=seconds(8)
        ),
        metadata=admin, timeout=20,
    )

    request = session.next_message(kind="command_request").command_request
    session.report_result(request.command_id, stdout=b"today\n")
    command = future.result()
    session.close()

    assert command.state == common_pb2.COMMAND_STATE_SUCCEEDED
    assert command.stdout == b"today\n"


def test_session_on_other_gateway_supersedes(stack, first, second) -> None:
    agent = Agent.register(first.channel(), stack.enrollment_token())
    older = agent.open_session()
    older_settings = older.wait_settings()

    newer = agent.on(second.channel()).open_session()
    newer_settings = newer.wait_settings()
    error = older.wait_ended()

    assert older_settings.gateway_instance_id != newer_settings.gateway_instance_id
    assert error is not None
    assert error.code() == grpc.StatusCode.ABORTED
    assert error.details() == "superseded by a newer session"
    assert session_holder(stack, agent) == newer_settings.gateway_instance_id
    newer.close()


def test_delete_on_other_gateway_closes_stream(stack, first, second, admin) -> None:
    agent = Agent.register(first.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()

    panel_stub(second.channel()).DeleteAgent(
        panel_pb2.DeleteAgentRequest(agent_id=agent.agent_id, reason="decommissioned"), metadata=admin, timeout=10
    )
    error = session.wait_ended(timeout=1.0)

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "agent revoked"


def test_killed_gateway_leaves_agent_offline(stack, first, admin) -> None:
    # This gateway never flushes, so a last-seen time in PostgreSQL comes from the survivor.
    doomed = stack.start_gateway(AGENTMGR_LIVENESS_FLUSH_SECONDS="3600")
    agent = Agent.register(doomed.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()
    wait_until(lambda: session_holder(stack, agent) is not None, timeout=5, what="session key")

    doomed.kill()
    session.wait_ended(timeout=15)

    stored = wait_until(
        lambda: (row := stack.run(fleet_agents.get_agent, uuid.UUID(agent.agent_id))).last_seen_at and row,
        timeout=10, what="last-seen time flushed by the surviving gateway",
    )
    assert stored.first_connected_at is not None
    panel = panel_stub(first.channel())
    wait_until(
        lambda: panel.GetAgent(panel_pb2.GetAgentRequest(agent_id=agent.agent_id), metadata=admin, timeout=10).status
        == common_pb2.AGENT_STATUS_OFFLINE,
        timeout=15, what="agent shown offline after the threshold",
    )
    wait_until(lambda: session_holder(stack, agent) is None, timeout=10, what="session key expiry")


def test_command_during_crash_delivered_elsewhere(stack, first, admin) -> None:
    doomed = stack.start_gateway()
    agent = Agent.register(doomed.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()
    doomed.kill()
    session.wait_ended(timeout=15)

    # The session key still names the dead gateway, so no process receives the routed message.
    command = panel_stub(first.channel()).RunCommand(
        panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="uptime", timeout=seconds(10)),
        metadata=admin, timeout=10,
    )
    reconnected = agent.on(first.channel()).open_session()
    request = reconnected.next_message(kind="command_request").command_request
    reconnected.close()

    assert request.command_id == command.id


def test_gateway_shutdown_ends_sessions(stack) -> None:
    leaving = stack.start_gateway()
    agent = Agent.register(leaving.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()

    exit_status = leaving.stop()
    error = session.wait_ended()

    assert exit_status == 0
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    messages = [record["message"] for record in leaving.log_records()]
    assert "closing: 1 agent session(s)" in messages
    assert "stopped: gateway" in messages
    assert stack.redis.exists(session_key(uuid.UUID(agent.agent_id))) == 0
    assert stack.redis.zscore(LAST_SEEN_KEY, agent.agent_id) is not None


def test_stopping_gateway_refuses_new_sessions(stack) -> None:
    leaving = stack.start_gateway()
    agent = Agent.register(leaving.channel(), stack.enrollment_token())
    session = agent.open_session()
    session.wait_settings()

    leaving.process.send_signal(signal.SIGTERM)
    ended = session.wait_ended()
    # The agent reconnects at once, as real agents do; the stopping gateway must not take it.
    retry = agent.open_session()
    retried = retry.wait_ended(timeout=30)
    exit_status = leaving.process.wait(timeout=60)

    assert ended is not None
    assert ended.code() == grpc.StatusCode.UNAVAILABLE
    assert retried is not None
    assert retried.code() == grpc.StatusCode.UNAVAILABLE
    assert retry.settings is None
    assert exit_status == 0


AGENT_SCRIPT = """
import sys, time
from tests.gateway_client import Agent, secure_channel
channel = secure_channel(sys.argv[1], open(sys.argv[2], "rb").read())
session = Agent(channel, sys.argv[3], sys.argv[4]).open_session(heartbeat=False)
session.wait_settings()
print("ready", flush=True)
time.sleep(600)
"""


def test_keepalive_drops_frozen_agent(stack) -> None:
    # Keepalive in one second, and a session key that outlives the test unless released.
    watchful = stack.start_gateway(
        AGENTMGR_GRPC_KEEPALIVE_TIME_SECONDS="1",
        AGENTMGR_GRPC_KEEPALIVE_TIMEOUT_SECONDS="1",
        AGENTMGR_OFFLINE_AFTER_SECONDS="600",
    )
    agent = Agent.register(watchful.channel(), stack.enrollment_token())
    ca_file = stack.home / "tls" / "ca.pem"
    process = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, watchful.address, str(ca_file), agent.agent_id, agent.agent_key],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        assert session_holder(stack, agent) is not None

        # A stopped process answers no pings, like a host that lost power.
        process.send_signal(signal.SIGSTOP)
        wait_until(lambda: session_holder(stack, agent) is None, timeout=30, what="session released by keepalive")
    finally:
        process.kill()
        process.wait()
        watchful.stop()
