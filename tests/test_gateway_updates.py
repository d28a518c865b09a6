"""The gateway's side of updates: notices on the stream, progress reports, artifact download."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.releases import generate_key_pair, load_private_key, manifest_for, parse_public_keys, sign_manifest
from agentmanager.v1 import agent_pb2, agent_pb2_grpc
from services.core import routing
from services.core.fleet import releases, rollouts
from services.core.fleet.rollouts import AgentUpdateState, Selection
from services.core.settings import Settings
from tests.gateway_client import Agent, GatewayStack
from tests.support import wait_until

CALL_TIMEOUT_SECONDS = 10


@pytest.fixture(scope="module")
def stack(postgres, redis_server, test_root) -> Iterator[GatewayStack]:
    stack = GatewayStack(postgres, redis_server, test_root)
    stack.start_gateway()
    yield stack
    stack.close()


@pytest.fixture
def channel(stack) -> Iterator[grpc.Channel]:
    with stack.gateways[0].channel() as channel:
        yield channel


def publish(stack: GatewayStack, tmp_path: Path, version: str, size: int = 700_000) -> releases.Release:
    """Sign and store a release in the gateway's own store, as `agentmgr updates publish` does."""
    pem, public_line = generate_key_pair()
    artifact = tmp_path / f"agent-{version}.tar.gz"
    artifact.write_bytes(hashlib.sha256(version.encode()).digest() * (size // 32))
    manifest_bytes, signature = sign_manifest(
        load_private_key(pem), manifest_for(artifact, version=version, os_name="linux", architecture="any")
    )
    store = releases.store_from_settings(Settings.from_env(stack.base_env))
    release, _ = stack.run(
        releases.add_release, store, manifest_bytes=manifest_bytes, signature=signature,
        trusted_keys=parse_public_keys(public_line), open_artifact=lambda: io.BytesIO(artifact.read_bytes()),
        source="test", actor="test",
    )
    return release


def download(channel: grpc.Channel, agent: Agent, release_id: str, offset: int = 0) -> bytes:
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.DownloadArtifactRequest(release_id=release_id, offset=offset)
    data = b""
    for chunk in stub.DownloadArtifact(request, metadata=agent.metadata, timeout=CALL_TIMEOUT_SECONDS):
        assert chunk.offset == offset + len(data)
        data += chunk.data
    return data


def test_download_whole_and_resumed(stack, channel, tmp_path) -> None:
    release = publish(stack, tmp_path, f"3.0.{uuid.uuid4().hex[:4]}")
    agent = Agent.register(channel, stack.enrollment_token())
    stored = releases.store_from_settings(Settings.from_env(stack.base_env)).path_for(release.sha256).read_bytes()

    whole = download(channel, agent, str(release.id))
    tail = download(channel, agent, str(release.id), offset=300_001)

    assert whole == stored
    assert hashlib.sha256(whole).hexdigest() == release.sha256
    assert tail == stored[300_001:]


def test_download_offset_past_end(stack, channel, tmp_path) -> None:
    release = publish(stack, tmp_path, f"3.1.{uuid.uuid4().hex[:4]}", size=1000)
    agent = Agent.register(channel, stack.enrollment_token())

    with pytest.raises(grpc.RpcError) as error:
        download(channel, agent, str(release.id), offset=release.size_bytes + 1)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_notice_routed_and_progress_stored(stack, channel, tmp_path) -> None:
    version = f"4.0.{uuid.uuid4().hex[:4]}"
    release = publish(stack, tmp_path, version, size=1000)
    agent = Agent.register(channel, stack.enrollment_token(group=f"g{uuid.uuid4().hex[:6]}"))
    session = agent.open_session()
    try:
        session.wait_settings()
        rollout, _ = stack.run(
            rollouts.create_rollout, target_version=version, selection=Selection(agent_ids=(uuid.UUID(agent.agent_id),)),
            waves=[100], max_parallel=5, failure_threshold_percent=0, agent_timeout_seconds=600, created_by="test",
        )
        _, notices = stack.run(rollouts.advance_rollout, rollout.id, is_online=lambda agent_id: True)
        for notice in notices:
            routing.publish_to_agent(stack.redis, notice.agent_id, {
                "kind": "update_notice", "rollout_id": str(rollout.id), "release_id": str(notice.release.id)})

        message = session.next_message(kind="update_notice")
        notice = message.update_notice
        session.send(agent_pb2.AgentMessage(update_status=agent_pb2.UpdateStatus(
            rollout_id=str(rollout.id), release_id=str(release.id), state=agent_pb2.UPDATE_STATE_SUCCEEDED,
            agent_version=version)))

        def succeeded() -> bool:
            members = stack.run(rollouts.list_rollout_agents, rollout.id)
            return members[0].state == AgentUpdateState.SUCCEEDED

        wait_until(succeeded, timeout=10, what="the success report to be stored")
    finally:
        session.close()

    assert notice.rollout_id == str(rollout.id)
    assert notice.release_id == str(release.id)
    assert notice.version == version
    assert notice.sha256 == release.sha256
    assert notice.manifest == release.manifest_bytes
    assert notice.signature == release.signature


def test_notice_resent_on_reconnect(stack, channel, tmp_path) -> None:
    version = f"5.0.{uuid.uuid4().hex[:4]}"
    publish(stack, tmp_path, version, size=1000)
    agent = Agent.register(channel, stack.enrollment_token())
    rollout, _ = stack.run(
        rollouts.create_rollout, target_version=version, selection=Selection(agent_ids=(uuid.UUID(agent.agent_id),)),
        waves=[100], max_parallel=5, failure_threshold_percent=0, agent_timeout_seconds=600, created_by="test",
    )
    # Notified while the agent is away: the notice waits in PostgreSQL.
    stack.run(rollouts.advance_rollout, rollout.id, is_online=lambda agent_id: True)

    session = agent.open_session()
    try:
        message = session.next_message(kind="update_notice")
    finally:
        session.close()

    assert message.update_notice.rollout_id == str(rollout.id)
