"""Small pieces shared by the benchmarks under ``stress/``.

- ``StandInConnector``: the tests' stand-in connector (no socket, so the pool
  skips its socket probe for it), recording nothing, so a benchmark measures
  the pool's own cost and nothing else.
- ``jain_index``, ``percentile``: the statistics the benchmarks report.
- ``machine_facts``: what a reader needs to judge a figure (cores, Python, date).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence

from aperturedb_pool.testing._standin import StandIn


def StandInConnector() -> StandIn:  # noqa: N802 - used as the class it was
    """The stand-in of the unit tests (``aperturedb_pool.testing._standin``),
    without recording its queries: a benchmark measures the pool's own cost."""
    return StandIn(record=False)


def jain_index(counts: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when all equal, 1/n when one takes everything."""
    n = len(counts)
    squares = sum(x * x for x in counts)
    if n == 0 or squares == 0:
        return float("nan")
    return sum(counts) ** 2 / (n * squares)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def load_average() -> float | None:
    """1-minute load average: other work on the machine is the main source of noise."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_facts() -> dict:
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": nproc,
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "switch_interval_s": sys.getswitchinterval(),
        "loadavg_1m": load_average(),
        "git": _git_revision(),
    }
