"""``agentmgr-agent run`` against a real gateway: liveness, commands, outages and revocation."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from services.core.database import Database
from services.core.fleet import commands
from tests.agent_support import (
    HEARTBEAT_SECONDS,
    OUTPUT_CAP_BYTES,
    AgentHost,
    GatewayProcess,
    Panel,
    create_enrollment_token,
    gateway,  # noqa: F401 - fixture
    host,  # noqa: F401 - fixture
    last_seen,
    panel,  # noqa: F401 - fixture
    state_name,
)
from tests.support import wait_until

from agentmanager.v1 import common_pb2, panel_pb2


def start_agent(gateway: GatewayProcess, host: AgentHost, database_url: str) -> str:
    """Install and start the agent; return its id once its session is open."""
    installed = host.install(gateway, create_enrollment_token(database_url))
    assert installed.returncode == 0, installed.stderr
    host.start()
    host.wait_connected()
    return host.agent_id


def process_gone(pid: int) -> bool:
    """Return whether ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def create_command_in_database(database_url: str, agent_id: str, command_line: str) -> str:
    """Store a command the way RunCommand does, for when no gateway runs to route it."""
    database = Database(database_url, max_connections=1, application_name="agentmgr-test")
    try:
        with database.transaction() as connection:
            command = commands.create_command(
                connection, agent_id=uuid.UUID(agent_id), command_line=command_line,
                timeout_seconds=30, expires_in_seconds=600, reason="queued during outage", requested_by="test",
            )
    finally:
        database.close()
    return str(command.id)


def journal_state(host: AgentHost, command_id: str) -> str | None:
    path = host.state_dir / "journal" / f"{command_id}.json"
    return json.loads(path.read_text())["state"] if path.exists() else None


def test_agent_online_within_two_heartbeats(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str, redis_url: str) -> None:
    agent_id = start_agent(gateway, host, database_url)

    assert panel.get_agent(agent_id).status == common_pb2.AGENT_STATUS_ONLINE
    first = last_seen(redis_url, agent_id)
    assert first is not None
    # Heartbeats keep it fresh: a newer last-seen time arrives within two intervals.
    wait_until(
        lambda: (last_seen(redis_url, agent_id) or 0) > first,
        timeout=2 * HEARTBEAT_SECONDS, interval=0.05, what="a heartbeat",
    )
    report = host.status()
    assert report["connection_state"] == "connected"
    assert report["gateway_instance_id"]
    assert report["last_connected_at"]


def test_command_output_and_exit_code_stored(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str) -> None:
    agent_id = start_agent(gateway, host, database_url)

    command = panel.run_command(agent_id, "echo out; echo err >&2; echo \"$HOME $PATH\"; exit 3", wait_seconds=20)
    command = panel.wait_final(command.id)

    assert state_name(command) == "COMMAND_STATE_FAILED"
    assert command.exit_code == 3
    assert command.stdout == b"out\n/ /usr/sbin:/usr/bin:/sbin:/bin\n"
    assert command.stderr == b"err\n"
    assert not command.stdout_truncated
    assert command.HasField("started_at")


def test_command_timeout_kills_children(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str, tmp_path: Path) -> None:
    agent_id = start_agent(gateway, host, database_url)
    pid_file = tmp_path / "child.pid"

    command = panel.run_command(agent_id, f"sleep 300 & echo $! > {pid_file}; wait", timeout_seconds=2)
    command = panel.wait_final(command.id)

    assert state_name(command) == "COMMAND_STATE_TIMED_OUT"
    assert not command.HasField("exit_code")
    assert "timed out" in command.error
    child = int(pid_file.read_text())
    wait_until(lambda: process_gone(child), timeout=10, what=f"the command's child {child} to be gone")


