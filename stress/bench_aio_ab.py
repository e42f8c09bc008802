"""Two source trees' ``AsyncConnectionPool`` measured at the same time: a before/after
comparison that a shared machine's load cannot tilt.

    python stress/bench_aio_ab.py OTHER_TREE [--rounds 8] [--slot 2.0]
                                  [--config aio-query-64|aio-lease-64]

``bench_aio.py`` pairs each measurement with dedicated clones measured right
before or after it; on a machine whose other jobs come and go by the second,
its ratios swing by more than a change worth making.  Here the tree this
script belongs to and ``OTHER_TREE`` (a checkout of another commit, e.g.
``git worktree add /tmp/base main``) each run the configuration in their own
process (their own embedded server, server on CPU 1, client on CPU 0, as
``bench_aio.py`` pins) during the same wall-clock slots: whatever load there
is falls on both.  Both clients share CPU 0, so each gets about half of it and
the one that needs less CPU per query answers more: the report gives, per
slot, this tree's queries per second over the other's, and the median.  Run it
once with the trees swapped (or the same tree twice) to see the method's own
spread (an A/A run on 2026-11-30, load about 8: slots 0.94-1.14, median 1.00).

This is a benchmark, not a test: the exit status does not depend on the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("ADB_LOG_FILE", "")

Q = [{"GetStatus": {}}]
HERE = Path(__file__).resolve().parent


def measure(start_at: float, rounds: int, slot: float, config: str) -> list[float]:
    """In a child: queries per second of ``config`` in each slot from ``start_at``."""
    sys.path.insert(0, str(HERE))
    from bench_aio import measure_tasks
    from bench_e2e import _pin

    from aperturedb_pool.aio import AsyncConnectionPool
    from aperturedb_pool.testing import ServerProcess

    loop = asyncio.new_event_loop()
    out: list[float] = []
    with ServerProcess("127.0.0.1", 0) as srv:
        _pin(srv)
        pool = AsyncConnectionPool(srv.connector(), min_size=8, max_size=8, name="ab")
        loop.run_until_complete(pool.open(wait=True, timeout=30))

        async def query() -> Any:
            return await pool.query(Q)

        async def lease() -> Any:
            async with pool.lease() as conn:
                return await conn.query(Q)

        body = query if config == "aio-query-64" else lease
        loop.run_until_complete(measure_tasks(64, body, 0.3))  # warm-up
        for r in range(rounds):
            time.sleep(max(0.0, start_at + r * slot - time.time()))
            res = loop.run_until_complete(measure_tasks(64, body, slot * 0.7))
            out.append(res["qps"])
        loop.run_until_complete(pool.close())
    loop.close()
    return out


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None
    p = argparse.ArgumentParser(prog="stress/bench_aio_ab.py", description=__doc__.splitlines()[0])
    p.add_argument("other", nargs="?", help="the other source tree (its root directory)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--slot", type=float, default=2.0, help="seconds per round (70%% measured)")
    p.add_argument("--config", choices=("aio-query-64", "aio-lease-64"), default="aio-query-64")
    p.add_argument("--child", type=float, help=argparse.SUPPRESS)  # the shared start time
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(measure(a.child, a.rounds, a.slot, a.config)))
        return 0
    if not a.other:
        p.error("name the other source tree")
    trees = {"this": HERE.parent, "other": Path(a.other).resolve()}
    start_at = time.time() + 8.0  # both servers up and warm by then
    procs = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(tree))
        procs[name] = subprocess.Popen(
            # This script and its measuring code for both; each tree's package
            # (PYTHONPATH: the script's own directory holds no package).
            [sys.executable, str(Path(__file__).resolve()), "--child", str(start_at),
             "--rounds", str(a.rounds), "--slot", str(a.slot), "--config", a.config],
            cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    got = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"{name} ({trees[name]}) failed", file=sys.stderr)
            return 1
        got[name] = json.loads(out.strip().splitlines()[-1])
    ratios = [x / y for x, y in zip(got["this"], got["other"], strict=True)]
    print(f"{a.config}, {a.rounds} slots of {a.slot:g} s, both trees at once; this tree "
          f"{trees['this']} over {trees['other']}: median {statistics.median(ratios):.3f} "
          f"(slots {' '.join(f'{r:.2f}' for r in ratios)}); q/s median this "
          f"{statistics.median(got['this']):.0f}, other {statistics.median(got['other']):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
