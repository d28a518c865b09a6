"""Rollout waves, limits, timeouts and the failure threshold, against a real PostgreSQL."""

from __future__ import annotations

import datetime
import io
import uuid

import pytest

from agent.releases import generate_key_pair, load_private_key, manifest_for, parse_public_keys, sign_manifest
from services.core.errors import FailedPrecondition, InvalidArgument, InvalidState, NotFound
from services.core.fleet import agents, enrollment, releases, rollouts
from services.core.fleet.rollouts import AgentUpdateState, RolloutState, Selection
from tests.fleet_support import database, fleet_template, fleet_url  # noqa: F401 - fixtures

NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=datetime.timezone.utc)


def add_release(database, tmp_path, version: str, architecture: str = "any") -> releases.Release:
    pem, public_line = generate_key_pair()
    artifact = tmp_path / f"agent-{version}-{architecture}.tar.gz"
    artifact.write_bytes(f"artifact {version} {architecture}".encode())
    manifest = manifest_for(artifact, version=version, os_name="linux", architecture=architecture)
    manifest_bytes, signature = sign_manifest(load_private_key(pem), manifest)
    store = releases.ReleaseStore(tmp_path / "store", free_space_margin_bytes=0)
    with database.transaction() as conn:
        release, _ = releases.add_release(
            conn, store, manifest_bytes=manifest_bytes, signature=signature,
            trusted_keys=parse_public_keys(public_line), open_artifact=lambda: io.BytesIO(artifact.read_bytes()),
            source="test", actor="test",
        )
    return release


def enroll(database, count: int, *, group: str = "", version: str = "1.0.0") -> list[uuid.UUID]:
    with database.transaction() as conn:
        _, secret = enrollment.create_token(conn, created_by="test", group=group)
    ids = []
    for _ in range(count):
        facts = agents.HostFacts(
            hostname="host", machine_id=f"machine-{uuid.uuid4().hex}", os_name="linux", os_version="12",
            architecture="x86_64", agent_version=version, addresses=(), labels={},
        )
        with database.transaction() as conn:
            agent, _ = agents.register_agent(conn, token_secret=secret, facts=facts)
        ids.append(agent.id)
    return ids


def create(database, **overrides):
    settings = dict(target_version="2.0.0", selection=Selection(), waves=[50, 100], max_parallel=10,
                    failure_threshold_percent=20, agent_timeout_seconds=300, created_by="test")
    settings.update(overrides)
    with database.transaction() as conn:
        return rollouts.create_rollout(conn, **settings)


def step(database, rollout_id, *, online=lambda agent_id: True, now=NOW):
    with database.transaction() as conn:
        return rollouts.advance_rollout(conn, rollout_id, is_online=online, now=now)


def report(database, rollout_id, agent_id, state, version="2.0.0", reason=""):
    with database.transaction() as conn:
        return rollouts.record_agent_update(conn, rollout_id, agent_id, state=state, agent_version=version, reason=reason)


def states(database, rollout_id) -> dict[uuid.UUID, AgentUpdateState]:
    with database.transaction() as conn:
        return {a.agent_id: a.state for a in rollouts.list_rollout_agents(conn, rollout_id)}


