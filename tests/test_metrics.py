"""aperturedb_pool.metrics, read through the real OpenTelemetry SDK (InMemoryMetricReader)
and a real prometheus_client CollectorRegistry (its text exposition, parsed back).

Pure logic runs on stand-in connectors (a scripted sequence whose every value is
known); a server restart and churn run the real SDK ``Connector`` against the
embedded server.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("opentelemetry.sdk.metrics")
pytest.importorskip("prometheus_client")

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from aperturedb_pool import (  # noqa: E402
    ConnectFailed,
    ConnectionPool,
    OutcomeUnknown,
    PoolTimeout,
    RetryPolicy,
)
from aperturedb_pool.metrics import BUCKETS, PrometheusCollector, instrument  # noqa: E402
from aperturedb_pool.pool import Lease  # noqa: E402

JOIN = 20.0
POOL = "db.client.connection.pool.name"
STATUS = [{"GetStatus": {"status": 0}}]
FAST = RetryPolicy(max_attempts=3, deadline=10.0, initial_delay=0.001, max_delay=0.002)


class Stub:
    """A stand-in connector; raises the exceptions queued in ``script`` (shared by clones)."""

    def __init__(self, script: list[BaseException] | None = None) -> None:
        self.script = [] if script is None else script

    def clone(self) -> "Stub":
        return Stub(self.script)

    def query(self, q: Any, blobs: Any = None) -> Any:
        if self.script:
            raise self.script.pop(0)
        return STATUS, []

    def close(self) -> None:
        pass


def otel() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


def read_otel(reader: InMemoryMetricReader) -> dict[str, dict[tuple, Any]]:
    """{instrument name: {sorted attribute items: value, or (count, sum, buckets)}}."""
    out: dict[str, dict[tuple, Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                pts = out.setdefault(m.name, {})
                for p in m.data.data_points:
                    key = tuple(sorted(p.attributes.items()))
                    if hasattr(p, "bucket_counts"):
                        pts[key] = (p.count, p.sum, list(p.bucket_counts))
                    else:
                        pts[key] = p.value
                out[m.name + ".unit"] = {(): m.unit}
    return out


def read_prom(registry: CollectorRegistry) -> dict[str, float]:
    """{'name{label="v",...}': value} from the text exposition."""
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def refilled(pool: ConnectionPool, size: int) -> None:
    """Wait for the background refill: the next lease is then served at once."""
    deadline = time.monotonic() + JOIN
    while True:
        s = pool.stats()
        if s.size == size and s.idle == size and s.opening == 0:
            return
        assert time.monotonic() < deadline, s
        time.sleep(0.002)


def at(pool: str, **kw: str) -> tuple:
    return tuple(sorted({POOL: pool, **kw}.items()))


def test_importing_the_package_imports_neither_exporter() -> None:
    code = ("import sys, aperturedb_pool, aperturedb_pool.metrics\n"
            "from aperturedb_pool import ConnectionPool\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('opentelemetry', 'prometheus_client'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_pool_never_instrumented_runs_the_plain_lease() -> None:
    with ConnectionPool(Stub(), min_size=1, max_size=1) as pool:
        lease = pool.lease()
        assert type(lease) is Lease and pool._metrics is None
        with lease:
            pass
        assert pool._metrics is None


def test_scripted_sequence_exact_in_both_exporters() -> None:
    provider, reader = otel()
    script: list[BaseException] = []
    pool = ConnectionPool(Stub(script), min_size=2, max_size=2, name="scripted", retry=FAST,
                          open=False)
    instrument(pool, provider)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(pool))
    with pool.open():
        pool.wait_ready(JOIN)
        # 3 leases served at once
        for _ in range(3):
            with pool.lease():
                time.sleep(0.002)
        # a lease that waits ~30 ms: both connectors held
        a, b = pool.acquire(), pool.acquire()
        got = threading.Event()

        def waiter() -> None:
            with pool.lease():
                got.set()

        t = threading.Thread(target=waiter)
        t.start()
        while pool.stats().waiting == 0:
            time.sleep(0.001)
        mid = read_otel(reader)
        assert mid["db.client.connection.pending_requests"] == {at("scripted"): 1}
        assert mid["db.client.connection.count"] == {at("scripted", **{
            "db.client.connection.state": "used"}): 2, at("scripted", **{
                "db.client.connection.state": "idle"}): 0}
        time.sleep(0.03)
        a.release()
        t.join(JOIN)
        assert got.is_set()
        # a timeout (b and the connector the waiter returned... take it first)
        c = pool.acquire()
        with pytest.raises(PoolTimeout):
            with pool.lease(timeout=0.01):
                pass
        c.release()
        b.release()
        with pool.lease():
            pass
        # a discard, then one retry after ConnectFailed, one write refused a retry
        lease = pool.acquire()
        lease.discard()
        refilled(pool, 2)
        script.append(ConnectFailed("refused"))
        assert pool.query([{"FindEntity": {}}])[0] == STATUS
        refilled(pool, 2)
        script.append(OutcomeUnknown("lost"))
        with pytest.raises(OutcomeUnknown):
            pool.query([{"AddEntity": {"class": "T"}}], idempotent=False)
        refilled(pool, 2)
        # a retirement of the whole generation
        pool.retire_all()
        refilled(pool, 2)
        # stats(reset=True) must not make exported counters go backwards
        pool.stats(reset=True)
        with pool.lease():
            pass
        s = pool.stats()
        o = read_otel(reader)
        p = read_prom(registry)

    # leases: 3 + waiter + a + b + c + the empty with + the discarded acquire()
    # + 2 query attempts (the retried one and its retry) + 1 refused write + the last
    leases = 3 + 1 + 2 + 1 + 1 + 1 + 2 + 1 + 1
    timed = leases  # lease(), query() and acquire(); the timed-out lease got none
    used_count = {at("scripted", **{"db.client.connection.state": "used"}): 0,
                  at("scripted", **{"db.client.connection.state": "idle"}): 2}
    assert o["db.client.connection.count"] == used_count
    assert o["db.client.connection.count.unit"] == {(): "{connection}"}
    assert o["db.client.connection.max"] == {at("scripted"): 2}
    assert o["db.client.connection.idle.max"] == {at("scripted"): 2}
    assert o["db.client.connection.idle.min"] == {at("scripted"): 2}
    assert o["db.client.connection.pending_requests"] == {at("scripted"): 0}
    assert o["db.client.connection.timeouts"] == {at("scripted"): 1}
    assert o["db.client.connection.timeouts.unit"] == {(): "{timeout}"}
    assert o["aperturedb_pool.leases"] == {at("scripted"): leases}
    assert s.leases_granted == 1  # after the reset: the last lease only
    wait_count, wait_sum, wait_buckets = o["db.client.connection.wait_time"][at("scripted")]
    assert wait_count == leases
    assert 0.025 <= wait_sum < 5.0  # the one lease that queued
    assert wait_buckets[0] == leases - 1  # every other lease waited zero
    use_count, use_sum, use_buckets = o["db.client.connection.use_time"][at("scripted")]
    assert use_count == timed and use_sum >= 3 * 0.002
    create_count, _, _ = o["db.client.connection.create_time"][at("scripted")]
    # 2 at the start, 1 after each of the 3 discards, 2 after the retirement
    assert create_count == 7 == o["aperturedb_pool.connection.opened"][at("scripted")]
    assert o["db.client.connection.wait_time.unit"] == {(): "s"}
    # discarded: 1 by discard() ("broken"), 1 by the failed attempt, 1 by the refused
    # write ("interrupted": a stand-in is not tracked), 2 retired
    disc = o["aperturedb_pool.connection.discarded"]
    r = "aperturedb_pool.discard.reason"
    assert disc == {at("scripted", **{r: "broken"}): 1,
                    at("scripted", **{r: "interrupted"}): 2,
                    at("scripted", **{r: "retired"}): 2}
    assert o["aperturedb_pool.generations_retired"] == {at("scripted"): 1}
    assert o["aperturedb_pool.retries"] == {at("scripted", **{"error.type": "ConnectFailed"}): 1}
    assert o["aperturedb_pool.writes.not_retried"] == {at("scripted"): 1}
    assert o["aperturedb_pool.cpu_bound"] == {at("scripted"): 0}

    # Prometheus: the same values under the translated names
    lab = 'pool_name="scripted"'
    assert p[f'db_client_connection_count{{{lab},state="idle"}}'] == 2
    assert p[f'db_client_connection_count{{{lab},state="used"}}'] == 0
    assert p[f"db_client_connection_max{{{lab}}}"] == 2
    assert p[f"db_client_connection_pending_requests{{{lab}}}"] == 0
    assert p[f"db_client_connection_timeouts_total{{{lab}}}"] == 1
    assert p[f"db_client_connection_wait_time_seconds_count{{{lab}}}"] == leases
    assert p[f'db_client_connection_wait_time_seconds_bucket{{le="0.0001",{lab}}}'] == leases - 1
    assert p[f'db_client_connection_wait_time_seconds_bucket{{le="+Inf",{lab}}}'] == leases
    assert p[f"db_client_connection_wait_time_seconds_sum{{{lab}}}"] == pytest.approx(wait_sum)
    assert p[f"db_client_connection_use_time_seconds_count{{{lab}}}"] == timed
    assert p[f"db_client_connection_use_time_seconds_sum{{{lab}}}"] == pytest.approx(use_sum)
    assert p[f"db_client_connection_create_time_seconds_count{{{lab}}}"] == create_count
    assert p[f'aperturedb_pool_connection_discarded_total{{{lab},reason="retired"}}'] == 2
    assert p[f'aperturedb_pool_connection_discarded_total{{{lab},reason="broken"}}'] == 1
    assert p[f"aperturedb_pool_generations_retired_total{{{lab}}}"] == 1
    assert p[f'aperturedb_pool_retries_total{{error_type="ConnectFailed",{lab}}}'] == 1
    assert p[f"aperturedb_pool_writes_not_retried_total{{{lab}}}"] == 1
    assert p[f"aperturedb_pool_leases_total{{{lab}}}"] == leases
    assert p[f"aperturedb_pool_cpu_bound{{{lab}}}"] == 0
    # OpenTelemetry buckets (replayed) and Prometheus buckets (direct) agree
    cum = 0
    for i, bound in enumerate(BUCKETS):
        cum += use_buckets[i]
        assert p[f'db_client_connection_use_time_seconds_bucket{{le="{float(bound)!r}",{lab}}}'] == cum


def test_histogram_created_time_counts_opens_after_instrumenting() -> None:
    provider, reader = otel()
    pool = ConnectionPool(Stub(), min_size=3, max_size=3, name="opens", open=False)
    instrument(pool, provider)
    with pool.open():
        pool.wait_ready(JOIN)
        count, total, _ = read_otel(reader)["db.client.connection.create_time"][at("opens")]
    assert count == 3 and 0 <= total < 3.0


def test_several_pools_one_collector_one_provider() -> None:
    provider, reader = otel()
    with ConnectionPool(Stub(), min_size=1, max_size=2, name="a") as a, \
            ConnectionPool(Stub(), min_size=1, max_size=3, name="b") as b:
        instrument(a, provider)
        instrument(b, provider)
        instrument(b, provider)  # twice: no double counting
        collector = PrometheusCollector(a)
        collector.add(b)
        with pytest.raises(ValueError, match="already"):
            collector.add(ConnectionPool(Stub(), name="a", open=False))
        registry = CollectorRegistry()
        registry.register(collector)
        with a.lease(), b.lease():
            pass
        o = read_otel(reader)
        p = read_prom(registry)
    assert o["db.client.connection.max"] == {at("a"): 2, at("b"): 3}
    assert o["aperturedb_pool.leases"] == {at("a"): 1, at("b"): 1}
    assert o["db.client.connection.wait_time"][at("b")][0] == 1
    assert p['db_client_connection_max{pool_name="a"}'] == 2
    assert p['db_client_connection_max{pool_name="b"}'] == 3


def test_histograms_off_leaves_leases_untimed() -> None:
    provider, reader = otel()
    with ConnectionPool(Stub(), min_size=1, max_size=1, name="plain") as pool:
        instrument(pool, provider, histograms=False)
        assert type(pool.lease()) is Lease
        with pool.lease():
            pass
        o = read_otel(reader)
    assert "db.client.connection.use_time" not in o or at("plain") not in \
        o["db.client.connection.use_time"]
    assert o["aperturedb_pool.leases"] == {at("plain"): 1}


def test_server_restart_exact(adb_server: Any) -> None:
    provider, reader = otel()
    pool = ConnectionPool(adb_server.connector(), min_size=4, max_size=4, name="restart",
                          retry=FAST, timeout=JOIN, open=False)
    instrument(pool, provider)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(pool))
    with pool.open():
        pool.wait_ready(JOIN)
        for _ in range(5):
            pool.query([{"GetStatus": {}}])
        assert adb_server.restart() == 4
        for _ in range(10):
            pool.query([{"GetStatus": {}}])
        deadline = time.monotonic() + JOIN
        while pool.stats().size < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        s = pool.stats()
        o = read_otel(reader)
        p = read_prom(registry)
    assert s.generation == 1
    assert o["aperturedb_pool.generations_retired"] == {at("restart"): 1}
    r = "aperturedb_pool.discard.reason"
    assert {dict(k)[r]: v for k, v in o["aperturedb_pool.connection.discarded"].items()} == \
        dict(s.discarded)
    assert sum(s.discarded.values()) >= 4  # every connector opened before the restart
    assert o["aperturedb_pool.leases"] == {at("restart"): s.leases_granted}
    assert o["db.client.connection.wait_time"][at("restart")][0] == s.leases_granted
    assert o["db.client.connection.use_time"][at("restart")][0] == s.leases_granted
    assert o["db.client.connection.create_time"][at("restart")][0] == s.connectors_opened
    assert sum(_retries(o).values()) == s.retries
    assert o["db.client.connection.count"][at("restart", **{
        "db.client.connection.state": "idle"})] == 4
    assert p['aperturedb_pool_generations_retired_total{pool_name="restart"}'] == 1
    assert p['db_client_connection_count{pool_name="restart",state="idle"}'] == 4
    assert p['db_client_connection_create_time_seconds_count{pool_name="restart"}'] == \
        s.connectors_opened


def _retries(o: dict) -> dict[str, int]:
    return {dict(k)["error.type"]: v for k, v in o.get("aperturedb_pool.retries", {}).items()}


def test_counts_add_up_at_every_collection_under_churn(adb_server: Any) -> None:
    """32 threads on 8 connectors for 2 s: leases, user exceptions inside leases,
    timeouts; OpenTelemetry and Prometheus collected all along.  used + idle is the
    pool's size (8: nothing is discarded) at every collection."""
    provider, reader = otel()
    pool = ConnectionPool(adb_server.connector(), min_size=8, max_size=8, name="churn",
                          timeout=JOIN, open=False)
    instrument(pool, provider)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(pool))
    stop = threading.Event()
    errors: list[BaseException] = []
    sums: list[tuple[str, int]] = []

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                x = rnd.random()
                try:
                    with pool.lease(timeout=0.002 if x < 0.05 else None) as conn:
                        if x < 0.5:
                            conn.query([{"GetStatus": {}}])
                        if x > 0.9:
                            raise ValueError("the caller's own error")
                except (ValueError, PoolTimeout):
                    pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def collect() -> None:
        while not stop.is_set():
            o = read_otel(reader)["db.client.connection.count"]
            sums.append(("otel", sum(o.values())))
            p = read_prom(registry)
            sums.append(("prom", int(p['db_client_connection_count{pool_name="churn",state="idle"}']
                                     + p['db_client_connection_count{pool_name="churn",state="used"}'])))

    with pool.open():
        pool.wait_ready(JOIN)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
        threads.append(threading.Thread(target=collect))
        for t in threads:
            t.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(JOIN)
        s = pool.stats()
        o = read_otel(reader)
    assert errors == []
    assert len(sums) >= 10
    assert {v for _, v in sums} == {8}, sums
    assert s.discarded == {}
    # quiet now: every lease is in the histograms, and the counters are exact
    assert o["aperturedb_pool.leases"] == {at("churn"): s.leases_granted}
    assert o["db.client.connection.wait_time"][at("churn")][0] == s.leases_granted
    assert o["db.client.connection.use_time"][at("churn")][0] == s.leases_granted
    assert o["db.client.connection.timeouts"] == {at("churn"): s.timeouts}
    assert adb_server.counters()["sharing_violations"] == 0


