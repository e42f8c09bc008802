"""aperturedb_pool.dask on a real LocalCluster of worker PROCESSES, against the embedded
server running in this process on loopback (real SDK connectors, real sockets).

One cluster (2 workers x 4 threads) serves the whole module; each test registers
the plugins it needs and removes them at its end, so the server's connection
counters see only that test's pools.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported (inherited by the workers)

import contextlib
import itertools
import logging
import pickle
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from typing import Any, Iterator

import cloudpickle
import pytest
from distributed import Client, LocalCluster, get_worker

from aperturedb_pool import OutcomeUnknown, RetryPolicy
from aperturedb_pool.batch import BatchProgress, BatchResult
from aperturedb_pool.dask import (
    BatchTaskLost,
    PoolPlugin,
    WorkerHasNoPool,
    _split_budget,
    get_pool,
    run_batches_on_dask,
)
from aperturedb_pool.retry import idempotent
from aperturedb_pool.testing import EmbeddedServer

# The workers cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SECRET = "Pw-d4sk-n0t-v1sible-7f3a"
BUDGET = 6  # fewer than the cluster's 8 threads: the split and the cap both matter
SEEDS = 200
FAST_RETRY = RetryPolicy(max_attempts=8, deadline=20.0, initial_delay=0.01, max_delay=0.2)


def _seed(server: EmbeddedServer) -> None:
    conn = server.connector()
    conn.query([{"AddEntity": {"class": "Seed", "properties": {"k": i, "v": i * 7 + 1}}}
                for i in range(SEEDS)])
    conn.close()


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(password=SECRET) as s:
        _seed(s)
        yield s


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    # SESSION_EXPIRY_OFFSET_SEC=0: the SDK renews a session when it expires, not 10 s
    # before (the token-expiry test uses sub-second TTLs).
    # allowed_failures=0: a task whose worker died is not run again elsewhere (the
    # setting the README advises for non-idempotent writes on workers that can die).
    cluster = LocalCluster(n_workers=2, threads_per_worker=4, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                           env={"SESSION_EXPIRY_OFFSET_SEC": "0", "ADB_LOG_FILE": ""},
                           scheduler_kwargs={"allowed_failures": 0})
    c = Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _plugin(server: EmbeddedServer, **kw: Any) -> PoolPlugin:
    kw.setdefault("max_connections", BUDGET)
    kw.setdefault("timeout", 20.0)
    kw.setdefault("retry", FAST_RETRY)
    return PoolPlugin(host="127.0.0.1", port=server.port, user="admin", password=SECRET,
                      use_ssl=False, **kw)


def _wait_closed(server: EmbeddedServer) -> None:
    deadline = time.monotonic() + 20
    while server.counters()["open"]:
        assert time.monotonic() < deadline, "connections of an earlier pool stayed open"
        time.sleep(0.01)


@contextlib.contextmanager
def _registered(client: Client, server: EmbeddedServer, plugin: PoolPlugin,
                fresh: bool = True) -> Iterator[None]:
    """The plugin on every worker; with ``fresh``, the server's counters start at zero
    with no connection open."""
    if fresh:
        _wait_closed(server)
        server.reset_counters()
    answers = client.register_plugin(plugin)
    assert all(a["status"] == "OK" for a in answers.values()), answers
    try:
        yield
    finally:
        client.unregister_worker_plugin(plugin.name)


# -- batch functions (they run in the workers) ---------------------------------

def _writer(cls: str) -> Any:
    def write(conn: Any, keys: list[str]) -> str:
        response, _ = conn.query([{"AddEntity": {"class": cls, "properties": {"k": k}}}
                                  for k in keys])
        if not isinstance(response, list):
            raise RuntimeError(f"failed transaction: {response}")
        return str(get_worker().address)
    return write


@idempotent
def read_seeds(conn: Any, keys: list[int]) -> tuple[str, list[int], list[tuple[int, Any]]]:
    response, _ = conn.query([{"FindEntity": {"with_class": "Seed",
                                              "constraints": {"k": ["==", k]},
                                              "results": {"list": ["k", "v"]}}}
                              for k in keys])
    if not isinstance(response, list):
        raise RuntimeError(f"failed transaction: {response}")
    found = [(e["k"], e["v"]) for r in response for e in r["FindEntity"]["entities"]]
    return str(get_worker().address), keys, found


def _stored(server: EmbeddedServer, cls: str) -> Counter[str]:
    return Counter(o["properties"]["k"] for o in server.dump() if o["class"] == cls)


def _mixed_run(client: Client, n_batches: int, cls: str, plugin_name: str,
               on_progress: Any = None, keep_going: Any = None
               ) -> tuple[BatchResult, BatchResult, dict[int, list[str]]]:
    """Write and read batches at once (two runs from two threads of this process).

    Writes are not idempotent (an unknown outcome is reported, never re-sent); reads
    are.  ``keep_going()``, when given, extends both inputs until it returns False.
    """
    writes = {i: [f"{cls}-{i}-{j}" for j in range(10)] for i in range(n_batches // 2)}
    reads = [[(i * 13 + j * 29) % SEEDS for j in range(5)] for i in range(n_batches // 2)]
    write_input: Any = list(writes.values())
    read_input: Any = reads
    if keep_going is not None:
        more = itertools.count(len(writes))

        def extra_writes() -> Iterator[list[str]]:
            yield from writes.values()
            while keep_going():
                i = next(more)
                writes[i] = [f"{cls}-{i}-{j}" for j in range(10)]
                yield writes[i]

        write_input = extra_writes()
        read_input = itertools.chain(reads, itertools.takewhile(
            lambda _: keep_going(), itertools.cycle(reads)))
    out: dict[str, BatchResult] = {}
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            out["reads"] = run_batches_on_dask(client, read_seeds, read_input,
                                               plugin_name=plugin_name, progress=on_progress)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    out["writes"] = run_batches_on_dask(client, _writer(cls), write_input,
                                        plugin_name=plugin_name)
    t.join(120)
    assert not t.is_alive() and not errors, errors
    return out["writes"], out["reads"], writes


def _check_reads(reads: BatchResult) -> set[str]:
    """Every read answered and every answer right; the workers that answered."""
    assert not reads.failed and not reads.skipped, reads.failed[:3]
    workers = set()
    assert sorted(reads.results) == reads.acknowledged
    for index, (worker, keys, found) in reads.results.items():
        workers.add(worker)
        assert [k for k, _ in found] == keys, index  # one answer per key, in order
        assert all(v == k * 7 + 1 for k, v in found), found
    return workers


def _check_writes(server: EmbeddedServer, cls: str, writes: BatchResult,
                  batches: dict[int, list[str]]) -> Counter[str]:
    """Every acknowledged write stored exactly once; a failed one at most once."""
    stored = _stored(server, cls)
    assert not writes.skipped
    assert set(writes.acknowledged) | {f.index for f in writes.failed} == set(batches)
    for i in writes.acknowledged:
        assert all(stored[k] == 1 for k in batches[i]), (i, [stored[k] for k in batches[i]])
    for f in writes.failed:
        assert isinstance(f.error, OutcomeUnknown), repr(f.error)
        assert all(stored[k] <= 1 for k in batches[f.index])
    assert max(stored.values(), default=1) == 1, "a write was stored twice"
    return stored


def _pool_stats(client: Client, name: str) -> dict[str, Any]:
    return client.run(lambda dask_worker: dask_worker.plugins[name].pool.stats())


# -- the proof ---------------------------------------------------------------

def test_400_batches_within_the_budget_one_login_per_worker(client: Client,
                                                            server: EmbeddedServer) -> None:
    cls = "Mixed" + uuid.uuid4().hex[:8]
    plugin = _plugin(server, plugin_name="main")
    with _registered(client, server, plugin):
        writes, reads, batches = _mixed_run(client, 400, cls, "main")
        stats = _pool_stats(client, "main")
    counters = server.counters()
    assert len(reads.acknowledged) == 200 and len(writes.acknowledged) == 200
    workers = _check_reads(reads) | set(writes.results.values())
    assert workers == set(client.nthreads()), "both workers ran batches"
    stored = _check_writes(server, cls, writes, batches)
    assert sum(stored.values()) == 2000
    # The server never saw more connections than the budget: 3 per worker.
    assert sorted(s.max_size for s in stats.values()) == [3, 3]
    assert 2 <= counters["peak_open"] <= BUDGET, counters
    # Both workers ran queries, so each logged in at least once: twice in all is once each.
    assert counters["authenticate"] == 2, counters
    assert counters["sharing_violations"] == 0


def test_server_restart_mid_run_no_failed_read_no_duplicate_write(
        client: Client, server: EmbeddedServer) -> None:
    cls = "Restart" + uuid.uuid4().hex[:8]
    dropped: list[int] = []

    def restart_once(p: BatchProgress) -> None:
        if p.done == 40:  # reads and writes in flight on both workers
            server.refuse_connections(0.3)
            dropped.append(server.restart())

    plugin = _plugin(server, plugin_name="restart")
    server.set_latency(0.002)  # requests are pending on the server when it restarts
    try:
        with _registered(client, server, plugin):
            writes, reads, batches = _mixed_run(client, 400, cls, "restart",
                                                on_progress=restart_once)
    finally:
        server.set_latency(0)
    counters = server.counters()
    assert dropped and dropped[0] > 0, "the restart closed the workers' connections"
    _check_reads(reads)  # 0 failed reads: each was retried on a new connection
    _check_writes(server, cls, writes, batches)
    # The restart forgot every session: the workers logged in again with their credentials.
    assert counters["authenticate"] > 2, counters
    assert counters["peak_open"] <= BUDGET
    assert counters["sharing_violations"] == 0


def test_session_and_refresh_tokens_expiring_mid_run(client: Client) -> None:
    """Refresh tokens live shorter than sessions: each renewal finds its refresh token
    expired and the worker logs in again with the credentials the plugin carried."""
    cls = "Ttl" + uuid.uuid4().hex[:8]
    with EmbeddedServer(password=SECRET, session_ttl=0.4, refresh_ttl=0.2) as ttl_server:
        _seed(ttl_server)
        plugin = _plugin(ttl_server, plugin_name="ttl")
        with _registered(client, ttl_server, plugin):
            # The run lasts at least 4 session lifetimes, however fast the machine.
            until = time.monotonic() + 1.6
            writes, reads, batches = _mixed_run(client, 100, cls, "ttl",
                                                keep_going=lambda: time.monotonic() < until)
        counters = ttl_server.counters()
        _check_reads(reads)
        assert writes.ok, writes.failed[:3]
        assert sum(_check_writes(ttl_server, cls, writes, batches).values()) == \
            10 * len(batches)
    assert counters["refresh_failed"] >= 2, counters   # refresh tokens expired ...
    assert counters["authenticate"] >= 4, counters     # ... and the workers logged in again
    assert counters["authenticate_failed"] == 0


def test_unknown_outcome_writes_are_not_resent_unless_idempotent(
        client: Client, server: EmbeddedServer) -> None:
    cls = "Unknown" + uuid.uuid4().hex[:8]
    plugin = _plugin(server, plugin_name="unknown", max_connections=2)
    with _registered(client, server, plugin):
        server.close_after_next_request(True, "AddEntity")  # executed, never answered
        plain = run_batches_on_dask(client, _writer(cls), [[f"{cls}-a"]],
                                    plugin_name="unknown")
        server.close_after_next_request(True, "AddEntity")
        again = run_batches_on_dask(client, _writer(cls), [[f"{cls}-b"]], idempotent=True,
                                    plugin_name="unknown")
    [failure] = plain.failed
    # The class and the query crossed the process boundary with the error.
    assert type(failure.error) is OutcomeUnknown and failure.maybe_executed
    assert failure.error.query == [{"AddEntity": {"class": cls,
                                                  "properties": {"k": f"{cls}-a"}}}]
    assert again.ok  # declared idempotent: re-sent (and stored twice, as declared safe)
    stored = _stored(server, cls)
    assert stored[f"{cls}-a"] == 1 and stored[f"{cls}-b"] == 2


def _bounded(run: Any, timeout: float = 60.0) -> Any:
    """``run()`` in a thread of its own: a run that hangs fails the test instead."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(run()), daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"the run did not finish in {timeout} s"
    return box[0]


