"""``agentmgr-agent install``, ``status`` and ``uninstall`` against a real gateway over TLS."""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from services.core.database import Database
from services.core.fleet import agents
from tests.agent_support import (
    AGENT_SCRIPT,
    AgentHost,
    GatewayProcess,
    Panel,
    create_enrollment_token,
    gateway,  # noqa: F401 - fixture
    host,  # noqa: F401 - fixture
    panel,  # noqa: F401 - fixture
    state_name,
)
from tests.support import PROJECT_ROOT, free_port

WRONG_FINGERPRINT = "sha256:" + "0" * 64


def fleet_agent(database_url: str, agent_id: str) -> agents.Agent:
    database = Database(database_url, max_connections=1, application_name="agentmgr-test")
    try:
        with database.transaction() as connection:
            return agents.get_agent(connection, uuid.UUID(agent_id))
    finally:
        database.close()


def count_agents(database_url: str) -> int:
    database = Database(database_url, max_connections=1, application_name="agentmgr-test")
    try:
        with database.transaction() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM agents")
            return cursor.fetchone()[0]
    finally:
        database.close()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_wrong_fingerprint_writes_nothing(gateway: GatewayProcess, host: AgentHost, database_url: str) -> None:
    token = create_enrollment_token(database_url)

    finished = host.cli("install", "--manager", gateway.address, "--token", token, "--ca-fingerprint", WRONG_FINGERPRINT)

    assert finished.returncode == 5, finished.stderr
    assert WRONG_FINGERPRINT in finished.stderr
    assert "nothing was written" in finished.stderr
    # The real fingerprint is not offered for copying, which would defeat the pin.
    assert gateway.ca_fingerprint not in finished.stderr
    assert not host.config_dir.exists()
    assert count_agents(database_url) == 0


def test_install_registers_and_stores_credentials(gateway: GatewayProcess, host: AgentHost, database_url: str) -> None:
    token = create_enrollment_token(database_url, labels={"site": "lab"})

    finished = host.install(gateway, token, "--label", "role=web")

    assert finished.returncode == 0, finished.stderr
    agent_id = finished.stdout.strip()
    assert agent_id == host.agent_id
    assert f"agentmgr-agent run --config-dir {host.config_dir}" in finished.stderr
    assert mode_of(host.config_dir) == 0o700
    assert mode_of(host.config_dir / "agent.key") == 0o600
    assert mode_of(host.config_dir / "config.json") == 0o600
    assert (host.config_dir / "ca.pem").read_bytes() == gateway.ca_pem
    key = (host.config_dir / "agent.key").read_text()
    assert key.startswith("amkey_")
    assert key.strip() not in finished.stdout + finished.stderr
    assert "installed: agent" in host.log_text()
    assert key.strip() not in host.log_text()
    assert token not in host.log_text()

    agent = fleet_agent(database_url, agent_id)
    assert agent.machine_id == host.env["AGENTMGR_AGENT_MACHINE_ID"]
    assert agent.labels == {"role": "web", "site": "lab"}
    assert agent.revoked_at is None


def test_second_install_needs_replace(gateway: GatewayProcess, host: AgentHost, database_url: str) -> None:
    token = create_enrollment_token(database_url)
    first = host.install(gateway, token)
    assert first.returncode == 0, first.stderr
    first_key = (host.config_dir / "agent.key").read_text()

    rejected = host.install(gateway, token)

    assert rejected.returncode == 4, rejected.stderr
    assert "--replace" in rejected.stderr
    assert first.stdout.strip() in rejected.stderr
    assert (host.config_dir / "agent.key").read_text() == first_key
    assert count_agents(database_url) == 1

    replaced = host.install(gateway, token, "--replace")

    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.strip() != first.stdout.strip()
    assert host.agent_id == replaced.stdout.strip()
    assert (host.config_dir / "agent.key").read_text() != first_key
    assert fleet_agent(database_url, first.stdout.strip()).revoked_at is not None
    assert fleet_agent(database_url, replaced.stdout.strip()).revoked_at is None


def test_install_machine_with_agent_needs_replace(gateway: GatewayProcess, host: AgentHost, tmp_path: Path, database_url: str) -> None:
    token = create_enrollment_token(database_url)
    assert host.install(gateway, token).returncode == 0
    # The same machine, installed again into a fresh config folder.
    clone = AgentHost(tmp_path / "clone", machine_id=host.env["AGENTMGR_AGENT_MACHINE_ID"])
    clone.root.mkdir()

    rejected = clone.install(gateway, token)

    assert rejected.returncode == 7, rejected.stderr
    assert "ALREADY_EXISTS" in rejected.stderr
    assert "--replace" in rejected.stderr
    assert not (clone.config_dir / "config.json").exists()


