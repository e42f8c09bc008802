"""Metrics export: OpenTelemetry (the semantic conventions for database client
connection pools) and a Prometheus collector.

::

    from aperturedb_pool.metrics import instrument, PrometheusCollector
    instrument(pool)                                   # the global MeterProvider
    instrument(pool, meter_provider=provider)
    registry.register(PrometheusCollector(pool_a, pool_b))

Neither ``opentelemetry`` nor ``prometheus_client`` is imported by
``import aperturedb_pool``, nor by this module: each is imported when its
exporter is first used (extras ``otel`` and ``prometheus``).

What it costs
-------------
A pool that is not instrumented runs exactly the code it ran before: its
``_metrics`` is None, which only slow paths look at (a waiter served, a
connector opened, a retry, ``stats(reset=True)``), and ``lease()`` creates the
same ``Lease``.  Gauges and counters are read from ``pool.stats()`` at
collection time (observable instruments), so they cost nothing between
collections.  Histograms need one observation per event:

* ``create_time``: reported by the background thread after each open.
* ``wait_time``: a lease that queued has its wait reported at the hand-off (a
  slow path that costs a thread switch anyway: one bucket increment under the
  pool lock).  Every other lease was served at once, without a queue (the
  lock-free checkout, or a connector found idle under the lock): it waited
  zero, and is counted from the pool's own counters at collection time, as
  leases granted minus leases that waited.  So the lock-free checkout does no
  new work.
* ``use_time``: nothing the pool counts gives it, so an instrumented pool
  creates a timing ``Lease`` subclass (``_TimedLease``): two clock reads and
  one bucket increment in a per-thread histogram (no lock), about 0.5 us
  a lease (``stress/bench_lease.py``, ``ours-metrics``).  Leases from
  ``acquire()`` are timed by ``acquire()`` and the pool's ``_release``, both
  slow paths.

The histograms are kept pre-aggregated (bucket counts and sums, boundaries
``BUCKETS``): the Prometheus collector exports them as they are.  The
OpenTelemetry API has no way to hand over a pre-aggregated histogram, so each
collection replays what is new into the SDK's histograms (one ``record`` per
observation, each at its bucket's mean: counts per bucket and sums are exact,
min and max are bucket means).  That costs the SDK's ``record`` (7-19 us in
opentelemetry-sdk 1.45, two per lease) at collection time, in the exporting
thread, never on a lease path (``stress/bench_metrics.py``).  ``instrument(pool, histograms=False)`` leaves the
histograms out (and leases untimed).

Exactness.  ``used + idle`` equals the pool's size at every collection by
construction: both come from one snapshot, idle as counted, used as the rest
(connectors in passage between the idle deque and a leaseholder, and those
being pinged, count as used).  Counters are exact whenever no lease is in
passage at the collection; ``stats(reset=True)`` does not make an exported
counter go backwards.  Histogram counts are exact for leases granted since
``instrument()`` / the collector was created; the count of zero waits is held
monotonic (a hand-off is counted a moment before its lease) and catches up at
the next collection.
"""

from __future__ import annotations

import os
import threading
import weakref
from bisect import bisect_left
from dataclasses import dataclass
from time import monotonic as _monotonic
from typing import Any, Iterable, Iterator, cast

from aperturedb_pool._version import __version__
from aperturedb_pool.pool import ConnectionPool, Lease
from aperturedb_pool.stats import PoolStats

__all__ = ["instrument", "PrometheusCollector", "snapshot", "BUCKETS", "POOL_NAME", "STATE"]

#: OpenTelemetry attribute names (semantic conventions)
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
ERROR_TYPE = "error.type"
REASON = "aperturedb_pool.discard.reason"

#: Histogram bucket upper bounds, seconds (a lease's wait is usually well under a
#: millisecond, a connector's creation tens of milliseconds).
BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                              0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NB = len(BUCKETS) + 1  # the last bucket: above every bound

