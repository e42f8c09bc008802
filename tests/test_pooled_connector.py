"""PooledConnector (issue 15): the SDK's own helpers run through the pool.

Every test drives the real SDK 0.5.3 helpers (ParallelLoader, ParallelQuery,
Utils, CommonLibrary.execute_query) against the embedded server.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from datetime import datetime
from typing import Any

import pytest

os.environ.setdefault("ADB_LOG_FILE", "")

from aperturedb.CommonLibrary import execute_query  # noqa: E402
from aperturedb.ParallelLoader import ParallelLoader  # noqa: E402
from aperturedb.ParallelQuery import ParallelQuery  # noqa: E402
from aperturedb.Utils import Utils  # noqa: E402

from aperturedb_pool import ConnectionPool, OutcomeUnknown, PooledConnector  # noqa: E402
from aperturedb_pool.testing.server import EmbeddedServer  # noqa: E402


def _adds(n: int, cls: str = "Person", blob_size: int = 1024,
          start: int = 0) -> list[tuple[list[dict[str, Any]], list[bytes]]]:
    # One (commands, blobs) per entity: an AddEntity with a unique key and a
    # connected 1 KiB blob.
    return [([{"AddEntity": {"class": cls, "properties": {"key": i}, "_ref": 1}},
              {"AddBlob": {"properties": {"key": i}, "connect": {"ref": 1}}}],
             [os.urandom(blob_size)]) for i in range(start, start + n)]


def _keys(server: EmbeddedServer, cls: str = "Person") -> collections.Counter:
    return collections.Counter(o["properties"]["key"] for o in server.dump()
                               if o["class"] == cls)


@pytest.fixture
def pool(adb_connector: Any) -> Any:
    p = ConnectionPool(adb_connector, min_size=1, max_size=4, name="shared-test")
    try:
        yield p
    finally:
        p.close()


def test_parallel_loader_16_threads_through_4_connectors(adb_server: Any, pool: Any) -> None:
    db = pool.connector()
    assert isinstance(db, PooledConnector)
    adb_server.reset_counters()
    loader = ParallelLoader(db)
    loader.ingest(_adds(10_000), batchsize=100, numthreads=16)
    assert loader.error_counter == 0
    assert loader.get_succeeded_queries() == 10_000
    keys = _keys(adb_server)
    assert len(keys) == 10_000 and set(keys.values()) == {1}  # every entity exactly once
    blobs = [o for o in adb_server.dump() if o["class"] == "_Blob"]
    assert len(blobs) == 10_000 and all(o["blob_size"] == 1024 for o in blobs)
    c = adb_server.counters()
    assert c["sharing_violations"] == 0
    assert c["accepted"] <= pool.max_size  # the pool's connections, none more
    assert pool.stats().size <= pool.max_size


def test_parallel_query_more_threads_than_the_server_accepts() -> None:
    # The SDK's issue #212: helper threads beyond the server's client limit.
    # Through the pool they wait their turn in the pool, never at the server.
    server = EmbeddedServer(max_clients=6).start()
    try:
        template = server.connector(retry_interval_seconds=0.05)
        with ConnectionPool(template, max_size=4) as pool:
            db = pool.connector()
            Utils(db).execute([{"AddEntity": {"class": "Person", "properties": {"key": 1}}}])
            peak = [0]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], server.counters()["open"])
                    time.sleep(0.005)

            watcher = threading.Thread(target=watch)
            watcher.start()
            reads = [([{"FindEntity": {"with_class": "Person", "constraints": {"key": ["==", 1]},
                                       "results": {"list": ["key"]}}}], [])
                     for _ in range(1_600)]
            pq = ParallelQuery(db)
            try:
                pq.query(reads, batchsize=10, numthreads=16)
            finally:
                done.set()
                watcher.join()
            assert pq.error_counter == 0
            assert pq.get_succeeded_queries() == 1_600
            c = server.counters()
            assert c["waiting"] == 0 and c["sharing_violations"] == 0
            # The template is never used; only the pool's connectors connect.
            assert c["accepted"] <= 4 and peak[0] <= 4
    finally:
        server.stop()


class _IndexedAdds(list):
    # A generator that asks ParallelLoader for an index (query_setup): the
    # loader then keeps a connected Utils clone for the whole run.
    def get_indices(self) -> dict[str, Any]:
        return {"entity": {"Person": ["key"]}}


def test_sdk_alone_freezes_where_the_pool_completes() -> None:
    # The SDK's issue #212, side by side.  A server with 6 client slots, 4 of
    # them held by a warm pool.  The SDK's own ParallelLoader keeps two
    # connections for the whole run (the caller's connector after GetSchema,
    # the Utils clone that made the index): the slots are full, and its 16
    # workers wait at the server for ever.  Through the pool the same ingest
    # needs no connection beyond the pool's 4 and completes meanwhile.
    server = EmbeddedServer(max_clients=6).start()
    sdk_thread = None
    try:
        template = server.connector(retry_interval_seconds=0.05)
        with ConnectionPool(template, min_size=4, max_size=4) as pool:
            pool.wait_ready()
            sdk = server.connector(retry_interval_seconds=0.05)
            sdk_loader = ParallelLoader(sdk)
            sdk_thread = threading.Thread(
                target=sdk_loader.ingest, args=(_IndexedAdds(_adds(160, blob_size=16)),),
                kwargs=dict(batchsize=10, numthreads=16), daemon=True)
            sdk_thread.start()
            deadline = time.monotonic() + 10
            while server.counters()["waiting"] < 16 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.counters()["waiting"] == 16  # every SDK worker stuck

            loader = ParallelLoader(pool.connector())
            loader.ingest(_IndexedAdds(_adds(160, cls="Person", blob_size=16, start=1_000)),
                          batchsize=10, numthreads=16)
            assert loader.error_counter == 0 and loader.get_succeeded_queries() == 160
            assert sdk_thread.is_alive() and server.counters()["waiting"] == 16
            assert pool.stats().connectors_opened == 4  # the pool needed no more

            server.set_max_clients(None)  # release the SDK's workers
            sdk_thread.join(30)
            assert not sdk_thread.is_alive() and sdk_loader.error_counter == 0
            sdk.close()
    finally:
        server.stop()
        if sdk_thread is not None:
            sdk_thread.join(5)


def test_utils_and_execute_query(adb_server: Any, pool: Any) -> None:
    db = pool.connector()
    ParallelLoader(db).ingest(_adds(250, blob_size=16), batchsize=50, numthreads=8)
    utils = Utils(db)
    assert utils.count_entities("Person") == 250
    assert utils.count_entities("Person", constraints={"key": ["<", 10]}) == 10
    schema = utils.get_schema()
    assert "Person" in schema["entities"]["classes"]
    assert utils.create_entity_index("Person", "key")
    assert utils.summary() is None  # prints; reads schema and host through db
    result, response, blobs = execute_query(
        db, [{"FindEntity": {"with_class": "Person", "constraints": {"key": ["==", 7]},
                             "results": {"list": ["key"]}}}], [])
    assert result == 0 and blobs == []
    assert response[0]["FindEntity"]["entities"] == [{"key": 7}]
    # A failed transaction is an answer: result 1, last_query_ok() False.
    result, response, _ = execute_query(db, [{"FindEntity": {"with_class": "Person",
                                                             "constraints": "bad"}}], [])
    assert result == 1 and not db.last_query_ok()
    assert adb_server.counters()["sharing_violations"] == 0


def test_last_response_is_per_thread(adb_server: Any, pool: Any) -> None:
    db = pool.connector()
    db.query([{"AddEntity": {"class": "Person", "properties": {"key": i}}} for i in range(32)])
    errors: list[str] = []
    start = threading.Barrier(32)

    def worker(i: int) -> None:
        start.wait()
        for n in range(25):
            bad = (i + n) % 3 == 0  # a failed transaction in some threads, some rounds
            q = [{"FindEntity": {"with_class": "Person",
                                 "constraints": "bad" if bad else {"key": ["==", i]},
                                 "results": {"list": ["key"]}}}]
            db.query(q)
            time.sleep(0)  # let other threads' queries land in between
            if db.last_query_ok() == bad:
                errors.append(f"thread {i} round {n}: last_query_ok {not bad}")
            if not bad:
                seen = json.loads(db.get_last_response_str())[0]["FindEntity"]["entities"]
                if seen != [{"key": i}] or db.get_response()[0]["FindEntity"]["entities"] != seen:
                    errors.append(f"thread {i} round {n}: saw {seen}")
            if not db.get_last_query_time() > 0:
                errors.append(f"thread {i}: query time {db.get_last_query_time()}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # This thread still sees its own last query (the AddEntity), not the others'.
    assert db.get_response()[0] == {"AddEntity": {"status": 0}} and db.last_query_ok()
    # A thread that never queried through this object sees a fresh connector's state.
    fresh: list[Any] = []
    t = threading.Thread(target=lambda: fresh.extend(
        [db.get_response(), db.last_query_ok(), db.get_last_query_time()]))
    t.start()
    t.join()
    assert fresh == [None, False, 0.0]
    assert adb_server.counters()["sharing_violations"] == 0


def test_clone_opens_no_socket_and_close_closes_nothing(adb_server: Any,
                                                        adb_connector: Any) -> None:
    with ConnectionPool(adb_connector, min_size=2, max_size=2) as pool:
        pool.wait_ready()
        db = pool.connector()
        db.query([{"GetStatus": {}}])
        accepted = adb_server.counters()["accepted"]
        opened = pool.stats().connectors_opened
        clones = [db.clone() for _ in range(20)]
        with _no_warning():
            clones.append(db.create_new_connection())
        for c in clones:
            assert isinstance(c, PooledConnector) and c.pool is pool
            # The attributes the helpers read are the template's.
            assert (c.host, c.port, c.use_ssl) == (adb_connector.host, adb_connector.port,
                                                  adb_connector.use_ssl)
            assert c.config is adb_connector.config
            assert c.shared_data is adb_connector.shared_data
            assert c.connected and c.authenticated
            c.close()
        assert adb_server.counters()["accepted"] == accepted
        assert pool.stats().connectors_opened == opened
        # Closing every clone closed nothing shared: the same connectors serve.
        response, _ = clones[0].query([{"GetStatus": {}}])
        assert response[0]["GetStatus"]["status"] == 0
        assert adb_server.counters()["accepted"] == accepted
        assert not pool.closed
    assert not db.connected


class _no_warning:
    # create_new_connection() on a PooledConnector is not deprecated noise.
    def __enter__(self) -> None:
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def test_write_with_unknown_outcome_is_not_resent(adb_server: Any, pool: Any) -> None:
    db = pool.connector()
    db.query([{"GetStatus": {}}])
    adb_server.reset_counters()
    # The server runs the write, then drops the connection without answering.
    adb_server.close_after_next_request(execute=True, command="AddEntity")
    with pytest.raises(OutcomeUnknown):
        db.query([{"AddEntity": {"class": "Person", "properties": {"key": 1}}}])
    assert not db.last_query_ok() and db.get_response() is None
    assert adb_server.counters()["requests_by_command"]["AddEntity"] == 1
    assert _keys(adb_server) == {1: 1}
    # A read under the same fault is retried and answered.
    adb_server.close_after_next_request(execute=True, command="FindEntity")
    response, _ = db.query([{"FindEntity": {"with_class": "Person",
                                            "results": {"count": True}}}])
    assert response[0]["FindEntity"]["count"] == 1 and db.last_query_ok()
    assert adb_server.counters()["requests_by_command"]["FindEntity"] == 2
    # idempotent=True declares a write safe to re-send (the caller's promise).
    adb_server.close_after_next_request(execute=False, command="UpdateEntity")
    db.query([{"UpdateEntity": {"with_class": "Person", "properties": {"v": 2}}}],
             idempotent=True)
    assert db.last_query_ok()


def test_loader_write_with_unknown_outcome_is_counted_not_resent(adb_server: Any,
                                                                 pool: Any) -> None:
    db = pool.connector()
    loader = ParallelLoader(db)
    adb_server.reset_counters()
    adb_server.close_after_next_request(execute=True, command="AddEntity")
    loader.ingest(_adds(1_000, blob_size=16), batchsize=50, numthreads=8)
    # The batch whose answer was lost is a failed batch for the loader, but it
    # ran once, and was never sent again.
    assert loader.error_counter == 1
    assert loader.get_succeeded_queries() == 950
    keys = _keys(adb_server)
    assert len(keys) == 1_000 and set(keys.values()) == {1}
    assert adb_server.counters()["requests_by_command"]["AddEntity"] == 1_000  # none re-sent


def _restart_during(server: EmbeddedServer, run: Any, *, after: int) -> int:
    # Restart the server (every connection dropped, sessions forgotten) each
    # time `after` more requests arrived, while `run` runs; the restarts done.
    restarts = [0]
    done = threading.Event()

    def restarter() -> None:
        mark = after
        while not done.is_set():
            if server.counters()["requests"] >= mark:
                server.restart()
                restarts[0] += 1
                mark += after
            time.sleep(0.002)

    t = threading.Thread(target=restarter)
    t.start()
    try:
        run()
    finally:
        done.set()
        t.join()
    return restarts[0]


def test_server_restarts_during_ingest(adb_server: Any, adb_connector: Any) -> None:
    with ConnectionPool(adb_connector, max_size=4) as pool:
        db = pool.connector()
        ParallelLoader(db).ingest(_adds(100, blob_size=16), batchsize=10, numthreads=4)
        adb_server.set_latency(0.001)
        adb_server.reset_counters()

        # Reads: every batch answered, whatever restarts.
        reads = [([{"FindEntity": {"with_class": "Person", "constraints": {"key": ["==", i % 100]},
                                   "results": {"list": ["key"]}}}], []) for i in range(2_000)]
        pq = ParallelQuery(db)
        restarts = _restart_during(adb_server, lambda: pq.query(reads, batchsize=10,
                                                                  numthreads=16), after=60)
        assert restarts >= 2
        assert pq.error_counter == 0 and pq.get_succeeded_queries() == 2_000

        # Writes: none stored twice; every acknowledged one stored.
        adb_server.reset_counters()
        loader = ParallelLoader(db)
        restarts = _restart_during(
            adb_server, lambda: loader.ingest(_adds(2_000, cls="Item", blob_size=16),
                                              batchsize=20, numthreads=16), after=30)
        assert restarts >= 2
        keys = _keys(adb_server, "Item")
        assert set(keys.values()) <= {1}
        acknowledged = loader.get_succeeded_queries()
        assert acknowledged <= len(keys) <= acknowledged + 20 * loader.error_counter
        assert adb_server.counters()["sharing_violations"] == 0


def test_pool_from_a_connector_factory(adb_server: Any) -> None:
    # No template: the attributes come from one of the pool's own connectors.
    with ConnectionPool(connector_factory=lambda: adb_server.connector(), max_size=2) as pool:
        db = pool.connector()
        assert (db.host, db.port, db.use_ssl) == ("127.0.0.1", adb_server.port, False)
        assert db.config is not None and db.shared_data is not None
        db.connect()
        assert Utils(db).count_entities("Person") == 0


def test_closed_pool(adb_connector: Any) -> None:
    from aperturedb_pool import PoolClosed

    pool = ConnectionPool(adb_connector, max_size=1)
    db = pool.connector()
    db.query([{"GetStatus": {}}])
    db.close()  # nothing shared closes
    assert db.connected and not pool.closed
    pool.close()
    assert not db.connected
    with pytest.raises(PoolClosed):
        db.query([{"GetStatus": {}}])
    assert db.get_response() is None and not db.last_query_ok()


def test_last_response_str_censors_tokens(adb_server: Any, pool: Any) -> None:
    db = pool.connector()
    db.query([{"Authenticate": {"username": "admin", "password": "admin"}}])
    response = db.get_response()
    token = response[0]["Authenticate"]["session_token"]
    text = db.get_last_response_str()
    assert token not in text and "..." in text
    assert db.get_response()[0]["Authenticate"]["session_token"] == token  # not rewritten
    # When the answer came, on the wall clock (derived from the monotonic
    # clock when asked for).
    answered = db.last_query_timestamp
    assert answered is not None
    assert abs((datetime.now() - answered).total_seconds()) < 5, answered


def test_an_interrupted_query_leaves_no_stale_answer(adb_server: Any, pool: Any) -> None:
    # A signal handler's exception (a soft time limit) while the query waits
    # for its answer: the thread's answer is cleared, the connector that is
    # owed the late answer is discarded, and the next query reads its own.
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    db = pool.connector()
    db.query([{"AddEntity": {"class": "Person", "properties": {"key": k}}} for k in range(5)])
    assert db.last_query_ok()
    find = [{"FindEntity": {"with_class": "Person", "constraints": {"key": ["==", 2]},
                            "results": {"list": ["key"]}}}]
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        adb_server.set_latency(0.3)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            db.query(find)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    adb_server.set_latency(0)
    assert db.get_response() is None and not db.last_query_ok()
    # No answer, so no time of one; the time the query took until it raised.
    assert db.last_query_timestamp is None and db.get_last_query_time() >= 0.04
    assert pool.stats().discarded == {"interrupted": 1}
    for k in (3, 1, 4):
        response, _ = db.query([{"FindEntity": {"with_class": "Person",
                                                "constraints": {"key": ["==", k]},
                                                "results": {"list": ["key"]}}}])
        assert response[0]["FindEntity"]["entities"] == [{"key": k}]
    assert adb_server.counters()["sharing_violations"] == 0


def test_utils_user_log_message(adb_server: Any, pool: Any) -> None:
    # UserLogMessage: added to the embedded server for Utils.user_log_message().
    utils = Utils(pool.connector())
    utils.user_log_message("ingest started", level="WARNING")
    assert adb_server.counters()["requests_by_command"]["UserLogMessage"] == 1
    response, _ = pool.query([{"UserLogMessage": {"text": "x", "type": "DEBUG"}}])
    assert response["status"] == -1 and "'type'" in response["info"]


# -- the SDK's rules, re-implemented here, held to the SDK's answers -------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 4) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["status", "FindEntity", "info", "token", "session_token",
                         "refresh_token", "access_token", "Token", "x"]),
        inner, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_check_status_is_the_sdks(response: Any) -> None:
    import copy

    from aperturedb.Connector import Connector

    sdk = Connector.__new__(Connector)  # check_status reads no attribute
    ours = PooledConnector.__new__(PooledConnector)
    try:
        expected = sdk.check_status(copy.deepcopy(response))
    except Exception as e:  # e.g. a non-numeric status the SDK compares with 0
        expected = type(e)
    try:
        got = ours.check_status(response)
    except Exception as e:
        got = type(e)
    if isinstance(expected, int) and not isinstance(expected, bool):
        assert got == expected
    else:
        # A status that is not an int (None, a string, a bool): the SDK returns
        # it or fails comparing it; ours reports "no status" (-2), not OK.
        assert got == -2 or got == expected


@settings(max_examples=200, deadline=None)
@given(_json)
def test_censoring_is_the_sdks_without_rewriting(response: Any) -> None:
    import copy

    from aperturedb.LoggingUtils import censor_tokens

    from aperturedb_pool.shared import _censored

    before = copy.deepcopy(response)
    expected = censor_tokens(copy.deepcopy(response))
    assert _censored(response) == expected
    assert response == before


def _child_runs_helpers(db: PooledConnector, q: Any) -> None:
    try:
        loader = ParallelLoader(db)
        loader.ingest(_adds(200, cls="Forked", blob_size=16), batchsize=20, numthreads=8)
        q.put(("ok", loader.error_counter, Utils(db).count_entities("Forked"),
               # the child's own session object (the parent's lock may be held)
               db.shared_data is not None and db.shared_data is not db._source.shared_data,
               db.pool.stats().connectors_opened))
    except BaseException as e:  # noqa: B036 - reported to the parent
        q.put(("error", repr(e)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_runs_the_helpers_on_its_own_connectors(adb_server: Any,
                                                               pool: Any) -> None:
    import multiprocessing

    db = pool.connector()
    assert Utils(db).count_entities("Forked") == 0
    session = db.shared_data
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_runs_helpers, args=(db, q))
    child.start()
    result = q.get(timeout=30)
    child.join(30)
    assert result[0] == "ok", result
    _, errors, count, has_session, child_opened = result
    assert (errors, count, has_session) == (0, 200, True)
    assert 1 <= child_opened <= pool.max_size
    # The parent's pool and session are untouched; it sees the child's writes.
    assert db.shared_data is session
    assert Utils(db).count_entities("Forked") == 200
    assert adb_server.counters()["sharing_violations"] == 0