def test_output_over_cap_truncated(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str) -> None:
    agent_id = start_agent(gateway, host, database_url)
    size = OUTPUT_CAP_BYTES * 3

    command = panel.run_command(
        agent_id, f"head -c {size} /dev/zero | tr '\\0' a; head -c {size} /dev/zero | tr '\\0' b >&2; echo small", wait_seconds=20
    )
    command = panel.wait_final(command.id)

    assert state_name(command) == "COMMAND_STATE_SUCCEEDED"
    assert command.stdout == b"a" * OUTPUT_CAP_BYTES
    assert command.stdout_truncated
    assert command.stderr == b"b" * OUTPUT_CAP_BYTES
    assert command.stderr_truncated
    records = [record for record in host.log_records() if record["message"].startswith("finished: command")]
    assert records, "the agent logged no finished command"


def test_stuck_command_blocks_no_other(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str) -> None:
    agent_id = start_agent(gateway, host, database_url)

    stuck = panel.run_command(agent_id, "sleep 60", timeout_seconds=120)
    quick = panel.run_command(agent_id, "echo quick", wait_seconds=20)
    quick = panel.wait_final(quick.id)

    assert state_name(quick) == "COMMAND_STATE_SUCCEEDED"
    assert quick.stdout == b"quick\n"
    assert state_name(panel.get_command(stuck.id)) == "COMMAND_STATE_RUNNING"


def test_gateway_killed_and_restarted(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str, tmp_path: Path) -> None:
    agent_id = start_agent(gateway, host, database_url)
    counter = tmp_path / "runs.txt"
    release = tmp_path / "release"

    # A command that finishes only after the gateway is gone.
    during = panel.run_command(agent_id, f"while [ ! -e {release} ]; do sleep 0.1; done; echo done")
    wait_until(lambda: state_name(panel.get_command(during.id)) == "COMMAND_STATE_RUNNING", timeout=20, what="the command to start")
    panel.close()
    gateway.kill()
    wait_until(lambda: host.connection_state() == "disconnected", timeout=20, what="the agent to notice the outage")
    outage_began = host.status()["connection_state_since"]

    release.touch()
    wait_until(lambda: journal_state(host, during.id) == "finished", timeout=20, what="the result to be kept on disk")
    # Retries do not move the time the outage began.
    assert host.status()["connection_state"] == "disconnected"
    assert host.status()["connection_state_since"] == outage_began
    queued = create_command_in_database(database_url, agent_id, f"echo run >> {counter}")

    gateway.start()
    host.wait_connected()
    restarted = Panel(gateway, panel_token(panel))
    try:
        finished_during = restarted.wait_final(during.id)
        finished_queued = restarted.wait_final(queued)
    finally:
        restarted.close()

    assert state_name(finished_during) == "COMMAND_STATE_SUCCEEDED"
    assert finished_during.stdout == b"done\n"
    assert state_name(finished_queued) == "COMMAND_STATE_SUCCEEDED"
    wait_until(lambda: journal_state(host, during.id) == "stored", timeout=10, what="the manager to confirm the result")
    # Several heartbeats later the queued command has still run exactly once.
    time.sleep(3 * HEARTBEAT_SECONDS)
    assert counter.read_text() == "run\n"

    messages = [record["message"] for record in host.log_records()]
    assert sum(message.startswith("failed: session") for message in messages if "retrying" in message) >= 1
    assert any(message.startswith("connected:") and "failed attempt" in message for message in messages)
    warnings = [record for record in host.log_records() if record["level"] == "WARNING" and record["message"].startswith("failed: session")]
    assert len(warnings) == 1, [record["message"] for record in warnings]


def test_revoked_agent_exits_with_its_code(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str) -> None:
    agent_id = start_agent(gateway, host, database_url)

    panel.delete_agent(agent_id)

    assert host.process is not None
    exit_code = host.process.wait(timeout=30)
    assert exit_code == 8
    assert host.connection_state() == "revoked"
    errors = [record for record in host.log_records() if record["level"] == "ERROR"]
    assert any("rejected the credentials" in record["message"] for record in errors)
    assert host.status()["connection_state"] == "revoked"


