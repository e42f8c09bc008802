"""Run every stress scenario; print PASS or FAIL with figures for each.

    python stress/run_all.py [--quick] [--repeat N] [--only NAME[,NAME...]] [--verbose]

Scenarios (each a script that starts its own embedded server as a separate
process on loopback, drives the real SDK Connector through the pool, and exits
non-zero on FAIL; run one alone with ``python stress/scenario_NAME.py``):

============  =====================================================================  ========
name          what it does                                                            default
============  =====================================================================  ========
churn         64 threads, pool of 8, random holds, random exceptions inside leases,  20 s
              interrupted queries: sharing detector 0, no leaks, stats add up
restarts      server restarts every 5 s under 32 threads of reads and unique         30 s
              writes: no read fails, no write duplicated or lost, count consistent
flaky         a loopback proxy resets or delays 3% of requests mid-request: the      30 s
              same invariants, and no answer ever reaches the wrong query
idle          server idle timeout (1 s) shorter than keepalive (3 s): no caller      30 s
              sees a failure
fork          a parent under load forks 4 children (3 rounds) that use the           15 s
              inherited pool: all succeed, the parent's connectors undisturbed
exhaustion    more waiters than max_waiting, timeouts, a deliberate leak, a dropped  ~4 s
              lease: the right errors, messages, timing and stats
asyncexc      ~5,000 asynchronous exceptions a second into 16 threads on a pool of   20 s
              4: no hang, no wrong answer, every slot back within 5 s
injection     an exception after every call (and at every line) of the lease paths, ~2 min
              both kinds at each point, fresh pool each: nothing hangs, leaks or
              answers wrongly
============  =====================================================================  ========

``--quick`` runs each for 6-12 s (about 1 minute in all); the defaults take
about 2.5 minutes in all; every scenario stops itself (a watchdog dumps the
stacks and fails a scenario that hangs).  ``--repeat 3`` runs the whole set
three times in a row.  Exit status 0 only when every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = ("churn", "restarts", "flaky", "idle", "fork", "exhaustion", "asyncexc",
             "injection")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/run_all.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (about 1 minute in all)")
    p.add_argument("--repeat", type=int, default=1, help="run the whole set N times")
    p.add_argument("--only", default=None, help="comma-separated scenario names")
    p.add_argument("--verbose", action="store_true", help="print every check of every run")
    p.add_argument("--seed", type=int, default=None, help="seed passed to every scenario")
    a = p.parse_args(argv)
    names = SCENARIOS if a.only is None else tuple(n.strip() for n in a.only.split(","))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    results: list[tuple[int, str, int, float, str]] = []
    t_all = time.monotonic()
    for rnd in range(1, a.repeat + 1):
        for name in names:
            cmd = [sys.executable, os.path.join(HERE, f"scenario_{name}.py")]
            if a.quick:
                cmd.append("--quick")
            if a.verbose:
                cmd.append("--verbose")
            if a.seed is not None:
                cmd += ["--seed", str(a.seed)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                      cwd=HERE)
                code, out, err = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as e:
                code = -1
                out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = "run_all: killed after 600 s"
            dt = time.monotonic() - t0
            verdict = next((ln for ln in out.splitlines()
                            if ln.startswith(("PASS ", "FAIL "))), "")
            if not verdict:
                verdict = f"FAIL {name}: no verdict (exit status {code})"
            if code != 0 and verdict.startswith("PASS"):
                verdict = f"FAIL {name}: exit status {code} after: {verdict}"
            prefix = f"[run {rnd}/{a.repeat}] " if a.repeat > 1 else ""
            print(prefix + verdict, flush=True)
            if code != 0 or a.verbose:
                for ln in out.splitlines():
                    if ln.startswith("  "):
                        print(ln, flush=True)
                if code != 0 and err.strip():
                    tail = err.strip().splitlines()[-15:]
                    print("  stderr (last lines):", flush=True)
                    for ln in tail:
                        print("    " + ln, flush=True)
            results.append((rnd, name, code, dt, verdict))
    failed = [r for r in results if r[2] != 0]
    print(f"\n{len(results) - len(failed)}/{len(results)} runs passed in "
          f"{time.monotonic() - t_all:.0f} s" + (f"; failed: "
                                                  f"{', '.join(f'{n} (run {r})' for r, n, *_ in failed)}"
                                                  if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
