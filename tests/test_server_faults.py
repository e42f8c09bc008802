"""Each fault of the embedded server, observed through the real SDK Connector,
and the sharing detector."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import

import threading
import time

import pytest

from aperturedb_pool.testing import EmbeddedServer

FAST = {"retry_interval_seconds": 0.01}


def fast(server, **kw):
    return server.connector(**{**FAST, **kw})


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` (a server counter, usually) until true; bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def ok(resp):
    return isinstance(resp, list) and all(next(iter(r.values()))["status"] >= 0 for r in resp)


@pytest.fixture
def server():
    with EmbeddedServer() as s:
        yield s


def count(server, cls):
    return sum(1 for e in server.dump() if e["class"] == cls)


def test_drop_connections_recovered_by_client_retry(server):
    c = fast(server)
    assert ok(c.query([{"GetStatus": {}}])[0])
    assert server.drop_connections() == 1
    assert server.counters()["open"] == 0
    assert ok(c.query([{"GetStatus": {}}])[0])  # the SDK reconnects by itself
    k = server.counters()
    assert k["dropped"] == 1 and k["accepted"] == 2 and k["authenticate"] == 1


def test_refuse_connections_for_a_while(server):
    server.refuse_connections(0.5)
    c = fast(server, retry_max_attempts=1)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="Could not query"):
        c.query([{"GetStatus": {}}])
    assert time.monotonic() - t0 < 0.4  # fails quickly, it does not hang
    assert server.counters()["refused"] >= 1
    assert server.counters()["accepted"] == 0
    # After the window, connections are served again.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert ok(fast(server, retry_max_attempts=1).query([{"GetStatus": {}}])[0])
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    server.refuse_connections(0)


def test_fixed_and_random_latency(server):
    c = fast(server)
    c.query([{"GetStatus": {}}])
    server.set_latency(0.2)
    t0 = time.monotonic()
    c.query([{"GetStatus": {}}])
    assert time.monotonic() - t0 >= 0.2
    server.set_latency((0.05, 0.1))
    for _ in range(3):
        t0 = time.monotonic()
        c.query([{"GetStatus": {}}])
        assert 0.05 <= time.monotonic() - t0 < 1.0
    server.set_latency(0)
    with pytest.raises(ValueError):
        server.set_latency((0.2, 0.1))


def test_close_after_request_without_executing(server):
    c = fast(server, retry_max_attempts=1)
    c.query([{"GetStatus": {}}])
    server.close_after_next_request(execute=False, command="AddEntity")
    assert ok(c.query([{"GetStatus": {}}])[0])  # not the command named: served
    with pytest.raises(Exception, match="Could not query"):
        c.query([{"AddEntity": {"class": "W"}}])
    assert count(server, "W") == 0  # the write did not happen
    assert server.counters()["fault_closed"] == 1


def test_close_after_request_executed_the_write_happened(server):
    c = fast(server, retry_max_attempts=1)
    c.query([{"GetStatus": {}}])
    server.close_after_next_request(execute=True, command="AddEntity")
    with pytest.raises(Exception, match="Could not query"):
        c.query([{"AddEntity": {"class": "W"}}])
    assert count(server, "W") == 1  # the write happened although no answer came


def test_sdk_retry_resends_an_executed_write(server):
    # The SDK's own retry loop re-sends after a lost answer: the write runs twice.
    c = fast(server)  # retry_max_attempts=3
    c.query([{"GetStatus": {}}])
    server.close_after_next_request(execute=True)
    r, _ = c.query([{"AddEntity": {"class": "W"}}])
    assert ok(r)
    assert count(server, "W") == 2


def test_garbage_answer(server):
    from google.protobuf.message import DecodeError

    c = fast(server)
    c.query([{"GetStatus": {}}])
    server.send_garbage_next(command="FindEntity")
    assert ok(c.query([{"GetStatus": {}}])[0])
    with pytest.raises(DecodeError):
        c.query([{"FindEntity": {"with_class": "X"}}])
    assert server.counters()["garbage_sent"] == 1
    c.close()
    assert ok(fast(server).query([{"GetStatus": {}}])[0])


def test_idle_timeout_closes_idle_connections(server):
    server.set_idle_timeout(0.2)
    c = fast(server)
    c.query([{"GetStatus": {}}])
    wait_for(lambda: server.counters()["idle_closed"] == 1, what="the idle close")
    assert server.counters()["open"] == 0
    assert ok(c.query([{"GetStatus": {}}])[0])  # the SDK reconnects
    server.set_idle_timeout(None)


def test_max_clients_extra_clients_wait_for_a_slot(server):
    server.set_max_clients(1)
    a = fast(server)
    a.query([{"GetStatus": {}}])
    b = a.clone()
    done = threading.Event()
    result = []

    def second():
        result.append(b.query([{"GetStatus": {}}])[0])
        done.set()

    t = threading.Thread(target=second)
    t.start()
    wait_for(lambda: server.counters()["waiting"] == 1, what="a waiting client")
    assert not done.is_set()
    a.close()  # frees the slot
    assert done.wait(10)
    t.join(10)
    assert ok(result[0])
    k = server.counters()
    assert k["waiting"] == 0 and k["open"] == 1
    server.set_max_clients(None)


def test_set_max_clients_none_releases_waiters(server):
    server.set_max_clients(1)
    a = fast(server)
    a.query([{"GetStatus": {}}])
    b = a.clone()
    t = threading.Thread(target=lambda: b.query([{"GetStatus": {}}]))
    t.start()
    wait_for(lambda: server.counters()["waiting"] == 1, what="a waiting client")
    server.set_max_clients(None)
    t.join(10)
    assert not t.is_alive()


def test_sharing_detector_fires_when_two_threads_share_a_connector(server):
    c = fast(server, retry_max_attempts=1)
    c.query([{"GetStatus": {}}])
    server.set_latency(0.5)  # keeps the first request unanswered
    errors = []

    def use():
        try:
            c.query([{"GetStatus": {}}])
        except Exception as e:
            errors.append(e)

    t1 = threading.Thread(target=use)
    t1.start()
    wait_for(lambda: server.counters()["pending"] == 1, what="the first request")
    t2 = threading.Thread(target=use)
    t2.start()
    wait_for(lambda: server.counters()["sharing_violations"] >= 1, what="a violation")
    # Two threads now read one socket and may reconnect it under each other: refuse
    # new connections and drop the open ones until both threads have given up.
    server.refuse_connections(60)
    server.set_latency(0)
    deadline = time.monotonic() + 10
    while (t1.is_alive() or t2.is_alive()) and time.monotonic() < deadline:
        server.drop_connections()
        t1.join(0.05)
        t2.join(0.05)
    assert not t1.is_alive() and not t2.is_alive()
    assert server.counters()["sharing_violations"] >= 1


def test_sharing_detector_silent_with_one_clone_per_thread(server):
    template = fast(server)
    server.set_latency((0.0, 0.002))
    clones = [template.clone() for _ in range(4)]

    def use(c):
        for _ in range(25):
            c.query([{"GetStatus": {}}])

    threads = [threading.Thread(target=use, args=(c,)) for c in clones]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    k = server.counters()
    assert k["sharing_violations"] == 0
    assert k["requests_by_command"]["GetStatus"] == 100


def test_reset_counters(server):
    c = fast(server)
    c.query([{"GetStatus": {}}])
    server.reset_counters()
    k = server.counters()
    assert k["requests"] == 0 and k["accepted"] == 0 and k["open"] == 1


def test_faults_can_be_set_before_start():
    s = EmbeddedServer(latency=0.05, max_clients=2, idle_timeout=30)
    s.set_latency(0.01)
    with s:
        c = fast(s)
        assert ok(c.query([{"GetStatus": {}}])[0])
