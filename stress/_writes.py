"""Uniquely-keyed writes and echo reads under faults, and the ledger that checks them.

Used by the restarts and flaky-network scenarios.  Every write is an
``AddEntity`` of class ``W`` with a unique ``key``; in "echo" mode the same
query also finds that key back, so the answer proves it belongs to this write.
Every outcome is booked:

- acknowledged: a successful response;
- unknown: ``OutcomeUnknown`` (the write may or may not have run);
- failed clearly: another ``PoolError`` (nothing was delivered: ``ConnectFailed``
  gave up as ``ServerUnreachable``, ``PoolTimeout``...) or a failed-transaction
  response;
- unclear: anything else (a plain ``Exception`` from the SDK...): a violation.

At the end the stored keys are compared with the ledger: no key twice, every
acknowledged key present, nothing present that was not acknowledged or
unknown, count = acknowledged + (0..unknown).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from typing import Any

from _scenario import Scenario, echo_ok, echo_query

WRITE_CLASS = "W"


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.unknown: set[str] = set()
        self.failed: dict[str, str] = {}
        self.unclear: dict[str, str] = {}
        self.bad_echo: list[str] = []
        self.reads_ok = 0
        self.read_failures: list[str] = []
        self.read_mismatches = 0
        self.read_latency_max = 0.0
        self.write_latency_max = 0.0
        self.errors_by_kind: collections.Counter[str] = collections.Counter()


def write_query(key: str, echo: bool) -> list[dict[str, Any]]:
    q: list[dict[str, Any]] = [{"AddEntity": {"class": WRITE_CLASS, "properties": {"key": key}}}]
    if echo:
        q.append({"FindEntity": {"with_class": WRITE_CLASS,
                                 "constraints": {"key": ["==", key]},
                                 "results": {"list": ["key"]}}})
    return q


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def do_write(pool: Any, ledger: Ledger, key: str, echo: bool) -> None:
    from aperturedb_pool import OutcomeUnknown, PoolError

    t0 = time.monotonic()
    try:
        response, _ = pool.query(write_query(key, echo))
    except OutcomeUnknown as e:
        with ledger.lock:
            ledger.unknown.add(key)
            ledger.errors_by_kind[type(e).__name__] += 1
        return
    except PoolError as e:
        with ledger.lock:
            ledger.failed[key] = _one_line(e)
            ledger.errors_by_kind[type(e).__name__] += 1
        return
    except Exception as e:
        with ledger.lock:
            ledger.unclear[key] = _one_line(e)
            ledger.errors_by_kind[type(e).__name__] += 1
        return
    dt = time.monotonic() - t0
    ok = isinstance(response, list) and response and \
        response[0].get("AddEntity", {}).get("status") == 0
    if ok and echo:
        try:
            found = response[1]["FindEntity"]["entities"]
            ok = [e["key"] for e in found] == [key]
        except (LookupError, TypeError, AttributeError):
            ok = False
        if not ok:
            with ledger.lock:
                ledger.bad_echo.append(f"{key}: {str(response)[:200]}")
            return
    with ledger.lock:
        ledger.write_latency_max = max(ledger.write_latency_max, dt)
        if ok:
            ledger.acked.add(key)
        elif isinstance(response, dict):
            ledger.failed[key] = f"failed transaction: {response}"
        else:
            ledger.unclear[key] = f"unexpected response: {str(response)[:200]}"


def do_read(pool: Any, ledger: Ledger, k: int) -> None:
    t0 = time.monotonic()
    try:
        response, _ = pool.query(echo_query(k))
    except Exception as e:
        with ledger.lock:
            ledger.read_failures.append(_one_line(e))
            ledger.errors_by_kind["read " + type(e).__name__] += 1
        return
    dt = time.monotonic() - t0
    with ledger.lock:
        ledger.read_latency_max = max(ledger.read_latency_max, dt)
        if echo_ok(response, k):
            ledger.reads_ok += 1
        else:
            ledger.read_mismatches += 1
            ledger.read_failures.append(f"mismatch: asked {k}, got {str(response)[:200]}")


def worker_loop(pool: Any, ledger: Ledger, i: int, seed: int, deadline: float, keys: int,
                echo_writes: bool) -> None:
    rng = random.Random(seed)
    n = 0
    while time.monotonic() < deadline:
        if rng.random() < 0.5:
            do_read(pool, ledger, rng.randrange(keys))
        else:
            n += 1
            do_write(pool, ledger, f"t{i}-{n}", echo_writes)


def check_ledger(sc: Scenario, ledger: Ledger, stored: list[dict[str, Any]]) -> None:
    """The write and read invariants, as checks of ``sc``."""
    keys = [o["properties"].get("key") for o in stored if o.get("class") == WRITE_CLASS]
    counts = collections.Counter(keys)
    dup = {k: c for k, c in counts.items() if c > 1}
    present = set(counts)
    missing = ledger.acked - present
    unexplained = present - ledger.acked - ledger.unknown
    failed_but_stored = present & set(ledger.failed)
    n_unknown_stored = len(present & ledger.unknown)
    sc.figure(reads=ledger.reads_ok, acked=len(ledger.acked), unknown=len(ledger.unknown),
              unknown_ran=n_unknown_stored, failed=len(ledger.failed),
              stored=len(keys), read_max_s=round(ledger.read_latency_max, 3))
    sc.check("no read failed", not ledger.read_failures,
             f"{len(ledger.read_failures)} failed; first: {ledger.read_failures[:3]}")
    sc.check("no answer delivered to the wrong query",
             ledger.read_mismatches == 0 and not ledger.bad_echo,
             f"read mismatches {ledger.read_mismatches}, write echoes {ledger.bad_echo[:3]}")
    sc.check("every write acknowledged, unknown, or failed with a clear error",
             not ledger.unclear, f"{len(ledger.unclear)} unclear: "
                                 f"{list(ledger.unclear.values())[:3]}")
    sc.check("no write stored twice", not dup, f"{len(dup)} duplicated: {list(dup.items())[:5]}")
    sc.check("every acknowledged write stored", not missing,
             f"{len(missing)} missing: {sorted(missing)[:5]}")
    sc.check("no write stored that was reported failed", not failed_but_stored,
             f"{len(failed_but_stored)}: {[ledger.failed[k] for k in list(failed_but_stored)[:3]]}")
    sc.check("nothing stored that was neither acknowledged nor unknown", not unexplained,
             f"{len(unexplained)}: {sorted(unexplained)[:5]}")
    n_stored = len(keys)
    sc.check("stored = acknowledged + (0..unknown)",
             len(ledger.acked) <= n_stored <= len(ledger.acked) + len(ledger.unknown),
             f"stored {n_stored}, acked {len(ledger.acked)}, unknown {len(ledger.unknown)}")
