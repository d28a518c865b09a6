"""Start order under a real supervisord: clean boot, failures, recovery and shutdown."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import ExitCode
from tests.support import PROJECT_ROOT, VENV_BIN, PostgresCluster, free_port, supervised, wait_until

pytestmark = pytest.mark.slow

OUR_PROGRAMS = ("migrate", "start_gate", "updater", "grpc_gateway")


def clean_env(**settings: str) -> dict[str, str]:
    """Return ``settings`` plus empty values for every other AGENTMGR_ variable of ours.

    The metrics endpoints are off, so that stacks started by other tests or
    other programs on this machine cannot collide with them on a port.
    """
    blank = {name: "" for name in os.environ if name.startswith("AGENTMGR_")}
    off = {"AGENTMGR_GATEWAY_METRICS_ADDRESS": "", "AGENTMGR_UPDATER_METRICS_ADDRESS": ""}
    return {**blank, **off, **settings}


def health_status(home: Path, address: str) -> int:
    """Call grpc.health.v1 over TLS, trusting only the gateway's generated CA."""
    credentials = grpc.ssl_channel_credentials(root_certificates=(home / "tls" / "ca.pem").read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def agentmgr_status(stack, *, expect_healthy: bool = True) -> dict:
    result = subprocess.run(
        [str(VENV_BIN / "agentmgr"), "-o", "json", "status"],
        env=stack.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == (0 if expect_healthy else 14), result.stdout + result.stderr
    return json.loads(result.stdout)


def test_clean_boot_with_private_servers(home):
    """No URLs configured: `make run`'s launcher supervises its own PostgreSQL and Redis."""
    address = f"127.0.0.1:{free_port()}"
    env = clean_env(AGENTMGR_GRPC_ADDRESS=address)

    with supervised(home, env) as stack:
        migrate = stack.wait_state("migrate", "EXITED", timeout=90)
        stack.wait_state("updater", "RUNNING", timeout=60)
        stack.wait_state("grpc_gateway", "RUNNING", timeout=60)
        status = health_status(home, address)
        ctl = stack.ctl("status")

        assert migrate["exitstatus"] == 0
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert stack.info("postgres")["statename"] == "RUNNING"
        assert stack.info("redis")["statename"] == "RUNNING"
        for program in ("grpc_gateway", "updater", "postgres", "redis"):
            assert any(line.startswith(program) and "RUNNING" in line for line in ctl.stdout.splitlines()), ctl.stdout

        # Every line our programs logged is one JSON object naming its service.
        for program in OUR_PROGRAMS:
            records = stack.log_records(program)
            assert records, f"{program} logged nothing"
            for record in records:
                assert record["service"] == program
                assert {"timestamp", "level", "logger", "pid", "message"} <= record.keys()
        gateway_lines = stack.log_records("grpc_gateway")
        assert gateway_lines[-1]["message"].startswith("listening:")

        # `agentmgr status` sees the same healthy stack with the same settings.
        report = agentmgr_status(stack)
        assert report["healthy"] is True
        assert report["supervisord"]["programs"]["migrate"] == "EXITED (status 0)"
        assert report["gateway"]["health"] == "SERVING"
        assert report["redis"]["workers"] == 1


def test_unreachable_database_then_recovery(home, redis_url, test_root):
    """migrate fails after its bounded wait; once PostgreSQL is up, `start migrate` brings all up."""
    cluster = PostgresCluster(test_root / f"late-pg-{home.name}")
    env = clean_env(
        AGENTMGR_DATABASE_URL=cluster.url,
        AGENTMGR_REDIS_URL=redis_url,
        AGENTMGR_GRPC_ADDRESS=f"127.0.0.1:{free_port()}",
        AGENTMGR_DB_WAIT_SECONDS="2",
    )
    try:
        with supervised(home, env) as stack:
            migrate = stack.wait_state("migrate", "EXITED", timeout=60)
            errors = [r for r in stack.log_records("migrate") if r["level"] == "ERROR"]

            assert migrate["exitstatus"] == ExitCode.DATABASE
            assert len(errors) == 1
            assert errors[0]["cause"] == "unreachable"
            assert any(r["message"].startswith("retrying: database") for r in stack.log_records("migrate"))
            for program in ("updater", "grpc_gateway"):
                info = stack.info(program)
                assert info["statename"] == "STOPPED"
                assert info["start"] == 0, f"{program} was started"
            report = agentmgr_status(stack, expect_healthy=False)
            assert report["supervisord"]["programs"]["migrate"] == f"EXITED (status {int(ExitCode.DATABASE)})"
            assert report["database"]["ok"] is False

            cluster.start()
            result = stack.ctl("start", "migrate")

            assert result.returncode == 0, result.stdout + result.stderr
            stack.wait_state("updater", "RUNNING", timeout=60)
            stack.wait_state("grpc_gateway", "RUNNING", timeout=60)
            assert stack.info("migrate")["exitstatus"] == 0
    finally:
        cluster.stop()


def test_restarted_gate_sees_earlier_exit(home, redis_url, test_root):
    """A gate that was down when migrate exited 0 starts the services when it comes back."""
    cluster = PostgresCluster(test_root / f"gate-pg-{home.name}")
    env = clean_env(
        AGENTMGR_DATABASE_URL=cluster.url,
        AGENTMGR_REDIS_URL=redis_url,
        AGENTMGR_GRPC_ADDRESS=f"127.0.0.1:{free_port()}",
        AGENTMGR_DB_WAIT_SECONDS="1",
    )
    try:
        with supervised(home, env) as stack:
            stack.wait_state("migrate", "EXITED", timeout=60)
            assert stack.ctl("stop", "start_gate").returncode == 0
            cluster.start()
            assert stack.ctl("start", "migrate").returncode == 0
            stack.wait_state("migrate", "EXITED", timeout=60)

            assert stack.info("migrate")["exitstatus"] == 0
            assert stack.info("grpc_gateway")["statename"] == "STOPPED"

            assert stack.ctl("start", "start_gate").returncode == 0
            stack.wait_state("grpc_gateway", "RUNNING", timeout=60)
            stack.wait_state("updater", "RUNNING", timeout=60)
    finally:
        cluster.stop()


def test_sigterm_stops_everything(home, database_url, redis_url):
    env = clean_env(
        AGENTMGR_DATABASE_URL=database_url,
        AGENTMGR_REDIS_URL=redis_url,
        AGENTMGR_GRPC_ADDRESS=f"127.0.0.1:{free_port()}",
    )
    with supervised(home, env, via_launcher=False) as stack:
        stack.wait_state("grpc_gateway", "RUNNING", timeout=90)
        stack.wait_state("updater", "RUNNING", timeout=60)
        # RUNNING only means alive for startsecs; on a loaded machine the programs may still be
        # importing, before their signal handlers exist. Wait until both serve.
        wait_until(lambda: any('"message": "listening: ' in line for line in stack.log_lines("grpc_gateway")),
                   timeout=90, what="the gateway to listen")
        wait_until(lambda: any('"listening: queue updates"' in line for line in stack.log_lines("updater")),
                   timeout=90, what="the updater to listen")
        pids = [stack.info(name)["pid"] for name in ("grpc_gateway", "updater", "start_gate")]

        # Bounded by the sum of the programs' stopwaitsecs in conf/supervisord.conf.
        stack.stop(timeout=330 + 30 + 15 + 5)

        assert stack.process.returncode == 0
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived supervisord"
        gateway = [r["message"] for r in stack.log_records("grpc_gateway")]
        assert "stopped: gateway" in gateway
        assert gateway[-1] == "exiting: grpc_gateway (status 0)"
        updater = [r["message"] for r in stack.log_records("updater")]
        assert updater[-1] == "exiting: updater (status 0)"


def test_venv_defaults_home_to_checkout_var():
    """With AGENTMGR_HOME unset, the venv's Python defaults it to var/ in the checkout."""
    env = {name: value for name, value in os.environ.items() if name != "AGENTMGR_HOME"}
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-c", "import os; print(os.environ['AGENTMGR_HOME'])"],
        env=env, capture_output=True, text=True, check=True,
    )

    assert result.stdout.strip() == str(PROJECT_ROOT / "var")
