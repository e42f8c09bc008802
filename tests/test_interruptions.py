"""The pool's core promise under interruption and bounded time.

No caller ever gets another query's answer, and no wait the API bounds is
unbounded: a query interrupted while it waits for its answer (a signal
handler's exception, a timeout the caller catches) leaves a connector that
refuses to send again; a session refresh inside a query does not hide an
interruption; a retry deadline bounds the response read; a lease's timeout
covers a hand-off that turned out unusable; a response's length prefix cannot
make the reader allocate what has not arrived.

Real SDK ``Connector`` over loopback, against the embedded server or the small
misbehaving server of ``_misbehaving``.  The systematic hunt (an exception at
every line the lease paths run) is in ``test_injection.py``.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

import functools  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import _support  # noqa: E402
import pytest  # noqa: E402
from _misbehaving import MisbehavingServer  # noqa: E402

import aperturedb_pool.connectors as connectors_mod  # noqa: E402
from aperturedb_pool import (  # noqa: E402
    ConnectionPool,
    ConnectorUnusable,
    OutcomeUnknown,
    PoolTimeout,
    QueryTimeout,
    RetryPolicy,
)
from aperturedb_pool.connectors import FrameTooLarge, read_frame  # noqa: E402

JOIN = 20.0
wait_until = functools.partial(_support.wait_until, timeout=JOIN, poll=0.005)


class Interrupted(Exception):
    """What a signal handler raises (a soft time limit, say)."""


def find(k: int) -> list:
    return [{"FindEntity": {"with_class": "K", "constraints": {"k": ["==", k]},
                            "results": {"list": ["k"]}}}]


def keys_of(response: Any) -> list:
    return [e["k"] for e in response[0]["FindEntity"].get("entities", [])]


def seed(server: Any, n: int = 10) -> None:
    conn = server.connector()
    try:
        conn.query([{"AddEntity": {"class": "K", "properties": {"k": k}}} for k in range(n)])
    finally:
        conn.close()


@pytest.fixture
def pools() -> Iterator[list[ConnectionPool]]:
    made: list[ConnectionPool] = []
    yield made
    for pool in made:
        pool.close()


def timed_query(pool: ConnectionPool, deadline: float, limit: float) -> tuple[Any, float]:
    """``pool.query`` under ``RetryPolicy(deadline=...)`` in a thread: (its error or
    "answered", seconds taken).  Fails if it is still running after ``limit``."""
    outcome: list[Any] = []

    def call() -> None:
        t0 = time.monotonic()
        try:
            pool.query(find(1), retry=RetryPolicy(deadline=deadline, initial_delay=0.01))
            outcome.append(("answered", time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome.append((e, time.monotonic() - t0))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"pool.query outlived its retry deadline of {deadline} s by far"
    return outcome[0]


@pytest.fixture
def alarm() -> Iterator[Any]:
    """``alarm(seconds)``: raise ``Interrupted`` in this (the main) thread after
    ``seconds``, the way a signal handler does (SIGALRM)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("soft time limit")

    previous = signal.signal(signal.SIGALRM, handler)

    def arm(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)

    try:
        yield arm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------
# 1. a caught interruption never yields a stale answer
# ---------------------------------------------------------------------------


def test_a_connector_owed_an_answer_refuses_to_send_and_is_discarded(
        adb_server: Any, pools: list, alarm: Any) -> None:
    seed(adb_server)
    pool = ConnectionPool(adb_server.connector(), min_size=1, max_size=1, timeout=JOIN)
    pools.append(pool)
    pool.wait_ready(JOIN)
    adb_server.set_latency(0.3)
    with pool.lease() as conn:
        alarm(0.05)  # fires while the query waits for its (delayed) answer
        with pytest.raises(Interrupted):
            conn.query(find(2))
        # The caller caught it and asks again on the same connector: the
        # first query's answer is still on its way, so nothing is sent.
        with pytest.raises(ConnectorUnusable, match="not sent") as info:
            conn.query(find(7))
        assert info.value.query == find(7)
    # The block ended cleanly, with a connector owed an answer: discarded.
    assert pool.stats().discarded.get("broken") == 1
    adb_server.set_latency(0)
    # The next holder, whichever connector it gets, reads its own answers.
    for k in (7, 3, 5):
        with pool.lease() as conn:
            assert keys_of(conn.query(find(k))[0]) == [k]
    assert adb_server.counters()["sharing_violations"] == 0


