"""Agent self-update end to end: the real updater worker, gateway and agents as processes.

The agents start with the agent of this checkout (``V1``, the code
``agentmgr-agent`` was installed with). Each release is a build of the same
code with another ``__version__``, packed, signed and published by the test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import agent
from agent.releases import generate_key_pair, load_private_key, manifest_for, parse_public_keys, sign_manifest
from agent.versions import ArtifactError, PendingUpdate, VersionStore, extract_artifact
from services.core.database import Database
from services.core.fleet import agents, releases, rollouts
from services.core.fleet.rollouts import AgentUpdateState, RolloutState
from services.core.settings import Settings
from tests.agent_support import GATEWAY_SETTINGS, AgentHost, GatewayProcess, create_enrollment_token, start_gateway
from tests.support import PROJECT_ROOT, VENV_BIN, RedisServer, free_port, wait_until

V1 = agent.__version__
HEALTH_TIMEOUT_SECONDS = 120
"""The agents' trial time for a new version: below the rollouts' agent timeout, and long enough for a
heavily loaded test machine to start a new version. A build that raises at import exits long before it,
so no test waits for it to pass."""
AGENT_TIMEOUT_SECONDS = 300
ROLLOUT_WAIT_SECONDS = 300
CONNECT_WAIT_SECONDS = 120


# Building and publishing releases.


BREAKAGES = {
    "raises": '\nraise RuntimeError("this build cannot start")\n',
    "hangs": "\nimport time\ntime.sleep(3600)\n",
}
"""Code appended to a broken build's ``agent/__init__.py``, so that it fails at import."""


def build_release(folder: Path, version: str, *, broken: str = "") -> Path:
    """Pack this checkout's agent as ``version``; ``broken`` names an entry of ``BREAKAGES`` to build in."""
    source = folder / f"src-{version}"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PROJECT_ROOT / "agent", source / "agent", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "agentmanager", source / "agentmanager", ignore=ignore)
    init = source / "agent" / "__init__.py"
    text, count = re.subn(r'^__version__ = ".*"$', f'__version__ = "{version}"', init.read_text(), flags=re.MULTILINE)
    assert count == 1
    text += BREAKAGES[broken] if broken else ""
    init.write_text(text)
    artifact = folder / f"agentmgr-agent-{version}.tar.gz"
    with tarfile.open(artifact, "w:gz") as archive:
        archive.add(source / "agent", arcname="agent")
        archive.add(source / "agentmanager", arcname="agentmanager")
    return artifact


def agentmgr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "agentmgr"), "-o", "json", *args],
        env={**os.environ, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )


