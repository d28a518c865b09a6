"""The agent's executor, journal, settings and backoff, without a gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentmanager.v1 import agent_pb2

from agent.config import AgentSettings, InstalledConfig, load_config, parse_manager_address, save_config
from agent.errors import NotInstalledError, UsageError
from agent.executor import execute
from agent.journal import RETENTION_SECONDS, EntryState, Journal
from agent.session import backoff_delay
from agent.trust import normalize_fingerprint
from tests.agent_support import AGENT_SCRIPT
from tests.support import wait_until


def run(command_line: str, *, timeout: float = 10, cap: int = 1024, grace: float = 1):
    return asyncio.run(execute(command_line, timeout_seconds=timeout, max_output_bytes=cap, kill_grace_seconds=grace))


def process_gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


# Executor.


def test_executor_exit_code_and_output() -> None:
    execution = run("echo out; echo err >&2; exit 7")

    assert execution.exit_code == 7
    assert execution.stdout == b"out\n"
    assert execution.stderr == b"err\n"
    assert not execution.timed_out
    assert execution.error == ""


def test_executor_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMGR_SECRET_FOR_TEST", "leak")

    execution = run("env | sort; pwd")

    lines = execution.stdout.decode().splitlines()
    assert "HOME=/" in lines
    assert "LANG=C.UTF-8" in lines
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in lines
    assert not any("AGENTMGR_SECRET_FOR_TEST" in line for line in lines)
    assert lines[-1] == "/"


def test_executor_own_process_group() -> None:
    execution = run("ps -o pgid= -p $$; ps -o sid= -p $$")

    group, session = (int(value) for value in execution.stdout.split())
    assert group != os.getpgrp()
    assert session == group


def test_executor_timeout_kills_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    execution = run(f"sleep 300 & echo $! > {pid_file}; trap '' TERM; wait", timeout=1, grace=0.5)

    assert execution.timed_out
    assert execution.exit_code is None
    child = int(pid_file.read_text())
    wait_until(lambda: process_gone(child), timeout=10, what=f"child {child} to be gone")


def test_executor_output_cap() -> None:
    execution = run("head -c 5000 /dev/zero; head -c 10 /dev/zero >&2", cap=100)

    assert execution.stdout == b"\0" * 100
    assert execution.stdout_truncated
    assert execution.stderr == b"\0" * 10
    assert not execution.stderr_truncated
    assert execution.exit_code == 0


def test_executor_killed_by_signal() -> None:
    execution = run("kill -9 $$")

    assert execution.exit_code is None
    assert execution.error == "killed by signal SIGKILL"
    assert not execution.timed_out


# Journal.


def result(command_id: str, stdout: bytes = b"x") -> agent_pb2.CommandResult:
    return agent_pb2.CommandResult(command_id=command_id, exit_code=0, stdout=stdout)


def test_journal_remembers_ids_across_instances(tmp_path: Path) -> None:
    command_id = str(uuid.uuid4())
    Journal(tmp_path).record_started(command_id)

    reopened = Journal(tmp_path)

    assert reopened.contains(command_id)
    assert reopened.state(command_id) is EntryState.STARTED
    assert reopened.interrupted() == [command_id]
    assert not reopened.contains(str(uuid.uuid4()))


def test_journal_keeps_results_until_stored(tmp_path: Path) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    journal = Journal(tmp_path)
    journal.record_started(first)
    journal.record_result(result(first, b"one"))
    journal.record_result(result(second, b"two"))

    assert [item.stdout for item in Journal(tmp_path).unconfirmed_results()] == [b"one", b"two"]
    assert journal.interrupted() == []

    assert journal.mark_stored(first)

    assert [item.command_id for item in journal.unconfirmed_results()] == [second]
    assert journal.contains(first)
    assert journal.result(first) is None
    assert not journal.mark_stored(str(uuid.uuid4()))


def test_journal_files_private(tmp_path: Path) -> None:
    command_id = str(uuid.uuid4())
    journal = Journal(tmp_path)
    journal.record_result(result(command_id))

    assert stat.S_IMODE(journal.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((journal.folder / f"{command_id}.json").stat().st_mode) == 0o600
    assert not [name for name in os.listdir(journal.folder) if name.endswith(".tmp")]


def test_journal_rejects_ids_that_are_not_uuids(tmp_path: Path) -> None:
    journal = Journal(tmp_path)

    with pytest.raises(ValueError):
        journal.record_started("../../etc/passwd")
    assert os.listdir(journal.folder) == []


def test_journal_prunes_old_stored_entries(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    stored, pending = str(uuid.uuid4()), str(uuid.uuid4())
    journal.record_result(result(stored))
    journal.mark_stored(stored)
    journal.record_result(result(pending))

    later = journal.prune(now=time.time() + RETENTION_SECONDS + 1)

    assert later == 1
    assert not journal.contains(stored)
    assert journal.contains(pending)


# Settings, addresses, fingerprints, backoff.


def test_settings_flags_win_over_environment(tmp_path: Path) -> None:
    environ = {"AGENTMGR_AGENT_CONFIG_DIR": "/env/config", "AGENTMGR_AGENT_STATE_DIR": "/env/state"}

    settings = AgentSettings.load(environ, config_dir=str(tmp_path))

    assert settings.config_dir == tmp_path
    assert settings.state_dir == Path("/env/state")
    assert settings.log_dir == Path("/env/state/log")
    assert settings.backoff_base_seconds == 1.0
    assert settings.backoff_cap_seconds == 60.0
    assert settings.max_concurrent_commands == 4


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AGENTMGR_AGENT_BACKOFF_BASE_SECONDS", "soon"),
        ("AGENTMGR_AGENT_BACKOFF_CAP_SECONDS", "0.5"),
        ("AGENTMGR_AGENT_MAX_CONCURRENT_COMMANDS", "0"),
        ("AGENTMGR_AGENT_MAX_CONCURRENT_COMMANDS", "2.5"),
        ("AGENTMGR_AGENT_LOG_LEVEL", "LOUD"),
        ("AGENTMGR_AGENT_KILL_GRACE_SECONDS", "nan"),
    ],
)
def test_settings_invalid_values(variable: str, value: str) -> None:
    with pytest.raises(UsageError, match=variable):
        AgentSettings.load({variable: value})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("manager.example:50051", ("manager.example", 50051)), ("[::1]:443", ("::1", 443)), ("127.0.0.1:1", ("127.0.0.1", 1))],
)
def test_manager_address_valid(text: str, expected: tuple[str, int]) -> None:
    assert parse_manager_address(text) == expected


@pytest.mark.parametrize("text", ["manager", "manager:", "manager:0", "manager:70000", "::1:50051", "a b:1"])
def test_manager_address_invalid(text: str) -> None:
    with pytest.raises(UsageError, match="invalid manager address"):
        parse_manager_address(text)


def test_fingerprint_normalized() -> None:
    digest = "AB" * 32
    colons = ":".join("AB" for _ in range(32))

    assert normalize_fingerprint(f"sha256:{digest}") == f"sha256:{digest.lower()}"
    assert normalize_fingerprint(f"SHA256:{colons}") == f"sha256:{digest.lower()}"
    with pytest.raises(UsageError):
        normalize_fingerprint(digest)


def test_backoff_full_jitter_within_cap() -> None:
    for failures in range(1, 40):
        bound = min(60.0, 1.0 * 2 ** (failures - 1))
        delays = [backoff_delay(failures, base=1.0, cap=60.0) for _ in range(50)]
        assert all(0 <= delay <= bound for delay in delays)
    # Full jitter spreads reconnects: many draws at the cap are not all alike.
    assert len({round(backoff_delay(30, base=1.0, cap=60.0), 3) for _ in range(50)}) > 10


def test_config_round_trip_and_modes(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    config = InstalledConfig(
        manager="manager.example:50051", agent_id=str(uuid.uuid4()), agent_key="amkey_secret",
        ca_pem=b"-----BEGIN CERTIFICATE-----\n", ca_fingerprint="sha256:" + "0" * 64,
        labels={"role": "web"}, installed_at="2026-01-01T00:00:00+00:00",
    )

    save_config(folder, config)

    assert load_config(folder) == config
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "agent.key").stat().st_mode) == 0o600
    assert "amkey_secret" not in repr(config)


def test_config_incomplete_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "config.json").write_text('{"manager": "m:1"}')

    with pytest.raises(NotInstalledError, match="--replace"):
        load_config(folder)


# The run loop without a reachable manager.


def installed_host(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """Write an install that points at a closed loopback port; return the folders and environment."""
    from tests.support import free_port

    config_dir, state_dir = tmp_path / "config", tmp_path / "state"
    save_config(config_dir, InstalledConfig(
        manager=f"127.0.0.1:{free_port()}", agent_id=str(uuid.uuid4()), agent_key="amkey_never-logged",
        ca_pem=b"", ca_fingerprint="", labels={}, installed_at="",
    ))
    env = {**os.environ, "AGENTMGR_AGENT_BACKOFF_BASE_SECONDS": "0.05", "AGENTMGR_AGENT_BACKOFF_CAP_SECONDS": "0.1",
           "AGENTMGR_AGENT_MACHINE_ID": f"test-{uuid.uuid4().hex}"}
    return config_dir, state_dir, env


def test_run_counts_repeated_failures(tmp_path: Path) -> None:
    config_dir, state_dir, env = installed_host(tmp_path)
    log = state_dir / "log" / "agent.log"
    process = subprocess.Popen(
        [str(AGENT_SCRIPT), "run", "--config-dir", str(config_dir), "--state-dir", str(state_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: log.exists() and log.read_text().count('"connecting: ') >= 5, timeout=30, what="five attempts")
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    manager = json.loads((config_dir / "config.json").read_text())["manager"]
    attempts = [record for record in records if record["message"].startswith("connecting: ")]
    warnings = [record for record in records if record["level"] == "WARNING"]
    assert exit_code == 0
    assert all(manager in record["message"] for record in attempts)
    assert len(warnings) == 1
    assert warnings[0]["message"].startswith(f"failed: session with manager {manager}")
    assert "amkey_never-logged" not in log.read_text()
    assert json.loads((state_dir / "status.json").read_text())["state"] == "stopped"


def test_second_run_same_state_rejected(tmp_path: Path) -> None:
    config_dir, state_dir, env = installed_host(tmp_path)
    folders = ["--config-dir", str(config_dir), "--state-dir", str(state_dir)]
    first = subprocess.Popen([str(AGENT_SCRIPT), "run", *folders], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (state_dir / "status.json").exists(), timeout=30, what="the first agent to start")

        second = subprocess.run([str(AGENT_SCRIPT), "run", *folders], env=env, capture_output=True, text=True, timeout=60)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)

    assert second.returncode == 9
    assert "another agentmgr-agent run" in second.stderr


def test_agent_imports_no_server_code() -> None:
    """The agent runs on hosts without the manager's server side, so it must not import ``services``."""
    modules = "agent.cli, agent.session, agent.commands, agent.enroll, agent.executor, agent.journal, agent.hostfacts, agent.trust"
    probe = f"import sys, {modules}; print(sorted(name for name in sys.modules if name.split('.')[0] == 'services'))"

    finished = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"