def test_an_interruption_after_the_write_under_a_session_refresh_discards_the_connector(
        pools: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from aperturedb_pool.testing.server import EmbeddedServer

    # A session that is always due for a refresh: the SDK sends RefreshToken
    # (and reads its answer) inside every query, before the caller's request.
    with EmbeddedServer(session_ttl=1, refresh_ttl=3600) as server:
        seed(server)
        pool = ConnectionPool(server.connector(), min_size=1, max_size=1, timeout=JOIN)
        pools.append(pool)
        pool.wait_ready(JOIN)
        server.set_latency(0.2)
        real_write = connectors_mod.write_frame
        refreshes = []

        def write_then_interrupted(sock: Any, data: bytes) -> None:
            real_write(sock, data)
            if b"RefreshToken" in data:
                refreshes.append(data)
            elif b"FindEntity" in data:
                # A signal arriving right after the caller's request went out.
                raise Interrupted("soft time limit")

        monkeypatch.setattr(connectors_mod, "write_frame", write_then_interrupted)
        with pytest.raises(Interrupted):
            with pool.lease() as conn:
                conn.query(find(2))
        monkeypatch.setattr(connectors_mod, "write_frame", real_write)
        assert refreshes, "the SDK did not refresh inside the query: the test proves nothing"
        assert pool.stats().discarded.get("interrupted") == 1
        server.set_latency(0)
        for k in (4, 6):
            with pool.lease() as conn:
                assert keys_of(conn.query(find(k))[0]) == [k]


# ---------------------------------------------------------------------------
# 4. a retry deadline bounds the response read
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [1.0, 4.0])  # near: the socket's timeout; far: watched
def test_the_retry_deadline_bounds_a_query_the_server_never_answers(pools: list,
                                                                    deadline: float) -> None:
    server = MisbehavingServer("silent")
    try:
        pool = ConnectionPool(server.connector(), min_size=1, max_size=1, timeout=JOIN)
        pools.append(pool)
        pool.wait_ready(JOIN)
        err, took = timed_query(pool, deadline, deadline + 5.0)
        assert isinstance(err, QueryTimeout) and "deadline" in str(err)
        assert took < deadline + 2.0  # the deadline, plus scheduling noise
        assert pool.stats().discarded.get("interrupted", 0) >= 1
    finally:
        server.stop()


def test_a_short_deadline_does_not_cut_a_later_query_without_one(adb_server: Any,
                                                                  pools: list) -> None:
    seed(adb_server)
    pool = ConnectionPool(adb_server.connector(), min_size=1, max_size=1, timeout=JOIN)
    pools.append(pool)
    pool.wait_ready(JOIN)
    assert keys_of(pool.query(find(3), retry=RetryPolicy(deadline=0.5))[0]) == [3]
    adb_server.set_latency(0.8)  # longer than that deadline: a stale bound would cut it
    with pool.lease() as conn:
        assert keys_of(conn.query(find(4))[0]) == [4]
    assert keys_of(pool.query(find(5), retry=RetryPolicy(deadline=5.0))[0]) == [5]


def test_a_keepalive_ping_after_a_bounded_query_is_bounded_too(pools: list) -> None:
    # A query under a retry deadline leaves the socket's timeout set from it;
    # the background ping that follows must still end within connect_timeout.
    server = MisbehavingServer("answer")
    try:
        pool = ConnectionPool(server.connector(), min_size=1, max_size=1, timeout=JOIN,
                              keepalive_interval=0.2, connect_timeout=0.5)
        pools.append(pool)
        pool.wait_ready(JOIN)
        pool.query(find(1))  # the default policy has a 30 s deadline
        server.mode = "mute"
        wait_until(lambda: pool.stats().discarded.get("failed_ping"),
                   "the unanswered ping to fail")
        assert pool.stats().keepalive_pings >= 1
    finally:
        server.stop()


