"""`make install` into a staging root (DESTDIR), as a package build would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import PROJECT_ROOT

pytestmark = pytest.mark.slow

PREFIX = "/opt/agent-manager"


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    stage = tmp_path_factory.mktemp("stage")
    result = subprocess.run(
        ["make", "install", f"DESTDIR={stage}", f"PREFIX={PREFIX}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "systemctl enable --now agent-manager" in result.stdout
    return stage


def test_install_lays_out_prefix(staged):
    root = staged / PREFIX.lstrip("/")

    assert (root / "conf" / "supervisord.conf").is_file()
    assert (root / "services" / "migrate" / "migrations").is_dir()
    assert (root / ".venv" / "bin" / "supervisord").is_file()
    env_file = staged / "etc" / "agent-manager" / "env"
    assert "AGENTMGR_HOME=/var/lib/agent-manager" in env_file.read_text()
    assert env_file.stat().st_mode & 0o777 == 0o640
    assert (staged / "var" / "lib" / "agent-manager").is_dir()


def test_installed_scripts_point_at_prefix(staged):
    bin_dir = staged / PREFIX.lstrip("/") / ".venv" / "bin"

    for name in ("supervisord", "supervisorctl", "agentmgr", "agentmgr-agent"):
        text = (bin_dir / name).read_text()
        assert str(staged) not in text, f"{name} names the staging folder"
    assert (bin_dir / "supervisord").read_text().startswith(f"#!{PREFIX}/.venv/bin/python")
    assert f"exec {PREFIX}/.venv/bin/python -m services.cli" in (bin_dir / "agentmgr").read_text()


def test_installed_code_runs(staged):
    """The staged venv imports the staged code once its .pth points at the staging copy."""
    root = staged / PREFIX.lstrip("/")
    python = root / ".venv" / "bin" / "python"

    result = subprocess.run(
        [str(python), "-c", "import services.cli.main, agent.releases, agentmanager.v1.agent_pb2; print('ok')"],
        env={"PYTHONPATH": str(root), "PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_unit_passes_systemd_analyze(staged, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (staged / "etc" / "systemd" / "system" / "agent-manager.service").read_text()
    assert "User=agentmgr" in unit
    assert f"ExecStart={PREFIX}/.venv/bin/python -m services.launch" in unit
    # Point the unit at the staged files, so that verify finds the programs it names.
    local = tmp_path / "agent-manager.service"
    local.write_text(unit.replace(PREFIX, str(staged / PREFIX.lstrip("/"))).replace(
        "/etc/agent-manager/env", str(staged / "etc" / "agent-manager" / "env")))

    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
