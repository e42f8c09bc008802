"""Shared pieces of the stress scenarios (``stress/scenario_*.py``).

Each scenario is a script: it starts its own embedded server as a separate
process on loopback (``ServerProcess``), drives the real SDK ``Connector``
through ``aperturedb_pool.ConnectionPool``, checks invariants at the end and
prints one verdict line, ``PASS name (...): figures`` or ``FAIL name (...)``
followed by every failed check; the exit status is 0 on PASS, 1 on FAIL.

- ``Scenario``: arguments (``--duration``, ``--quick``, ``--seed``, ``--json``,
  ``--verbose``), checks, figures, the verdict, and a hard time limit (a
  faulthandler watchdog dumps every thread's stack and exits 1 if a scenario
  hangs).
- ``PoolLog``: captures the pool's log records (counted; shown with --verbose).
- ``seed_echo`` / ``echo_query`` / ``echo_ok``: entities that carry a unique
  key, so every answer can be checked against the query that asked for it (a
  response delivered to the wrong query cannot pass).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# Before anything imports the SDK: otherwise it may write error.<time>.log files here.
os.environ.setdefault("ADB_LOG_FILE", "")

ECHO_CLASS = "Echo"


class Scenario:
    """Arguments, checks and the verdict of one scenario."""

    def __init__(self, name: str, doc: str | None, *, duration: float, quick: float,
                 limit: float = 120.0, argv: list[str] | None = None,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        p = argparse.ArgumentParser(prog=f"stress/scenario_{name}.py",
                                    description=(doc or "").strip().splitlines()[0] if doc else None,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    epilog=doc)
        p.add_argument("--duration", type=float, default=None,
                       help=f"seconds of load (default {duration:g}; --quick {quick:g})")
        p.add_argument("--quick", action="store_true", help="a short run")
        p.add_argument("--seed", type=int, default=None, help="random seed")
        p.add_argument("--json", action="store_true", help="also print the result as JSON")
        p.add_argument("--verbose", action="store_true", help="show the pool's log lines")
        if extra is not None:
            extra(p)
        self.args = p.parse_args(argv)
        self.name = name
        self.duration = (self.args.duration if self.args.duration is not None
                         else quick if self.args.quick else duration)
        self.seed = self.args.seed if self.args.seed is not None else random.randrange(2 ** 31)
        self.checks: list[tuple[str, bool, str]] = []
        self.figures: dict[str, Any] = {}
        self.started = time.monotonic()
        # Bounded: a hang is a failure with every thread's stack, never a stuck run.
        self.limit = max(limit, self.duration * 3 + 60)
        faulthandler.dump_traceback_later(self.limit, exit=True)
        self.log = PoolLog(verbose=self.args.verbose)

    def check(self, what: str, ok: bool, detail: Any = "") -> bool:
        text = str(detail)
        if not ok:
            # One readable line per failed check: SDK messages carry \r\n and padding.
            text = " ".join(text.split())
            text = text if len(text) <= 900 else text[:900] + " ..."
        self.checks.append((what, bool(ok), text))
        return bool(ok)

    def check_no_leak(self, stats: Any, what: str = "no lease leaked") -> bool:
        """The pool has no lease out and no caller waiting (at the end of a run)."""
        return self.check(what, stats.leased == 0 and stats.waiting == 0,
                          f"leased {stats.leased}, waiting {stats.waiting}")

    def figure(self, **kw: Any) -> None:
        self.figures.update(kw)

    def finish(self) -> int:
        faulthandler.cancel_dump_traceback_later()
        elapsed = time.monotonic() - self.started
        failed = [c for c in self.checks if not c[1]]
        ok = bool(self.checks) and not failed
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        verdict = "PASS" if ok else "FAIL"
        print(f"{verdict} {self.name} ({elapsed:.1f} s, seed {self.seed}): {figs}", flush=True)
        for what, good, detail in self.checks:
            if not good or self.args.verbose:
                print(f"  {'ok  ' if good else 'FAIL'} {what}" + (f": {detail}" if detail else ""),
                      flush=True)
        if not self.checks:
            print("  FAIL no check was run", flush=True)
        if self.args.json:
            print(json.dumps({"scenario": self.name, "pass": ok, "elapsed_s": round(elapsed, 2),
                              "seed": self.seed, "figures": self.figures,
                              "checks": [{"check": c, "ok": g, "detail": d}
                                         for c, g, d in self.checks]}, default=str), flush=True)
        return 0 if ok else 1


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


class PoolLog(logging.Handler):
    """Captures the pool's log records: counted, kept, printed with --verbose."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self.records: list[logging.LogRecord] = []
        lg = logging.getLogger("aperturedb_pool")
        lg.addHandler(self)
        lg.setLevel(logging.INFO)

    # emit() runs under the handler's own lock (an RLock that logging re-creates
    # in a forked child, unlike a lock of ours).
    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 100_000:
            self.records.append(record)
        if self.verbose:
            print(f"  [log {record.levelname.lower()}] {record.getMessage()}", file=sys.stderr,
                  flush=True)

    def count(self, level: int = logging.WARNING, contains: str = "") -> int:
        with self.lock:  # type: ignore[union-attr]
            return sum(1 for r in self.records
                       if r.levelno >= level and contains in r.getMessage())

    def messages(self, level: int = logging.WARNING) -> list[str]:
        with self.lock:  # type: ignore[union-attr]
            return [r.getMessage() for r in self.records if r.levelno >= level]


def start_server(**kw: Any) -> Any:
    """A started ``ServerProcess`` on loopback (a free port)."""
    from aperturedb_pool.testing import ServerProcess

    kw.setdefault("host", "127.0.0.1")
    kw.setdefault("port", 0)
    return ServerProcess(**kw).start()


def seed_echo(pool: Any, n: int, cls: str = ECHO_CLASS) -> None:
    """Store ``n`` entities of ``cls`` with properties ``{"k": 0..n-1}``."""
    for start in range(0, n, 200):
        q = [{"AddEntity": {"class": cls, "properties": {"k": k}}}
             for k in range(start, min(n, start + 200))]
        response, _ = pool.query(q, idempotent=False)
        if not isinstance(response, list):
            raise RuntimeError(f"seeding failed: {response}")


def echo_query(k: int, cls: str = ECHO_CLASS) -> list[dict[str, Any]]:
    """A read whose answer must carry ``k`` back."""
    return [{"FindEntity": {"with_class": cls, "constraints": {"k": ["==", k]},
                            "results": {"list": ["k"]}}}]


def echo_ok(response: Any, k: int) -> bool:
    try:
        body = response[0]["FindEntity"]
        return body["status"] == 0 and [e["k"] for e in body["entities"]] == [k]
    except (LookupError, TypeError, AttributeError):
        return False


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


def run_threads(n: int, target: Callable[[int], None], name: str,
                join_timeout: float) -> list[str]:
    """Run ``target(i)`` in ``n`` threads; return the crashes (and threads that hung)."""
    crashes: list[str] = []
    lock = threading.Lock()

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # reported as a failed check by the caller
            with lock:
                crashes.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=wrap, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        crashes.append(f"{len(hung)} thread(s) still running after {join_timeout:.0f} s: "
                       f"{hung[:5]}")
    return crashes


def server_settled(srv: Any, pool: Any, timeout: float = 3.0) -> tuple[bool, int, int]:
    """Wait until the server's open client connections equal the pool's size."""
    last = (0, 0)

    def same() -> bool:
        nonlocal last
        last = (srv.counters()["open"], pool.stats().size)
        return last[0] == last[1]
    ok = wait_until(same, timeout, 0.1)
    return ok, last[0], last[1]