class HoldsALock(Exception):
    """An error that cannot be pickled back to the client."""

    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def test_an_error_that_cannot_be_pickled_arrives_by_name(client: Client,
                                                         server: EmbeddedServer) -> None:
    def fails(conn: Any, batch: Any) -> None:
        raise HoldsALock()

    def returns_a_lock(conn: Any, batch: Any) -> Any:
        return threading.Lock()

    plugin = _plugin(server, plugin_name="unpicklable", max_connections=2)
    with _registered(client, server, plugin, fresh=False):
        # Without the check in the worker, both runs would wait for ever.
        result = _bounded(lambda: run_batches_on_dask(client, fails, [[1]],
                                                      plugin_name="unpicklable"))
        returned = _bounded(lambda: run_batches_on_dask(client, returns_a_lock, [[1]],
                                                        plugin_name="unpicklable"))
    [failure] = result.failed
    # Reported as what it was (not as a lost task, which would claim it may have run).
    assert type(failure.error) is RuntimeError and not failure.maybe_executed
    assert str(failure.error).endswith("HoldsALock: cannot travel")
    [failure] = returned.failed
    assert isinstance(failure.error, BatchTaskLost) and failure.maybe_executed
    assert "returns_a_lock returned cannot be pickled" in str(failure.error)


def test_a_stopped_run_finishes_what_it_submitted_and_skips_the_rest(
        client: Client, server: EmbeddedServer) -> None:
    """Dask can cancel a task a worker already runs: on max_failures the submitted
    batches finish (each ends acknowledged or failed) and only the others are skipped,
    none of which ran."""
    cls = "Stop" + uuid.uuid4().hex[:8]

    def write_then_fail(conn: Any, keys: list[str]) -> None:
        conn.query([{"AddEntity": {"class": cls, "properties": {"k": k}}} for k in keys])
        raise ValueError(f"refused {keys[0]}")

    plugin = _plugin(server, plugin_name="stop", max_connections=4)
    with _registered(client, server, plugin):
        result = run_batches_on_dask(client, write_then_fail, [[f"{cls}-{i}"] for i in range(60)],
                                     in_flight=6, max_failures=2, plugin_name="stop")
    stored = _stored(server, cls)
    assert not result.acknowledged and result.skipped
    assert len(result.failed) >= 3
    assert all(isinstance(f.error, ValueError) for f in result.failed)
    assert sorted([f.index for f in result.failed] + [i for i, _ in result.skipped]) == \
        list(range(60))
    assert set(stored) == {f.batch[0] for f in result.failed}, "a skipped batch ran"


