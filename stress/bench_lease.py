"""Lease benchmark: the pool's own cost and fairness, with stand-in connectors.

Run:  python stress/bench_lease.py [--json] [--duration S] [--only NAME[,NAME...]]

Every figure comes from one run, side by side with the SDK's pool
(``aperturedb.ConnectionPool``) and bare baselines, and the targets of the
pool issue are stated as ratios against the SDK's pool measured here:

1. ``single``: lease + return from one thread with an empty body, ns per
   lease, median of ``--repeats`` runs of ``--iterations`` leases. Target: ours
   at most 0.3 x the SDK pool.
2. ``contended``: 8 threads sharing 4 connectors, empty bodies, wall time /
   total leases over ``--contended-repeats`` runs of ``--contended-duration``
   seconds (threads start on a Barrier, stop on an Event). Pooled, not a median:
   CPython threads flip between a fast regime and a convoy several times slower
   for 0.1 s to seconds at a time. Target: ours at most 0.5 x SDK.
3. ``fairness``: 32 threads sharing 8 connectors for ``--duration`` seconds,
   each lease held for a ``time.sleep(0.0002)``. Utilization = leases per
   second / (8 / measured mean hold); Jain's index of per-thread lease counts;
   wait (request to body) p99 and max. Targets for ours: utilization >= 0.95,
   Jain >= 0.99, longest wait <= 10 ms.

Pools under test (``--only`` also accepts these names): ``ours``
(``aperturedb_pool.ConnectionPool``), ``sdk`` (``aperturedb.ConnectionPool``
0.5.3), ``queue`` (a bare ``queue.Queue`` get/put), ``deque`` (a bare
deque + Lock, single thread only: it cannot wait).

All pools run the same loop code: each is wrapped in a ``Subject`` whose
``lease`` is a zero-argument callable returning a context manager. The garbage
collector is disabled during timed sections (as ``timeit`` does) and subjects
are interleaved within each repeat so machine drift hits them alike (the
"paired ratio" is the median over repeats of ours_i / SDK_i).
This is a benchmark, never a test: the exit status does not depend on targets.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat

from _benchkit import StandInConnector, jain_index, load_average, machine_facts, percentile

SCENARIOS = ("single", "contended", "fairness")
POOLS = ("ours", "ours-metrics", "sdk", "queue", "deque")
# deque + Lock cannot make a caller wait, so it only runs where nobody has to.
POOLS_BY_SCENARIO = {
    "single": ("ours", "ours-metrics", "sdk", "queue", "deque"),
    "contended": ("ours", "ours-metrics", "sdk", "queue"),
    "fairness": ("ours", "sdk", "queue"),
}
LABELS = {
    "ours": "aperturedb_pool.ConnectionPool",
    "ours-metrics": "the same, instrumented (metrics)",
    "sdk": "aperturedb.ConnectionPool (SDK)",
    "queue": "bare queue.Queue",
    "deque": "bare deque+Lock",
}
# (scenario, metric) -> (comparison, bound, relative to SDK?)
TARGETS = {
    ("single", "ns_per_lease"): ("<=", 0.3, True),
    ("contended", "ns_per_lease"): ("<=", 0.5, True),
    ("fairness", "utilization"): (">=", 0.95, False),
    ("fairness", "jain"): (">=", 0.99, False),
    ("fairness", "max_wait_ms"): ("<=", 10.0, False),
}
CHUNK = 64  # empty leases between two looks at the stop Event
JOIN_GRACE_S = 30.0
# Ratios vs SDK are shown where they mean something (not for counts or near-zero waits).
RATIO_METRICS = {"ns_per_lease", "leases_per_s", "utilization", "jain"}  # a pool that hangs its threads longer than this is reported, not awaited


# --------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    name: str
    lease: Callable[[], object]  # returns a context manager
    close: Callable[[], None]
    stats: Callable[[], object] | None = None


class _QueueLease:
    """The least a context manager around queue.Queue get/put can do."""

    __slots__ = ("_queue", "_conn")

    def __init__(self, q: queue.Queue) -> None:
        self._queue = q

    def __enter__(self):
        self._conn = conn = self._queue.get()
        return conn

    def __exit__(self, exc_type, exc, tb):
        self._queue.put(self._conn)
        return False


class _DequeLease:
    """The least a context manager around a deque guarded by a Lock can do."""

    __slots__ = ("_idle", "_lock", "_conn")

    def __init__(self, idle: deque, lock: threading.Lock) -> None:
        self._idle = idle
        self._lock = lock

    def __enter__(self):
        with self._lock:
            self._conn = conn = self._idle.pop()
        return conn

    def __exit__(self, exc_type, exc, tb):
        with self._lock:
            self._idle.append(self._conn)
        return False


def _make_ours(size: int) -> Subject:
    from aperturedb_pool import ConnectionPool

    pool = ConnectionPool(StandInConnector(), min_size=size, max_size=size, name="bench")
    try:
        if hasattr(pool, "wait_ready"):
            pool.wait_ready(timeout=10)
        pool.lease  # noqa: B018  (fail here, not in a worker, if the API is missing)
    except BaseException:
        if hasattr(pool, "close"):
            pool.close()
        raise
    return Subject("ours", pool.lease, pool.close, getattr(pool, "stats", None))


def _import_sdk_pool():
    # The SDK's import writes an error log file unless this is set (to empty).
    os.environ.setdefault("ADB_LOG_FILE", "")
    from aperturedb.ConnectionPool import ConnectionPool

    return ConnectionPool


def _make_sdk(size: int) -> Subject:
    sdk_pool_class = _import_sdk_pool()
    pool = sdk_pool_class(pool_size=size, connection_factory=StandInConnector)
    return Subject("sdk", pool.get_connection, pool.close)


def _make_queue(size: int) -> Subject:
    q: queue.Queue = queue.Queue(maxsize=size)
    for _ in range(size):
        q.put(StandInConnector())
    return Subject("queue", functools.partial(_QueueLease, q), lambda: None)


def _make_deque(size: int) -> Subject:
    idle = deque(StandInConnector() for _ in range(size))
    return Subject("deque", functools.partial(_DequeLease, idle, threading.Lock()), lambda: None)


def _make_ours_metrics(size: int) -> Subject:
    # The pool instrumented as a user would: OpenTelemetry (the SDK, when
    # installed, with a reader that is never collected during the timing) and a
    # Prometheus collector.  What a lease pays is the timing Lease subclass.
    from aperturedb_pool import metrics

    subject = _make_ours(size)
    pool = subject.lease.__self__
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        metrics.instrument(pool, MeterProvider(metric_readers=[InMemoryMetricReader()]))
    except ImportError:
        metrics.snapshot(pool)  # the recorder and the timing lease alone
    metrics.PrometheusCollector(pool)
    return Subject("ours-metrics", pool.lease, pool.close, subject.stats)


FACTORIES = {"ours": _make_ours, "ours-metrics": _make_ours_metrics, "sdk": _make_sdk,
             "queue": _make_queue, "deque": _make_deque}


# --------------------------------------------------------------------------- hot loops
# The same code runs for every pool; keep it free of anything but the lease.


def _loop_empty(lease, iterations: int) -> int:
    """Nanoseconds for `iterations` empty leases on this thread."""
    it = repeat(None, iterations)
    t0 = time.perf_counter_ns()
    for _ in it:
        with lease():
            pass
    return time.perf_counter_ns() - t0


def _worker_empty(lease, barrier: threading.Barrier, stop: threading.Event, out: list, idx: int):
    try:
        is_set = stop.is_set
        chunks = 0
        barrier.wait()
        t0 = time.perf_counter_ns()
        while not is_set():  # checked every CHUNK leases so the check costs ~nothing
            for _ in repeat(None, CHUNK):
                with lease():
                    pass
            chunks += 1
        out[idx] = (t0, time.perf_counter_ns(), chunks * CHUNK)
    except BaseException as exc:  # a broken pool must not hang the run
        out[idx] = exc
        barrier.abort()


def _worker_hold(lease, hold: float, barrier: threading.Barrier, stop: threading.Event,
                 out: list, idx: int):
    try:
        waits: list[float] = []
        append = waits.append
        pc = time.perf_counter
        sleep = time.sleep
        is_set = stop.is_set
        held = 0.0
        barrier.wait()
        start = pc()
        while not is_set():
            t_req = pc()
            with lease():
                t_in = pc()
                sleep(hold)
                t_out = pc()
            append(t_in - t_req)
            held += t_out - t_in
        out[idx] = (len(waits), held, waits, start, pc())
    except BaseException as exc:
        out[idx] = exc
        barrier.abort()


def _run_threads(target, args_for, n_threads: int):
    """Start n threads waiting on a Barrier the caller also waits on, to release them."""
    out: list = [None] * n_threads
    barrier = threading.Barrier(n_threads + 1)
    threads = [
        threading.Thread(target=target, args=args_for(barrier, out, i),
                         name=f"bench-{i}", daemon=True)
        for i in range(n_threads)
    ]
    for t in threads:
        t.start()
    return out, barrier, threads


def _join_all(threads, deadline: float) -> bool:
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def _first_error(out: list) -> BaseException | None:
    for item in out:
        if isinstance(item, BaseException) and not isinstance(item, threading.BrokenBarrierError):
            return item
    for item in out:
        if isinstance(item, BaseException):
            return item
    return None


# --------------------------------------------------------------------------- scenarios


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    pool_stats: dict[str, str] = field(default_factory=dict)

    def add(self, scenario: str, pool: str, metric: str, value: float, unit: str, **extra):
        self.rows.append({"scenario": scenario, "pool": pool, "metric": metric,
                          "value": value, "unit": unit, **extra})

    def error(self, scenario: str, pool: str, exc: BaseException | str):
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.errors.append({"scenario": scenario, "pool": pool, "error": text})
        log(f"  {pool}: ERROR in {scenario}: {text}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(names, size: int, scenario: str, report: Report) -> list[Subject]:
    subjects = []
    for name in names:
        if name in report.skipped:
            continue
        try:
            subjects.append(FACTORIES[name](size))
        except Exception as exc:
            reason = f"construction failed: {type(exc).__name__}: {exc}"
            if name == "ours":
                reason += " (pool not implemented yet?)"
            report.skipped[name] = reason
            log(f"  {name}: SKIPPED ({reason})")
    return subjects


def _close(subject: Subject, scenario: str, report: Report) -> None:
    if subject.stats is not None:
        try:
            report.pool_stats[f"{scenario}/{subject.name}"] = repr(subject.stats())
        except Exception as exc:
            report.pool_stats[f"{scenario}/{subject.name}"] = f"stats() failed: {exc!r}"
    try:
        subject.close()
    except Exception as exc:
        report.error(scenario, subject.name, f"close() failed: {type(exc).__name__}: {exc}")


def run_single(names, args, report: Report) -> None:
    log(f"[single] 1 thread, pool of 4, {args.repeats} x {args.iterations} empty leases")
    subjects = _build(names, 4, "single", report)
    samples: dict[str, list[float]] = {s.name: [] for s in subjects}
    failed: set[str] = set()
    gc_was_enabled = gc.isenabled()
    try:
        for s in subjects:  # warm-up: first-call costs, caches, lazy imports
            try:
                _loop_empty(s.lease, min(10_000, args.iterations))
            except Exception as exc:
                report.error("single", s.name, exc)
                failed.add(s.name)
        for _ in range(args.repeats):
            for s in subjects:  # interleaved so drift hits every subject alike
                if s.name in failed:
                    continue
                gc.collect()
                gc.disable()
                try:
                    ns = _loop_empty(s.lease, args.iterations)
                except Exception as exc:
                    report.error("single", s.name, exc)
                    failed.add(s.name)
                    continue
                finally:
                    if gc_was_enabled:
                        gc.enable()
                samples[s.name].append(ns / args.iterations)
    finally:
        for s in subjects:
            _close(s, "single", report)
    for s in subjects:
        if s.name in failed or not samples[s.name]:
            continue
        _add_repeats(report, "single", s.name, samples[s.name])


def _add_repeats(report: Report, scenario: str, name: str, values: list[float],
                 value: float | None = None, statistic: str = "median") -> None:
    med = statistics.median(values)
    if value is None:
        value = med
    spread = (max(values) - min(values)) / med if med else float("nan")
    report.add(scenario, name, "ns_per_lease", value, "ns", statistic=statistic,
               repeats=[round(v, 1) for v in values], min=min(values), spread=spread)
    log(f"  {name:6s} {value:10.0f} ns/lease {statistic} (repeats: "
        f"{', '.join(f'{v:.0f}' for v in values)}; spread {spread:.0%})")


def run_contended(names, args, report: Report) -> None:
    n_threads, size = 8, 4
    log(f"[contended] {n_threads} threads, pool of {size}, {args.contended_repeats} x "
        f"{args.contended_duration:g} s of empty leases")
    subjects = _build(names, size, "contended", report)
    samples: dict[str, list[tuple[int, int]]] = {s.name: [] for s in subjects}
    failed: set[str] = set()
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(args.contended_repeats):
            for s in subjects:  # interleaved, and the same duration for every pool
                if s.name in failed:
                    continue
                stop = threading.Event()
                gc.collect()
                gc.disable()
                try:
                    out, barrier, threads = _run_threads(
                        _worker_empty, lambda b, o, i, s=s, stop=stop: (s.lease, b, stop, o, i),
                        n_threads)
                    try:
                        barrier.wait()
                    except threading.BrokenBarrierError:
                        pass
                    time.sleep(args.contended_duration)  # the timer, not synchronization
                    stop.set()
                    joined = _join_all(threads, time.monotonic() + JOIN_GRACE_S)
                finally:
                    if gc_was_enabled:
                        gc.enable()
                if not joined:
                    report.error("contended", s.name, f"threads still running "
                                 f"{JOIN_GRACE_S:.0f} s after stop; abandoned (daemon threads)")
                    failed.add(s.name)
                    continue
                exc = _first_error(out)
                if exc is not None:
                    report.error("contended", s.name, exc)
                    failed.add(s.name)
                    continue
                wall = max(o[1] for o in out) - min(o[0] for o in out)
                samples[s.name].append((wall, sum(o[2] for o in out)))
    finally:
        for s in subjects:
            _close(s, "contended", report)
    for s in subjects:
        if s.name in failed or not samples[s.name]:
            continue
        # CPython threads flip between a fast regime and a convoy several times slower,
        # for 0.1 s to seconds at a time: that is the pool's behaviour, not noise, so the
        # figure is all wall time over all leases rather than a median that picks a regime.
        pooled = sum(w for w, _ in samples[s.name]) / sum(n for _, n in samples[s.name])
        _add_repeats(report, "contended", s.name, [w / n for w, n in samples[s.name]],
                     value=pooled, statistic="pooled")


def run_fairness(names, args, report: Report) -> None:
    n_threads, size, hold = 32, 8, args.hold
    log(f"[fairness] {n_threads} threads, pool of {size}, {args.duration:g} s each, "
        f"hold = sleep({hold:g})")
    for name in names:
        if name in report.skipped:
            continue
        subjects = _build([name], size, "fairness", report)
        if not subjects:
            continue
        s = subjects[0]
        stop = threading.Event()
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            out, barrier, threads = _run_threads(
                _worker_hold, lambda b, o, i, s=s, stop=stop: (s.lease, hold, b, stop, o, i),
                n_threads)
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            time.sleep(args.duration)  # the timer, not synchronization
            stop.set()
            joined = _join_all(threads, time.monotonic() + JOIN_GRACE_S)
            # Our pool: how long it found the process CPU-bound (then the
            # longer cpu_bound_fairness_threshold applies, and waits grow).
            bound = getattr(s.stats(), "cpu_bound_seconds", None) if s.stats else None
        finally:
            if gc_was_enabled:
                gc.enable()
            _close(s, "fairness", report)
        if not joined:
            report.error("fairness", name, f"threads still running {JOIN_GRACE_S:.0f} s after "
                         "stop; abandoned (daemon threads)")
            continue
        exc = _first_error(out)
        if exc is not None:
            report.error("fairness", name, exc)
            continue
        _fairness_figures(report, name, out, size, hold)
        if bound is not None:
            report.add("fairness", name, "cpu_bound_s", bound,
                       "s the pool found the process CPU-bound")


def _fairness_figures(report: Report, name: str, out: list, size: int, hold: float) -> None:
    counts = [o[0] for o in out]
    total = sum(counts)
    held = sum(o[1] for o in out)
    waits = sorted(w for o in out for w in o[2])
    wall = max(o[4] for o in out) - min(o[3] for o in out)
    mean_hold = held / total if total else float("nan")
    rate = total / wall
    utilization = rate / (size / mean_hold) if total else 0.0
    fair_share = total / len(counts)
    starved = sum(1 for c in counts if c < 0.1 * fair_share)
    fig = {
        "leases_per_s": (rate, "1/s"),
        "mean_hold_us": (mean_hold * 1e6, "us"),
        "utilization": (utilization, ""),
        "jain": (jain_index(counts), ""),
        "starved_threads": (starved, "threads below 10% of fair share"),
        "min_thread_leases": (min(counts), "leases"),
        "max_thread_leases": (max(counts), "leases"),
        "p50_wait_ms": (percentile(waits, 50) * 1e3, "ms"),
        "p99_wait_ms": (percentile(waits, 99) * 1e3, "ms"),
        "max_wait_ms": (waits[-1] * 1e3 if waits else float("nan"), "ms"),
    }
    for metric, (value, unit) in fig.items():
        report.add("fairness", name, metric, value, unit)
    log(f"  {name:6s} util {utilization:.3f}  jain {fig['jain'][0]:.3f}  "
        f"starved {starved}  p99 wait {fig['p99_wait_ms'][0]:.2f} ms  "
        f"max wait {fig['max_wait_ms'][0]:.1f} ms  ({total} leases, mean hold "
        f"{mean_hold * 1e6:.0f} us)")


# --------------------------------------------------------------------------- output


def _row(report: Report, scenario: str, pool: str, metric: str) -> dict | None:
    for row in report.rows:
        if (row["scenario"], row["pool"], row["metric"]) == (scenario, pool, metric):
            return row
    return None


def _value(report: Report, scenario: str, pool: str, metric: str) -> float | None:
    row = _row(report, scenario, pool, metric)
    return None if row is None else row["value"]


def _finish(report: Report) -> list[dict]:
    """Add ratios vs SDK to every row; return target verdicts for ours."""
    for row in report.rows:
        sdk = _value(report, row["scenario"], "sdk", row["metric"])
        row["ratio_vs_sdk"] = None
        if sdk and row["metric"] in RATIO_METRICS:
            row["ratio_vs_sdk"] = row["value"] / sdk
        sdk_row = _row(report, row["scenario"], "sdk", row["metric"])
        if "repeats" in row and sdk_row and len(sdk_row["repeats"]) == len(row["repeats"]):
            # Subjects alternate within each repeat, so repeat i of two pools ran at
            # nearly the same moment: the median of these ratios cancels slow drift.
            row["paired_ratio_median"] = statistics.median(
                [a / b for a, b in zip(row["repeats"], sdk_row["repeats"], strict=True)])
    verdicts = []
    for (scenario, metric), (op, bound, relative) in TARGETS.items():
        value = _value(report, scenario, "ours", metric)
        measured = None
        if value is not None:
            if relative:
                sdk = _value(report, scenario, "sdk", metric)
                measured = value / sdk if sdk else None
            else:
                measured = value
        ok = None
        if measured is not None:
            ok = measured <= bound if op == "<=" else measured >= bound
        what = f"{scenario} {metric}" + (" / SDK" if relative else "")
        verdicts.append({"target": f"{what} {op} {bound:g}", "measured": measured, "ok": ok})
    return verdicts


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if metric in ("utilization", "jain"):
        return f"{value:.3f}"
    if metric == "ns_per_lease":
        return f"{value:.0f}"
    if metric.endswith("_ms"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def print_table(report: Report, facts: dict, verdicts: list[dict], args) -> None:
    print(f"Lease benchmark  {facts['date']}  nproc={facts['nproc']}  "
          f"Python {facts['python']}  ({facts['cpu']})")
    print(f"platform {facts['platform']}  git {facts['git']}  "
          f"GIL switch interval {facts['switch_interval_s'] * 1e3:g} ms")
    print(f"load average (1 min) {facts['loadavg_1m']} at start, {facts['loadavg_1m_end']} "
          "at end: other work on the machine is the main source of noise")
    print()
    header = f"{'scenario':10s} {'pool':34s} {'metric':18s} {'value':>12s} {'vs SDK':>8s}  note"
    print(header)
    print("-" * len(header))
    last = None
    for row in report.rows:
        if last is not None and row["scenario"] != last:
            print()
        last = row["scenario"]
        ratio = row.get("ratio_vs_sdk")
        note = ""
        if "spread" in row:
            note = (f"{row['statistic']} of {len(row['repeats'])}, min {row['min']:.0f}, "
                    f"spread {row['spread']:.0%}")
            if "paired_ratio_median" in row and row["pool"] != "sdk":
                note += f", paired ratio {row['paired_ratio_median']:.2f}"
        elif row["unit"] and row["unit"] not in ("ms", "us", "1/s", "leases"):
            note = row["unit"]
        print(f"{row['scenario']:10s} {LABELS[row['pool']]:34s} {row['metric']:18s} "
              f"{_fmt(row['value'], row['metric']):>12s} "
              f"{(f'{ratio:.2f}' if ratio is not None else '-'):>8s}  {note}")
    print()
    print("Targets for aperturedb_pool.ConnectionPool:")
    for v in verdicts:
        state = {True: "PASS", False: "FAIL", None: "n/a "}[v["ok"]]
        measured = "-" if v["measured"] is None else f"{v['measured']:.3f}"
        print(f"  {state}  {v['target']:40s} measured {measured}")
    for name, reason in report.skipped.items():
        print(f"SKIPPED {name}: {reason}")
    for e in report.errors:
        print(f"ERROR {e['scenario']}/{e['pool']}: {e['error']}")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--duration", type=float, default=2.0,
                   help="seconds per pool in the fairness scenario (default 2)")
    p.add_argument("--only", default="",
                   help="comma-separated scenarios (single, contended, fairness) and/or "
                        "pools (ours, ours-metrics, sdk, queue, deque) to run; default all")
    p.add_argument("--iterations", type=int, default=200_000,
                   help="leases per repeat, single thread (default 200000)")
    p.add_argument("--repeats", type=int, default=5, help="repeats, single thread (default 5)")
    p.add_argument("--contended-duration", type=float, default=0.5,
                   help="seconds per repeat, 8 threads (default 0.5)")
    p.add_argument("--contended-repeats", type=int, default=6,
                   help="repeats, 8 threads (default 6)")
    p.add_argument("--hold", type=float, default=0.0002,
                   help="seconds slept inside each lease in the fairness scenario")
    args = p.parse_args(argv)
    tokens = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in tokens if t not in SCENARIOS and t not in POOLS]
    if unknown:
        p.error(f"--only: unknown name(s) {', '.join(unknown)}; "
                f"choose from {', '.join(SCENARIOS + POOLS)}")
    args.scenarios = [s for s in SCENARIOS if s in tokens] or list(SCENARIOS)
    args.pools = [n for n in POOLS if n in tokens] or list(POOLS)
    if args.duration <= 0 or args.iterations < 1 or args.repeats < 1 \
            or args.contended_duration <= 0 or args.contended_repeats < 1 or args.hold < 0:
        p.error("durations, iterations and repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    facts = machine_facts()
    report = Report()
    runners = {"single": run_single, "contended": run_contended, "fairness": run_fairness}
    started = time.perf_counter()
    for scenario in args.scenarios:
        names = [n for n in POOLS_BY_SCENARIO[scenario] if n in args.pools]
        try:
            runners[scenario](names, args, report)
        except Exception as exc:  # report what we have rather than lose the run
            report.error(scenario, "*", "".join(traceback.format_exception_only(exc)).strip())
    facts["elapsed_s"] = round(time.perf_counter() - started, 1)
    facts["loadavg_1m_end"] = load_average()
    verdicts = _finish(report)
    if args.json:
        json.dump({
            "machine": facts,
            "config": {k: getattr(args, k) for k in (
                "duration", "iterations", "repeats", "contended_duration",
                "contended_repeats", "hold", "scenarios", "pools")},
            "results": report.rows,
            "targets": verdicts,
            "skipped": report.skipped,
            "errors": report.errors,
            "pool_stats": report.pool_stats,
        }, sys.stdout, indent=2, default=str)
        print()
    else:
        print_table(report, facts, verdicts, args)
        print(f"\n(total {facts['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
