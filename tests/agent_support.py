"""Real programs for the agent tests: a migrated database, the gateway process, the agent CLI.

The gateway runs as ``python -m services.grpc_gateway`` over TLS on a loopback
port; the agent runs as the installed ``agentmgr-agent`` console script.
Operators' actions go through the gateway's real PanelService, so commands
are routed exactly as in production.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from agentmanager.v1 import panel_pb2, panel_pb2_grpc
from services.core.database import Database
from services.core.fleet import apitokens, enrollment
from services.core.fleet.models import ApiRole
from services.core.keys import LAST_SEEN_KEY
from tests.support import PROJECT_ROOT, VENV_BIN, json_lines, run_program, wait_until

AGENT_SCRIPT = VENV_BIN / "agentmgr-agent"

HEARTBEAT_SECONDS = 1.0
"""Heartbeat interval the test gateways announce, short so the tests run quickly."""

GATEWAY_SETTINGS = {
    "AGENTMGR_HEARTBEAT_INTERVAL_SECONDS": str(HEARTBEAT_SECONDS),
    "AGENTMGR_OFFLINE_AFTER_SECONDS": "10",
    "AGENTMGR_LIVENESS_FLUSH_SECONDS": "0.5",
    "AGENTMGR_GRPC_SHUTDOWN_GRACE_SECONDS": "1",
    "AGENTMGR_COMMAND_OUTPUT_MAX_BYTES": "4096",
}
OUTPUT_CAP_BYTES = 4096

# Settings of every test agent: fast reconnects, a short kill grace, no inherited folders.
AGENT_SETTINGS = {
    "AGENTMGR_AGENT_BACKOFF_BASE_SECONDS": "0.2",
    "AGENTMGR_AGENT_BACKOFF_CAP_SECONDS": "1",
    "AGENTMGR_AGENT_KILL_GRACE_SECONDS": "1",
    "AGENTMGR_AGENT_LOG_LEVEL": "DEBUG",
}


class GatewayProcess:
    """``python -m services.grpc_gateway`` on the address in ``env``, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.address = env["AGENTMGR_GRPC_ADDRESS"]
        self.home = Path(env["AGENTMGR_HOME"])

    def start(self) -> None:
        """Start the gateway and wait for its ``listening`` line."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.grpc_gateway"],
            env=self.env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"),
        )
        wait_until(lambda: self._listening(offset), timeout=60, what=f"the gateway on {self.address}")

    def _listening(self, offset: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return b'"listening: ' in log.read()

    def kill(self) -> None:
        """Kill the gateway with SIGKILL, as a crash would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def ca_pem(self) -> bytes:
        return (self.home / "tls" / "ca.pem").read_bytes()

    @property
    def ca_fingerprint(self) -> str:
        from services.core.tls import certificate_fingerprint

        return certificate_fingerprint(self.ca_pem)