def test_budget_smaller_than_the_workers_leaves_one_without_a_pool(
        client: Client, server: EmbeddedServer) -> None:
    plugin = _plugin(server, plugin_name="tiny", max_connections=1)
    with _registered(client, server, plugin):
        sizes = client.run(lambda dask_worker: dask_worker.plugins["tiny"]._pool and
                           dask_worker.plugins["tiny"]._pool.max_size)
        without = [w for w, size in sizes.items() if not size]
        assert sorted(sizes.values(), key=bool) == [None, 1]
        fut = client.submit(lambda: get_pool("tiny"), workers=without, pure=False)
        with pytest.raises(WorkerHasNoPool, match="max_connections=1"):
            fut.result(timeout=30)
        fut = client.submit(lambda: get_pool("nope"), pure=False)
        with pytest.raises(LookupError, match="register_plugin"):
            fut.result(timeout=30)


def test_the_password_never_shows(client: Client, server: EmbeddedServer) -> None:
    plugin = _plugin(server, plugin_name="secret", max_connections=2)
    assert SECRET not in repr(plugin) and SECRET not in str(plugin)
    assert SECRET not in repr(vars(plugin))
    keyed = PoolPlugin(key="WyJ4IiwgIngiLCAieCIsICJ4Il0=")  # ["x", "x", "x", "x"]
    assert "WyJ4" not in repr(keyed) and "WyJ4" not in repr(vars(keyed))
    # Every log record of the workers, at DEBUG, while the plugin is set up and used.
    client.run(_capture_logs)
    try:
        with _registered(client, server, plugin, fresh=False):
            shown = client.run(lambda dask_worker: repr(dask_worker.plugins))
            assert client.submit(lambda: get_pool("secret").query(
                [{"GetStatus": {}}])[0][0]["GetStatus"]["status"], pure=False).result(30) == 0
            pages = _dashboard_pages(client)
    finally:
        records = client.run(_stop_capture)
    assert all("PoolPlugin('secret'" in text for text in shown.values())
    assert any("pool of max_size 1 opened" in line for lines in records.values()
               for line in lines)
    for where, text in [*shown.items(), *records.items(), *pages.items(),
                        ("scheduler logs", client.get_scheduler_logs()),
                        ("worker logs", client.get_worker_logs())]:
        assert SECRET not in str(text), where