# Counters of PoolStats exported as monotonic counters (kept across stats(reset=True)).
_COUNTERS = ("timeouts", "leases_granted", "leases_waited", "connectors_opened",
             "connectors_closed", "keepalive_pings", "probes", "refill_failures", "retries",
             "give_ups", "unknown_outcomes")


class _Hist:
    """Bucket counts and per-bucket sums; ``counts[i]`` holds values <= BUCKETS[i]."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts = [0] * _NB
        self.sums = [0.0] * _NB

    def add(self, v: float) -> None:
        i = bisect_left(BUCKETS, v)
        self.counts[i] += 1
        self.sums[i] += v

    def remove(self, v: float) -> None:
        i = bisect_left(BUCKETS, v)
        if self.counts[i] > 0:
            self.counts[i] -= 1
            self.sums[i] -= v

    def merge(self, other: "_Hist") -> None:
        for i in range(_NB):
            self.counts[i] += other.counts[i]
            self.sums[i] += other.sums[i]

    def copy(self) -> "_Hist":
        h = _Hist()
        h.counts = list(self.counts)
        h.sums = list(self.sums)
        return h


@dataclass(frozen=True)
class _Snapshot:
    """What one collection exports for one pool."""

    stats: PoolStats
    idle: int
    used: int
    counters: dict[str, int]
    discarded: dict[str, int]
    retries_by_error: dict[str, int]
    writes_not_retried: int
    create: _Hist
    wait: _Hist
    use: _Hist


class _Recorder:
    """One per instrumented pool (``pool._metrics``), shared by every exporter of it.

    Its slow-path hooks are called by the pool, some under the pool lock: the
    recorder's own lock is only ever taken after the pool's, never before.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        self._reset_state()

    def _reset_state(self) -> None:
        self.lock = threading.Lock()
        self.create = _Hist()
        self.wait = _Hist()  # leases that queued
        self.waited_n = 0
        self.granted0 = 0  # leases granted before the recorder existed
        self.zero_waits = 0  # exported so far: held monotonic
        self.local = threading.local()
        self.use_threads: list[tuple[weakref.ref[threading.Thread], _Hist]] = []
        self.use_done = _Hist()  # per-thread histograms of finished threads
        self.retries: dict[str, int] = {}
        self.not_retried = 0
        self.base: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.base_discarded: dict[str, int] = {}
        self.replayed: dict[int, dict[str, _Hist]] = {}  # per OpenTelemetry export

    # -- hooks called by the pool (slow paths) --------------------------------
    def waited(self, seconds: float) -> None:
        with self.lock:
            self.wait.add(seconds)
            self.waited_n += 1

    def unwaited(self, seconds: float) -> None:
        with self.lock:
            self.wait.remove(seconds)
            self.waited_n = max(0, self.waited_n - 1)

    def created(self, seconds: float) -> None:
        with self.lock:
            self.create.add(seconds)

    def retried(self, exc: BaseException) -> None:
        key = type(exc).__name__
        with self.lock:
            self.retries[key] = self.retries.get(key, 0) + 1

    def write_not_retried(self) -> None:
        with self.lock:
            self.not_retried += 1

    def counters_reset(self, s: PoolStats) -> None:
        # Under the pool lock, with the snapshot taken just before the reset.
        with self.lock:
            for k in _COUNTERS:
                self.base[k] += getattr(s, k)
            for k, n in s.discarded.items():
                self.base_discarded[k] = self.base_discarded.get(k, 0) + n

    # -- use time (the timing lease, no lock) ----------------------------------
    def released(self, lease: Any, now: float) -> None:
        # An acquire() lease, from the pool's _release (a slow path).
        granted = getattr(lease, "_granted", None)
        if granted is None:
            return  # acquired before the pool was instrumented
        try:
            h = self.local.h
        except AttributeError:
            h = self._thread_hist()
        h.add(now - granted)

    def _thread_hist(self) -> _Hist:
        h = _Hist()
        with self.lock:
            self.use_threads.append((weakref.ref(threading.current_thread()), h))
        self.local.h = h
        return h

    # -- collection -------------------------------------------------------------
    def snapshot(self, pool: ConnectionPool) -> _Snapshot:
        s = pool.stats()
        with pool._lock:
            granted = pool._granted_base + sum(slot.uses for slot in pool._all)
            with self.lock:
                counters = {k: self.base[k] + getattr(s, k) for k in _COUNTERS}
                discarded = dict(self.base_discarded)
                for k, n in s.discarded.items():
                    discarded[k] = discarded.get(k, 0) + n
                zero = self.base["leases_granted"] + granted - self.granted0 - self.waited_n
                self.zero_waits = max(self.zero_waits, zero)
                wait = self.wait.copy()
                wait.counts[0] += self.zero_waits
                create = self.create.copy()
                use = self.use_done.copy()
                alive = []
                for ref, h in self.use_threads:
                    t = ref()
                    if t is None or not t.is_alive():
                        self.use_done.merge(h)
                        use.merge(h)
                    else:
                        use.merge(h)
                        alive.append((ref, h))
                self.use_threads = alive
                retries = dict(self.retries)
                not_retried = self.not_retried
        # One snapshot: used + idle == size (slots in passage count as used).
        idle = min(s.idle, s.size)
        return _Snapshot(stats=s, idle=idle, used=s.size - idle, counters=counters,
                         discarded=discarded, retries_by_error=retries,
                         writes_not_retried=not_retried, create=create, wait=wait, use=use)


