"""Run a set of benchmarks against the real manager and write each scenario's section.

Usage: .venv/bin/python -m bench.run [--set standard|quick] [--only NAME,...] [--write docs/benchmarks.md]

The standard set (`make bench`) connects up to 10,000 simulated agents to two
gateway processes; the quick set (`make bench-quick`) uses 500 agents and one
gateway. Without --write the sections are only printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

from bench import scenarios
from bench.report import load_line, replace_section
from bench.simulator import Fleet
from bench.stack import BenchStack
from tests.support import PROJECT_ROOT

MIB = 1024 * 1024
SCENARIOS = ("ingest", "enrollment", "capacity", "commands", "reconnect", "rollout", "boot")


@dataclasses.dataclass(frozen=True)
class BenchmarkSet:
    """Sizes and durations of one set of scenarios."""

    gateways: int
    capacity_steps: tuple[int, ...]
    """Connected agents at each capacity step, growing."""
    round_trip_at: tuple[int, ...]
    """Capacity steps at which command round trips are measured."""
    round_trips: int
    fan_out_at: tuple[int, ...]
    capacity_window_seconds: float
    ingest_streams: int
    ingest_clients: int
    ingest_seconds: float
    rollout_agents: int
    rollout_bytes: int
    rollout_parallel: int
    boot_runs: int
    """Runs per case of bench.boot; 0 skips it."""
    baseline_streams: int
    """Idle streams on the bare echo server that the capacity figures are compared with."""


SETS = {
    "standard": BenchmarkSet(
        gateways=2, capacity_steps=(1000, 5000, 10_000), round_trip_at=(1000, 10_000), round_trips=300,
        fan_out_at=(1000, 10_000), capacity_window_seconds=20, ingest_streams=40, ingest_clients=2, ingest_seconds=12,
        rollout_agents=1000, rollout_bytes=5 * MIB, rollout_parallel=200, boot_runs=3, baseline_streams=3000,
    ),
    "quick": BenchmarkSet(
        gateways=1, capacity_steps=(500,), round_trip_at=(500,), round_trips=100, fan_out_at=(500,),
        capacity_window_seconds=5, ingest_streams=20, ingest_clients=1, ingest_seconds=6,
        rollout_agents=100, rollout_bytes=5 * MIB, rollout_parallel=100, boot_runs=0, baseline_streams=500,
    ),
}


def publish(text: str, write: Path | None) -> None:
    """Print a finished section and, with --write, replace it in the Markdown file at once."""
    print(text, flush=True)
    if write is not None:
        name = text.split(" ", 2)[1].split(":", 1)[0]
        replace_section(write, name, text)


def run_set(plan: BenchmarkSet, command: str, write: Path | None, only: frozenset[str]) -> None:
    """Run the scenarios named in ``only`` and publish their sections.

    Enrollment and the capacity steps also run, without publishing, when a later
    scenario needs the agents they enroll and connect.
    """
    stack = BenchStack(gateway_count=plan.gateways).start()
    fleet = Fleet(stack.address, stack.ca_certificate)
    context = scenarios.Context(stack, fleet, command)
    needs_fleet = bool(only & {"enrollment", "capacity", "commands", "reconnect"})
    try:
        if "ingest" in only:
            publish(scenarios.heartbeat_ingest(
                context, streams=plan.ingest_streams, clients=plan.ingest_clients, seconds=plan.ingest_seconds), write)

        if needs_fleet or "rollout" in only:
            section = scenarios.enrollment(context, max(plan.capacity_steps) if needs_fleet else plan.rollout_agents)
            if "enrollment" in only:
                publish(section, write)

        if needs_fleet:
            load_before = load_line()
            scenarios.measure_idle(context, window_seconds=3)
            if "capacity" in only:
                scenarios.measure_stream_baseline(context, plan.baseline_streams)
            steps, trips, fan_outs = [], [], []
            for agents in plan.capacity_steps:
                steps.append(scenarios.grow_fleet(context, agents, plan.capacity_window_seconds))
                logging.info("capacity step: %d agents online", agents)
                if "commands" in only and agents in plan.round_trip_at:
                    trips.append((agents, scenarios.round_trips(context, plan.round_trips)))
                if "commands" in only and agents in plan.fan_out_at:
                    fan_outs.append(scenarios.fan_out(context))
            if "capacity" in only:
                publish(scenarios.capacity_section(context, steps, plan.capacity_window_seconds, load_before), write)
            if "commands" in only:
                publish(scenarios.round_trip_section(context, trips, fan_outs, load_before), write)

        if "reconnect" in only:
            publish(scenarios.reconnect_storm(context), write)

        if "rollout" in only:
            fleet.stop()
            publish(scenarios.rollout(
                context, plan.rollout_agents, size_bytes=plan.rollout_bytes, max_parallel=plan.rollout_parallel), write)
    finally:
        fleet.stop()
        stack.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS), default="standard", help="which sizes to run (default standard)")
    parser.add_argument("--write", type=Path, help="Markdown file whose sections are replaced (default: print only)")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, from {', '.join(SCENARIOS)} (default: all)")
    arguments = parser.parse_args()
    only = frozenset(name.strip() for name in arguments.only.split(",") if name.strip())
    if unknown := only - set(SCENARIOS):
        parser.error(f"invalid --only scenario(s) {', '.join(sorted(unknown))}: expected names from {', '.join(SCENARIOS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    plan = SETS[arguments.set]
    command = f".venv/bin/python -m bench.run --set {arguments.set}"
    if only != set(SCENARIOS):
        command += f" --only {','.join(sorted(only))}"
    if arguments.write:
        command += f" --write {arguments.write}"
    started = time.monotonic()
    run_set(plan, command, arguments.write, only)
    if plan.boot_runs and "boot" in only:
        boot = [sys.executable, "-m", "bench.boot", "--runs", str(plan.boot_runs)]
        if arguments.write:
            boot += ["--write", str(arguments.write)]
        subprocess.run(boot, cwd=PROJECT_ROOT, check=True)
    logging.info("finished: %s set in %.0f s", arguments.set, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
