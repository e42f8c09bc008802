"""ConnectionPool with the real SDK ``Connector`` over loopback, against EmbeddedServer.

Every test gets a fresh embedded server (the ``adb_server`` fixture of
``aperturedb_pool.testing.pytest_plugin``) and uses its faults: dropped
connections, restarts, refused connections, latency, connections closed
around a request, garbage frames, idle timeouts.  The server's sharing
detector (two requests in flight on one connection) must stay at zero.

Synchronisation uses events, barriers and joins with timeouts; the only
polling is ``wait_until`` on effects nothing can signal (the server closing an
idle connection, a FIN reaching a client socket, the pool's background thread).
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

import functools  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import _support  # noqa: E402
import pytest  # noqa: E402

import aperturedb_pool.connectors as connectors_mod  # noqa: E402
from aperturedb_pool import (  # noqa: E402
    ConnectFailed,
    ConnectionPool,
    OutcomeUnknown,
    PoolClosed,
    PoolTimeout,
    QueryTimeout,
    RetryPolicy,
    ServerUnreachable,
)
from aperturedb_pool.health import probe_socket  # noqa: E402

JOIN = 20.0  # upper bound of any join or wait in this module

GET_STATUS = [{"GetStatus": {}}]
FAST = RetryPolicy(max_attempts=5, deadline=10.0, initial_delay=0.01, max_delay=0.05)


def add(tid: int, cls: str = "T") -> list:
    return [{"AddEntity": {"class": cls, "properties": {"tid": tid}}}]


def find(tid: int, cls: str = "T") -> list:
    return [{"FindEntity": {"with_class": cls, "constraints": {"tid": ["==", tid]},
                            "results": {"list": ["tid"]}}}]


def entities(response: Any) -> list:
    return response[0]["FindEntity"]["entities"]


def status_ok(response: Any) -> bool:
    return response[0]["GetStatus"]["status"] == 0


wait_until = functools.partial(_support.wait_until, timeout=JOIN, poll=0.005)


def idle_sockets(pool: ConnectionPool) -> list:
    with pool._lock:
        return [s.conn.conn for s in pool._idle]


def run_threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    """Run target(i) in n threads started together; return their exceptions."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(JOIN)
            target(i)
        except BaseException as e:  # noqa: B036 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive(), "a worker thread did not finish in time"
    return errors