class _TimedLease(Lease):
    """The Lease of an instrumented pool: it times the use of its connector."""

    __slots__ = ("_t0",)

    def __enter__(self) -> Any:
        conn = Lease.__enter__(self)
        self._t0 = _monotonic()
        return conn

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        # The return first: nothing of this class runs between the with
        # statement's call and the plain Lease's (see "Interruptions" in pool.py).
        Lease.__exit__(self, et, ev, tb)
        took = _monotonic() - self._t0
        rec = self._pool._metrics
        try:
            h = rec.local.h
        except AttributeError:
            h = rec._thread_hist()
        i = bisect_left(BUCKETS, took)
        h.counts[i] += 1
        h.sums[i] += took


_recorders: "weakref.WeakSet[_Recorder]" = weakref.WeakSet()


def _unwrap(pool: Any) -> ConnectionPool:
    # The drop-in aperturedb_pool.compat.ConnectionPool wraps one: its .pool.
    if not isinstance(pool, ConnectionPool) and isinstance(getattr(pool, "pool", None),
                                                           ConnectionPool):
        pool = pool.pool
    if not isinstance(pool, ConnectionPool):
        raise TypeError(f"expected an aperturedb_pool.ConnectionPool, got {pool!r}")
    return pool


def _recorder(pool: ConnectionPool, timed: bool) -> _Recorder:
    with pool._lock:
        rec = pool._metrics
        if rec is None:
            rec = _Recorder(pool)
            rec.granted0 = pool._granted_base + sum(slot.uses for slot in pool._all)
            pool._metrics = rec
            _recorders.add(rec)
        if timed:
            pool._lease_type = _TimedLease
    return cast(_Recorder, rec)


def _after_fork_in_child() -> None:
    # The pool's own at-fork hook (registered first, so run first) restarted its
    # counters: so do its recorder's.
    for rec in list(_recorders):
        rec._reset_state()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _hist_dict(h: _Hist) -> dict[str, Any]:
    return {"count": sum(h.counts), "sum": sum(h.sums),
            "buckets": dict(_prom_buckets(h))}


