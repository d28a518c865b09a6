"""Agent sessions on one real gateway: settings, replacement, revocation, command delivery, liveness."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2, panel_pb2
from services.core.fleet import agents as fleet_agents
from tests.gateway_client import (
    Agent,
    bearer,
    host_facts,
    panel_stub,
    seconds,
    secure_channel,
)
from tests.gateway_client import channel, gateway, stack  # noqa: F401 - fixtures
from tests.support import wait_until


@pytest.fixture(scope="module")
def panel(channel):
    return panel_stub(channel)


@pytest.fixture(scope="module")
def admin(stack):
    return bearer(stack.api_token("admin"))


@pytest.fixture
def agent(stack, channel) -> Agent:
    return Agent.register(channel, stack.enrollment_token())


def run_command(panel, admin, agent: Agent, command_line: str = "echo hi", **options) -> panel_pb2.Command:
    options.setdefault("timeout", seconds(30))
    request = panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line=command_line, **options)
    return panel.RunCommand(request, metadata=admin, timeout=30)


def get_command(panel, admin, command_id: str) -> panel_pb2.Command:
    return panel.GetCommand(panel_pb2.GetCommandRequest(command_id=command_id), metadata=admin, timeout=10)


def agent_status(panel, admin, agent: Agent) -> int:
    return panel.GetAgent(panel_pb2.GetAgentRequest(agent_id=agent.agent_id), metadata=admin, timeout=10).status


def test_session_starts_with_settings(agent) -> None:
    session = agent.open_session()
    try:
        settings = session.wait_settings()
    finally:
        session.close()

    assert settings.heartbeat_interval.ToNanoseconds() == 500_000_000
    assert settings.offline_threshold.seconds == 3
    assert settings.max_output_bytes == 1024 * 1024
    assert settings.max_message_bytes == 64 * 1024
    assert settings.min_keepalive_ping_interval.seconds == 10
    assert settings.gateway_instance_id


def test_connected_agent_shown_online_then_offline(agent, panel, admin, stack) -> None:
    assert agent_status(panel, admin, agent) == common_pb2.AGENT_STATUS_NEVER_CONNECTED

    session = agent.open_session()
    session.wait_settings()
    assert agent_status(panel, admin, agent) == common_pb2.AGENT_STATUS_ONLINE
    wait_until(
        lambda: stack.run(fleet_agents.get_agent, uuid.UUID(agent.agent_id)).last_seen_at is not None,
        timeout=10, what="last-seen time flushed to PostgreSQL",
    )
    session.close()

    wait_until(
        lambda: agent_status(panel, admin, agent) == common_pb2.AGENT_STATUS_OFFLINE,
        timeout=15, what="agent shown offline after the threshold",
    )
    stored = stack.run(fleet_agents.get_agent, uuid.UUID(agent.agent_id))
    assert stored.first_connected_at is not None


def test_newer_session_supersedes_older(agent, panel, admin) -> None:
    older = agent.open_session()
    older.wait_settings()

    newer = agent.open_session()
    newer.wait_settings()
    error = older.wait_ended()

    assert error is not None
    assert error.code() == grpc.StatusCode.ABORTED
    assert error.details() == "superseded by a newer session"
    command = run_command(panel, admin, agent)
    assert newer.next_message(kind="command_request").command_request.command_id == command.id
    newer.close()


def test_revocation_closes_live_stream(agent, panel, admin, stack) -> None:
    session = agent.open_session()
    session.wait_settings()
    queued = run_command(panel, admin, agent, "sleep 100")
    session.next_message(kind="command_request")

    response = panel.DeleteAgent(panel_pb2.DeleteAgentRequest(agent_id=agent.agent_id), metadata=admin, timeout=10)
    error = session.wait_ended(timeout=1.0)

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "agent revoked"
    assert list(response.cancelled_command_ids) == [queued.id]
    assert response.agent.status == common_pb2.AGENT_STATUS_REVOKED
    again = agent.open_session()
    later = again.wait_ended()
    assert later is not None
    assert later.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revocation_published_by_another_process(agent, stack) -> None:
    session = agent.open_session()
    session.wait_settings()

    # As the CLI does: revoke in PostgreSQL, then publish on the revocations channel.
    stack.run(fleet_agents.revoke_agent, uuid.UUID(agent.agent_id), actor="cli:test")
    stack.redis.publish("agentmgr:revocations", f'{{"agent_id": "{agent.agent_id}"}}')
    error = session.wait_ended(timeout=1.0)

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_offline_agent_gets_command_on_reconnect(agent, panel, admin) -> None:
    queued = run_command(panel, admin, agent, "uname -a")
    assert queued.state == common_pb2.COMMAND_STATE_QUEUED

    session = agent.open_session()
    request = session.next_message(kind="command_request").command_request
    session.report_result(request.command_id, stdout=b"Linux\n")
    session.next_message(kind="result_stored")
    session.close()

    assert request.command_id == queued.id
    assert request.command_line == "uname -a"
    assert request.timeout.seconds == 30
    finished = get_command(panel, admin, queued.id)
    assert finished.state == common_pb2.COMMAND_STATE_SUCCEEDED
    assert finished.stdout == b"Linux\n"
    assert finished.exit_code == 0


def test_expired_command_never_delivered(agent, panel, admin) -> None:
    queued = run_command(panel, admin, agent, "echo late", expires_in=seconds(1))
    time.sleep(1.5)

    session = agent.open_session()
    session.wait_settings()
    session.expect_nothing("command_request", within=1.5)
    session.close()

    assert get_command(panel, admin, queued.id).state == common_pb2.COMMAND_STATE_EXPIRED


def test_cancelled_command_never_delivered(agent, panel, admin) -> None:
    queued = run_command(panel, admin, agent, "rm -rf /tmp/never")
    cancelled = panel.CancelCommand(panel_pb2.CancelCommandRequest(command_id=queued.id), metadata=admin, timeout=10)

    session = agent.open_session()
    session.wait_settings()
    session.expect_nothing("command_request", within=1.5)
    session.close()

    assert cancelled.state == common_pb2.COMMAND_STATE_CANCELLED
    assert get_command(panel, admin, queued.id).state == common_pb2.COMMAND_STATE_CANCELLED


def test_cancel_of_final_command_rejected(agent, panel, admin) -> None:
    queued = run_command(panel, admin, agent)
    panel.CancelCommand(panel_pb2.CancelCommandRequest(command_id=queued.id), metadata=admin, timeout=10)

    with pytest.raises(grpc.RpcError) as caught:
        panel.CancelCommand(panel_pb2.CancelCommandRequest(command_id=queued.id), metadata=admin, timeout=10)

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_run_command_waits_for_result(agent, panel, admin) -> None:
    session = agent.open_session()
    session.wait_settings()

    def answer() -> None:
        request = session.next_message(kind="command_request").command_request
        session.report_result(request.command_id, exit_code=3, stderr=b"boom\n")

    responder = threading.Thread(target=answer)
    responder.start()
    command = run_command(panel, admin, agent, "false", wait=seconds(8))
    responder.join()
    session.close()

    assert command.state == common_pb2.COMMAND_STATE_FAILED
    assert command.exit_code == 3
    assert command.stderr == b"boom\n"


def test_run_command_wait_limit_returns_id(agent, panel, admin) -> None:
    session = agent.open_session()
    session.wait_settings()

    command = run_command(panel, admin, agent, "sleep 5", wait=seconds(0.5))
    delivered = session.next_message(kind="command_request").command_request
    session.close()

    assert command.id == delivered.command_id
    assert command.state == common_pb2.COMMAND_STATE_SENT


def test_duplicate_result_is_ignored(agent, panel, admin) -> None:
    session = agent.open_session()
    session.wait_settings()
    queued = run_command(panel, admin, agent)
    request = session.next_message(kind="command_request").command_request

    session.report_result(request.command_id, stdout=b"first\n")
    first_ack = session.next_message(kind="result_stored").result_stored
    session.report_result(request.command_id, stdout=b"second\n")
    second_ack = session.next_message(kind="result_stored").result_stored
    session.close()

    assert first_ack.command_id == queued.id
    assert second_ack.command_id == queued.id
    assert get_command(panel, admin, queued.id).stdout == b"first\n"


def test_unacknowledged_command_redelivered(agent, panel, admin) -> None:
    first = agent.open_session()
    queued = run_command(panel, admin, agent)
    assert first.next_message(kind="command_request").command_request.command_id == queued.id
    first.close()

    second = agent.open_session()
    again = second.next_message(kind="command_request").command_request
    second.close()

    assert again.command_id == queued.id


def test_result_for_another_agents_command_ignored(agent, panel, admin, stack, channel) -> None:
    other = Agent.register(channel, stack.enrollment_token())
    queued = run_command(panel, admin, agent)
    intruder = other.open_session()
    intruder.wait_settings()

    intruder.report_result(queued.id, stdout=b"forged\n")
    intruder.expect_nothing("result_stored", within=1.0)
    still_open = not intruder.ended.is_set()
    intruder.close()

    assert still_open
    assert get_command(panel, admin, queued.id).state == common_pb2.COMMAND_STATE_QUEUED


def test_list_commands_filters_by_agent_and_state(agent, panel, admin, stack, channel) -> None:
    other = Agent.register(channel, stack.enrollment_token())
    mine = run_command(panel, admin, agent)
    run_command(panel, admin, other)

    listed = panel.ListCommands(
        panel_pb2.ListCommandsRequest(agent_id=agent.agent_id, state=common_pb2.COMMAND_STATE_QUEUED),
        metadata=admin, timeout=10,
    )

    assert [command.id for command in listed.commands] == [mine.id]
    assert listed.total == 1


def test_list_agents_pages(panel, admin, stack, channel) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    token = stack.enrollment_token(group=group)
    enrolled = {Agent.register(channel, token).agent_id for _ in range(3)}
    seen: list[str] = []
    page_token = ""

    for _ in range(3):
        response = panel.ListAgents(
            panel_pb2.ListAgentsRequest(group=group, page=common_pb2.PageRequest(page_size=2, page_token=page_token)),
            metadata=admin, timeout=10,
        )
        seen.extend(agent.id for agent in response.agents)
        page_token = response.next_page_token
        if not page_token:
            break

    assert sorted(seen) == sorted(enrolled)
    assert response.total == 3


def test_replacement_closes_old_agents_stream(stack, channel) -> None:
    facts = {"machine_id": uuid.uuid4().hex, "hostname": "replaced.example.test"}
    old = Agent.register(channel, stack.enrollment_token(), **facts)
    session = old.open_session()
    session.wait_settings()

    agent_pb2_grpc.AgentServiceStub(channel).Register(
        agent_pb2.RegisterRequest(enrollment_token=stack.enrollment_token(), facts=host_facts(**facts), replace=True),
        timeout=10,
    )
    error = session.wait_ended(timeout=1.0)

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "agent revoked"


def test_resubscribe_closes_revoked_agents_stream(agent, stack, gateway) -> None:
    session = agent.open_session()
    session.wait_settings()

    # Revoke without publishing, then drop the gateway's subscription: the revocation
    # message is lost, so only the resynchronisation after resubscribing can find it.
    stack.run(fleet_agents.revoke_agent, uuid.UUID(agent.agent_id), actor="test")
    stack.redis.client_kill_filter(_type="pubsub")
    error = session.wait_ended(timeout=10)

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    messages = [record["message"] for record in gateway.log_records()]
    assert any(message.startswith("failed: routing subscription") for message in messages)


def test_too_frequent_pings_end_connection(agent, gateway) -> None:
    # One ping a second breaks the documented minimum of ten seconds between pings.
    impatient = secure_channel(
        gateway.address,
        gateway.ca_certificate,
        **{
            "grpc.keepalive_time_ms": 1000,
            "grpc.keepalive_permit_without_calls": 1,
            "grpc.http2.max_pings_without_data": 0,
        },
    )
    session = agent.on(impatient).open_session(heartbeat=False)
    session.wait_settings()

    error = session.wait_ended(timeout=30)
    impatient.close()

    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in error.details().lower()


def test_heartbeat_reclaims_expired_session_key(agent, panel, admin, stack) -> None:
    session = agent.open_session()
    session.wait_settings()

    # As if heartbeats had stopped for longer than the key's TTL: routing finds no holder.
    stack.redis.delete(f"agentmgr:session:{agent.agent_id}")
    queued = run_command(panel, admin, agent, "echo late")
    request = session.next_message(timeout=10, kind="command_request").command_request
    session.close()

    assert request.command_id == queued.id
