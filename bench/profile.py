"""Profile one gateway process with py-spy while simulated agents flood it with heartbeats.

Usage: .venv/bin/python -m bench.profile [--seconds 15] [--streams 40] [--top 25]

Prints the functions with the largest share of samples, counting a function
once per sample wherever it is on the stack (inclusive), and the raw py-spy
output path. Needs py-spy (a test dependency) and permission to ptrace the
gateway, which root has.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import ingest
from bench.simulator import Fleet
from bench.stack import BenchStack


def inclusive_shares(raw_output: Path) -> tuple[collections.Counter[str], int]:
    """Count, for each function, the samples in which it appears in py-spy's raw (collapsed) output."""
    shares: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_output.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for frame in set(stack.split(";")):
            shares[frame] += count
    return shares, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="length of the load and of the profile, in seconds")
    parser.add_argument("--streams", type=int, default=40, help="Session streams that send heartbeats")
    parser.add_argument("--top", type=int, default=25, help="functions to print")
    arguments = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    stack = BenchStack(gateway_count=1).start()
    fleet = Fleet(stack.address, stack.ca_certificate)
    output = stack.root / "gateway-profile.txt"
    try:
        credentials, errors, _ = fleet.register(stack.enrollment_token(), arguments.streams, workers=1, concurrency=8)
        if errors:
            raise RuntimeError(f"failed to register the agents: {errors}")
        fleet.stop()
        plan = ingest.LoadPlan(stack.address, stack.ca_certificate, "gateway", credentials, arguments.seconds + 4)
        processes, results = ingest.drive([plan])
        profile = subprocess.run(
            [py_spy, "record", "--pid", str(stack.gateway_pids[0]), "--duration", str(int(arguments.seconds)),
             "--rate", "200", "--format", "raw", "--output", str(output), "--nonblocking"],
            capture_output=True, text=True, check=False)
        if profile.returncode != 0:
            raise RuntimeError(f"py-spy failed with {profile.returncode}: {profile.stderr.strip()}")
        results.get(timeout=60)
        for process in processes:
            process.join(timeout=30)

        shares, total = inclusive_shares(output)
        print(f"{total} samples of gateway pid {stack.gateway_pids[0]}; inclusive share of the top functions:")
        for frame, count in shares.most_common(arguments.top):
            print(f"{100 * count / total:5.1f}%  {frame}")
        saved_copy = Path(os.environ.get("TMPDIR", "/tmp")) / "agentmgr-gateway-profile.txt"
        shutil.copy(output, saved_copy)
        print(f"raw py-spy output: {saved_copy}")
    finally:
        fleet.stop()
        stack.close()
    return 0


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    sys.exit(main())
