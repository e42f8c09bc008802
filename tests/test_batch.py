"""run_batches against the embedded server: real SDK connectors, real sockets, faults.

Faults are injected from the progress callback (it runs in the calling thread
after each finished batch), so they land mid-run without any sleep.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported: no error.<time>.log files

import concurrent.futures as cf
import threading
import uuid
from typing import Any

import pytest

from aperturedb_pool import ConnectionPool, ConnectorError, OutcomeUnknown, RetryPolicy
from aperturedb_pool.batch import (
    BatchAborted,
    BatchError,
    BatchProgress,
    chunks,
    run_batches,
)
from aperturedb_pool.retry import idempotent


def _pool(server: Any, **kw: Any) -> ConnectionPool:
    kw.setdefault("min_size", 1)
    kw.setdefault("max_size", 4)
    kw.setdefault("timeout", 10.0)
    kw.setdefault("retry", RetryPolicy(max_attempts=6, deadline=10.0, initial_delay=0.01,
                                       max_delay=0.2))
    return ConnectionPool(server.connector(), name="batch-test", **kw)


def _keys_on_server(pool: ConnectionPool, cls: str) -> list[str]:
    response, _ = pool.query([{"FindEntity": {"with_class": cls,
                                              "results": {"list": ["k"], "count": True}}}])
    found = response[0]["FindEntity"]
    keys = [e["k"] for e in found.get("entities", [])]
    assert found["count"] == len(keys)
    return keys


def _add_batch(cls: str) -> Any:
    def add(conn: Any, batch: list[str]) -> int:
        response, _ = conn.query([{"AddEntity": {"class": cls, "properties": {"k": k}}}
                                  for k in batch])
        if not isinstance(response, list):
            raise RuntimeError(f"failed transaction: {response}")
        return len(batch)
    return add


def test_10k_entities_16_threads_pool_of_4_with_faults(adb_server: Any) -> None:
    """Every batch is acknowledged or listed as failed, and the server holds
    exactly the acknowledged entities: no write is lost, none is duplicated."""
    cls = "Load" + uuid.uuid4().hex[:8]
    keys = [f"{cls}-{i}" for i in range(10_000)]
    batches = list(chunks(keys, 50))
    fired: list[str] = []
    seen: list[BatchProgress] = []
    main = threading.get_ident()

    def progress(p: BatchProgress) -> None:
        assert threading.get_ident() == main  # always called in the caller's thread
        seen.append(p)
        # Writes are not idempotent here: a request the server received and
        # then lost (closed before executing) must be reported, never re-sent.
        if p.done == 20:
            adb_server.close_after_next_request(False, "AddEntity")
            fired.append("close_after")
        elif p.done == 60:
            fired.append(f"drop:{adb_server.drop_connections()}")
        elif p.done == 100:
            adb_server.close_after_next_request(False, "AddEntity")
            fired.append("close_after")
        elif p.done == 140:
            adb_server.refuse_connections(0.2)
            fired.append(f"drop+refuse:{adb_server.drop_connections()}")

    with _pool(adb_server, max_size=4) as pool:
        result = run_batches(pool, _add_batch(cls), batches, threads=16, progress=progress)
        stats = pool.stats()
        on_server = _keys_on_server(pool, cls)

    assert len(fired) == 4
    assert not result.skipped
    acked = set(result.acknowledged)
    failed = {f.index for f in result.failed}
    assert acked.isdisjoint(failed)
    assert acked | failed == set(range(len(batches)))
    assert result.failed, "the close-after faults hit a batch each"
    for f in result.failed:
        # Not idempotent: an unknown outcome is reported, not retried.
        assert isinstance(f.error, OutcomeUnknown), repr(f.error)
        assert f.batch == batches[f.index]
    expected = [k for i in sorted(acked) for k in batches[i]]
    assert len(on_server) == len(set(on_server)), "no entity was written twice"
    assert sorted(on_server) == sorted(expected)
    assert result.items_acknowledged == len(expected)
    assert result.results == {i: len(batches[i]) for i in acked}
    assert [p.done for p in seen] == list(range(1, len(batches) + 1))
    assert seen[-1].total == len(batches)
    assert stats.leased == 0 and stats.size <= 4
    assert adb_server.counters()["sharing_violations"] == 0


def test_idempotent_batches_are_retried_and_never_duplicated(adb_server: Any) -> None:
    """Conditional adds (if_not_found) declared idempotent: a batch executed but
    unanswered is re-sent, and the server still holds each entity once."""
    cls = "Idem" + uuid.uuid4().hex[:8]
    keys = [f"{cls}-{i}" for i in range(1000)]

    @idempotent
    def add_if_missing(conn: Any, batch: list[str]) -> None:
        response, _ = conn.query([{"AddEntity": {"class": cls, "properties": {"k": k},
                                                 "if_not_found": {"k": ["==", k]}}}
                                  for k in batch])
        if not isinstance(response, list):
            raise RuntimeError(f"failed transaction: {response}")

    def progress(p: BatchProgress) -> None:
        if p.done in (5, 15, 25):
            adb_server.close_after_next_request(True, "AddEntity")  # executed, unanswered
        elif p.done == 35:
            adb_server.drop_connections()

    with _pool(adb_server) as pool:
        result = run_batches(pool, add_if_missing, keys, batch_size=20, threads=8,
                             progress=progress)
        on_server = _keys_on_server(pool, cls)
        stats = pool.stats()
    result.raise_for_failures()
    assert result.ok and len(result.acknowledged) == 50
    assert result.results == {}
    assert sorted(on_server) == sorted(keys)
    assert stats.retries >= 3
    assert adb_server.counters()["fault_closed"] == 3


def test_caller_executor_is_used_and_left_running(adb_server: Any) -> None:
    cls = "Exec" + uuid.uuid4().hex[:8]
    names: set[str] = set()
    inner = _add_batch(cls)

    def add(conn: Any, batch: list[str]) -> int:
        names.add(threading.current_thread().name)
        return inner(conn, batch)

    with cf.ThreadPoolExecutor(max_workers=3, thread_name_prefix="mine") as ex, \
            _pool(adb_server, max_size=2) as pool:
        # A generator: read lazily, never materialized.
        gen = (f"{cls}-{i}" for i in range(300))
        result = run_batches(pool, add, gen, batch_size=10, executor=ex)
        assert ex.submit(lambda: 42).result(timeout=5) == 42  # not shut down
        assert sorted(_keys_on_server(pool, cls)) == sorted(f"{cls}-{i}" for i in range(300))
    assert result.ok and len(result.acknowledged) == 30
    assert names and all(n.startswith("mine") for n in names)


def test_failed_transactions_are_listed_not_retried(adb_server: Any) -> None:
    cls = "Bad" + uuid.uuid4().hex[:8]
    calls = []

    def add(conn: Any, batch: list[int]) -> None:
        calls.append(batch)
        q = [{"AddEntity": {"class": cls, "properties": {"k": k}}} for k in batch]
        if batch[0] % 20 == 0:
            q.append({"FindEntity": {"with_class": cls, "limit": -1}})  # invalid: whole tx fails
        response, _ = conn.query(q)
        if not isinstance(response, list):
            raise RuntimeError(f"failed transaction: {response}")

    with _pool(adb_server) as pool:
        result = run_batches(pool, add, list(range(100)), batch_size=10, threads=4)
        on_server = _keys_on_server(pool, cls)
    assert sorted(f.index for f in result.failed) == [0, 2, 4, 6, 8]
    assert all(isinstance(f.error, RuntimeError) for f in result.failed)
    assert len(calls) == 10  # no retry of a failed transaction
    assert sorted(int(k) for k in on_server) == sorted(
        k for i in result.acknowledged for k in range(i * 10, i * 10 + 10))
    with pytest.raises(BatchError) as ei:
        result.raise_for_failures()
    assert ei.value.result is result and "first failure: batch 0" in str(ei.value)
    assert result.unfinished_batches() == [list(range(i * 10, i * 10 + 10))
                                           for i in (0, 2, 4, 6, 8)]


def test_max_failures_stops_and_lists_the_rest_as_skipped(adb_server: Any) -> None:
    def always_fails(conn: Any, batch: Any) -> None:
        raise ValueError(f"bad batch {batch}")

    with _pool(adb_server, max_size=2) as pool:
        result = run_batches(pool, always_fails, [[i] for i in range(50)], threads=2,
                             max_failures=3)
        assert pool.stats().leased == 0
    assert len(result.failed) >= 4
    assert result.skipped
    indices = ([f.index for f in result.failed] + [i for i, _ in result.skipped] +
               result.acknowledged)
    assert sorted(indices) == list(range(50))
    assert [b for _, b in result.skipped] == [[i] for i, _ in result.skipped]


def test_progress_error_aborts_with_the_partial_result(adb_server: Any) -> None:
    cls = "Abort" + uuid.uuid4().hex[:8]

    def progress(p: BatchProgress) -> None:
        if p.done == 3:
            raise KeyError("stop")

    with _pool(adb_server, max_size=2) as pool:
        with pytest.raises(BatchAborted) as ei:
            run_batches(pool, _add_batch(cls), [f"k{i}" for i in range(200)], batch_size=5,
                        threads=2, progress=progress)
        on_server = _keys_on_server(pool, cls)
    result = ei.value.result
    assert isinstance(ei.value.__cause__, KeyError)
    assert not result.failed
    assert sorted(result.acknowledged + [i for i, _ in result.skipped]) == list(range(40))
    assert len(on_server) == result.items_acknowledged


def test_connector_errors_are_failures_with_their_query(adb_server: Any) -> None:
    """A connector error carries the query that was being sent."""
    def add(conn: Any, batch: list[str]) -> None:
        conn.query([{"AddEntity": {"class": "Q", "properties": {"k": batch[0]}}}])

    with _pool(adb_server, max_size=1) as pool:
        adb_server.close_after_next_request(False, "AddEntity")
        result = run_batches(pool, add, [["a"], ["b"]], threads=1)
    assert [f.index for f in result.failed] == [0]
    err = result.failed[0].error
    assert isinstance(err, ConnectorError) and result.failed[0].maybe_executed
    assert err.query == [{"AddEntity": {"class": "Q", "properties": {"k": "a"}}}]


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(chunks([1], 0))
    assert list(chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="threads"):
        run_batches(object(), lambda c, b: None, [], threads=0)
    with pytest.raises(TypeError, match="ThreadPoolExecutor"):
        with cf.ProcessPoolExecutor(max_workers=1) as ex:
            run_batches(object(), lambda c, b: None, [], executor=ex)


def test_the_readme_batch_example_adds_each_person_once(adb_server: Any) -> None:
    """The README's loader (stress/batch_example.py holds it verbatim), twice over the
    same people: the second run finds every person through the equality index."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "stress" / "batch_example.py"
    spec = importlib.util.spec_from_file_location("batch_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    people = [{"id": i, "name": f"person {i}"} for i in range(2000)]
    for _ in range(2):
        with _pool(adb_server) as pool:
            result = run_batches(pool, example.load, people, batch_size=100, threads=16)
        assert not result.failed and len(result.acknowledged) == 20
        stored = [o for o in adb_server.dump() if o["class"] == "Person"]
        assert sorted(o["properties"]["id"] for o in stored) == list(range(2000))
