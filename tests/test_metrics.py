"""Prometheus endpoints of the gateway and the updater, scraped after known actions."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentmanager.v1 import agent_pb2, agent_pb2_grpc
from services.core import routing
from services.core.database import Database
from services.core.fleet import commands, rollouts
from tests.gateway_client import Agent, GatewayStack
from tests.test_rollouts import add_release, enroll
from tests.support import VENV_BIN, free_port, run_program, start_updater, stop_process, wait_until


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the endpoint as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def gateway_stack(postgres, redis_server, test_root):
    stack = GatewayStack(postgres, redis_server, test_root)
    yield stack
    stack.close()


def test_gateway_metrics_after_known_actions(gateway_stack):
    address = f"127.0.0.1:{free_port()}"
    gateway = gateway_stack.start_gateway(AGENTMGR_GATEWAY_METRICS_ADDRESS=address)
    with gateway.channel() as channel:
        agent = Agent.register(channel, gateway_stack.enrollment_token())
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            list(stub.DownloadArtifact(agent_pb2.DownloadArtifactRequest(release_id=str(uuid.uuid4())), timeout=10))
        session = agent.open_session()
        try:
            session.wait_settings()
            command = gateway_stack.run(commands.create_command, agent_id=uuid.UUID(agent.agent_id),
                                        command_line="true", timeout_seconds=10, expires_in_seconds=60,
                                        reason="", requested_by="test")
            routing.publish_to_agent(gateway_stack.redis, command.agent_id, {"kind": "command", "command_id": str(command.id)})
            session.next_message(kind="command_request", timeout=10)
            session.report_result(str(command.id), exit_code=0)
            session.next_message(kind="result_stored", timeout=10)
            wait_until(lambda: value(scrape(address), "agentmgr_heartbeats_total") >= 1, timeout=10,
                       what="a heartbeat to be counted")
            samples = scrape(address)
        finally:
            session.close()

    assert value(samples, "agentmgr_connected_agents") == 1
    assert value(samples, "agentmgr_rpc_requests_total", method="Register", code="OK") == 1
    assert value(samples, "agentmgr_rpc_requests_total", method="DownloadArtifact", code="UNAUTHENTICATED") == 1
    assert value(samples, "agentmgr_auth_failures_total", method="DownloadArtifact") == 1
    assert value(samples, "agentmgr_command_results_total", state="succeeded") == 1
    assert value(samples, "agentmgr_rpc_duration_seconds_count", method="Register") == 1


def test_updater_metrics_count_jobs_in_work_horses(service_env, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**service_env, "AGENTMGR_UPDATER_METRICS_ADDRESS": address}
    assert run_program("services.migrate", env).returncode == 0
    worker = start_updater(env, tmp_path / "updater.log")
    try:
        fetched = subprocess.run(
            [str(VENV_BIN / "agentmgr"), "-o", "json", "updates", "fetch", "--wait", "30"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )
        assert json.loads(fetched.stdout)["outcome"] == "succeeded", fetched.stdout + fetched.stderr
        database = Database(env["AGENTMGR_DATABASE_URL"], max_connections=1)
        try:
            add_release(database, tmp_path, "2.0.0")
            enroll(database, 3)
            with database.transaction() as conn:
                rollout, _ = rollouts.create_rollout(
                    conn, target_version="2.0.0", selection=rollouts.Selection(), waves=[100], max_parallel=1,
                    failure_threshold_percent=50, agent_timeout_seconds=60, created_by="test")
        finally:
            database.close()

        samples = scrape(address)
    finally:
        stop_process(worker)

    assert value(samples, "agentmgr_jobs_total", function="fetch_upstream", outcome="succeeded") == 1
    assert value(samples, "agentmgr_rollout_agents", rollout_id=str(rollout.id), state="pending") == 3