@pytest.fixture
def make_pool() -> Any:
    pools: list[ConnectionPool] = []

    def make(server: Any, template: Any = None, **kw: Any) -> ConnectionPool:
        kw.setdefault("timeout", JOIN)
        kw.setdefault("retry", FAST)
        pool = ConnectionPool(server.connector() if template is None else template, **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


# ---------------------------------------------------------------------------
# many threads, one pool
# ---------------------------------------------------------------------------


def test_32_threads_share_8_connectors_without_ever_sharing_one(adb_server: Any,
                                                                 make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=2, max_size=8, check_ownership=True)
    pool.wait_ready(JOIN)
    for i in range(32):
        pool.query(add(i))

    def work(i: int) -> None:
        for _ in range(100):
            with pool.lease() as conn:
                response, _ = conn.query(find(i))
                # A crossed response would carry another thread's entity.
                assert entities(response) == [{"tid": i}]

    assert run_threads(32, work) == []
    c = adb_server.counters()
    assert c["sharing_violations"] == 0
    assert c["accepted"] <= 8
    assert c["authenticate"] == 1  # clones share one session
    s = pool.stats()
    assert s.size <= 8 and s.leased == 0 and s.waiting == 0
    assert s.leases_granted == 32 + 32 * 100
    assert dict(s.discarded) == {} and s.timeouts == 0


def test_pool_query_from_many_threads(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=4, check_ownership=True)
    for i in range(8):
        pool.query(add(i))

    def work(i: int) -> None:
        for _ in range(50):
            assert entities(pool.query(find(i))[0]) == [{"tid": i}]

    assert run_threads(8, work) == []
    assert adb_server.counters()["sharing_violations"] == 0


# ---------------------------------------------------------------------------
# server faults
# ---------------------------------------------------------------------------


def test_server_restart_heals_in_one_retirement(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=4, max_size=4)
    pool.wait_ready(JOIN)
    pool.query(add(1))
    assert adb_server.restart() == 4
    for _ in range(20):
        assert entities(pool.query(find(1))[0]) == [{"tid": 1}]
    s = pool.stats()
    assert s.generation == 1, "one failure must retire every older connector at once"
    assert s.discarded.get("retired", 0) >= 3
    assert s.give_ups == 0
    assert adb_server.counters()["sharing_violations"] == 0


def test_restart_during_reads_from_16_threads(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=4, max_size=8)
    pool.wait_ready(JOIN)
    for i in range(16):
        pool.query(add(i))
    warmed = [threading.Event() for _ in range(16)]
    restarted = threading.Event()

    def reader(i: int) -> None:
        done_before = done_after = 0
        while done_after < 15:
            after = restarted.is_set()
            assert entities(pool.query(find(i))[0]) == [{"tid": i}]
            if after:
                done_after += 1
            else:
                done_before += 1
                if done_before == 5:
                    warmed[i].set()

    def restarter() -> None:
        for e in warmed:
            assert e.wait(JOIN)
        adb_server.restart()
        restarted.set()

    t = threading.Thread(target=restarter, daemon=True)
    t.start()
    errors = run_threads(16, reader)
    t.join(JOIN)
    assert errors == []
    s = pool.stats()
    assert s.generation == 1
    assert s.give_ups == 0
    assert adb_server.counters()["sharing_violations"] == 0


def test_idle_timeout_shorter_than_keepalive_is_caught_at_checkout(adb_server: Any,
                                                                   make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=2, max_size=2, keepalive_interval=30.0,
                     probe_after=0.1)
    pool.wait_ready(JOIN)
    adb_server.set_idle_timeout(0.3)
    wait_until(lambda: adb_server.counters()["idle_closed"] >= 2, "the server to close idle links")
    # No retry layer here: the lease itself must hand out a live connector.
    with pool.lease() as conn:
        assert status_ok(conn.query(GET_STATUS)[0])
    s = pool.stats()
    assert s.discarded.get("probe", 0) + s.discarded.get("retired", 0) >= 2
    assert s.generation >= 1


def test_keepalive_shorter_than_idle_timeout_keeps_connectors(adb_server: Any,
                                                              make_pool: Any) -> None:
    adb_server.set_idle_timeout(0.6)
    pool = make_pool(adb_server, min_size=2, max_size=2, keepalive_interval=0.1)
    pool.wait_ready(JOIN)
    t0 = time.monotonic()
    wait_until(lambda: pool.stats().keepalive_pings >= 12 and time.monotonic() - t0 > 0.9,
               "keepalive pings for longer than the idle timeout")
    assert adb_server.counters()["idle_closed"] == 0
    s = pool.stats()
    assert s.connectors_opened == 2 and dict(s.discarded) == {}
    with pool.lease() as conn:
        assert status_ok(conn.query(GET_STATUS)[0])


def test_garbage_frame_is_unknown_outcome_and_discards(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.query(add(5))
    adb_server.send_garbage_next()
    with pytest.raises(OutcomeUnknown):
        with pool.lease() as conn:
            conn.query(find(5))
    wait_until(lambda: conn.conn is None, "the connector to be closed")
    s = pool.stats()
    assert s.discarded.get("interrupted") == 1
    assert s.generation == 0  # a garbled answer is not a server restart
    with pool.lease() as again:
        assert again is not conn
        assert entities(again.query(find(5))[0]) == [{"tid": 5}]
    # Through pool.query: a read is retried, a write is not re-sent.
    adb_server.send_garbage_next()
    assert entities(pool.query(find(5))[0]) == [{"tid": 5}]
    adb_server.send_garbage_next()
    with pytest.raises(OutcomeUnknown):
        pool.query(add(6))
    assert [o["properties"]["tid"] for o in adb_server.dump()] == [5, 6]


def test_refused_connections_then_recovery_within_one_backoff(adb_server: Any,
                                                              make_pool: Any) -> None:
    adb_server.refuse_connections(60)
    reconnect_max = 0.2
    pool = make_pool(adb_server, min_size=1, max_size=2, reconnect_initial=0.02,
                     reconnect_max=reconnect_max, name="refused")
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.5)
    msg = str(info.value)
    assert "'refused'" in msg and "unreachable" in msg
    assert f"{adb_server.port}" in msg  # the last error names the server
    assert pool.stats().refill_failures >= 2
    adb_server.refuse_connections(0)
    t0 = time.monotonic()
    pool.wait_ready(JOIN)
    assert time.monotonic() - t0 <= reconnect_max + 0.5
    with pool.lease() as conn:
        assert status_ok(conn.query(GET_STATUS)[0])


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


def test_tls_with_hostname_verification(adb_tls_server: Any, make_pool: Any) -> None:
    template = adb_tls_server.connector()
    assert template.config.verify_hostname and template.use_ssl
    pool = make_pool(adb_tls_server, template, min_size=2, max_size=4, check_ownership=True,
                     probe_after=0.0)
    pool.wait_ready(JOIN)

    def work(i: int) -> None:
        for _ in range(30):
            with pool.lease() as conn:
                assert status_ok(conn.query(GET_STATUS)[0])

    assert run_threads(8, work) == []
    assert adb_tls_server.counters()["sharing_violations"] == 0
    # The checkout probe works on TLS sockets: a dropped link is never handed out.
    adb_tls_server.drop_connections()
    wait_until(lambda: all(probe_socket(s) for s in idle_sockets(pool)),
               "the clients to see the close")
    with pool.lease() as conn:
        assert status_ok(conn.query(GET_STATUS)[0])
    assert pool.stats().discarded.get("probe", 0) + pool.stats().discarded.get("retired", 0) >= 1


def test_tls_hostname_mismatch_fails_fast(tmp_path: Any, make_pool: Any) -> None:
    with _support.tls_server_naming("db.example.org", tmp_path) as (server, cafile):
        bad = make_pool(server, server.connector(ca_cert=cafile), min_size=1, max_size=1,
                        reconnect_initial=0.01)
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            bad.wait_ready(JOIN)
        assert info.value.permanent
        assert time.monotonic() - t0 < JOIN / 2
        # Control: the same server and CA without hostname verification work.
        ok = make_pool(server, server.connector(ca_cert=cafile, verify_hostname=False),
                       min_size=1, max_size=1)
        with ok.lease() as conn:
            assert status_ok(conn.query(GET_STATUS)[0])
        bad.close()
        ok.close()


# ---------------------------------------------------------------------------
# fork
# ---------------------------------------------------------------------------


def _child_uses_pool(pool: ConnectionPool, q: Any) -> None:
    try:
        got = []
        for _ in range(10):
            with pool.lease(timeout=10) as conn:
                got.append(entities(conn.query(find(7))[0]))
        got.append(entities(pool.query(find(7))[0]))
        # min_size connectors are opened in the background: count them once
        # all are open (a second open could still be on its way to the server).
        pool.wait_ready(10)
        s = pool.stats()
        q.put(("ok", got, s.connectors_opened, s.size))
    except BaseException as e:  # noqa: B036 - reported to the parent
        q.put(("error", repr(e)))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_fork_child_uses_its_own_connectors(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=2, max_size=4)
    pool.wait_ready(JOIN)
    pool.query(add(7))
    held = pool.acquire()  # leased across the fork
    before = adb_server.counters()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child_uses_pool, args=(pool, q))
    child.start()
    result = q.get(timeout=JOIN)
    child.join(JOIN)
    assert child.exitcode == 0
    assert result[0] == "ok", result
    _, got, child_opened, child_size = result
    assert got == [[{"tid": 7}]] * 11
    assert child_opened >= 1
    after = adb_server.counters()
    assert after["accepted"] - before["accepted"] == child_opened  # the child's own
    # The parent's connectors were not disturbed: the held one and the idle one.
    assert entities(held.conn.query(find(7))[0]) == [{"tid": 7}]
    other = pool.acquire()
    assert entities(other.conn.query(find(7))[0]) == [{"tid": 7}]
    held.release()
    other.release()
    s = pool.stats()
    assert s.connectors_opened == 2 and dict(s.discarded) == {}
    final = adb_server.counters()
    assert final["sharing_violations"] == 0
    assert final["accepted"] == after["accepted"]  # the parent needed no new connection


