"""What the retry layer costs a query: client CPU per query of each way to run one.

Run:  python stress/bench_query_cpu.py [--count N] [--rounds R] [--json]

One thread, a pool of 1, ``GetStatus`` against the embedded server in its own
process (so the CPU measured is the client's alone: ``time.thread_time`` of the
calling thread).  Each round runs ``--count`` queries of each way, in turn:

=============  ====================================================================
dedicated      ``conn.query(q)`` on a clone of the template (no pool: the baseline)
lease          ``with pool.lease() as conn: conn.query(q)``
pool.query     ``pool.query(q)``: the lease, the retry policy's first attempt, the
               deadline handed to the connector (issue 15: "the retry layer's
               first attempt must cost almost nothing")
shared         ``pool.connector().query(q)``: ``pool.query`` plus the calling
               thread's last response
=============  ====================================================================

The report gives, per way, the lowest CPU per query over the rounds (the least
disturbed by other work on the machine), its excess over ``dedicated`` and over
``lease`` in microseconds, and its ratio to ``dedicated``.  Compare two commits
by running this with ``PYTHONPATH`` pointing at each, alternately.  A benchmark,
never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("ADB_LOG_FILE", "")

Q = [{"GetStatus": {}}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/bench_query_cpu.py")
    p.add_argument("--count", type=int, default=2000, help="queries per measurement")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a = p.parse_args(argv)
    if a.count < 1 or a.rounds < 1:
        p.error("--count and --rounds must be at least 1")

    from aperturedb_pool import ConnectionPool
    from aperturedb_pool.testing import ServerProcess

    with ServerProcess("127.0.0.1", 0) as srv:
        template = srv.connector()
        dedicated = template.clone()
        dedicated.query(Q)
        pool = ConnectionPool(template, min_size=1, max_size=1, name="query-cpu")
        pool.wait_ready(30)
        shared = pool.connector()

        def lease() -> None:
            with pool.lease() as conn:
                conn.query(Q)

        ways: dict[str, Callable[[], Any]] = {
            "dedicated": lambda: dedicated.query(Q), "lease": lease,
            "pool.query": lambda: pool.query(Q), "shared": lambda: shared.query(Q)}
        for f in ways.values():  # warm-up
            for _ in range(min(a.count, 200)):
                f()
        cpu: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(a.rounds):
            for name, f in ways.items():
                t0 = time.thread_time()
                for _ in range(a.count):
                    f()
                cpu[name].append((time.thread_time() - t0) / a.count * 1e6)
        pool.close()

    best = {k: min(v) for k, v in cpu.items()}
    report = {k: {"cpu_us": round(v, 2), "over_dedicated_us": round(v - best["dedicated"], 2),
                  "over_lease_us": round(v - best["lease"], 2),
                  "vs_dedicated": round(best["dedicated"] / v, 3)} for k, v in best.items()}
    if a.json:
        print(json.dumps({"count": a.count, "rounds": a.rounds, "ways": report}))
        return 0
    print(f"client CPU per GetStatus, one thread, lowest of {a.rounds} rounds of {a.count}")
    print(f"{'way':12s} {'cpu_us':>8s} {'+dedicated':>11s} {'+lease':>8s} {'vs dedicated':>13s}")
    for k, r in report.items():
        print(f"{k:12s} {r['cpu_us']:8.2f} {r['over_dedicated_us']:+11.2f} "
              f"{r['over_lease_us']:+8.2f} {r['vs_dedicated']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