def test_install_bad_token_rejected(gateway: GatewayProcess, host: AgentHost) -> None:
    finished = host.install(gateway, "amenr_not-a-real-token")

    assert finished.returncode == 7, finished.stderr
    assert "UNAUTHENTICATED" in finished.stderr
    assert not (host.config_dir / "config.json").exists()


def test_install_unreachable_manager(host: AgentHost) -> None:
    address = f"127.0.0.1:{free_port()}"

    finished = host.cli("install", "--manager", address, "--token", "amenr_x", "--ca-fingerprint", WRONG_FINGERPRINT)

    assert finished.returncode == 6, finished.stderr
    assert address in finished.stderr
    assert not host.config_dir.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--manager", "no-port", "--token", "t", "--ca-fingerprint", WRONG_FINGERPRINT], "invalid manager address"),
        (["--manager", "127.0.0.1:1", "--token", "t", "--ca-fingerprint", "md5:abc"], "invalid --ca-fingerprint"),
        (["--manager", "127.0.0.1:1", "--token", "t"], "missing CA pin"),
        (["--manager", "127.0.0.1:1", "--ca-fingerprint", WRONG_FINGERPRINT], "missing enrollment token"),
        (["--manager", "127.0.0.1:1", "--token", "t", "--ca-fingerprint", WRONG_FINGERPRINT, "--label", "Bad Key=x"], "invalid --label"),
    ],
)
def test_install_invalid_arguments(host: AgentHost, arguments: list[str], message: str) -> None:
    finished = host.cli("install", *arguments)

    assert finished.returncode == 2, finished.stderr
    assert message in finished.stderr
    assert not host.config_dir.exists()


def test_install_with_ca_file(gateway: GatewayProcess, host: AgentHost, tmp_path: Path, database_url: str) -> None:
    ca_file = tmp_path / "manager-ca.pem"
    ca_file.write_bytes(gateway.ca_pem)
    token = create_enrollment_token(database_url)

    mismatch = host.cli(
        "install", "--manager", gateway.address, "--token", token,
        "--ca-file", str(ca_file), "--ca-fingerprint", WRONG_FINGERPRINT,
    )
    assert mismatch.returncode == 5, mismatch.stderr
    assert not host.config_dir.exists()

    finished = host.cli("install", "--manager", gateway.address, "--token", token, "--ca-file", str(ca_file))

    assert finished.returncode == 0, finished.stderr
    assert (host.config_dir / "ca.pem").read_bytes() == gateway.ca_pem


def test_status_and_uninstall(gateway: GatewayProcess, host: AgentHost, database_url: str) -> None:
    assert host.install(gateway, create_enrollment_token(database_url)).returncode == 0

    report = host.status()

    assert report["manager"] == gateway.address
    assert report["agent_id"] == host.agent_id
    assert report["version"]
    assert report["connection_state"] == "never_run"

    removed = host.cli("uninstall")

    assert removed.returncode == 0, removed.stderr
    assert not (host.config_dir / "config.json").exists()
    assert not (host.config_dir / "agent.key").exists()
    assert "DeleteAgent" in removed.stderr
    after = host.cli("status")
    assert after.returncode == 3
    assert "agentmgr-agent install" in after.stderr


def test_readme_first_session(gateway: GatewayProcess, host: AgentHost, panel: Panel, service_env: dict[str, str]) -> None:
    """Create a token with the CLI, paste its install line, run the agent, run a command."""
    created = subprocess.run(
        [str(AGENT_SCRIPT.parent / "agentmgr"), "--output", "json", "token", "create", "--manager", gateway.address],
        env={**host.env, **service_env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert created.returncode == 0, created.stderr
    install_line = json.loads(created.stdout)["install_command"]
    argv = shlex.split(install_line)
    assert argv[:2] == ["agentmgr-agent", "install"]

    installed = subprocess.run(
        [str(AGENT_SCRIPT), *argv[1:], *host.folders()],
        env=host.env, cwd=host.root, capture_output=True, text=True, timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    host.start()
    host.wait_connected()

    command = panel.run_command(host.agent_id, "uname -s", wait_seconds=20)
    command = panel.wait_final(command.id)

    assert state_name(command) == "COMMAND_STATE_SUCCEEDED"
    assert command.stdout == b"Linux\n"