def snapshot(pool: ConnectionPool) -> dict[str, Any]:
    """The exported values of ``pool`` now, as a JSON-ready dict under the
    OpenTelemetry names (attributes as nested keys: ``count`` by state,
    ``discarded`` by reason, ``retries`` by error class; histograms as count,
    sum and cumulative buckets keyed by their upper bound).  Instruments the
    pool (with histograms) if it was not: histograms start then.
    """
    pool = _unwrap(pool)
    rec = _recorder(pool, timed=True)
    snap = rec.snapshot(pool)
    s = snap.stats
    return {
        POOL_NAME: s.name,
        "db.client.connection.count": {"idle": snap.idle, "used": snap.used},
        "db.client.connection.idle.max": s.max_size,
        "db.client.connection.idle.min": s.min_size,
        "db.client.connection.max": s.max_size,
        "db.client.connection.pending_requests": s.waiting,
        "db.client.connection.timeouts": snap.counters["timeouts"],
        "db.client.connection.create_time": _hist_dict(snap.create),
        "db.client.connection.wait_time": _hist_dict(snap.wait),
        "db.client.connection.use_time": _hist_dict(snap.use),
        "aperturedb_pool.connection.discarded": dict(sorted(snap.discarded.items())),
        "aperturedb_pool.generations_retired": s.generation,
        "aperturedb_pool.retries": dict(sorted(snap.retries_by_error.items())),
        "aperturedb_pool.writes.not_retried": snap.writes_not_retried,
        "aperturedb_pool.cpu_bound": int(s.cpu_bound),
        "aperturedb_pool.leases": snap.counters["leases_granted"],
        "aperturedb_pool.connection.opened": snap.counters["connectors_opened"],
        "aperturedb_pool.connection.refill_failures": snap.counters["refill_failures"],
    }


# -- OpenTelemetry ---------------------------------------------------------------

_UNITS = {"connection": "{connection}", "request": "{request}", "timeout": "{timeout}"}