def test_two_waves_complete(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    ids = enroll(database, 4)
    rollout, count = create(database)

    rollout, first = step(database, rollout.id)
    for notice in first:
        report(database, rollout.id, notice.agent_id, AgentUpdateState.SUCCEEDED)
    rollout, second = step(database, rollout.id)
    for notice in second:
        report(database, rollout.id, notice.agent_id, AgentUpdateState.SUCCEEDED)
    rollout, third = step(database, rollout.id)

    assert count == 4
    assert len(first) == 2
    assert len(second) == 2
    assert {n.agent_id for n in first} | {n.agent_id for n in second} == set(ids)
    assert third == []
    assert rollout.state == RolloutState.COMPLETED
    with database.transaction() as conn:
        assert {agents.get_agent(conn, agent_id).agent_version for agent_id in ids} == {"2.0.0"}


def test_wave_waits_for_in_flight_agents(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 4)
    rollout, _ = create(database)

    _, first = step(database, rollout.id)
    report(database, rollout.id, first[0].agent_id, AgentUpdateState.SUCCEEDED)
    rollout, again = step(database, rollout.id)

    assert again == []
    assert rollout.current_wave == 0


def test_max_parallel_limits_notices(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 5)
    rollout, _ = create(database, waves=[100], max_parallel=2)

    _, first = step(database, rollout.id)
    _, none = step(database, rollout.id)
    report(database, rollout.id, first[0].agent_id, AgentUpdateState.SUCCEEDED)
    _, next_one = step(database, rollout.id)

    assert len(first) == 2
    assert none == []
    assert len(next_one) == 1


def test_each_agent_notified_once(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 3)
    rollout, _ = create(database, waves=[100])

    notified = []
    for _ in range(5):
        notified += [n.agent_id for n in step(database, rollout.id)[1]]

    assert len(notified) == 3
    assert len(set(notified)) == 3


def test_silent_agent_times_out(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 1)
    rollout, _ = create(database, waves=[100], agent_timeout_seconds=60, failure_threshold_percent=100)

    _, notices = step(database, rollout.id)
    rollout, _ = step(database, rollout.id, now=NOW + datetime.timedelta(seconds=61))

    assert states(database, rollout.id)[notices[0].agent_id] == AgentUpdateState.TIMED_OUT
    assert rollout.state == RolloutState.COMPLETED


def test_failures_over_threshold_pause(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 4)
    rollout, _ = create(database, failure_threshold_percent=40)

    _, first = step(database, rollout.id)
    report(database, rollout.id, first[0].agent_id, AgentUpdateState.ROLLED_BACK, reason="did not start")
    report(database, rollout.id, first[1].agent_id, AgentUpdateState.SUCCEEDED)
    rollout, notices = step(database, rollout.id)

    assert rollout.state == RolloutState.PAUSED
    assert "1 of 2 agents failed" in rollout.state_reason
    assert notices == []
    assert sorted(states(database, rollout.id).values()).count(AgentUpdateState.PENDING) == 2


def test_resume_continues_paused_rollout(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 2)
    rollout, _ = create(database)
    with database.transaction() as conn:
        rollouts.pause_rollout(conn, rollout.id, actor="op")

    _, while_paused = step(database, rollout.id)
    with database.transaction() as conn:
        resumed = rollouts.resume_rollout(conn, rollout.id, actor="op")
    _, after = step(database, rollout.id)

    assert while_paused == []
    assert resumed.state == RolloutState.RUNNING
    assert len(after) == 1


def test_offline_agent_updated_when_back(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    ids = enroll(database, 2)
    rollout, _ = create(database, waves=[100])
    offline = ids[0]

    _, first = step(database, rollout.id, online=lambda agent_id: agent_id != offline)
    report(database, rollout.id, first[0].agent_id, AgentUpdateState.SUCCEEDED)
    rollout, waiting = step(database, rollout.id, online=lambda agent_id: agent_id != offline)
    rollout_back, back = step(database, rollout.id)

    assert [n.agent_id for n in first] == [ids[1]]
    assert waiting == []
    assert rollout.state == RolloutState.RUNNING
    assert [n.agent_id for n in back] == [offline]


def test_reports_are_idempotent(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 1)
    rollout, _ = create(database, waves=[100])
    _, notices = step(database, rollout.id)
    agent_id = notices[0].agent_id

    assert report(database, rollout.id, agent_id, AgentUpdateState.DOWNLOADING) is True
    assert report(database, rollout.id, agent_id, AgentUpdateState.DOWNLOADING) is False
    assert report(database, rollout.id, agent_id, AgentUpdateState.SUCCEEDED) is True
    assert report(database, rollout.id, agent_id, AgentUpdateState.FAILED) is False
    assert states(database, rollout.id)[agent_id] == AgentUpdateState.SUCCEEDED


def test_success_with_wrong_version_is_failure(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 1)
    rollout, _ = create(database, waves=[100])
    _, notices = step(database, rollout.id)

    report(database, rollout.id, notices[0].agent_id, AgentUpdateState.SUCCEEDED, version="1.0.0")

    assert states(database, rollout.id)[notices[0].agent_id] == AgentUpdateState.FAILED


def test_selection_by_group_and_up_to_date_agents_skipped(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    web = enroll(database, 2, group="web")
    enroll(database, 2, group="db")
    enroll(database, 1, group="web", version="2.0.0")

    rollout, count = create(database, selection=Selection(group="web"))

    assert count == 2
    assert set(states(database, rollout.id)) == set(web)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"waves": [50, 40, 100]}, InvalidArgument),
        ({"waves": [10, 50]}, InvalidArgument),
        ({"max_parallel": 0}, InvalidArgument),
        ({"failure_threshold_percent": 101}, InvalidArgument),
        ({"target_version": "9.9.9"}, NotFound),
        ({"selection": Selection(group="nobody")}, FailedPrecondition),
    ],
)
def test_invalid_rollouts_rejected(database, tmp_path, overrides, error):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 1)

    with pytest.raises(error):
        create(database, **overrides)


