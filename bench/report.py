"""Sections of docs/benchmarks.md: the shared header lines and the replacement between markers."""

from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores, {cpu}, {memory_gib:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def load_line() -> str:
    """Return the load averages, which show other work sharing the machine during the run."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def section(name: str, title: str, command: str, body: list[str], *, load_before: str) -> str:
    """Return a whole section with its markers, header lines and ``body``."""
    return "\n".join([
        f"<!-- {name}:start -->",
        f"## {title}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_line()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Load average before / after: {load_before} ; {load_line()}",
        "",
        *body,
        f"<!-- {name}:end -->",
    ])


def replace_section(path: Path, name: str, text: str) -> None:
    """Replace the section ``name`` in ``path`` with ``text``, or append it when it is missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in document:
        before, rest = document.split(start, 1)
        document = before + text + rest.split(end, 1)[1]
    else:
        document = document.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(document)


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (``fraction`` from 0 to 1)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