class _Interrupt(BaseException):
    """Raised asynchronously in a worker (a BaseException, as KeyboardInterrupt is)."""


def test_counts_add_up_under_asynchronous_interruptions() -> None:
    """16 threads on 4 connectors, an asynchronous exception into a random worker
    every millisecond (leases interrupted anywhere: queries, returns, waits).  At
    every collection both counts are >= 0 and add up to at most the pool's size;
    once the pool has recovered, idle is the size and used is 0: nothing drifted."""
    import ctypes

    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)

    class Slow(Stub):
        def clone(self) -> "Slow":
            return Slow()

        def query(self, q: Any, blobs: Any = None) -> Any:
            time.sleep(0.0002)
            return STATUS, []

    provider, reader = otel()
    pool = ConnectionPool(Slow(), min_size=4, max_size=4, name="interrupted", timeout=5.0,
                          open=False)
    instrument(pool, provider)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(pool))
    stop = threading.Event()
    bad: list[Any] = []
    collections = [0]

    def worker() -> None:
        while not stop.is_set():
            try:
                try:
                    while not stop.is_set():
                        try:
                            if random.random() < 0.7:
                                with pool.lease() as conn:
                                    conn.query(STATUS)
                            else:
                                pool.query(STATUS)
                        except (_Interrupt, PoolTimeout):
                            pass
                except _Interrupt:
                    pass
            except _Interrupt:
                pass

    def check(used: float, idle: float, where: str) -> None:
        if not (0 <= used and 0 <= idle and used + idle <= 4):
            bad.append((where, used, idle))

    def collect() -> None:
        lab = 'pool_name="interrupted"'
        used_k = at("interrupted", **{"db.client.connection.state": "used"})
        idle_k = at("interrupted", **{"db.client.connection.state": "idle"})
        while not stop.is_set():
            o = read_otel(reader)["db.client.connection.count"]
            check(o[used_k], o[idle_k], "otel")
            p = read_prom(registry)
            check(p[f'db_client_connection_count{{{lab},state="used"}}'],
                  p[f'db_client_connection_count{{{lab},state="idle"}}'], "prom")
            collections[0] += 1

    with pool.open():
        pool.wait_ready(JOIN)
        workers = [threading.Thread(target=worker, daemon=True) for _ in range(16)]
        collector = threading.Thread(target=collect)
        for t in workers:
            t.start()
        collector.start()
        end = time.monotonic() + 1.5
        rnd = random.Random(7)
        while time.monotonic() < end:
            t = rnd.choice(workers)
            if t.ident is not None:
                set_async_exc(t.ident, _Interrupt)
            time.sleep(0.001)
        stop.set()
        for t in workers:
            t.join(JOIN)
        collector.join(JOIN)
        assert not any(t.is_alive() for t in workers)
        # recovered (lost slots come back within about 2 s): nothing drifted
        deadline = time.monotonic() + JOIN
        while True:
            s = pool.stats()
            if s.size == 4 and s.idle == 4 and s.leased == 0:
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.01)
        o = read_otel(reader)
        p = read_prom(registry)
    assert bad == [] and collections[0] >= 5
    assert o["db.client.connection.count"] == {
        at("interrupted", **{"db.client.connection.state": "idle"}): 4,
        at("interrupted", **{"db.client.connection.state": "used"}): 0}
    assert p['db_client_connection_count{pool_name="interrupted",state="used"}'] == 0
    assert o["db.client.connection.pending_requests"] == {at("interrupted"): 0}
    assert o["aperturedb_pool.leases"] == {at("interrupted"): s.leases_granted}
    disc = sum(o.get("aperturedb_pool.connection.discarded", {}).values())
    assert disc == sum(s.discarded.values()) > 0  # interrupted queries were discarded


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_its_own_leases_from_zero() -> None:
    import json

    from aperturedb_pool.metrics import snapshot

    keys = ("aperturedb_pool.leases", "db.client.connection.wait_time",
            "db.client.connection.use_time")
    with ConnectionPool(Stub(), min_size=1, max_size=1, name="forked", timeout=JOIN) as pool:
        snapshot(pool)  # instrumented in the parent
        for _ in range(3):
            with pool.lease():
                pass
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                before = snapshot(pool)
                with pool.lease():
                    pass
                after = snapshot(pool)
                os.write(w, json.dumps([[before[k] for k in keys],
                                        [after[k] for k in keys]]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            before, after = json.loads(f.read())
        _, status = os.waitpid(pid, 0)
        assert status == 0
        parent = snapshot(pool)
    assert before[0] == 0 and before[1]["count"] == 0 and before[2]["count"] == 0
    assert after[0] == 1 and after[1]["count"] == 1 and after[2]["count"] == 1
    assert parent["aperturedb_pool.leases"] == 3
    assert parent["db.client.connection.use_time"]["count"] == 3


def test_instrumented_late_histograms_count_from_then_counters_from_the_start() -> None:
    provider, reader = otel()
    with ConnectionPool(Stub(), min_size=1, max_size=1, name="late") as pool:
        pool.wait_ready(JOIN)
        for _ in range(3):
            with pool.lease():
                pass
        instrument(pool, provider)
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(pool, histograms=False))
        for _ in range(2):
            with pool.lease():
                pass
        o = read_otel(reader)
        p = read_prom(registry)
    assert o["aperturedb_pool.leases"] == {at("late"): 5}
    assert o["db.client.connection.wait_time"][at("late")][0] == 2
    assert o["db.client.connection.use_time"][at("late")][0] == 2
    assert p['aperturedb_pool_leases_total{pool_name="late"}'] == 5
    assert not any(k.startswith("db_client_connection_wait_time") for k in p)


def test_the_drop_in_compat_pool_is_accepted() -> None:
    from aperturedb_pool.compat import ConnectionPool as CompatPool
    from aperturedb_pool.metrics import snapshot

    compat = CompatPool(pool_size=1, connection_factory=Stub)
    try:
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(compat))
        with compat.get_connection():
            pass
        assert snapshot(compat)["aperturedb_pool.leases"] == 1
        name = compat.pool.name
        assert read_prom(registry)[f'aperturedb_pool_leases_total{{pool_name="{name}"}}'] == 1
        with pytest.raises(TypeError, match="ConnectionPool"):
            PrometheusCollector(object())
    finally:
        compat.close()
