"""Bad inputs to every gateway RPC: each gets the right status code and stores nothing.

One gateway process (real TLS over TCP, real PostgreSQL and Redis) serves the
whole module; each test enrolls its own agents and tokens.
"""

from __future__ import annotations

import datetime
import time
import uuid

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentmanager.v1 import agent_pb2, agent_pb2_grpc, common_pb2, panel_pb2
from services.core.fleet import agents as fleet_agents
from services.core.fleet import enrollment
from services.core.fleet.listing import PageRequest
from services.core.fleet.models import utc_now
from tests.gateway_client import (
    CALL_TIMEOUT_SECONDS,
    Agent,
    GatewayStack,
    agent_metadata,
    bearer,
    health_status,
    host_facts,
    panel_stub,
    seconds,
)
from tests.gateway_client import channel, gateway, stack  # noqa: F401 - fixtures


@pytest.fixture(autouse=True)
def clear_rate_limits(stack: GatewayStack) -> None:
    """Forget earlier Register failures, so that each case gets its own status."""
    for key in stack.redis.scan_iter("agentmgr:register-failures:*"):
        stack.redis.delete(key)


def status_of(call, *args, **kwargs) -> grpc.StatusCode:
    """Run a unary call that must fail and return its status code."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=CALL_TIMEOUT_SECONDS, **kwargs)
    return caught.value.code()


def register(channel: grpc.Channel, token: str, facts: common_pb2.HostFacts | None = None, replace: bool = False):
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.RegisterRequest(enrollment_token=token, replace=replace)
    if facts is not None:
        request.facts.CopyFrom(facts)
    return stub.Register(request, timeout=CALL_TIMEOUT_SECONDS)


def token_uses(stack: GatewayStack) -> int:
    """Return the use count summed over every enrollment token."""
    page = stack.run(enrollment.list_tokens, include_revoked=True, page=PageRequest(page_size=500))
    return sum(token.use_count for token in page.items)


# Register.


def expired_token(stack: GatewayStack) -> str:
    token = stack.enrollment_token(expires_at=utc_now() + datetime.timedelta(seconds=1))
    time.sleep(1.2)
    return token


def revoked_token(stack: GatewayStack) -> str:
    token_row, secret = stack.run(enrollment.create_token, created_by="test")
    stack.run(enrollment.revoke_token, token_row.id, actor="test")
    return secret


def exhausted_token(stack: GatewayStack, channel: grpc.Channel) -> str:
    token = stack.enrollment_token(max_uses=1)
    register(channel, token, host_facts())
    return token


REGISTER_CASES = [
    # (case, token factory, facts, expected code)
    ("unknown token", lambda s, c: "amenr_" + "x" * 43, host_facts, grpc.StatusCode.UNAUTHENTICATED),
    ("empty token", lambda s, c: "", host_facts, grpc.StatusCode.INVALID_ARGUMENT),
    ("expired token", lambda s, c: expired_token(s), host_facts, grpc.StatusCode.FAILED_PRECONDITION),
    ("revoked token", lambda s, c: revoked_token(s), host_facts, grpc.StatusCode.FAILED_PRECONDITION),
    ("exhausted token", exhausted_token, host_facts, grpc.StatusCode.FAILED_PRECONDITION),
    ("missing facts", lambda s, c: s.enrollment_token(), lambda: None, grpc.StatusCode.INVALID_ARGUMENT),
    ("overlong hostname", lambda s, c: s.enrollment_token(), lambda: host_facts(hostname="a" * 254),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("overlong hostname label", lambda s, c: s.enrollment_token(), lambda: host_facts(hostname="a" * 64 + ".example"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("malformed hostname", lambda s, c: s.enrollment_token(), lambda: host_facts(hostname="bad_host!'; --"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("hostname with leading dash", lambda s, c: s.enrollment_token(), lambda: host_facts(hostname="-host"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("malformed address", lambda s, c: s.enrollment_token(), lambda: host_facts(addresses=["300.1.2.3"]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("short machine id", lambda s, c: s.enrollment_token(), lambda: host_facts(machine_id="abc"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("control character in os", lambda s, c: s.enrollment_token(), lambda: host_facts(os_name="Linux\x00"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("oversized message", lambda s, c: s.enrollment_token(), lambda: host_facts(os_version="x" * 100_000),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(
    "token_factory, facts_factory, expected",
    [case[1:] for case in REGISTER_CASES],
    ids=[case[0] for case in REGISTER_CASES],
)
def test_register_rejects_bad_input(stack, channel, token_factory, facts_factory, expected) -> None:
    token = token_factory(stack, channel)
    agents_before = stack.count("agents")
    uses_before = token_uses(stack)

    with pytest.raises(grpc.RpcError) as caught:
        register(channel, token, facts_factory())

    assert caught.value.code() == expected, caught.value.details()
    assert stack.count("agents") == agents_before
    assert token_uses(stack) == uses_before


def test_register_names_the_invalid_field(channel, stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        register(channel, stack.enrollment_token(), host_facts(hostname="bad_host"))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hostname" in caught.value.details()


def test_register_same_machine_needs_replace(channel, stack) -> None:
    facts = host_facts()
    first = register(channel, stack.enrollment_token(), facts)
    agents_before = stack.count("agents")

    with pytest.raises(grpc.RpcError) as caught:
        register(channel, stack.enrollment_token(), facts)

    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stack.count("agents") == agents_before
    assert first.agent_key not in caught.value.details()


def test_register_replace_revokes_old_agent(channel, stack) -> None:
    facts = host_facts()
    first = register(channel, stack.enrollment_token(), facts)

    second = register(channel, stack.enrollment_token(), facts, replace=True)

    assert second.agent_id != first.agent_id
    assert second.agent_key != first.agent_key
    old = stack.run(fleet_agents.get_agent, uuid.UUID(first.agent_id))
    assert old.revoked_at is not None
    error = session_status(channel, agent_metadata(first.agent_id, first.agent_key))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_register_key_and_settings(channel, stack) -> None:
    response = register(channel, stack.enrollment_token(group="web", labels={"site": "a"}), host_facts())

    assert uuid.UUID(response.agent_id)
    assert len(response.agent_key) >= 43
    assert response.group == "web"
    assert response.labels["site"] == "a"
    assert response.settings.heartbeat_interval.ToNanoseconds() == 500_000_000
    assert response.settings.offline_threshold.seconds == 3


def test_register_failures_are_rate_limited(channel, stack) -> None:
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            register(channel, "amenr_unknown", host_facts())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    agents_before = stack.count("agents")

    with pytest.raises(grpc.RpcError) as caught:
        register(channel, stack.enrollment_token(), host_facts())

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stack.count("agents") == agents_before


# Agent credentials.


def session_status(channel: grpc.Channel, metadata, first: agent_pb2.AgentMessage | None = None) -> grpc.RpcError:
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    message = first or agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_version="0.1.0"))
    call = stub.Session(iter([message]), metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    return caught.value


def test_session_rejects_bad_credentials(channel, stack) -> None:
    agent = Agent.register(channel, stack.enrollment_token())
    cases = {
        "missing metadata": (),
        "missing key": (("x-agent-id", agent.agent_id),),
        "missing id": (("x-agent-key", agent.agent_key),),
        "wrong key": agent_metadata(agent.agent_id, agent.agent_key[:-2] + "xx"),
        "unknown agent id": agent_metadata(str(uuid.uuid4()), agent.agent_key),
        "malformed agent id": agent_metadata("1 OR 1=1", agent.agent_key),
        "api token as key": agent_metadata(agent.agent_id, stack.api_token("admin")),
    }
    for case, metadata in cases.items():
        error = session_status(channel, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, case
    assert stack.count("agents", "last_seen_at IS NOT NULL AND id = %s", (agent.agent_id,)) == 0


def test_session_requires_hello_first(channel, stack) -> None:
    agent = Agent.register(channel, stack.enrollment_token())

    error = session_status(channel, agent.metadata, agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in error.details()


def test_session_rejects_invalid_hello_facts(channel, stack) -> None:
    agent = Agent.register(channel, stack.enrollment_token())
    hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_version="1", facts=host_facts(hostname="bad host")))

    error = session_status(channel, agent.metadata, hello)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_download_artifact_statuses(channel, stack) -> None:
    agent = Agent.register(channel, stack.enrollment_token())
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    unknown = agent_pb2.DownloadArtifactRequest(release_id=str(uuid.uuid4()))
    malformed = agent_pb2.DownloadArtifactRequest(release_id="../../etc/passwd")

    with pytest.raises(grpc.RpcError) as anonymous:
        list(stub.DownloadArtifact(unknown, timeout=CALL_TIMEOUT_SECONDS))
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.DownloadArtifact(unknown, metadata=agent.metadata, timeout=CALL_TIMEOUT_SECONDS))
    with pytest.raises(grpc.RpcError) as invalid:
        list(stub.DownloadArtifact(malformed, metadata=agent.metadata, timeout=CALL_TIMEOUT_SECONDS))

    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_handler_checks_credentials() -> None:
    from services.grpc_gateway.agent_service import AgentServicer
    from services.grpc_gateway.panel_service import PanelServicer

    for servicer, service in ((AgentServicer, "AgentService"), (PanelServicer, "PanelService")):
        module = agent_pb2 if service == "AgentService" else panel_pb2
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            handler = getattr(servicer, method.name)
            assert getattr(handler, "rpc_wrapped", False), f"{service}.{method.name} is not wrapped by rpc.py"


# Open routes.


def test_health_needs_no_credentials(channel) -> None:
    assert health_status(channel) == 1
    assert health_status(channel, "agentmanager.v1.AgentService") == 1
    assert health_status(channel, "agentmanager.v1.PanelService") == 1


def test_reflection_lists_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_SECONDS
    )
    names = {service.name for response in responses for service in response.list_services_response.service}

    assert "agentmanager.v1.AgentService" in names
    assert "agentmanager.v1.PanelService" in names


# Panel credentials and roles.


def test_panel_rejects_bad_credentials(channel, stack) -> None:
    panel = panel_stub(channel)
    agent = Agent.register(channel, stack.enrollment_token())
    cases = {
        "missing metadata": (),
        "unknown token": bearer("amapi_" + "x" * 43),
        "basic scheme": (("authorization", "Basic dXNlcjpwYXNz"),),
        "empty bearer": (("authorization", "Bearer "),),
        "agent credentials": agent.metadata,
        "enrollment token": bearer(stack.enrollment_token()),
    }
    for case, metadata in cases.items():
        code = status_of(panel.ListAgents, panel_pb2.ListAgentsRequest(), metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, case


def test_panel_roles(channel, stack) -> None:
    panel = panel_stub(channel)
    viewer = bearer(stack.api_token("viewer"))
    operator = bearer(stack.api_token("operator"))
    agent = Agent.register(channel, stack.enrollment_token())
    commands_before = stack.count("commands")
    tokens_before = stack.count("enrollment_tokens")

    run = panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="id", timeout=seconds(5))
    assert status_of(panel.RunCommand, run, metadata=viewer) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(
        panel.CreateEnrollmentToken, panel_pb2.CreateEnrollmentTokenRequest(), metadata=viewer
    ) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(
        panel.DeleteAgent, panel_pb2.DeleteAgentRequest(agent_id=agent.agent_id), metadata=operator
    ) == grpc.StatusCode.PERMISSION_DENIED

    assert stack.count("commands") == commands_before
    assert stack.count("enrollment_tokens") == tokens_before
    assert stack.run(fleet_agents.get_agent, uuid.UUID(agent.agent_id)).revoked_at is None
    assert panel.GetAgent(panel_pb2.GetAgentRequest(agent_id=agent.agent_id), metadata=viewer).id == agent.agent_id


def test_panel_rejects_bad_requests(channel, stack) -> None:
    panel = panel_stub(channel)
    admin = bearer(stack.api_token("admin"))
    agent = Agent.register(channel, stack.enrollment_token())
    commands_before = stack.count("commands")
    cases = [
        ("GetAgent malformed id", panel.GetAgent, panel_pb2.GetAgentRequest(agent_id="x' OR 1=1 --"),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("GetAgent unknown id", panel.GetAgent, panel_pb2.GetAgentRequest(agent_id=str(uuid.uuid4())),
         grpc.StatusCode.NOT_FOUND),
        ("DeleteAgent unknown id", panel.DeleteAgent, panel_pb2.DeleteAgentRequest(agent_id=str(uuid.uuid4())),
         grpc.StatusCode.NOT_FOUND),
        ("RunCommand unknown agent", panel.RunCommand,
         panel_pb2.RunCommandRequest(agent_id=str(uuid.uuid4()), command_line="id", timeout=seconds(5)),
         grpc.StatusCode.NOT_FOUND),
        ("RunCommand empty command", panel.RunCommand,
         panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="", timeout=seconds(5)),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("RunCommand missing timeout", panel.RunCommand,
         panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="id"),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("RunCommand negative wait", panel.RunCommand,
         panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="id", timeout=seconds(5), wait=seconds(-1)),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("RunCommand oversized", panel.RunCommand,
         panel_pb2.RunCommandRequest(agent_id=agent.agent_id, command_line="x" * 100_000, timeout=seconds(5)),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("GetCommand unknown id", panel.GetCommand, panel_pb2.GetCommandRequest(command_id=str(uuid.uuid4())),
         grpc.StatusCode.NOT_FOUND),
        ("CancelCommand malformed id", panel.CancelCommand, panel_pb2.CancelCommandRequest(command_id="1"),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("ListAgents SQL in sort", panel.ListAgents,
         panel_pb2.ListAgentsRequest(page=common_pb2.PageRequest(sort="hostname; DROP TABLE agents")),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("ListAgents huge page", panel.ListAgents,
         panel_pb2.ListAgentsRequest(page=common_pb2.PageRequest(page_size=100_000)),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("ListAgents forged page token", panel.ListAgents,
         panel_pb2.ListAgentsRequest(page=common_pb2.PageRequest(page_token="J09SIDE9MQ")),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("ListAgents unknown status", panel.ListAgents, panel_pb2.ListAgentsRequest(status=42),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("ListCommands malformed agent id", panel.ListCommands, panel_pb2.ListCommandsRequest(agent_id="'"),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("RevokeEnrollmentToken unknown id", panel.RevokeEnrollmentToken,
         panel_pb2.RevokeEnrollmentTokenRequest(token_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND),
    ]
    for case, call, request, expected in cases:
        assert status_of(call, request, metadata=admin) == expected, case
    assert stack.count("commands") == commands_before


def test_sql_looking_filters_are_values(channel, stack) -> None:
    panel = panel_stub(channel)
    viewer = bearer(stack.api_token("viewer"))
    Agent.register(channel, stack.enrollment_token())
    agents_before = stack.count("agents")
    filters = ["x' OR '1'='1", "%' OR 1=1; --", "'; DROP TABLE agents; --", "_%", "\\"]

    for text in filters:
        by_hostname = panel.ListAgents(panel_pb2.ListAgentsRequest(hostname_contains=text), metadata=viewer)
        by_group = panel.ListAgents(panel_pb2.ListAgentsRequest(group="web' OR '1'='1"), metadata=viewer)
        by_requester = panel.ListCommands(panel_pb2.ListCommandsRequest(requested_by=text), metadata=viewer)
        assert list(by_hostname.agents) == [], text
        assert list(by_group.agents) == [], text
        assert list(by_requester.commands) == [], text

    assert stack.count("agents") == agents_before