def test_agent_restart_reports_interrupted_command(
    gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str, tmp_path: Path
) -> None:
    agent_id = start_agent(gateway, host, database_url)
    counter = tmp_path / "runs.txt"
    pid_file = tmp_path / "child.pid"
    command = panel.run_command(
        agent_id, f"echo run >> {counter}; sleep 300 & echo $! > {pid_file}; wait", timeout_seconds=600
    )
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=20, what="the command to start")

    assert host.stop() == 0
    child = int(pid_file.read_text())
    wait_until(lambda: process_gone(child), timeout=10, what="the command's child to be killed with the agent")
    host.start()
    host.wait_connected()
    command = panel.wait_final(command.id)

    assert state_name(command) == "COMMAND_STATE_FAILED"
    assert command.error.startswith("interrupted")
    assert counter.read_text() == "run\n"


def test_second_agent_same_key_superseded(gateway: GatewayProcess, host: AgentHost, database_url: str, tmp_path: Path) -> None:
    start_agent(gateway, host, database_url)
    # A copy of the same install with its own state folder: two processes, one key.
    twin = AgentHost(tmp_path / "twin", machine_id=host.env["AGENTMGR_AGENT_MACHINE_ID"])
    twin.root.mkdir()
    twin.config_dir = host.config_dir
    twin.start()
    try:
        wait_until(
            lambda: any(record["message"].startswith("superseded:") for record in host.log_records() + twin.log_records()),
            timeout=30, what="a superseded session to be logged",
        )
    finally:
        twin.stop()

    superseded = [record for record in host.log_records() + twin.log_records() if record["message"].startswith("superseded:")]
    assert superseded[0]["level"] == "WARNING"
    assert "second agent" in superseded[0]["message"]
    host.wait_connected()


def test_reinstall_while_running_switches_agent(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str) -> None:
    old_id = start_agent(gateway, host, database_url)

    reinstalled = host.install(gateway, create_enrollment_token(database_url), "--replace")

    assert reinstalled.returncode == 0, reinstalled.stderr
    new_id = reinstalled.stdout.strip()
    wait_until(
        lambda: any(record["message"].startswith(f"reloaded: config now names agent {new_id}") for record in host.log_records()),
        timeout=30, what="the running agent to reload its config",
    )
    host.wait_connected()
    command = panel.wait_final(panel.run_command(new_id, "echo switched", wait_seconds=20).id)
    assert command.stdout == b"switched\n"
    assert panel.get_agent(old_id).status == common_pb2.AGENT_STATUS_REVOKED
    assert host.process is not None and host.process.poll() is None


def panel_token(panel: Panel) -> str:
    return dict(panel.metadata)["authorization"].removeprefix("Bearer ")


def test_cancel_kills_running_command(gateway: GatewayProcess, host: AgentHost, panel: Panel, database_url: str, tmp_path: Path) -> None:
    agent_id = start_agent(gateway, host, database_url)
    pid_file = tmp_path / "child.pid"
    command = panel.run_command(agent_id, f"sleep 300 & echo $! > {pid_file}; wait", timeout_seconds=600)
    wait_until(lambda: state_name(panel.get_command(command.id)) == "COMMAND_STATE_RUNNING" and pid_file.exists(),
               timeout=30, what="the command to run")

    cancelled = panel.stub.CancelCommand(panel_pb2.CancelCommandRequest(command_id=command.id),
                                         metadata=panel.metadata, timeout=10)

    assert state_name(cancelled) == "COMMAND_STATE_CANCELLED"
    child = int(pid_file.read_text())
    wait_until(lambda: process_gone(child), timeout=20, what=f"the cancelled command's child {child} to be gone")
    wait_until(lambda: any(r["message"].startswith("cancelled: command") for r in host.log_records()),
               timeout=20, what="the agent to log the cancellation")
    assert state_name(panel.get_command(command.id)) == "COMMAND_STATE_CANCELLED"