class UpdateStack:
    """A publisher key the manager trusts, a gateway and the updater worker, shared by this module's tests."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.root = root
        self.keys = root / "keys"
        self.env = {**env, **GATEWAY_SETTINGS, "AGENTMGR_UPDATES_TRUSTED_KEYS_FILE": str(root / "trusted.pub")}
        keygen = agentmgr(self.env, "release", "keygen", "--out", str(self.keys))
        assert keygen.returncode == 0, keygen.stderr
        (root / "trusted.pub").write_text((self.keys / "publisher.pub").read_text())
        self.gateway: GatewayProcess = start_gateway(self.env, Path(env["AGENTMGR_HOME"]))
        self.updater_log = root / "updater.log"
        self.updater = subprocess.Popen(
            [sys.executable, "-m", "services.updater"], env={**os.environ, **self.env}, cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL, stderr=open(self.updater_log, "wb"),
        )
        wait_until(lambda: b"listening: queue updates" in self.updater_log.read_bytes(), timeout=180, what="the updater to listen")
        self.database = Database(env["AGENTMGR_DATABASE_URL"], max_connections=1, application_name="agentmgr-test")

    def publish(self, artifact: Path, version: str) -> None:
        """Sign ``artifact`` with the trusted key and publish it, as a release manager would."""
        signed = agentmgr(self.env, "release", "sign", str(artifact), "--key", str(self.keys / "publisher.key"), "--version", version)
        assert signed.returncode == 0, signed.stderr
        published = agentmgr(self.env, "updates", "publish", str(artifact))
        assert published.returncode == 0, published.stderr

    def release(self, version: str) -> releases.Release:
        with self.database.transaction() as conn:
            release = releases.find_release(conn, version, "linux", "any")
        assert release is not None
        return release

    def close(self) -> None:
        self.updater.send_signal(signal.SIGTERM)
        self.updater.wait(timeout=60)
        self.gateway.stop()
        self.database.close()


class Fleet:
    """The agents of one test: a group of their own, so that each rollout selects only them."""

    def __init__(self, stack: UpdateStack, root: Path) -> None:
        self.stack = stack
        self.root = root
        self.group = f"g{uuid.uuid4().hex[:8]}"
        self.token = create_enrollment_token(stack.env["AGENTMGR_DATABASE_URL"], group=self.group)
        self.hosts: list[AgentHost] = []

    def add_host(self, *, start: bool = True, health_timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> AgentHost:
        """Install an agent of this group and, with ``start``, run it until its session is open."""
        folder = self.root / f"host{len(self.hosts)}"
        folder.mkdir()
        host = AgentHost(folder, machine_id=f"test-{uuid.uuid4().hex}")
        host.env["AGENTMGR_AGENT_UPDATE_HEALTH_TIMEOUT_SECONDS"] = str(health_timeout_seconds)
        self.hosts.append(host)
        installed = host.install(self.stack.gateway, self.token)
        assert installed.returncode == 0, installed.stderr
        if start:
            host.start()
            host.wait_connected(timeout=CONNECT_WAIT_SECONDS)
        return host

    def start_rollout(self, version: str, *, waves: str = "100", failure_threshold: str = "0") -> uuid.UUID:
        result = agentmgr(
            self.stack.env, "updates", "rollout", version, "--group", self.group, "--waves", waves, "--max-parallel", "10",
            "--failure-threshold", failure_threshold, "--agent-timeout", str(AGENT_TIMEOUT_SECONDS),
        )
        assert result.returncode == 0, result.stderr
        return uuid.UUID(json.loads(result.stdout)["rollout_id"])

    def rollout(self, rollout_id: uuid.UUID) -> rollouts.Rollout:
        with self.stack.database.transaction() as conn:
            return rollouts.get_rollout(conn, rollout_id)

    def members(self, rollout_id: uuid.UUID) -> dict[str, rollouts.RolloutAgent]:
        with self.stack.database.transaction() as conn:
            return {str(member.agent_id): member for member in rollouts.list_rollout_agents(conn, rollout_id)}

    def wait_rollout(self, rollout_id: uuid.UUID, state: RolloutState) -> rollouts.Rollout:
        def reached() -> rollouts.Rollout | None:
            for host in self.hosts:
                host.check_alive()
            rollout = self.rollout(rollout_id)
            if rollout.state != state and rollout.state in rollouts.FINAL_ROLLOUT_STATES | {RolloutState.PAUSED}:
                raise AssertionError(f"rollout {rollout_id} is {rollout.state.value}, not {state.value}: {rollout.state_reason}")
            return rollout if rollout.state == state else None

        return wait_until(reached, timeout=ROLLOUT_WAIT_SECONDS, interval=0.5, what=f"rollout {rollout_id} to be {state.value}")

    def wait_member(self, rollout_id: uuid.UUID, host: AgentHost, state: AgentUpdateState) -> rollouts.RolloutAgent:
        def reached() -> rollouts.RolloutAgent | None:
            host.check_alive()
            member = self.members(rollout_id)[host.agent_id]
            if member.state != state and member.state in rollouts.FINAL_AGENT_STATES:
                raise AssertionError(f"agent {host.agent_id} ended {member.state.value}, not {state.value}: {member.error}")
            return member if member.state == state else None

        return wait_until(reached, timeout=ROLLOUT_WAIT_SECONDS, interval=0.5, what=f"agent {host.agent_id} to be {state.value}")

    def recorded_version(self, host: AgentHost) -> str:
        """Return the agent's version in the manager's agents table."""
        with self.stack.database.transaction() as conn:
            return agents.get_agent(conn, uuid.UUID(host.agent_id)).agent_version

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


def log_messages(host: AgentHost, prefix: str) -> list[str]:
    return [record["message"] for record in host.log_records() if record.get("message", "").startswith(prefix)]


def installed_versions(host: AgentHost) -> list[str]:
    folder = VersionStore(host.state_dir).versions
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def stack(postgres, redis_server, test_root) -> Iterator[UpdateStack]:
    """One migrated database, Redis database, gateway and updater for the whole module, as starting them takes seconds."""
    home = test_root / f"updates-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    home.chmod(0o755)
    database_name = f"t_{uuid.uuid4().hex[:12]}"
    # The last Redis database: the per-test fixtures of other modules start from 1.
    redis_url = redis_server.url_for(RedisServer.DATABASES - 1)
    redis.Redis.from_url(redis_url).flushdb()
    env = {
        "AGENTMGR_HOME": str(home),
        "AGENTMGR_DATABASE_URL": postgres.create_database(database_name),
        "AGENTMGR_REDIS_URL": redis_url,
        "AGENTMGR_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "AGENTMGR_LOG_LEVEL": "INFO",
        "AGENTMGR_GATEWAY_METRICS_ADDRESS": "",
        "AGENTMGR_UPDATER_METRICS_ADDRESS": "",
    }
    update_stack = UpdateStack(env, home)
    yield update_stack
    update_stack.close()
    postgres.drop_database(database_name)
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture
def fleet(stack, tmp_path) -> Iterator[Fleet]:
    agents_of_test = Fleet(stack, tmp_path)
    yield agents_of_test
    agents_of_test.stop()


# End to end. Each test publishes its own versions, because the module shares one release store.


def test_rollout_updates_agents_in_two_waves(stack, fleet) -> None:
    version = "2.0.0"
    stack.publish(build_release(fleet.root / "build", version), version)
    hosts = [fleet.add_host() for _ in range(4)]

    rollout_id = fleet.start_rollout(version, waves="50,100")
    rollout = fleet.wait_rollout(rollout_id, RolloutState.COMPLETED)
    for host in hosts:
        wait_until(lambda: host.status()["running_version"] == version and host.connection_state() == "connected",
                   timeout=CONNECT_WAIT_SECONDS, what=f"the agent in {host.root} to run {version}")

    members = fleet.members(rollout_id)
    assert rollout.state_reason == "4 of 4 agents updated"
    assert sorted(member.wave for member in members.values()) == [0, 0, 1, 1]
    assert {member.state for member in members.values()} == {AgentUpdateState.SUCCEEDED}
    for host in hosts:
        status = host.status()
        assert fleet.recorded_version(host) == version
        assert status["running_version"] == version
        assert status["selected_version"] == version
        assert status["pending_update"] is None
        assert status["trusted_publisher_keys"] == 1
        assert installed_versions(host) == [version]
        # One install per agent, although the gateway repeats the notice when the new version connects.
        assert len(log_messages(host, "updating:")) == 1
        assert len(log_messages(host, "healthy:")) == 1


def test_offline_agent_updated_on_reconnect(stack, fleet) -> None:
    version = "2.1.0"
    stack.publish(build_release(fleet.root / "build", version), version)
    online = fleet.add_host()
    offline = fleet.add_host(start=False)

    rollout_id = fleet.start_rollout(version)
    fleet.wait_member(rollout_id, online, AgentUpdateState.SUCCEEDED)
    waiting = fleet.members(rollout_id)[offline.agent_id]
    still_running = fleet.rollout(rollout_id)
    offline.start()
    rollout = fleet.wait_rollout(rollout_id, RolloutState.COMPLETED)

    assert waiting.state == AgentUpdateState.PENDING
    assert still_running.state == RolloutState.RUNNING
    assert rollout.state_reason == "2 of 2 agents updated"
    assert fleet.recorded_version(offline) == version
    wait_until(lambda: offline.status()["running_version"] == version, timeout=CONNECT_WAIT_SECONDS, what="the reconnected agent to run the update")


def test_partial_download_resumed(stack, fleet) -> None:
    version = "2.1.1"
    artifact = build_release(fleet.root / "build", version)
    stack.publish(artifact, version)
    release = stack.release(version)
    host = fleet.add_host(start=False)
    # The first half of the artifact, as a download cut short by an outage leaves it.
    store = VersionStore(host.state_dir)
    store.prepare()
    half = release.size_bytes // 2
    store.download_path(str(release.id)).write_bytes(artifact.read_bytes()[:half])
    host.start()
    host.wait_connected(timeout=CONNECT_WAIT_SECONDS)

    rollout_id = fleet.start_rollout(version)
    fleet.wait_member(rollout_id, host, AgentUpdateState.SUCCEEDED)

    assert log_messages(host, "downloading:") == [f"downloading: release {release.id} from byte {half} of {release.size_bytes}"]
    assert fleet.recorded_version(host) == version


def test_version_that_cannot_start_rolls_back(stack, fleet) -> None:
    version = "2.2.0"
    stack.publish(build_release(fleet.root / "build", version, broken="raises"), version)
    hosts = [fleet.add_host() for _ in range(2)]

    rollout_id = fleet.start_rollout(version, waves="50,100", failure_threshold="0")
    rollout = fleet.wait_rollout(rollout_id, RolloutState.PAUSED)
    members = fleet.members(rollout_id)
    rolled_back = [host for host in hosts if members[host.agent_id].state == AgentUpdateState.ROLLED_BACK]
    untouched = [host for host in hosts if members[host.agent_id].state == AgentUpdateState.PENDING]

    assert "failure threshold reached" in rollout.state_reason
    assert len(rolled_back) == 1
    assert len(untouched) == 1
    host = rolled_back[0]
    assert f"version {version} exited with status 1 before it opened a session" in members[host.agent_id].error
    host.wait_connected(timeout=CONNECT_WAIT_SECONDS)
    status = host.status()
    assert status["running_version"] == V1
    assert status["selected_version"] == "installed"
    assert status["pending_update"] is None
    assert fleet.recorded_version(host) == V1
    assert len(log_messages(host, "rolled back:")) == 1
    assert installed_versions(untouched[0]) == []


def test_version_without_session_rolls_back(stack, fleet) -> None:
    version = "2.2.1"
    stack.publish(build_release(fleet.root / "build", version, broken="hangs"), version)
    host = fleet.add_host(health_timeout_seconds=3)

    rollout_id = fleet.start_rollout(version)
    rollout = fleet.wait_rollout(rollout_id, RolloutState.PAUSED)
    member = fleet.members(rollout_id)[host.agent_id]

    assert member.state == AgentUpdateState.ROLLED_BACK
    assert f"version {version} opened no session within 3s" in member.error
    assert "failure threshold reached" in rollout.state_reason
    host.wait_connected(timeout=CONNECT_WAIT_SECONDS)
    assert host.status()["running_version"] == V1
    assert host.status()["selected_version"] == "installed"


def test_agent_rejects_tampered_and_untrusted_releases(stack, fleet) -> None:
    version, untrusted_version = "2.3.0", "2.3.1"
    stack.publish(build_release(fleet.root / "build", version), version)
    # The same size with other bytes: only the SHA-256 check can catch it.
    store = releases.store_from_settings(Settings.from_env(stack.env))
    stored = store.path_for(stack.release(version).sha256)
    tampered = bytearray(stored.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(tampered))

    # A release that the manager stores although no key pinned by the agents signed it.
    untrusted_pem, untrusted_line = generate_key_pair()
    untrusted_artifact = build_release(fleet.root / "untrusted", untrusted_version)
    manifest_bytes, signature = sign_manifest(
        load_private_key(untrusted_pem),
        manifest_for(untrusted_artifact, version=untrusted_version, os_name="linux", architecture="any"),
    )
    with stack.database.transaction() as conn:
        releases.add_release(
            conn, store, manifest_bytes=manifest_bytes, signature=signature, trusted_keys=parse_public_keys(untrusted_line),
            open_artifact=lambda: io.BytesIO(untrusted_artifact.read_bytes()), source="test", actor="test",
        )

    host = fleet.add_host()
    tampered_rollout = fleet.start_rollout(version)
    tampered_member = fleet.wait_member(tampered_rollout, host, AgentUpdateState.FAILED)
    untrusted_rollout = fleet.start_rollout(untrusted_version)
    untrusted_member = fleet.wait_member(untrusted_rollout, host, AgentUpdateState.FAILED)

    assert "has SHA-256" in tampered_member.error
    assert "does not match any trusted publisher key" in untrusted_member.error
    assert installed_versions(host) == []
    assert list(VersionStore(host.state_dir).downloads.iterdir()) == []
    assert host.status()["selected_version"] == "installed"
    assert host.status()["running_version"] == V1
    assert fleet.recorded_version(host) == V1
    assert host.check_alive()


def test_agent_without_pinned_keys_rejects_updates(stack, fleet) -> None:
    version = "2.4.0"
    stack.publish(build_release(fleet.root / "build", version), version)
    host = fleet.add_host(start=False)
    (host.config_dir / "trusted_publishers.pub").write_text("")
    host.start()
    host.wait_connected(timeout=CONNECT_WAIT_SECONDS)

    rollout_id = fleet.start_rollout(version)
    member = fleet.wait_member(rollout_id, host, AgentUpdateState.FAILED)

    assert "no publisher key is pinned" in member.error
    assert installed_versions(host) == []


# The version store alone.


def make_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def file_member(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"x = 1\n"


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


REQUIRED = [file_member("agent/__init__.py"), file_member("agent/__main__.py"), file_member("agentmanager/__init__.py")]


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (file_member("/etc/agent.py"), "absolute path"),
        (file_member("agent/../../escape.py"), "'..' part"),
        (file_member("other/module.py"), "outside the folders"),
        (link_member("agent/link.py", "/etc/passwd"), "link or a special file"),
        (link_member("agent/hard.py", "agent/__init__.py", tarfile.LNKTYPE), "link or a special file"),
    ],
    ids=["absolute", "dotdot", "outside", "symlink", "hardlink"],
)
def test_extract_rejects_unsafe_member(tmp_path, member, message) -> None:
    archive = make_archive(tmp_path / "bad.tar.gz", [*REQUIRED, member])
    destination = tmp_path / "out"
    destination.mkdir()

    with pytest.raises(ArtifactError) as error:
        extract_artifact(archive, destination)

    assert message in str(error.value)
    assert list(destination.iterdir()) == []
    assert not (tmp_path / "escape.py").exists()


def test_extract_requires_agent_entry_point(tmp_path) -> None:
    archive = make_archive(tmp_path / "partial.tar.gz", [file_member("agent/__init__.py")])

    with pytest.raises(ArtifactError) as error:
        extract_artifact(archive, tmp_path)

    assert "agent/__main__.py" in str(error.value)


def test_select_switches_and_restores(tmp_path) -> None:
    store = VersionStore(tmp_path)
    store.prepare()
    for version in ("1.0.0", "2.0.0"):
        store.install(make_archive(tmp_path / f"{version}.tar.gz", REQUIRED), version)

    store.select("1.0.0")
    first = store.current_version()
    store.select("2.0.0")
    second = store.current_version()
    store.select(None)

    assert first == "1.0.0"
    assert second == "2.0.0"
    assert store.current_version() is None
    with pytest.raises(FileNotFoundError):
        store.select("3.0.0")


def test_clear_pending_keeps_newer_record(tmp_path) -> None:
    store = VersionStore(tmp_path)
    store.prepare()
    newer = PendingUpdate(rollout_id=str(uuid.uuid4()), release_id=str(uuid.uuid4()), version="3.0.0",
                          previous_version="2.0.0", switched_at=0.0)
    store.write_pending(newer)

    store.clear_pending(str(uuid.uuid4()))
    kept = store.read_pending()
    store.clear_pending(newer.rollout_id)

    assert kept == newer
    assert store.read_pending() is None


def test_prune_keeps_selected_pending_and_temporary(tmp_path) -> None:
    store = VersionStore(tmp_path)
    store.prepare()
    for version in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        store.install(make_archive(tmp_path / f"{version}.tar.gz", REQUIRED), version)
    (store.versions / ".5.0.0.1234.tmp").mkdir()
    store.select("2.0.0")
    store.write_pending(PendingUpdate(rollout_id=str(uuid.uuid4()), release_id=str(uuid.uuid4()), version="3.0.0",
                                      previous_version="2.0.0", switched_at=0.0))

    removed = store.prune_versions({"1.0.0"})

    assert removed == ["4.0.0"]
    assert sorted(path.name for path in store.versions.iterdir()) == [".5.0.0.1234.tmp", "1.0.0", "2.0.0", "3.0.0"]