class AgentHost:
    """One simulated host: its own config and state folders for the real agent CLI."""

    def __init__(self, root: Path, *, machine_id: str) -> None:
        self.root = root
        self.config_dir = root / "etc" / "agentmgr-agent"
        self.state_dir = root / "var" / "agentmgr-agent"
        self.env = {**os.environ, **AGENT_SETTINGS, "AGENTMGR_AGENT_MACHINE_ID": machine_id}
        for name in ("AGENTMGR_AGENT_CONFIG_DIR", "AGENTMGR_AGENT_STATE_DIR", "AGENTMGR_AGENT_LOG_DIR", "AGENTMGR_AGENT_TOKEN"):
            self.env.pop(name, None)
        self.process: subprocess.Popen | None = None

    def folders(self) -> list[str]:
        return ["--config-dir", str(self.config_dir), "--state-dir", str(self.state_dir)]

    def cli(self, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``agentmgr-agent COMMAND --config-dir ... --state-dir ... ARGS`` and return it finished."""
        return subprocess.run(
            [str(AGENT_SCRIPT), command, *self.folders(), *args],
            env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
        )

    def install(self, gateway: GatewayProcess, token: str, *args: str) -> subprocess.CompletedProcess:
        return self.cli(
            "install", "--manager", gateway.address, "--token", token, "--ca-fingerprint", gateway.ca_fingerprint, *args
        )

    def start(self) -> None:
        """Start ``agentmgr-agent run`` in the background."""
        self.process = subprocess.Popen(
            [str(AGENT_SCRIPT), "run", *self.folders()],
            env=self.env, cwd=self.root, stdout=subprocess.DEVNULL, stderr=open(self.root / "run.stderr", "ab"),
        )

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    @property
    def agent_id(self) -> str:
        return json.loads((self.config_dir / "config.json").read_text())["agent_id"]

    def status(self) -> dict[str, Any]:
        """Return ``agentmgr-agent status --output json``."""
        finished = self.cli("status", "--output", "json")
        assert finished.returncode == 0, finished.stderr
        return json.loads(finished.stdout)

    def connection_state(self) -> str | None:
        path = self.state_dir / "status.json"
        return json.loads(path.read_text())["state"] if path.exists() else None

    def wait_connected(self, timeout: float = 30) -> None:
        wait_until(
            lambda: self.check_alive() and self.connection_state() == "connected",
            timeout=timeout, what=f"the agent in {self.root} to connect",
        )

    def check_alive(self) -> bool:
        """Return True while ``run`` is running; raise with the log's tail once it exited."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the agent exited with {self.process.returncode}: {self.log_text()[-3000:]}")
        return True

    def log_text(self) -> str:
        path = self.state_dir / "log" / "agent.log"
        return path.read_text() if path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        return json_lines(self.log_text())


def migrate(env: dict[str, str]) -> None:
    finished = run_program("services.migrate", env)
    assert finished.returncode == 0, finished.stderr


def create_enrollment_token(database_url: str, **options: Any) -> str:
    """Create an enrollment token with the fleet functions and return its secret."""
    database = Database(database_url, max_connections=1, application_name="agentmgr-test")
    try:
        with database.transaction() as connection:
            _, secret = enrollment.create_token(connection, created_by="test", **options)
    finally:
        database.close()
    return secret


def create_api_token(database_url: str, role: ApiRole = ApiRole.ADMIN) -> str:
    database = Database(database_url, max_connections=1, application_name="agentmgr-test")
    try:
        with database.transaction() as connection:
            _, secret = apitokens.create_api_token(connection, name="agent-tests", role=role, created_by="test")
    finally:
        database.close()
    return secret


class Panel:
    """The gateway's PanelService over TLS, as an operator with an API token."""

    def __init__(self, gateway: GatewayProcess, api_token: str) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=gateway.ca_pem)
        self.channel = grpc.secure_channel(gateway.address, credentials)
        self.stub = panel_pb2_grpc.PanelServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_token}"),)

    def run_command(self, agent_id: str, command_line: str, *, timeout_seconds: float = 30, wait_seconds: float = 0) -> panel_pb2.Command:
        request = panel_pb2.RunCommandRequest(agent_id=agent_id, command_line=command_line, reason="agent test")
        request.timeout.FromTimedelta(datetime.timedelta(seconds=timeout_seconds))
        if wait_seconds:
            request.wait.FromTimedelta(datetime.timedelta(seconds=wait_seconds))
        return self.stub.RunCommand(request, metadata=self.metadata, timeout=wait_seconds + 30)

    def get_command(self, command_id: str) -> panel_pb2.Command:
        return self.stub.GetCommand(panel_pb2.GetCommandRequest(command_id=command_id), metadata=self.metadata, timeout=30)

    def wait_final(self, command_id: str, *, timeout: float = 60) -> panel_pb2.Command:
        """Poll GetCommand until the command is in a final state and return it."""
        final = {"COMMAND_STATE_SUCCEEDED", "COMMAND_STATE_FAILED", "COMMAND_STATE_TIMED_OUT",
                 "COMMAND_STATE_EXPIRED", "COMMAND_STATE_CANCELLED"}

        def check() -> panel_pb2.Command | None:
            command = self.get_command(command_id)
            return command if state_name(command) in final else None

        return wait_until(check, timeout=timeout, interval=0.2, what=f"command {command_id} to finish")

    def get_agent(self, agent_id: str) -> panel_pb2.Agent:
        return self.stub.GetAgent(panel_pb2.GetAgentRequest(agent_id=agent_id), metadata=self.metadata, timeout=30)

    def delete_agent(self, agent_id: str) -> panel_pb2.DeleteAgentResponse:
        request = panel_pb2.DeleteAgentRequest(agent_id=agent_id, reason="agent test")
        return self.stub.DeleteAgent(request, metadata=self.metadata, timeout=30)

    def close(self) -> None:
        self.channel.close()


def state_name(command: panel_pb2.Command) -> str:
    from agentmanager.v1 import common_pb2

    return common_pb2.CommandState.Name(command.state)


def last_seen(redis_url: str, agent_id: str) -> float | None:
    """Return the Unix time of the agent's last heartbeat that the gateway wrote to Redis."""
    client = redis.Redis.from_url(redis_url)
    try:
        return client.zscore(LAST_SEEN_KEY, agent_id)
    finally:
        client.close()


def start_gateway(env: dict[str, str], home: Path) -> GatewayProcess:
    migrate(env)
    process = GatewayProcess(env, home / "grpc_gateway.log")
    process.start()
    return process


@pytest.fixture
def gateway(service_env: dict[str, str], home: Path) -> Iterator[GatewayProcess]:
    """A migrated database and a running gateway, with the TLS files it generates itself."""
    process = start_gateway({**service_env, **GATEWAY_SETTINGS}, home)
    yield process
    process.stop()


@pytest.fixture
def panel(gateway: GatewayProcess, database_url: str) -> Iterator[Panel]:
    client = Panel(gateway, create_api_token(database_url))
    yield client
    client.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[AgentHost]:
    """A host with its own folders; its agent process is stopped at the end."""
    agent_host = AgentHost(tmp_path, machine_id=f"test-{uuid.uuid4().hex}")
    yield agent_host
    agent_host.stop()