class _OtelExport:
    """The instruments of one MeterProvider, each observing every pool instrumented on it.

    One set per provider: the SDK keeps the first instrument of a name and drops
    the callbacks of a second one.
    """

    def __init__(self, provider: Any) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation  # noqa: F401

        self._Observation = Observation
        self.lock = threading.Lock()
        self.pools: list[tuple[weakref.ref[ConnectionPool], _Recorder, bool]] = []
        self.snaps: list[tuple[str, _Snapshot]] = []
        meter = provider.get_meter("aperturedb_pool", __version__)
        m = meter
        # The first callback takes this collection's snapshots (the SDK runs every
        # callback of a collection, in creation order, before it aggregates); the
        # others read them.
        m.create_observable_up_down_counter(
            "db.client.connection.count", [self._count], unit="{connection}",
            description="The number of connections that are currently in the state "
                        "described by the state attribute")
        self._gauge(m, "db.client.connection.idle.max", "{connection}",
                    "The maximum number of idle open connections allowed",
                    lambda s: s.stats.max_size)
        self._gauge(m, "db.client.connection.idle.min", "{connection}",
                    "The minimum number of idle open connections allowed",
                    lambda s: s.stats.min_size)
        self._gauge(m, "db.client.connection.max", "{connection}",
                    "The maximum number of open connections allowed",
                    lambda s: s.stats.max_size)
        self._gauge(m, "db.client.connection.pending_requests", "{request}",
                    "The number of current pending requests for an open connection",
                    lambda s: s.stats.waiting)
        self._counter(m, "db.client.connection.timeouts", "{timeout}",
                      "The number of connection timeouts that have occurred trying to "
                      "obtain a connection from the pool",
                      lambda s: s.counters["timeouts"])
        self._hists = {
            "create": m.create_histogram(
                "db.client.connection.create_time", unit="s",
                description="The time it took to create a new connection",
                explicit_bucket_boundaries_advisory=list(BUCKETS)),
            "wait": m.create_histogram(
                "db.client.connection.wait_time", unit="s",
                description="The time it took to obtain an open connection from the pool",
                explicit_bucket_boundaries_advisory=list(BUCKETS)),
            "use": m.create_histogram(
                "db.client.connection.use_time", unit="s",
                description="The time between borrowing a connection and returning it to "
                            "the pool",
                explicit_bucket_boundaries_advisory=list(BUCKETS)),
        }
        m.create_observable_counter(
            "aperturedb_pool.connection.discarded", [self._discarded], unit="{connection}",
            description="Connectors closed by the pool, by reason")
        self._counter(m, "aperturedb_pool.generations_retired", "{generation}",
                      "Generations of connectors retired at once (a server restart, "
                      "retire_all())", lambda s: s.stats.generation)
        m.create_observable_counter(
            "aperturedb_pool.retries", [self._retries], unit="{retry}",
            description="Attempts of pool.query()/run() retried, by the error class of the "
                        "failed attempt")
        self._counter(m, "aperturedb_pool.writes.not_retried", "{query}",
                      "Calls not declared idempotent whose outcome is unknown: refused a "
                      "retry (OutcomeUnknown raised)", lambda s: s.writes_not_retried)
        self._gauge(m, "aperturedb_pool.cpu_bound", "1",
                    "1 while the process is found CPU-bound and the longer "
                    "cpu_bound_fairness_threshold applies", lambda s: int(s.stats.cpu_bound))
        self._counter(m, "aperturedb_pool.leases", "{lease}", "Leases granted",
                      lambda s: s.counters["leases_granted"])
        self._counter(m, "aperturedb_pool.connection.opened", "{connection}",
                      "Connectors opened", lambda s: s.counters["connectors_opened"])
        self._counter(m, "aperturedb_pool.connection.refill_failures", "{connection}",
                      "Failed attempts to open a connector",
                      lambda s: s.counters["refill_failures"])

    def _obs(self, fn: Any) -> Iterator[Any]:
        for name, snap in self.snaps:
            yield self._Observation(fn(snap), {POOL_NAME: name})

    def _gauge(self, m: Any, name: str, unit: str, desc: str, fn: Any) -> None:
        m.create_observable_up_down_counter(name, [lambda _o: list(self._obs(fn))], unit=unit,
                                            description=desc)

    def _counter(self, m: Any, name: str, unit: str, desc: str, fn: Any) -> None:
        m.create_observable_counter(name, [lambda _o: list(self._obs(fn))], unit=unit,
                                    description=desc)

    def add(self, pool: ConnectionPool, rec: _Recorder, histograms: bool) -> None:
        with self.lock:
            for ref, _r, _h in self.pools:
                if ref() is pool:
                    return
            self.pools.append((weakref.ref(pool), rec, histograms))

    def _count(self, _options: Any) -> list[Any]:
        # First callback of a collection: snapshot every pool, replay histograms.
        snaps = []
        with self.lock:
            live = [(p, r, h) for p, r, h in ((ref(), r, h) for ref, r, h in self.pools)
                    if p is not None]
            self.pools = [(weakref.ref(p), r, h) for p, r, h in live]
        for pool, rec, hist in live:
            snap = rec.snapshot(pool)
            snaps.append((pool.name, snap))
            if hist:
                self._replay(pool.name, rec, snap)
        self.snaps = snaps
        out = []
        for name, snap in snaps:
            out.append(self._Observation(snap.idle, {POOL_NAME: name, STATE: "idle"}))
            out.append(self._Observation(snap.used, {POOL_NAME: name, STATE: "used"}))
        return out

    def _replay(self, name: str, rec: _Recorder, snap: _Snapshot) -> None:
        # What is new since the last collection goes into the SDK's histograms,
        # each observation at its bucket's mean (bucket counts and sums exact).
        done = rec.replayed.setdefault(id(self), {})
        attrs = {POOL_NAME: name}
        for key, h in (("create", snap.create), ("wait", snap.wait), ("use", snap.use)):
            last = done.get(key) or _Hist()
            inst = self._hists[key]
            for i in range(_NB):
                k = h.counts[i] - last.counts[i]
                if k <= 0:
                    continue
                lo = BUCKETS[i - 1] if i else 0.0
                hi = BUCKETS[i] if i < len(BUCKETS) else float("inf")
                # The mean lies in the bucket, (lo, hi]; rounding must not move it out.
                v = min((h.sums[i] - last.sums[i]) / k, hi)
                if i and v <= lo:
                    v = hi if i < len(BUCKETS) else lo * 2
                for _ in range(k):
                    inst.record(v, attrs)
            done[key] = h

    def _discarded(self, _options: Any) -> list[Any]:
        return [self._Observation(n, {POOL_NAME: name, REASON: reason})
                for name, snap in self.snaps for reason, n in sorted(snap.discarded.items())]

    def _retries(self, _options: Any) -> list[Any]:
        return [self._Observation(n, {POOL_NAME: name, ERROR_TYPE: err})
                for name, snap in self.snaps for err, n in sorted(snap.retries_by_error.items())]


