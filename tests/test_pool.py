"""ConnectionPool's own methods with stand-in connectors (no socket):
construction and options, closing and retiring, ``query``/``run``, stats.

Split from the former ``test_pool_unit.py``; the shared stand-in is
``aperturedb_pool.testing._standin.StandIn``, the fixtures (``make_pool``,
``template``, the clocks) are in ``conftest.py``.
"""

from __future__ import annotations

import functools
import gc
import math
import sys
import time
import weakref
from typing import Any

import _support
import pytest
from _support import (
    JOIN,
    Flaky,
    join,
    start,
)

from aperturedb_pool import (
    ConnectFailed,
    ConnectionPool,
    OutcomeUnknown,
    PoolClosed,
    PoolError,
    PoolStats,
    PoolTimeout,
    RetryPolicy,
    ServerUnreachable,
)
from aperturedb_pool.testing._standin import StandIn

wait_until = functools.partial(_support.wait_until, timeout=JOIN)


class OldSDKStandIn:
    """An SDK before 0.4.33: create_new_connection() and no clone()."""

    def __init__(self) -> None:
        self.made: list[StandIn] = []

    def create_new_connection(self) -> StandIn:
        c = StandIn()
        self.made.append(c)
        return c

    def query(self, q: Any, blobs: Any = None) -> Any:  # pragma: no cover - never called
        raise AssertionError("the pool must never query through the template")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# construction and options
# ---------------------------------------------------------------------------


def test_template_is_cloned_and_never_queried(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=4)
    pool.wait_ready(JOIN)
    with pool.lease() as conn:
        assert conn is not template
        assert conn in template.clones
        conn.query([{"FindEntity": {}}])
    assert template.queries == []
    assert not template.closed
    assert pool.stats().size == 2
    assert pool.stats().connectors_opened == 2


def test_create_new_connection_is_used_for_old_sdks(make_pool: Any) -> None:
    old = OldSDKStandIn()
    pool = make_pool(old, min_size=1, max_size=1)
    with pool.lease() as conn:
        assert conn in old.made
        assert conn.query([{"GetStatus": {}}])[0][0]["GetStatus"]["status"] == 0


def test_connector_factory_instead_of_template(make_pool: Any) -> None:
    made: list[StandIn] = []

    def factory() -> StandIn:
        made.append(StandIn())
        return made[-1]

    pool = ConnectionPool(connector_factory=factory, min_size=1, max_size=2, timeout=5)
    try:
        with pool.lease() as conn:
            assert conn is made[0]
    finally:
        pool.close()
    with pytest.raises(TypeError, match="not both"):
        ConnectionPool(StandIn(), connector_factory=factory)


def test_open_false_defers_opening(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=2, open=False)
    assert template.clones == []
    assert pool.stats().size == 0
    pool.open(wait=True, timeout=JOIN)
    assert pool.stats().size == 2
    assert pool.stats().idle == 2


def test_leasing_from_a_pool_never_opened_is_an_error(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, open=False)
    with pytest.raises(PoolError, match="open"):
        pool.acquire(timeout=JOIN)
    pool.open()
    with pool.lease(timeout=JOIN):
        pass


def test_wait_ready_fails_fast_on_an_error_retrying_cannot_fix(make_pool: Any) -> None:
    class Broken(StandIn):
        def clone(self) -> StandIn:
            raise PermissionError("bad credentials")

    pool = make_pool(Broken(), min_size=1, max_size=1, reconnect_initial=0.01)
    t0 = time.monotonic()
    with pytest.raises(PermissionError, match="bad credentials"):
        pool.wait_ready(timeout=JOIN)
    assert time.monotonic() - t0 < JOIN / 2


