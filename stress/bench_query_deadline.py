"""What a retry deadline costs ``pool.query()``: client CPU per query, with and without one.

Run:  python stress/bench_query_deadline.py [--count N] [--rounds R]

One thread, a pool of 1, ``GetStatus`` against the embedded server in its own
process.  Each round runs ``--count`` queries with the default policy
(``RetryPolicy()``: a 30 s deadline, which the pool's background thread
watches) and ``--count`` with ``RetryPolicy(deadline=None)``, alternating which
goes first; it prints the client CPU (``time.process_time``) per query of each
and their ratio, and the median ratio over the rounds.  A near deadline (under
``connectors.WATCHED_BEYOND``) bounds the socket instead: ``--near`` measures
that too.  A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("ADB_LOG_FILE", "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/bench_query_deadline.py")
    p.add_argument("--count", type=int, default=5000, help="queries per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--near", action="store_true", help="also a 2 s deadline (socket-bound)")
    a = p.parse_args(argv)
    from aperturedb_pool import ConnectionPool, RetryPolicy
    from aperturedb_pool.testing import ServerProcess

    policies = {"none": RetryPolicy(deadline=None), "default-30s": RetryPolicy()}
    if a.near:
        policies["near-2s"] = RetryPolicy(deadline=2.0)
    srv = ServerProcess(host="127.0.0.1", port=0).start()
    try:
        pool = ConnectionPool(srv.connector(), min_size=1, max_size=1)
        pool.wait_ready(15)
        q = [{"GetStatus": {}}]
        per: dict[str, list[float]] = {k: [] for k in policies}
        names = list(policies)
        for r in range(a.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                pol = policies[name]
                for _ in range(200):  # warm-up
                    pool.query(q, retry=pol)
                t0 = time.process_time()
                for _ in range(a.count):
                    pool.query(q, retry=pol)
                per[name].append((time.process_time() - t0) / a.count * 1e6)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} us" for k, v in per.items()),
                  flush=True)
        base = statistics.median(per["none"])
        for name, values in per.items():
            ratios = [v / b for v, b in zip(values, per["none"], strict=True)]
            print(f"{name:12s} median {statistics.median(values):6.1f} us CPU per query, "
                  f"{statistics.median(values) / base:.3f} x no deadline "
                  f"(paired ratios {min(ratios):.2f}-{max(ratios):.2f})")
        pool.close()
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
