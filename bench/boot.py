"""Boot benchmark: time from supervisord start to gRPC health SERVING on an empty database.

Three cases, each run several times in this one process, median reported:
- baseline: a bare grpc.aio server with only the health service and TLS,
  started as a Python process (the floor for any Python gRPC service);
- external: `supervisord -n -c conf/supervisord.conf` against an empty
  database on an already running PostgreSQL and Redis;
- private: `python -m services.launch` (what `make run` runs) on an empty
  state folder, so the time includes initdb of the private PostgreSQL.

Usage: .venv/bin/python -m bench.boot [--runs N] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import (
    PostgresCluster,
    RedisServer,
    SupervisedStack,
    free_port,
    make_shared_dir,
)

SECTION_START = "<!-- boot:start -->"
SECTION_END = "<!-- boot:end -->"
TIMEOUT_SECONDS = 180

BASELINE_SERVER = r"""
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    key, cert = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
    server.add_secure_port(sys.argv[1], grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()
asyncio.run(main())
"""


def wait_serving(address: str, ca_file: Path, started: float) -> float:
    """Poll health over TLS until SERVING; return the seconds since ``started``."""
    deadline = started + TIMEOUT_SECONDS
    while not ca_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no CA file at {ca_file}")
        time.sleep(0.02)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{address} not SERVING within {TIMEOUT_SECONDS}s")


def blank_agentmgr_env(**settings: str) -> dict[str, str]:
    return {**{name: "" for name in os.environ if name.startswith("AGENTMGR_")}, **settings}


def time_baseline(tls_dir: Path) -> float:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", BASELINE_SERVER, address, str(tls_dir / "server.key"), str(tls_dir / "server.pem")]
    )
    try:
        return wait_serving(address, tls_dir / "ca.pem", started)
    finally:
        process.terminate()
        process.wait(timeout=30)


def time_stack(root: Path, env: dict[str, str], *, via_launcher: bool) -> float:
    home = root / f"home-{uuid.uuid4().hex[:8]}"
    address = f"127.0.0.1:{free_port()}"
    stack = SupervisedStack(home, {**env, "AGENTMGR_GRPC_ADDRESS": address})
    started = time.monotonic()
    try:
        stack.start(via_launcher=via_launcher)
        return wait_serving(address, home / "tls" / "ca.pem", started)
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    parser.add_argument("--write", type=Path, help="Markdown file whose boot section is replaced")
    arguments = parser.parse_args()

    root = make_shared_dir("agentmgr-bench-")
    postgres = PostgresCluster(root / "postgres")
    redis_server = RedisServer(root)
    postgres.start()
    redis_server.start()
    samples: dict[str, list[float]] = {"baseline": [], "external": [], "private": []}
    try:
        for run in range(arguments.runs):
            env = blank_agentmgr_env(
                AGENTMGR_DATABASE_URL=postgres.create_database(f"bench_{run}"),
                AGENTMGR_REDIS_URL=redis_server.url_for(run + 1),
            )
            samples["external"].append(time_stack(root, env, via_launcher=False))
            samples["private"].append(time_stack(root, blank_agentmgr_env(), via_launcher=True))
        # The baseline serves with TLS files that one of the gateways above created.
        tls_dir = next(root.glob("home-*/tls"))
        for _ in range(arguments.runs):
            samples["baseline"].append(time_baseline(tls_dir))
    finally:
        redis_server.stop()
        postgres.stop()

    medians = {case: statistics.median(values) for case, values in samples.items()}
    report = render(medians, samples, arguments.runs)
    print(report)
    if arguments.write:
        replace_section(arguments.write, report)
    return 0


def render(medians: dict[str, float], samples: dict[str, list[float]], runs: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION_START,
        "## Boot: supervisord start to health SERVING",
        "",
        f"- Command: `.venv/bin/python -m bench.boot --runs {runs} --write docs/benchmarks.md`",
        f"- Machine: {os.cpu_count()} cores, {cpu}, Linux {platform.release()}, Python {platform.python_version()}",
        f"- Date: {datetime.date.today().isoformat()}",
        "",
        "| case | median (s) | runs (s) | ratio to baseline |",
        "| --- | ---: | --- | ---: |",
    ]
    names = {
        "baseline": "bare grpc.aio health server (baseline)",
        "external": "manager, empty database on a running PostgreSQL",
        "private": "manager via `make run`'s launcher, first start (includes initdb)",
    }
    for case in ("baseline", "external", "private"):
        runs_text = ", ".join(f"{value:.2f}" for value in samples[case])
        ratio = medians[case] / medians["baseline"]
        lines.append(f"| {names[case]} | {medians[case]:.2f} | {runs_text} | {ratio:.1f}x |")
    lines += [
        "",
        "The manager's time covers supervisord start, migrate (every bundled migration on an empty",
        "database), the start gate, the gateway's schema check, TLS creation and bind.",
        SECTION_END,
    ]
    return "\n".join(lines)


def replace_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
