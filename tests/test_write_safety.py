"""A write is never executed twice: the cases a review found, with the real SDK.

Each test counts the entities on the embedded server afterwards: the pool may
report an unknown outcome, but it must never re-send a write that may have run.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

from typing import Any  # noqa: E402

import pytest  # noqa: E402

from aperturedb_pool import ConnectionPool, OutcomeUnknown, RetryPolicy  # noqa: E402
from aperturedb_pool.health import probe_socket, socket_of  # noqa: E402

JOIN = 20.0
FAST = RetryPolicy(max_attempts=5, deadline=10.0, initial_delay=0.01, max_delay=0.05)


def count(pool: ConnectionPool, cls: str) -> int:
    response, _ = pool.query([{"FindEntity": {"with_class": cls, "results": {"count": True}}}])
    return response[0]["FindEntity"]["count"]


@pytest.fixture
def pool(adb_server: Any) -> Any:
    # probe_after=0: every request is preceded by the zero-timeout probe, so a
    # connection the server closed fails as ConnectFailed ("not sent").
    p = ConnectionPool(adb_server.connector(), min_size=1, max_size=2, timeout=JOIN,
                       retry=FAST, probe_after=0.0, name="safety")
    p.wait_ready(JOIN)
    yield p
    p.close()


def test_run_does_not_rerun_a_unit_whose_earlier_write_reached_the_server(
        adb_server: Any, pool: ConnectionPool) -> None:
    calls = []

    def unit(conn: Any) -> Any:
        calls.append(1)
        conn.query([{"AddEntity": {"class": "Order", "properties": {"n": 1}}}])
        if len(calls) == 1:
            adb_server.drop_connections()
            sock = socket_of(conn)
            deadline = __import__("time").monotonic() + JOIN
            while probe_socket(sock) is None:  # the FIN has not arrived yet
                assert __import__("time").monotonic() < deadline
        # Not sent (the probe sees the closed peer): ConnectFailed inside.
        return conn.query([{"GetStatus": {}}])

    with pytest.raises(OutcomeUnknown, match="earlier query of this unit"):
        pool.run(unit)
    assert len(calls) == 1, "the unit was re-run"
    assert count(pool, "Order") == 1
    assert pool.stats().unknown_outcomes == 1


def test_run_reruns_an_idempotent_unit(adb_server: Any, pool: ConnectionPool) -> None:
    calls = []

    def unit(conn: Any) -> Any:
        calls.append(1)
        conn.query([{"AddEntity": {"class": "Tag", "properties": {"k": 7},
                                   "if_not_found": {"k": ["==", 7]}}}])
        if len(calls) == 1:
            adb_server.drop_connections()
            sock = socket_of(conn)
            deadline = __import__("time").monotonic() + JOIN
            while probe_socket(sock) is None:
                assert __import__("time").monotonic() < deadline
        return conn.query([{"GetStatus": {}}])

    unit.idempotent = True  # type: ignore[attr-defined]
    response, _ = pool.run(unit)
    assert response[0]["GetStatus"]["status"] == 0
    assert len(calls) == 2
    assert count(pool, "Tag") == 1  # the conditional add ran twice, stored once


class _Interrupted(Exception):
    """Stands for an asynchronous exception (a signal handler, a soft time
    limit) raised after the request frame was written to the socket."""


def test_exception_after_the_frame_was_written_is_not_retried(adb_server: Any) -> None:
    from aperturedb.Connector import Connector

    class LateInterrupt(Connector):
        armed = False

        def _send_msg(self, data: bytes) -> None:
            super()._send_msg(data)
            if LateInterrupt.armed and b"AddEntity" in bytes(data):
                LateInterrupt.armed = False
                raise _Interrupted("raised after sendall completed")

    base = adb_server.connector()
    template = LateInterrupt(shared_data=base.shared_data, config=base.config)
    with ConnectionPool(template, min_size=1, max_size=1, timeout=JOIN, retry=FAST) as pool:
        pool.wait_ready(JOIN)
        LateInterrupt.armed = True
        with pytest.raises(_Interrupted):
            pool.query([{"AddEntity": {"class": "Pay", "properties": {"n": 1}}}])
        assert pool.stats().retries == 0
        assert pool.stats().discarded.get("interrupted") == 1
        assert count(pool, "Pay") == 1