_otel_exports: dict[int, tuple[Any, _OtelExport]] = {}
_otel_lock = threading.Lock()


def instrument(pool: ConnectionPool, meter_provider: Any = None, *,
               histograms: bool = True) -> None:
    """Export ``pool``'s metrics through OpenTelemetry.

    ``meter_provider``: an ``opentelemetry.sdk.metrics.MeterProvider`` (or any
    provider of the API); None: the global one (``metrics.get_meter_provider()``;
    one set later is followed through the API's proxy, but instrument every pool
    on the same side of ``set_meter_provider()``: pools instrumented before it
    and after it would register the same instruments twice on one provider,
    and the SDK keeps the first).  Instrumenting a pool twice on one provider
    does nothing the second time; several pools on one provider share instruments, told apart by
    ``db.client.connection.pool.name`` (give them distinct names).
    ``histograms=False``: no ``create_time``/``wait_time``/``use_time`` (and
    leases are not timed).
    """
    from opentelemetry import metrics as otel_metrics

    provider = otel_metrics.get_meter_provider() if meter_provider is None else meter_provider
    pool = _unwrap(pool)
    rec = _recorder(pool, timed=histograms)
    with _otel_lock:
        entry = _otel_exports.get(id(provider))
        if entry is None or entry[0] is not provider:
            entry = (provider, _OtelExport(provider))
            _otel_exports[id(provider)] = entry
    entry[1].add(pool, rec, histograms)


# -- Prometheus ------------------------------------------------------------------

def _prom_buckets(h: _Hist) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for i, bound in enumerate(BUCKETS):
        total += h.counts[i]
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + h.counts[-1]))
    return out