# ---------------------------------------------------------------------------
# closing, leaks, dropped leases
# ---------------------------------------------------------------------------


def test_close_with_leases_outstanding(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=2, max_size=2)
    pool.wait_ready(JOIN)
    a = pool.acquire()
    b = pool.acquire()
    a_conn, b_conn = a.conn, b.conn
    box: dict[str, Any] = {}

    def waiter() -> None:
        try:
            pool.acquire(timeout=JOIN)
        except BaseException as e:  # noqa: B036
            box["error"] = e

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_until(lambda: pool.stats().waiting == 1, "the waiter to queue")
    t0 = time.monotonic()
    pool.close()
    t.join(JOIN)
    assert isinstance(box.get("error"), PoolClosed)
    assert time.monotonic() - t0 < JOIN / 2
    # Leased connectors keep working until they come back...
    assert status_ok(a_conn.query(GET_STATUS)[0])
    a.release()
    assert a_conn.conn is None  # ...and are closed when they do
    with pytest.raises(PoolClosed):
        with pool.lease():
            pass
    pool.close()  # idempotent
    b.release()
    assert b_conn.conn is None
    wait_until(lambda: adb_server.counters()["open"] == 0, "the server to see every close")
    s = pool.stats()
    assert s.size == 0 and s.connectors_closed == s.connectors_opened == 2


