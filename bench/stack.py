"""The manager under test: private PostgreSQL and Redis, gateway processes and the updater.

Every program runs as its own real process (``python -m services.grpc_gateway``,
``python -m services.updater``), as under supervisord, so /proc shows their
memory and CPU time apart from the simulated agents.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from services.core.database import Database
from services.core.settings import Settings
from services.migrate.main import migrate
from tests.gateway_client import GatewayProcess
from tests.support import PROJECT_ROOT, PostgresCluster, RedisServer, free_port, make_shared_dir

logger = logging.getLogger("bench.stack")

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
GATEWAY_STOP_SECONDS = 60.0
"""Time a gateway gets to stop after SIGTERM before it is killed; its own grace period is 10 s by default."""


def raise_open_files_limit() -> None:
    """Raise the soft open-files limit to the hard limit (run in the child, before exec)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class BenchGateway(GatewayProcess):
    """A gateway process whose open-files limit is raised to the hard limit, one socket per agent."""

    def start(self) -> BenchGateway:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.grpc_gateway"],
                env={**os.environ, **self.env}, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=raise_open_files_limit,
            )
        deadline = time.monotonic() + 60
        while not self._listening():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway on {self.address} not listening within 60s: {self.log_tail()}")
            time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "gateway not started"
        return self.process.pid


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    """Resident memory and CPU time of one process at one moment."""

    rss_bytes: int
    cpu_seconds: float
    taken_at: float


def sample_process(pid: int) -> ProcessSample:
    """Read the resident set size and the user plus system CPU time of ``pid`` from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which may contain spaces, start after the last ")".
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])
    return ProcessSample(rss_pages * PAGE_BYTES, cpu_ticks / CLOCK_TICKS_PER_SECOND, time.monotonic())


def cpu_percent(before: ProcessSample, after: ProcessSample) -> float:
    """Return the CPU used between two samples, in percent of one core."""
    return 100 * (after.cpu_seconds - before.cpu_seconds) / max(after.taken_at - before.taken_at, 1e-9)


class BenchStack:
    """Private PostgreSQL and Redis, a migrated database and ``gateway_count`` gateways on one port.

    ``close`` removes the temporary folder, logs included, unless KEEP_BENCH_FILES is set.
    """

    def __init__(self, *, gateway_count: int = 1, settings: dict[str, str] | None = None) -> None:
        self.root = make_shared_dir("agentmgr-bench-")
        self.gateway_count = gateway_count
        self.settings = settings or {}
        self.postgres = PostgresCluster(self.root / "postgres")
        self.redis_server = RedisServer(self.root)
        self.gateways: list[BenchGateway] = []
        self.updater: subprocess.Popen | None = None
        self.database: Database | None = None
        self.redis: redis.Redis | None = None
        self.env: dict[str, str] = {}
        self.address = ""

    def start(self) -> BenchStack:
        """Start every server and gateway; on a failure, stop what was started and raise."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> BenchStack:
        self.postgres.start()
        self.redis_server.start()
        home = self.root / "home"
        home.mkdir()
        # Picked after PostgreSQL and Redis took their ports, so that neither can take this one.
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {
            **{name: "" for name in os.environ if name.startswith("AGENTMGR_")},
            "AGENTMGR_HOME": str(home),
            "AGENTMGR_DATABASE_URL": self.postgres.create_database("bench"),
            "AGENTMGR_REDIS_URL": self.redis_server.url_for(1),
            "AGENTMGR_GRPC_ADDRESS": self.address,
            "AGENTMGR_GRPC_REUSE_PORT": "true",
            "AGENTMGR_UPDATER_METRICS_ADDRESS": "",
            **self.settings,
        }
        migrate(Settings.from_env(self.env))
        self.database = Database(self.env["AGENTMGR_DATABASE_URL"], max_connections=4, application_name="agentmgr-bench")
        self.redis = redis.Redis.from_url(self.env["AGENTMGR_REDIS_URL"])
        self.start_gateways()
        return self

    def start_gateways(self) -> None:
        """Start the gateways one after another, so that only the first creates the TLS files."""
        self.gateways = []
        for number in range(self.gateway_count):
            env = {**self.env, "AGENTMGR_GATEWAY_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
            gateway = BenchGateway(env, self.root / f"gateway-{number}.log")
            self.gateways.append(gateway.start())

    def stop_gateways(self) -> None:
        """Send SIGTERM to every gateway at once, then wait for each to exit."""
        running = [gateway.process for gateway in self.gateways if gateway.process and gateway.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=GATEWAY_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("gateway %d did not stop within %gs; killing it", process.pid, GATEWAY_STOP_SECONDS)
                process.kill()
                process.wait()

    @property
    def ca_certificate(self) -> bytes:
        return (Path(self.env["AGENTMGR_HOME"]) / "tls" / "ca.pem").read_bytes()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def gateway_pids(self) -> list[int]:
        return [gateway.pid for gateway in self.gateways]

    def run(self, operation: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run a fleet function in one transaction on the benchmark database."""
        assert self.database is not None, "stack not started"
        with self.database.transaction() as connection:
            return operation(connection, *args, **kwargs)

    def enrollment_token(self) -> str:
        from services.core.fleet import enrollment

        return self.run(enrollment.create_token, created_by="bench", description=f"bench {uuid.uuid4().hex[:6]}")[1]

    def start_updater(self) -> None:
        self.updater = subprocess.Popen(
            [sys.executable, "-m", "services.updater"], env={**os.environ, **self.env}, cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL, stderr=open(self.root / "updater.log", "ab"),
        )

    def stop_updater(self) -> None:
        if self.updater is not None and self.updater.poll() is None:
            self.updater.send_signal(signal.SIGTERM)
            try:
                self.updater.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.updater.kill()
                self.updater.wait()
        self.updater = None

    def close(self) -> None:
        self.stop_updater()
        self.stop_gateways()
        if self.database is not None:
            self.database.close()
        if self.redis is not None:
            self.redis.close()
        self.redis_server.stop()
        self.postgres.stop()
        if os.environ.get("KEEP_BENCH_FILES"):
            print(f"kept: benchmark files in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