class PrometheusCollector:
    """A ``prometheus_client`` collector of one or more pools.

    ``registry.register(PrometheusCollector(pool))``; several pools go in one
    collector (``PrometheusCollector(a, b)`` or ``collector.add(c)``), told apart
    by the label ``pool_name``: a registry refuses two collectors exporting the
    same names.  Pools are held weakly: a pool that is gone is no longer
    exported.  ``histograms=False``: no ``*_time_seconds`` histograms (and
    leases are not timed).
    """

    def __init__(self, *pools: ConnectionPool, histograms: bool = True) -> None:
        self._lock = threading.Lock()
        self._histograms = histograms
        self._pools: list[tuple[weakref.ref[ConnectionPool], _Recorder]] = []
        for p in pools:
            self.add(p)

    def add(self, pool: ConnectionPool) -> "PrometheusCollector":
        pool = _unwrap(pool)
        rec = _recorder(pool, timed=self._histograms)
        with self._lock:
            for ref, _r in self._pools:
                other = ref()
                if other is pool:
                    return self
                if other is not None and other.name == pool.name:
                    raise ValueError(f"a pool named {pool.name!r} is already in this "
                                     f"collector: give each pool its own name=")
            self._pools.append((weakref.ref(pool), rec))
        return self

    def _snapshots(self) -> list[tuple[str, _Snapshot]]:
        with self._lock:
            live = [(ref(), rec) for ref, rec in self._pools]
            self._pools = [(ref, rec) for (ref, rec), (p, _) in zip(self._pools, live, strict=True)
                           if p is not None]
        return [(p.name, rec.snapshot(p)) for p, rec in live if p is not None]

    def describe(self) -> Iterable[Any]:
        return self._families([])

    def collect(self) -> Iterable[Any]:
        return self._families(self._snapshots())

    def _families(self, snaps: list[tuple[str, _Snapshot]]) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        fams: list[Any] = []
        pn = ["pool_name"]

        def gauge(name: str, doc: str, fn: Any) -> None:
            g = GaugeMetricFamily(name, doc, labels=pn)
            for pool_name, s in snaps:
                g.add_metric([pool_name], fn(s))
            fams.append(g)

        def counter(name: str, doc: str, fn: Any) -> None:
            c = CounterMetricFamily(name, doc, labels=pn)
            for pool_name, s in snaps:
                c.add_metric([pool_name], fn(s))
            fams.append(c)

        count = GaugeMetricFamily("db_client_connection_count",
                                  "Connections by state (idle, used); they add up to the "
                                  "pool's size", labels=["pool_name", "state"])
        for pool_name, s in snaps:
            count.add_metric([pool_name, "idle"], s.idle)
            count.add_metric([pool_name, "used"], s.used)
        fams.append(count)
        gauge("db_client_connection_idle_max", "The maximum number of idle open connections "
              "allowed", lambda s: s.stats.max_size)
        gauge("db_client_connection_idle_min", "The minimum number of idle open connections "
              "allowed", lambda s: s.stats.min_size)
        gauge("db_client_connection_max", "The maximum number of open connections allowed",
              lambda s: s.stats.max_size)
        gauge("db_client_connection_pending_requests", "Callers waiting for a connection",
              lambda s: s.stats.waiting)
        counter("db_client_connection_timeouts", "Leases that timed out waiting for a "
                "connection", lambda s: s.counters["timeouts"])
        if self._histograms:
            for key, name, doc in (
                    ("create", "db_client_connection_create_time_seconds",
                     "The time it took to create a new connection"),
                    ("wait", "db_client_connection_wait_time_seconds",
                     "The time it took to obtain an open connection from the pool"),
                    ("use", "db_client_connection_use_time_seconds",
                     "The time between borrowing a connection and returning it")):
                h = HistogramMetricFamily(name, doc, labels=pn)
                for pool_name, s in snaps:
                    hist = getattr(s, key)
                    h.add_metric([pool_name], _prom_buckets(hist), sum(hist.sums))
                fams.append(h)
        disc = CounterMetricFamily("aperturedb_pool_connection_discarded",
                                   "Connectors closed by the pool, by reason",
                                   labels=["pool_name", "reason"])
        for pool_name, s in snaps:
            for reason, n in sorted(s.discarded.items()):
                disc.add_metric([pool_name, reason], n)
        fams.append(disc)
        counter("aperturedb_pool_generations_retired", "Generations of connectors retired "
                "at once", lambda s: s.stats.generation)
        retries = CounterMetricFamily("aperturedb_pool_retries",
                                      "Attempts retried, by the error class of the failed "
                                      "attempt", labels=["pool_name", "error_type"])
        for pool_name, s in snaps:
            for err, n in sorted(s.retries_by_error.items()):
                retries.add_metric([pool_name, err], n)
        fams.append(retries)
        counter("aperturedb_pool_writes_not_retried", "Calls not declared idempotent whose "
                "outcome is unknown (refused a retry)", lambda s: s.writes_not_retried)
        gauge("aperturedb_pool_cpu_bound", "1 while the CPU-bound fairness threshold applies",
              lambda s: int(s.stats.cpu_bound))
        counter("aperturedb_pool_leases", "Leases granted",
                lambda s: s.counters["leases_granted"])
        counter("aperturedb_pool_connection_opened", "Connectors opened",
                lambda s: s.counters["connectors_opened"])
        counter("aperturedb_pool_connection_refill_failures", "Failed attempts to open a "
                "connector", lambda s: s.counters["refill_failures"])
        return fams


def serve_prometheus(pools: Iterable[ConnectionPool], port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` of ``pools`` on ``addr:port`` from a fresh registry
    (a daemon thread); returns ``(server, thread)`` (``server.shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PrometheusCollector(*pools))
    return start_http_server(port, addr=addr, registry=registry)