def _capture_logs(dask_worker: Any) -> None:
    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(self.format(record))

    root = logging.getLogger()
    handler = Keep()
    root.addHandler(handler)
    dask_worker._adb_test_capture = (handler, root.level)
    root.setLevel(logging.DEBUG)


def _stop_capture(dask_worker: Any) -> list[str]:
    handler, level = dask_worker._adb_test_capture
    root = logging.getLogger()
    root.removeHandler(handler)
    root.setLevel(level)
    return list(handler.lines)


def _dashboard_pages(client: Client) -> dict[str, str]:
    base = client.dashboard_link.rsplit("/status", 1)[0]
    urls = [f"{base}/info/main/workers.html", f"{base}/info/main/logs.html"]
    urls += [f"{base}/info/worker/{urllib.request.quote(w, safe='')}.html"
             for w in client.nthreads()]
    pages = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=20) as r:
            pages[url] = r.read().decode()
    assert any("Worker" in p for p in pages.values())
    return pages


def test_the_plugin_pickles_to_configuration_only(client: Client,
                                                  server: EmbeddedServer) -> None:
    plugin = _plugin(server, plugin_name="pickled", max_connections=2)
    with _registered(client, server, plugin, fresh=False):
        # The worker's copy holds an open pool; what it would send anywhere does not.
        state = client.run(lambda dask_worker: (
            dask_worker.plugins["pickled"]._pool is not None,
            pickle.loads(pickle.dumps(dask_worker.plugins["pickled"]))._pool))
    assert all(v == (True, None) for v in state.values()), state
    copy = pickle.loads(pickle.dumps(plugin))
    assert copy._revealed() == plugin._revealed() and copy._revealed()["PASSWORD"] == SECRET