def test_leak_warning_names_the_line_and_reports_the_return(
        adb_server: Any, make_pool: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aperturedb_pool")
    pool = make_pool(adb_server, min_size=1, max_size=1, leak_threshold=0.1)
    pool.wait_ready(JOIN)
    with pool.lease() as conn:  # LEAK-LINE-INTEGRATION
        conn.query(GET_STATUS)
        wait_until(lambda: pool.stats().leaks_reported == 1, "the leak report")
    leaks = [r.getMessage() for r in caplog.records if "leased for" in r.getMessage()]
    assert len(leaks) == 1
    assert __file__ in leaks[0]
    assert "test_leak_warning_names_the_line_and_reports_the_return" in leaks[0]
    assert "LEAK-LINE-INTEGRATION" in leaks[0]
    back = [r.getMessage() for r in caplog.records if "came back" in r.getMessage()]
    assert len(back) == 1
    with pool.lease() as conn:  # short leases are not reported
        conn.query(GET_STATUS)
    assert pool.stats().leaks_reported == 1


def test_dropped_acquire_lease_is_reclaimed(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    lease = pool.acquire()
    conn = lease.conn
    conn.query(GET_STATUS)
    with pytest.warns(ResourceWarning):
        del lease
        gc.collect()
        pool.stats()  # reclaims a lease nothing refers to any more
    wait_until(lambda: conn.conn is None, "the reclaimed connector to be closed")
    assert pool.stats().discarded.get("reclaimed") == 1
    with pool.lease() as again:
        assert again is not conn
        assert status_ok(again.query(GET_STATUS)[0])


# ---------------------------------------------------------------------------
# what happens to a connector after an error
# ---------------------------------------------------------------------------


def test_template_is_not_modified_and_clones_make_one_attempt(adb_server: Any,
                                                              make_pool: Any) -> None:
    template = adb_server.connector(retry_max_attempts=5, retry_interval_seconds=3.0)
    pool = make_pool(adb_server, template, min_size=1, max_size=1)
    with pool.lease() as conn:
        assert conn is not template
        assert conn.config.retry_max_attempts == 1
        assert conn.config.retry_interval_seconds == 0
    assert template.config.retry_max_attempts == 5
    assert template.config.retry_interval_seconds == 3.0
    assert template.conn is None  # the pool never queried through it
    sibling = template.clone()  # other clones of the user's template are untouched
    assert sibling.config.retry_max_attempts == 5
    # Behaviour, not just settings: one attempt, no sleep, never re-sent.
    adb_server.close_after_next_request(execute=False, command="FindEntity")
    t0 = time.monotonic()
    with pytest.raises(OutcomeUnknown):
        with pool.lease() as conn:
            conn.query(find(1))
    assert time.monotonic() - t0 < 2.0  # the template's 3 s retry sleep never ran
    assert adb_server.counters()["requests_by_command"].get("FindEntity") == 1


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_keyboard_interrupt_during_a_query_discards_the_connector(adb_server: Any,
                                                                  make_pool: Any) -> None:
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("needs the main thread and Python's default SIGINT handler")
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.query(add(3))
    # The answer would arrive long after the interrupt.  FindEntity only: the
    # replacement's ping is answered at once, whenever the latency is reset.
    adb_server.set_latency(5.0, command="FindEntity")
    main = threading.main_thread().ident
    fired = threading.Event()
    leased: list[Any] = []

    def interrupter() -> None:
        # Anywhere after the send the query is in flight: interrupt it there.
        wait_until(lambda: leased[0]._slot is not None and leased[0]._slot.phase.sent,
                   "the request to be sent")
        signal.pthread_kill(main, signal.SIGINT)
        fired.set()

    t = threading.Thread(target=interrupter, daemon=True)
    interrupted = False
    try:
        lease = pool.lease()
        leased.append(lease)
        t.start()
        with lease as conn:
            conn.query(find(3))
        assert fired.wait(JOIN)
    except KeyboardInterrupt:
        interrupted = True
    t.join(JOIN)
    assert interrupted
    adb_server.set_latency(0)
    wait_until(lambda: conn.conn is None, "the interrupted connector to be closed")
    assert pool.stats().discarded.get("interrupted") == 1
    with pool.lease() as again:
        # A fresh stream: the late FindEntity answer can never reach this query.
        assert again is not conn
        assert status_ok(again.query(GET_STATUS)[0])


def test_query_timeout_discards_and_never_resends_a_write(adb_server: Any,
                                                          make_pool: Any) -> None:
    template = adb_server.connector()
    pool = make_pool(adb_server, template, min_size=1, max_size=1, query_timeout=0.2)
    pool.wait_ready(JOIN)
    adb_server.set_latency(0.6)
    with pytest.raises(QueryTimeout) as info:
        with pool.lease() as conn:
            conn.query(GET_STATUS)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, OutcomeUnknown)
    assert pool.stats().discarded.get("interrupted") == 1
    wait_until(lambda: conn.conn is None, "the timed-out connector to be closed")
    # (The pool's own opens obey query_timeout too: let the replacement open.)
    adb_server.set_latency(0)
    pool.wait_ready(JOIN)
    adb_server.set_latency(0.6)
    # pool.query with a per-call timeout: the write is not re-sent.
    q = add(9)
    unknown_before = pool.stats().unknown_outcomes
    with pytest.raises(QueryTimeout) as info2:
        pool.query(q, timeout=0.1)
    assert info2.value.query == q
    # A request sent now is answered after the delayed AddEntity had its turn.
    observer = template.clone()
    try:
        assert status_ok(observer.query(GET_STATUS)[0])
    finally:
        observer.close()
    assert adb_server.counters()["requests_by_command"].get("AddEntity", 0) <= 1
    assert len(adb_server.dump()) <= 1
    s = pool.stats()
    assert s.unknown_outcomes == unknown_before + 1 and s.retries == 0
    adb_server.set_latency(0)
    pool.wait_ready(JOIN)
    with pool.lease() as again:
        assert status_ok(again.query(GET_STATUS)[0])


def test_caller_exception_between_queries_keeps_the_connector(adb_server: Any,
                                                              make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.wait_ready(JOIN)
    with pytest.raises(ZeroDivisionError):
        with pool.lease() as conn:
            conn.query(GET_STATUS)
            _ = 1 / 0
    with pool.lease() as again:
        assert again is conn
        assert status_ok(again.query(GET_STATUS)[0])
    assert dict(pool.stats().discarded) == {}
    assert adb_server.counters()["accepted"] == 1


def test_failed_transaction_is_returned_not_retried(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    response, _ = pool.query([{"NoSuchCommand": {}}])
    assert isinstance(response, dict) and response["status"] == -1
    s = pool.stats()
    assert s.retries == 0 and dict(s.discarded) == {}
    assert adb_server.counters()["failed_transactions"] == 1


# ---------------------------------------------------------------------------
# pool.query and the retry policy (issue 5)
# ---------------------------------------------------------------------------


def test_closed_before_the_request_was_sent_is_retried(adb_server: Any, make_pool: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.query(GET_STATUS)
    adb_server.drop_connections()
    wait_until(lambda: all(probe_socket(s) for s in idle_sockets(pool)),
               "the client to see the close")
    # The connector answered moments ago, so checkout does not probe it; make
    # the pre-send probe treat it as silent for a while, as after any pause.
    monkeypatch.setattr(connectors_mod, "_monotonic", lambda: time.monotonic() + 60.0)
    response, _ = pool.query(add(1))
    assert response[0]["AddEntity"]["status"] == 0
    assert len(adb_server.dump()) == 1
    s = pool.stats()
    assert s.retries == 1 and s.unknown_outcomes == 0


def test_closed_before_the_request_with_checkout_probe(adb_server: Any,
                                                       make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1, probe_after=0.0)
    pool.query(GET_STATUS)
    adb_server.drop_connections()
    wait_until(lambda: all(probe_socket(s) for s in idle_sockets(pool)),
               "the client to see the close")
    response, _ = pool.query(add(1))
    assert response[0]["AddEntity"]["status"] == 0
    assert len(adb_server.dump()) == 1
    s = pool.stats()
    # Caught at checkout (which also retires its generation): nothing to retry.
    assert s.probes >= 1 and s.retries == 0
    assert s.discarded.get("probe", 0) + s.discarded.get("retired", 0) == 1


def test_a_lost_session_refresh_answer_leaves_the_write_unsent_and_retried(
        adb_server: Any, make_pool: Any) -> None:
    # The SDK refreshes the shared session inside query(), before it sends the
    # caller's query.  The refresh runs on the server and its answer is lost:
    # the write itself never left the client, so it is safe to send again.
    template = adb_server.connector()
    pool = make_pool(adb_server, template, min_size=1, max_size=2)
    pool.wait_ready(JOIN)
    template.shared_data.session.session_started -= 10_000  # due for a refresh
    adb_server.close_after_next_request(execute=True, command="RefreshToken")
    response, _ = pool.query(add(7))
    assert response[0]["AddEntity"]["status"] == 0
    assert [o["properties"]["tid"] for o in adb_server.dump()] == [7]
    s = pool.stats()
    assert s.retries == 1 and s.unknown_outcomes == 0
    assert adb_server.counters()["requests_by_command"]["AddEntity"] == 1
    # Through a lease, the caller sees the classification itself.
    template.shared_data.session.session_started -= 10_000
    adb_server.close_after_next_request(execute=True, command="RefreshToken")
    with pytest.raises(ConnectFailed, match="not sent"):
        with pool.lease() as conn:
            conn.query(add(8))
    assert [o["properties"]["tid"] for o in adb_server.dump()] == [7]


def test_a_lost_login_answer_leaves_the_write_unsent_and_retried(
        adb_server: Any, make_pool: Any) -> None:
    # With no shared session (a refresh was refused and the login after it
    # failed, say) the SDK logs in inside query(), before the caller's query.
    template = adb_server.connector()
    pool = make_pool(adb_server, template, min_size=1, max_size=2)
    pool.wait_ready(JOIN)
    template.shared_data.session = None
    adb_server.close_after_next_request(execute=True, command="Authenticate")
    response, _ = pool.query(add(9))
    assert response[0]["AddEntity"]["status"] == 0
    assert [o["properties"]["tid"] for o in adb_server.dump()] == [9]
    assert pool.stats().unknown_outcomes == 0


def test_write_closed_after_execution_is_unknown_and_never_resent(adb_server: Any,
                                                                  make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.wait_ready(JOIN)
    adb_server.close_after_next_request(execute=True, command="AddEntity")
    q = add(42)
    with pytest.raises(OutcomeUnknown) as info:
        pool.query(q)
    assert info.value.query == q
    assert "may or may not" in str(info.value)
    assert [o["properties"] for o in adb_server.dump()] == [{"tid": 42}]
    assert adb_server.counters()["requests_by_command"]["AddEntity"] == 1
    s = pool.stats()
    assert s.retries == 0 and s.unknown_outcomes == 1
    # The pool itself is fine afterwards.
    assert entities(pool.query(find(42))[0]) == [{"tid": 42}]


def test_read_closed_after_execution_is_retried(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=1)
    pool.query(add(8))
    adb_server.close_after_next_request(execute=True, command="FindEntity")
    assert entities(pool.query(find(8))[0]) == [{"tid": 8}]
    assert adb_server.counters()["requests_by_command"]["FindEntity"] == 2
    s = pool.stats()
    assert s.retries == 1 and s.give_ups == 0


def test_refused_longer_than_the_deadline_fails_at_the_deadline(adb_server: Any,
                                                                make_pool: Any) -> None:
    pool = make_pool(adb_server, min_size=1, max_size=2, reconnect_initial=0.02,
                     reconnect_max=0.1)
    pool.query(GET_STATUS)
    adb_server.refuse_connections(60)
    adb_server.drop_connections()
    policy = RetryPolicy(max_attempts=100, deadline=1.0, initial_delay=0.02, max_delay=0.1)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable) as info:
        pool.query(GET_STATUS, retry=policy)
    elapsed = time.monotonic() - t0
    assert policy.deadline - policy.max_delay <= elapsed <= policy.deadline + policy.max_delay + 0.3
    assert isinstance(info.value, TimeoutError)
    assert "unreachable" in str(info.value)
    assert pool.stats().give_ups == 1
    adb_server.refuse_connections(0)
    assert status_ok(pool.query(GET_STATUS)[0])


# ---------------------------------------------------------------------------
# the drop-in for the SDK's pool
# ---------------------------------------------------------------------------


def test_compat_pool_is_a_drop_in(adb_server: Any) -> None:
    compat = pytest.importorskip("aperturedb_pool.compat")
    pool = compat.ConnectionPool(pool_size=3, connection_factory=adb_server.connector)
    try:
        assert pool.total() == 3 and pool.available() == 3
        with pool.get_connection(timeout=1) as conn:
            assert status_ok(conn.query(GET_STATUS)[0])
            assert pool.available() == 2
        pool.query(add(1))
        assert entities(pool.query(find(1))[0]) == [{"tid": 1}]
        with pool.get_connection() as a, pool.get_connection() as b, pool.get_connection() as c:
            assert len({id(a), id(b), id(c)}) == 3
            with pytest.raises(TimeoutError):
                with pool.get_connection(timeout=0.05):
                    pass
        assert adb_server.counters()["authenticate"] == 1  # one session, not pool_size
    finally:
        pool.close()
    with pytest.raises(PoolClosed):
        with pool.get_connection(timeout=1):
            pass


def test_compat_pool_fails_to_initialize_like_the_sdk(adb_server: Any) -> None:
    compat = pytest.importorskip("aperturedb_pool.compat")
    adb_server.refuse_connections(60)
    with pytest.raises(ConnectionError, match="Failed to initialize pool"):
        compat.ConnectionPool(pool_size=2, connection_factory=adb_server.connector,
                              timeout=0.3, reconnect_initial=0.01, reconnect_max=0.05)


# ---------------------------------------------------------------------------
# readiness and the ownership check with the real client
# ---------------------------------------------------------------------------


def test_wait_ready_fails_fast_on_bad_credentials(adb_server: Any, make_pool: Any) -> None:
    pool = make_pool(adb_server, adb_server.connector(password="wrong"), min_size=1,
                     max_size=1, reconnect_initial=0.01)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="authentication failed"):
        pool.wait_ready(JOIN)
    assert time.monotonic() - t0 < JOIN / 2
    assert pool.stats().size == 0


def test_ownership_check_with_the_real_connector(adb_server: Any, make_pool: Any) -> None:
    from aperturedb_pool import LeaseError

    pool = make_pool(adb_server, min_size=1, max_size=1, check_ownership=True)
    box: dict[str, Any] = {}

    def intruder() -> None:
        try:
            conn.query(GET_STATUS)
        except BaseException as e:  # noqa: B036 - reported to the test
            box["error"] = e

    with pool.lease() as conn:
        t = threading.Thread(target=intruder, daemon=True)
        t.start()
        t.join(JOIN)
        assert isinstance(box.get("error"), LeaseError)
        assert status_ok(conn.query(GET_STATUS)[0])
    with pytest.raises(LeaseError):
        conn.query(GET_STATUS)
    assert adb_server.counters()["requests_by_command"].get("GetStatus", 0) == 2  # ping + 1


def test_tls_fresh_connections_are_not_mistaken_for_dirty_ones(adb_tls_server: Any,
                                                              make_pool: Any) -> None:
    # A TLS 1.3 server sends session tickets right after the handshake: a fresh
    # socket is readable with no application data.  A connector must still
    # open when its first request is sent after they arrived (a loaded machine,
    # a wait on the shared session lock), whatever probe_after is.
    import select

    from aperturedb.Connector import Connector

    class TicketsFirst(Connector):
        def _connect(self) -> None:
            super()._connect()
            select.select([self.conn], [], [], 2.0)  # until the tickets are here

    base = adb_tls_server.connector()
    template = TicketsFirst(config=base.config)
    pool = make_pool(adb_tls_server, template, min_size=2, max_size=2, probe_after=0.0)
    pool.wait_ready(5.0)
    assert pool.stats().refill_failures == 0
    with pool.lease() as conn:
        assert status_ok(conn.query(GET_STATUS)[0])