def test_wait_ready_times_out_on_transient_failures_with_the_cause(make_pool: Any) -> None:
    class Refused(StandIn):
        def clone(self) -> StandIn:
            raise ConnectFailed("could not connect to h:1: refused")

    pool = make_pool(Refused(), min_size=1, max_size=1, reconnect_initial=0.01,
                     reconnect_max=0.02)
    with pytest.raises(PoolTimeout) as info:
        pool.wait_ready(timeout=0.2)
    assert isinstance(info.value.__cause__, ConnectFailed)
    assert "refused" in str(info.value)
    wait_until(lambda: pool.stats().refill_failures >= 2, what="refill failures")


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"min_size": 3, "max_size": 2}, ValueError, ["min_size", "3", "max_size", "2"]),
        ({"max_size": 0}, ValueError, ["max_size", "0"]),
        ({"min_size": -1}, ValueError, ["min_size", "-1"]),
        ({"min_size": "2"}, TypeError, ["min_size", "'2'"]),
        ({"max_size": 2.5}, TypeError, ["max_size", "2.5"]),
        ({"max_size": True}, TypeError, ["max_size", "True"]),
        ({"timeout": -1}, ValueError, ["timeout", "-1"]),
        ({"timeout": math.nan}, ValueError, ["timeout", "nan"]),
        ({"timeout": "5"}, TypeError, ["timeout", "'5'"]),
        ({"timeout": None}, ValueError, ["timeout", "None"]),
        ({"max_lifetime": -5.0}, ValueError, ["max_lifetime", "-5.0"]),
        ({"max_lifetime": 0}, ValueError, ["max_lifetime", "0"]),
        ({"max_idle": math.nan}, ValueError, ["max_idle", "nan"]),
        ({"keepalive_interval": -1}, ValueError, ["keepalive_interval", "-1"]),
        ({"query_timeout": math.nan}, ValueError, ["query_timeout", "nan"]),
        ({"leak_threshold": -0.5}, ValueError, ["leak_threshold", "-0.5"]),
        ({"probe_after": -1}, ValueError, ["probe_after", "-1"]),
        ({"fairness_threshold": math.nan}, ValueError, ["fairness_threshold", "nan"]),
        ({"reconnect_initial": 0}, ValueError, ["reconnect_initial", "0"]),
        ({"reconnect_max": -2}, ValueError, ["reconnect_max", "-2"]),
        ({"max_waiting": -1}, ValueError, ["max_waiting", "-1"]),
        ({"tcp_keepalive": (30, 10)}, ValueError, ["tcp_keepalive", "(30, 10)"]),
        ({"tcp_keepalive": (-1, 10, 3)}, ValueError, ["tcp_keepalive", "idle", "-1"]),
        ({"tcp_keepalive": (30, 10, 0)}, ValueError, ["tcp_keepalive", "count", "0"]),
        ({"retry": 3}, TypeError, ["retry", "3"]),
    ],
)
def test_bad_options_name_the_parameter_and_value(kwargs: dict, exc: type, words: list) -> None:
    with pytest.raises(exc) as info:
        ConnectionPool(StandIn(), open=False, **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("tmpl", [object(), 42, "localhost"])
def test_template_without_clone_is_a_type_error(tmpl: Any) -> None:
    with pytest.raises(TypeError, match="template") as info:
        ConnectionPool(tmpl, open=False)
    assert "clone" in str(info.value)


def test_template_that_is_a_class_is_a_type_error() -> None:
    """The Connector class itself (instead of an instance) has clone, query
    and close as functions: refused at construction, naming the fix."""
    from aperturedb.Connector import Connector

    with pytest.raises(TypeError, match="template") as info:
        ConnectionPool(Connector, open=False)
    assert "the class 'Connector'" in str(info.value)
    assert "pass an instance" in str(info.value)
    assert "Connector(host=" in str(info.value)


def test_template_without_query_is_a_type_error() -> None:
    class NoQuery:
        def clone(self) -> Any:  # pragma: no cover
            return self

        def close(self) -> None:  # pragma: no cover
            pass

    with pytest.raises(TypeError, match=r"template.*query"):
        ConnectionPool(NoQuery(), open=False)


def test_bad_lease_timeout_names_the_parameter(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    pool.wait_ready(JOIN)
    # Validation must not depend on whether a connector happens to be idle.
    for bad, exc in ((-1, ValueError), (math.nan, ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="timeout"):
            with pool.lease(timeout=bad):
                pass
        with pytest.raises(exc, match="timeout"):
            pool.acquire(timeout=bad)
    held = pool.acquire()
    try:
        with pytest.raises(ValueError, match="timeout"):
            pool.acquire(timeout=-1)
    finally:
        held.release()
    assert pool.stats().leased == 0


# ---------------------------------------------------------------------------
# closing and retiring
# ---------------------------------------------------------------------------


def test_close_with_leases_outstanding(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=2)
    pool.wait_ready(JOIN)
    held = pool.acquire()
    held_conn = held.conn
    idle_conn = [c for c in template.clones if c is not held_conn][0]
    other = pool.acquire()
    t, box = start(lambda: pool.acquire(timeout=JOIN))
    wait_until(lambda: pool.stats().waiting == 1, what="a waiter")
    other.release()  # handed to the waiter
    join(t)
    waiter_lease = box["result"]
    t2, box2 = start(lambda: pool.acquire(timeout=JOIN))
    wait_until(lambda: pool.stats().waiting == 1, what="a second waiter")

    pool.close()
    join(t2)
    assert isinstance(box2.get("error"), PoolClosed)
    assert pool.closed
    # Leased connectors stay usable until they come back, then are closed.
    assert held_conn.query([{"GetStatus": {}}])
    assert not held_conn.closed
    held.release()
    assert held_conn.closed
    waiter_lease.release()
    assert idle_conn.closed
    assert all(c.closed for c in template.clones)
    with pytest.raises(PoolClosed):
        with pool.lease():
            pass
    with pytest.raises(PoolClosed):
        pool.acquire()
    with pytest.raises(PoolClosed):
        pool.open()
    pool.close()  # idempotent
    s = pool.stats()
    assert s.size == 0 and s.leased == 0 and s.idle == 0
    assert s.connectors_closed == s.connectors_opened == len(template.clones)


def test_close_stops_the_background_thread(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    pool.wait_ready(JOIN)
    thread = pool._bg_thread
    assert thread is not None and thread.is_alive()
    pool.close()
    thread.join(JOIN)
    assert not thread.is_alive()


def test_context_manager_closes(template: StandIn) -> None:
    with ConnectionPool(template, min_size=1, max_size=1, timeout=JOIN) as pool:
        with pool.lease() as conn:
            pass
    assert pool.closed and conn.closed


def test_close_with_a_grace_period_closes_leases_still_out(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    lease = pool.acquire()
    conn = lease.conn
    t0 = time.monotonic()
    pool.close(timeout=0.05)
    assert time.monotonic() - t0 < JOIN / 2
    assert conn.closed  # closed under its holder after the grace period
    lease.release()  # returning it later is harmless
    assert pool.stats().leased == 0


def test_a_dropped_pool_is_collected_and_its_thread_ends(template: StandIn) -> None:
    pool = ConnectionPool(template, min_size=1, max_size=1)
    pool.wait_ready(JOIN)
    thread, wakeup, ref = pool._bg_thread, pool._bg_wakeup, weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None
    wakeup.set()
    thread.join(JOIN)
    assert not thread.is_alive()


def test_interpreter_exit_never_hangs_on_the_pool(tmp_path: Any) -> None:
    import subprocess

    script = tmp_path / "exit.py"
    script.write_text(
        "from aperturedb_pool import ConnectionPool\n"
        "class C:\n"
        "    def clone(self): return C()\n"
        "    def query(self, q, blobs=None): return [{'GetStatus': {'status': 0}}], []\n"
        "    def close(self): pass\n"
        "pool = ConnectionPool(C(), min_size=2, max_size=4, keepalive_interval=0.01)\n"
        "pool.wait_ready(5)\n"
        "held = pool.acquire()  # never released, pool never closed\n"
        "print('ok', flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=JOIN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_retire_all(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=3, max_size=3)
    pool.wait_ready(JOIN)
    held = pool.acquire()
    before = list(template.clones)
    assert pool.retire_all() == 3
    assert pool.stats().generation == 1
    idle_old = [c for c in before if c is not held.conn]
    wait_until(lambda: all(c.closed for c in idle_old), what="idle connectors closed")
    assert not held.conn.closed  # leased: closed only when it comes back
    held_conn = held.conn
    held.release()
    wait_until(lambda: held_conn.closed, what="retired connector closed on return")
    assert pool.stats().discarded.get("retired") == 3
    pool.wait_ready(JOIN)
    wait_until(lambda: pool.stats().size == 3, what="refill")
    new = [c for c in template.clones if c not in before]
    assert len(new) == 3 and not any(c.closed for c in new)
    with pool.lease() as conn:
        assert conn in new


# ---------------------------------------------------------------------------
# pool.query / pool.run with stand-ins
# ---------------------------------------------------------------------------

FAST = RetryPolicy(max_attempts=4, deadline=5.0, initial_delay=0.001, max_delay=0.002)


def test_pool_query_returns_the_response(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    response, blobs = pool.query([{"FindEntity": {"with_class": "x"}}])
    assert response == [{"FindEntity": {"status": 0, "returned": 0}}] and blobs == []
    assert pool.stats().leased == 0


def test_pool_query_retries_connect_failures_on_a_fresh_connector(make_pool: Any,
                                                                  template: StandIn) -> None:
    pool = make_pool(min_size=1, max_size=1, retry=FAST)
    with pool.lease() as first:
        first.fail_next = ConnectFailed("closed before the request was sent")
    response, _ = pool.query([{"AddEntity": {"class": "x"}}])
    assert response[0]["AddEntity"]["status"] == 0
    wait_until(lambda: first.closed, what="failed connector closed")
    s = pool.stats()
    assert s.retries == 1 and s.give_ups == 0
    assert sum(len([q for q in c.queries if "AddEntity" in q[0]]) for c in template.clones) == 2


def test_pool_query_never_resends_a_write_with_unknown_outcome(make_pool: Any,
                                                               template: StandIn) -> None:
    pool = make_pool(min_size=1, max_size=1, retry=FAST)
    with pool.lease() as first:
        first.fail_next = OutcomeUnknown("closed after the request was sent")
    q = [{"AddEntity": {"class": "x"}}]
    with pytest.raises(OutcomeUnknown) as info:
        pool.query(q)
    assert info.value.query == q
    s = pool.stats()
    assert s.retries == 0 and s.unknown_outcomes == 1
    assert sum(len(c.queries) for c in template.clones) == 1
    # A read, or a write declared idempotent, is retried.
    with pool.lease() as conn:
        conn.fail_next = OutcomeUnknown("again")
    assert pool.query([{"FindEntity": {}}])[0][0]["FindEntity"]["status"] == 0
    with pool.lease() as conn:
        conn.fail_next = OutcomeUnknown("again")
    assert pool.query(q, idempotent=True)[0][0]["AddEntity"]["status"] == 0
    assert pool.stats().retries == 2


def test_pool_run_retries_only_declared_idempotent_callables(make_pool: Any) -> None:
    from aperturedb_pool.retry import idempotent

    pool = make_pool(min_size=1, max_size=1, retry=FAST)
    calls: list[int] = []

    def unit(conn: Any, n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            conn.fail_next = OutcomeUnknown("cut")
        conn.query([{"AddEntity": {}}])
        conn.query([{"FindEntity": {}}])
        return n * 2

    with pytest.raises(OutcomeUnknown):
        pool.run(unit, 1)
    assert calls == [1]
    calls.clear()
    assert pool.run(idempotent(unit), 21) == 42
    assert calls == [21, 21]


def test_a_per_call_retry_that_is_not_a_policy_is_refused_by_name(make_pool: Any) -> None:
    pool = make_pool()
    for bad in (3, "no_retry", RetryPolicy):
        with pytest.raises(TypeError, match=r"retry must be a RetryPolicy"):
            pool.query([{"GetStatus": {}}], retry=bad)
        with pytest.raises(TypeError, match=r"retry must be a RetryPolicy"):
            pool.run(lambda conn: None, retry=bad)
    assert pool.stats().leased == 0 and pool.query([{"GetStatus": {}}]) is not None


def test_an_outage_without_retries_is_the_connect_failure_itself(make_pool: Any) -> None:
    # no_retry: one attempt, and its precise error - the lease wait ended
    # because no connector could be opened, nothing was sent.
    flaky = Flaky()
    flaky.down.set()
    pool = make_pool(flaky, min_size=1, max_size=1, timeout=0.2, reconnect_initial=0.01,
                     reconnect_max=0.05)
    with pytest.raises(ConnectFailed) as info:
        pool.query([{"GetStatus": {}}], retry=RetryPolicy.no_retry())
    assert not isinstance(info.value, ServerUnreachable)
    assert "unreachable" in str(info.value) and "nothing was sent" in str(info.value)
    assert isinstance(info.value.__cause__, PoolTimeout)


def test_pool_query_when_unreachable_fails_once_at_the_deadline(make_pool: Any) -> None:
    flaky = Flaky()
    flaky.down.set()
    pool = make_pool(flaky, min_size=1, max_size=1, reconnect_initial=0.01,
                     reconnect_max=0.05)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable) as info:
        pool.query([{"GetStatus": {}}], retry=RetryPolicy(deadline=0.3, initial_delay=0.01))
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0
    assert isinstance(info.value, TimeoutError)
    assert "unreachable" in str(info.value)
    assert pool.stats().give_ups == 1


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------


def test_stats_is_an_immutable_consistent_snapshot(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=2, name="s")
    with pool.lease():
        s = pool.stats()
    assert isinstance(s, PoolStats)
    assert (s.name, s.min_size, s.max_size, s.leased) == ("s", 1, 2, 1)
    with pytest.raises(AttributeError):
        s.size = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.discarded["x"] = 1  # type: ignore[index]
    d = s.as_dict()
    assert d["leases_granted"] == 1 and isinstance(d["discarded"], dict)
    assert "'s'" in str(s) and "leased 1" in str(s)
    assert pool.stats(reset=True).leases_granted == 1
    after = pool.stats()
    assert after.leases_granted == 0 and after.size == 1  # gauges survive a reset