def test_a_batch_whose_worker_dies_fails_as_an_unknown_outcome(
        client: Client, server: EmbeddedServer) -> None:
    cls = "Dies" + uuid.uuid4().hex[:8]

    def write_or_die(conn: Any, keys: list[str]) -> None:
        conn.query([{"AddEntity": {"class": cls, "properties": {"k": k}}} for k in keys])
        if keys == ["die"]:
            os._exit(3)  # the worker process dies after the write reached the server

    plugin = _plugin(server, plugin_name="dies")
    with _registered(client, server, plugin, fresh=False):
        result = run_batches_on_dask(client, write_or_die, [["a"], ["die"], ["b"]],
                                     in_flight=1, plugin_name="dies")
        client.wait_for_workers(2, timeout=60)  # the nanny started a new worker
    assert result.acknowledged == [0, 2]
    [lost] = result.failed
    assert isinstance(lost.error, BatchTaskLost) and isinstance(lost.error, OutcomeUnknown)
    assert lost.maybe_executed and "KilledWorker" in str(lost.error)
    assert _stored(server, cls) == Counter({"a": 1, "die": 1, "b": 1})  # never run twice


def test_a_joining_worker_takes_its_share_and_registering_again_rebalances(
        client: Client, server: EmbeddedServer) -> None:
    """As documented: the newcomer's share comes from the workers known at its setup,
    the running workers keep theirs until the plugin is registered again.  (Last test
    of the module: it leaves the cluster with 3 workers.)"""
    def sizes() -> dict[str, int]:
        return client.run(lambda dask_worker: dask_worker.plugins["join"].pool.max_size)

    plugin = _plugin(server, plugin_name="join")
    with _registered(client, server, plugin, fresh=False):
        before = sizes()
        assert sorted(before.values()) == [3, 3]
        client.cluster.scale(3)
        client.wait_for_workers(3, timeout=60)
        joined = sizes()
        (newcomer,) = set(joined) - set(before)
        expected = _split_budget(BUDGET, dict.fromkeys(joined, 4))
        assert joined[newcomer] == expected[newcomer] == 2
        assert {w: joined[w] for w in before} == before  # not shrunk under their tasks
        client.register_plugin(plugin)
        assert sizes() == expected and sum(expected.values()) == BUDGET