def test_the_retry_deadline_bounds_the_wait_for_the_shared_session_lock(
        adb_server: Any, pools: list) -> None:
    template = adb_server.connector()
    pool = ConnectionPool(template, min_size=1, max_size=1, timeout=JOIN)
    pools.append(pool)
    pool.wait_ready(JOIN)
    # Another connector renewing the session (against a slow server) holds
    # the lock every clone shares.
    with template.shared_data.lock:
        err, took = timed_query(pool, 1.0, 6.0)
    assert took < 1.0 + 2.0
    assert "renewing the session" in str(err) + str(getattr(err, "__cause__", ""))
    # Nothing was sent, and the connector is fine once the lock is free.
    assert keys_of(pool.query(find(1))[0]) in ([], [1])


# ---------------------------------------------------------------------------
# 5. a lease's timeout covers a hand-off that turned out unusable
# ---------------------------------------------------------------------------


def test_a_lease_timeout_covers_an_unusable_hand_off(adb_server: Any, pools: list) -> None:
    pool = ConnectionPool(adb_server.connector(), min_size=1, max_size=1, timeout=JOIN,
                          probe_after=0.0)
    pools.append(pool)
    pool.wait_ready(JOIN)
    holder = pool.acquire()
    outcome: list[Any] = []
    queued = threading.Event()

    def waiter() -> None:
        t0 = time.monotonic()
        queued.set()
        try:
            with pool.lease(timeout=1.0):
                outcome.append(("leased", time.monotonic() - t0))
        except PoolTimeout as e:
            outcome.append((e, time.monotonic() - t0))

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    queued.wait(JOIN)
    wait_until(lambda: pool.stats().waiting == 1, "the waiter to queue")
    time.sleep(0.7)  # the waiter has used most of its 1 s when the hand-off comes
    # The held connector dies, and no replacement can open: the waiter's
    # checkout probe finds the handed-over connector closed.
    adb_server.refuse_connections(5.0)
    adb_server.drop_connections()
    wait_until(lambda: holder.conn.conn is None or
               connectors_mod.peek(holder.conn.conn) == b"", "the client to see the close")
    holder.release()
    t.join(JOIN)
    err, took = outcome[0]
    assert isinstance(err, PoolTimeout), outcome
    assert took < 1.0 + 0.45, f"lease(timeout=1.0) returned after {took:.2f} s"
    assert "within 1 s" in str(err)


# ---------------------------------------------------------------------------
# 6. a length prefix cannot make the reader allocate what has not arrived
# ---------------------------------------------------------------------------


def test_a_length_prefix_over_the_protocol_limit_is_refused_at_once() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(connectors_mod._FRAME_LEN.pack(0xFFFFFFF0) + b"x" * 10)
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLarge, match="limit"):
                read_frame(b)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * 2**20
    finally:
        a.close()
        b.close()


def test_a_large_announced_frame_grows_only_with_what_arrives() -> None:
    a, b = socket.socketpair()
    try:
        announced = 512 * 2**20  # within the limit, far more than will ever come
        a.sendall(connectors_mod._FRAME_LEN.pack(announced) + b"y" * 100_000)
        a.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            assert read_frame(b) is None  # EOF inside the body
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, f"{peak} bytes allocated for 100 kB that arrived"
    finally:
        a.close()
        b.close()


def test_a_huge_prefix_from_the_server_is_an_unknown_outcome_and_the_pool_goes_on(
        pools: list) -> None:
    server = MisbehavingServer("huge", prefix=0xFFFFFFF0, body=b"z" * 64)
    try:
        pool = ConnectionPool(server.connector(), min_size=1, max_size=1, timeout=JOIN)
        pools.append(pool)
        pool.wait_ready(JOIN)
        t0 = time.monotonic()
        with pytest.raises(OutcomeUnknown, match="limit"):
            pool.query(find(1), retry=RetryPolicy.no_retry())
        assert time.monotonic() - t0 < 2.0
        assert pool.stats().discarded.get("interrupted") == 1
        server.mode = "answer"
        response, _ = pool.query(find(1))
        assert response[0]["FindEntity"]["status"] == 0
    finally:
        server.stop()