def test_abort_is_final(database, tmp_path):
    add_release(database, tmp_path, "2.0.0")
    enroll(database, 1)
    rollout, _ = create(database)
    with database.transaction() as conn:
        aborted = rollouts.abort_rollout(conn, rollout.id, actor="op")

    with pytest.raises(InvalidState, match="allowed states: paused"):
        with database.transaction() as conn:
            rollouts.resume_rollout(conn, rollout.id, actor="op")
    assert aborted.state == RolloutState.ABORTED
    assert step(database, rollout.id)[1] == []


def test_worker_killed_mid_rollout_resumes(service_env, tmp_path):
    """A real updater worker, SIGKILLed mid-rollout and replaced: every agent is notified once.

    The test plays the gateway through its Redis interface: it marks agents as
    connected, listens on its own gateway channel and reports their progress.
    """
    import json
    import signal

    import redis as redis_module

    from services.core.database import Database
    from services.core.keys import gateway_channel, session_key
    from tests.support import run_program, start_updater, stop_process, wait_until

    assert run_program("services.migrate", service_env).returncode == 0
    database = Database(service_env["AGENTMGR_DATABASE_URL"], max_connections=2)
    client = redis_module.Redis.from_url(service_env["AGENTMGR_REDIS_URL"])
    try:
        add_release(database, tmp_path, "2.0.0")
        ids = enroll(database, 6)
        for agent_id in ids:
            client.set(session_key(agent_id), "test-gateway")
        listener = client.pubsub()
        listener.subscribe(gateway_channel("test-gateway"))
        rollout, _ = create(database, waves=[50, 100], max_parallel=2, failure_threshold_percent=50)

        worker = start_updater(service_env, tmp_path / "first.log")
        notices: list[str] = []

        def collect() -> None:
            while (message := listener.get_message(timeout=0.1)) is not None:
                if message["type"] == "message":
                    payload = json.loads(message["data"])
                    assert payload["kind"] == "update_notice"
                    notices.append(payload["agent_id"])

        def finish_notified() -> None:
            collect()
            for agent_id in set(notices):
                report(database, rollout.id, uuid.UUID(agent_id), AgentUpdateState.SUCCEEDED)

        wait_until(lambda: collect() or len(notices) >= 2, timeout=60, what="the first notices")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        finish_notified()
        worker = start_updater(service_env, tmp_path / "second.log")
        try:
            def completed() -> bool:
                finish_notified()
                with database.transaction() as conn:
                    return rollouts.get_rollout(conn, rollout.id).state == RolloutState.COMPLETED

            wait_until(completed, timeout=120, interval=0.5, what="the rollout to complete")
        finally:
            stop_process(worker)

        assert sorted(notices) == sorted(str(agent_id) for agent_id in ids)
        assert set(states(database, rollout.id).values()) == {AgentUpdateState.SUCCEEDED}
    finally:
        client.close()
        database.close()