# -- pure logic and arguments ---------------------------------------------------

def test_split_budget() -> None:
    two = {"tcp://a:1": 4, "tcp://b:1": 4}
    assert _split_budget(6, two) == {"tcp://a:1": 3, "tcp://b:1": 3}
    assert _split_budget(7, two) == {"tcp://a:1": 4, "tcp://b:1": 3}
    assert _split_budget(100, two) == {"tcp://a:1": 4, "tcp://b:1": 4}  # capped by threads
    assert _split_budget(1, two) == {"tcp://a:1": 1, "tcp://b:1": 0}
    # What a one-thread worker cannot use goes to the others.
    assert _split_budget(6, {"tcp://a:1": 1, "tcp://b:1": 8}) == {"tcp://a:1": 1,
                                                                  "tcp://b:1": 5}
    shares = _split_budget(10, {f"tcp://w{i}:1": 2 for i in range(7)})
    assert sum(shares.values()) == 10 and set(shares.values()) == {1, 2}


def test_arguments_are_checked_in_the_client() -> None:
    ok = dict(host="h", user="u", password="p")
    with pytest.raises(ValueError, match="port"):
        PoolPlugin(port=70000, user="u", password="p")
    with pytest.raises(ValueError, match="credentials"):
        PoolPlugin(host="h")
    with pytest.raises(ValueError, match="max_connections"):
        PoolPlugin(**ok, max_connections=0)
    with pytest.raises(TypeError, match="max_size"):
        PoolPlugin(**ok, max_size=4)
    with pytest.raises(TypeError, match="unknown option"):
        PoolPlugin(**ok, timeuot=3)
    with pytest.raises(ValueError, match="timeout"):
        PoolPlugin(**ok, timeout=-1)
    with pytest.raises(ValueError, match="key"):
        PoolPlugin(key="not a key")
    with pytest.raises(ValueError, match="^PoolPlugin: user: USER is set but PASSWORD"):
        PoolPlugin(host="h", user="u")
    with pytest.raises(ValueError, match="token: TOKEN and USER/PASSWORD"):
        PoolPlugin(host="h", token="t", user="u", password="p")
    PoolPlugin(**ok, ca_cert="/only/on/the/workers.pem", use_ssl=True)  # not checked here
    with pytest.raises(RuntimeError, match="Dask worker"):
        get_pool()
    with pytest.raises(ValueError, match="in_flight"):
        run_batches_on_dask(None, lambda c, b: None, [], in_flight=0)  # type: ignore[arg-type]
