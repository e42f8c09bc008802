"""Unit tests of ConnectionPool's own logic, with stand-in connectors (no socket).

A stand-in is any object with ``clone()``, ``query()`` and ``close()``; the pool
skips its socket probe for it.  Synchronisation uses events and the pool's own
state; the only polling is ``wait_until`` on effects of the pool's background
thread (opening and closing connectors), which has no hook to wait on.
Time-dependent rules (lifetime, idle shrink, keepalive) run on a shifted
clock injected as the pool modules' ``_monotonic`` (``_support.set_pool_clock``),
so nothing sleeps for
them.
"""

from __future__ import annotations

import _thread
import functools
import gc
import logging
import math
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable

import _support
import pytest

import aperturedb_pool._lease as lease_mod
import aperturedb_pool.pool as pool_mod
from aperturedb_pool import (
    ConnectFailed,
    ConnectionPool,
    LeaseError,
    OutcomeUnknown,
    PoolClosed,
    PoolError,
    PoolStats,
    PoolTimeout,
    RetryPolicy,
    ServerUnreachable,
    TooManyWaiters,
)

JOIN = 10.0  # seconds: upper bound of every join / wait in this module

# ---------------------------------------------------------------------------
# stand-ins and helpers
# ---------------------------------------------------------------------------


class StandIn:
    """A stand-in Connector: clone/query/close, no socket.

    It records its queries, counts threads inside ``query`` at once (a pool
    bug would show as ``overlaps``) and can be told to fail or block the next
    query.
    """

    def __init__(self, parent: StandIn | None = None) -> None:
        self.parent = parent
        self.clones: list[StandIn] = []
        self.closed = False
        self.close_calls = 0
        self.queries: list[Any] = []
        self.inside = 0
        self.overlaps = 0
        self.fail_next: BaseException | None = None
        self.fail_ping = False
        self.entered: threading.Event | None = None
        self.proceed: threading.Event | None = None
        self._lock = threading.Lock()

    # The template's API -----------------------------------------------------
    def clone(self) -> StandIn:
        c = StandIn(parent=self)
        with self._lock:
            self.clones.append(c)
        return c

    def query(self, q: Any, blobs: Any = None) -> Any:
        with self._lock:
            if self.closed:
                raise AssertionError("query on a closed connector")
            self.inside += 1
            if self.inside > 1:
                self.overlaps += 1
            self.queries.append(q)
        try:
            if self.entered is not None:
                self.entered.set()
            if self.proceed is not None:
                assert self.proceed.wait(JOIN)
            if self.fail_next is not None:
                e, self.fail_next = self.fail_next, None
                raise e
            name = next(iter(q[0])) if isinstance(q, list) and q else "?"
            if name == "GetStatus":
                if self.fail_ping:
                    raise ConnectionResetError("ping failed")
                return [{"GetStatus": {"status": 0, "info": "OK"}}], []
            return [{name: {"status": 0, "returned": 0}}], []
        finally:
            with self._lock:
                self.inside -= 1

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.close_calls += 1


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


class SlottedStandIn:
    """A stand-in that takes no instance attributes: its queries cannot be observed."""

    __slots__ = ("closed", "fail")

    def __init__(self) -> None:
        self.closed = False
        self.fail = False

    def clone(self) -> SlottedStandIn:
        return SlottedStandIn()

    def query(self, q: Any, blobs: Any = None) -> Any:
        return [{"GetStatus": {"status": 0}}], []

    def close(self) -> None:
        self.closed = True


wait_until = functools.partial(_support.wait_until, timeout=JOIN)


class ShiftedClock:
    """time.monotonic() plus an offset that tests advance to make time pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FrozenClock(ShiftedClock):
    """A clock that moves only when a test advances it (real time does not
    count): for margins that a loaded machine's stalls must not eat."""

    def __init__(self) -> None:
        super().__init__()
        self.base = time.monotonic()

    def __call__(self) -> float:
        return self.base + self.offset


def kick(pool: ConnectionPool) -> None:
    """Run a maintenance round now instead of at its scheduled time."""
    pool._bg_wakeup.set()


def discarded(pool: ConnectionPool, reason: str) -> int:
    return pool.stats().discarded.get(reason, 0)


@pytest.fixture
def template() -> StandIn:
    return StandIn()


@pytest.fixture
def make_pool(template: StandIn) -> Any:
    pools: list[ConnectionPool] = []

    def make(tmpl: Any = None, **kw: Any) -> ConnectionPool:
        kw.setdefault("timeout", 5.0)
        p = ConnectionPool(template if tmpl is None else tmpl, **kw)
        pools.append(p)
        if tmpl is None and kw.get("open", True):
            # Start from a ready pool (min_size opens run in the background);
            # tests about failing opens assert on their own.
            try:
                p.wait_ready(2.0)
            except Exception:  # noqa: S110
                pass
        return p

    yield make
    for p in pools:
        p.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ShiftedClock:
    c = ShiftedClock()
    _support.set_pool_clock(monkeypatch, c)
    return c


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    c = FrozenClock()
    _support.set_pool_clock(monkeypatch, c)
    return c


@pytest.fixture
def cpu_clock(frozen_clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The process's CPU time as the pool samples it: it grows at
    ``cores`` x the frozen clock's time (set ``cores`` to change the load)."""
    busy = {"cores": 1.0, "cpu": 0.0, "at": frozen_clock()}

    def process_time() -> float:
        now = frozen_clock()
        busy["cpu"] += (now - busy["at"]) * busy["cores"]
        busy["at"] = now
        return busy["cpu"]

    monkeypatch.setattr(lease_mod, "_process_time", process_time)
    return busy


def start(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def join(t: threading.Thread) -> None:
    t.join(JOIN)
    assert not t.is_alive(), "thread did not finish in time"


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
# leasing and returning
# ---------------------------------------------------------------------------


def test_a_returned_connector_is_reused(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=1, max_size=4)
    with pool.lease() as first:
        first.query([{"GetStatus": {}}])
    for _ in range(20):
        with pool.lease() as conn:
            assert conn is first
    s = pool.stats()
    assert s.leases_granted == 21
    assert s.connectors_opened == 1 and len(template.clones) == 1
    assert s.leased == 0 and s.idle == 1 and sum(s.discarded.values()) == 0


def test_concurrent_leases_get_distinct_connectors_and_grow_to_max(make_pool: Any,
                                                                   template: StandIn) -> None:
    pool = make_pool(min_size=0, max_size=3)
    leases = [pool.acquire() for _ in range(3)]
    conns = [lease.conn for lease in leases]
    assert len({id(c) for c in conns}) == 3
    s = pool.stats()
    assert (s.size, s.leased, s.idle) == (3, 3, 0)
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)
    assert len(template.clones) == 3  # never beyond max_size
    for lease in leases:
        lease.release()
    assert pool.stats().idle == 3


def test_exception_inside_a_query_discards_the_connector(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pytest.raises(RuntimeError, match="boom"):
        with pool.lease() as conn:
            conn.fail_next = RuntimeError("boom")
            conn.query([{"FindEntity": {}}])
    assert conn.closed or wait_until(lambda: conn.closed, what="close")
    assert discarded(pool, "interrupted") == 1
    with pool.lease() as other:
        assert other is not conn
        other.query([{"GetStatus": {}}])


def test_keyboard_interrupt_inside_a_query_discards_the_connector(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pytest.raises(KeyboardInterrupt):
        with pool.lease() as conn:
            conn.fail_next = KeyboardInterrupt()
            conn.query([{"FindEntity": {}}])
    wait_until(lambda: conn.closed, what="close")
    assert discarded(pool, "interrupted") == 1
    with pool.lease() as other:
        assert other is not conn


def test_caller_exception_between_queries_keeps_the_connector(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pytest.raises(ValueError, match="caller"):
        with pool.lease() as conn:
            conn.query([{"FindEntity": {}}])
            raise ValueError("caller code failed")
    with pool.lease() as again:
        assert again is conn
    assert not conn.closed
    s = pool.stats()
    assert dict(s.discarded) == {} and s.connectors_opened == 1


def test_a_failed_query_caught_by_the_caller_still_discards(make_pool: Any) -> None:
    # The stream is what matters, not whether the exception escaped the block.
    pool = make_pool(min_size=1, max_size=1)
    with pool.lease() as conn:
        conn.fail_next = OSError("reset")
        with pytest.raises(OSError):
            conn.query([{"FindEntity": {}}])
    wait_until(lambda: conn.closed, what="close")
    assert discarded(pool, "broken") + discarded(pool, "interrupted") == 1


def test_untrackable_stand_in_is_discarded_on_any_exception(make_pool: Any) -> None:
    pool = make_pool(SlottedStandIn(), min_size=1, max_size=1)
    with pool.lease() as conn:
        conn.query([{"GetStatus": {}}])
    with pool.lease() as again:
        assert again is conn
    with pytest.raises(ValueError):
        with pool.lease() as conn:
            raise ValueError("cannot tell if a query was running")
    wait_until(lambda: conn.closed, what="close")
    assert discarded(pool, "interrupted") == 1


def test_lease_discard_closes_the_connector(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    lease = pool.acquire()
    conn = lease.conn
    lease.discard()
    wait_until(lambda: conn.closed, what="close")
    assert sum(pool.stats().discarded.values()) == 1
    with pool.lease() as other:
        assert other is not conn


def test_acquire_release_pair(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=2)
    lease = pool.acquire()
    assert lease.active
    assert lease.conn.query([{"GetStatus": {}}])[0][0]["GetStatus"]["status"] == 0
    assert pool.stats().leased == 1
    pool.release(lease)
    assert not lease.active and lease.conn is None
    assert pool.stats().leased == 0
    with pytest.raises(LeaseError, match="already released"):
        lease.release()
    with pytest.raises(LeaseError, match="already released"):
        pool.release(lease)
    second = pool.acquire()
    second.release(ValueError("caller error, not a query"))  # kept: nothing in flight
    assert pool.stats().idle >= 1 and dict(pool.stats().discarded) == {}


def test_release_rejects_foreign_leases(make_pool: Any) -> None:
    a = make_pool(min_size=1, max_size=1, name="a")
    b = make_pool(min_size=1, max_size=1, name="b")
    lease = a.acquire()
    with pytest.raises(LeaseError, match="'b'"):
        b.release(lease)
    with pytest.raises(LeaseError):
        b.release("not a lease")  # type: ignore[arg-type]
    a.release(lease)


def test_a_lease_object_cannot_be_entered_twice(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=2)
    lease = pool.lease()
    with lease:
        with pytest.raises(LeaseError, match="already acquired"):
            lease.__enter__()
    assert pool.stats().leased == 0


def test_dropped_acquire_lease_is_reclaimed_with_resource_warning(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    lease = pool.acquire()
    conn = lease.conn
    with pytest.warns(ResourceWarning, match="without release"):
        del lease
        gc.collect()
        pool.stats()  # reclaims a lease nothing refers to any more
    wait_until(lambda: conn.closed, what="reclaimed connector closed")
    s = pool.stats()
    assert s.discarded.get("reclaimed") == 1 and s.leased == 0
    with pool.lease(timeout=JOIN) as other:  # the pool refilled
        assert other is not conn


def test_with_block_lease_is_not_a_manual_lease(make_pool: Any, recwarn: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    for _ in range(3):
        with pool.lease():
            pass
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


# ---------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------


def test_pool_timeout_message_and_type(make_pool: Any) -> None:
    pool = make_pool(min_size=2, max_size=2, name="orders-db")
    held = [pool.acquire(), pool.acquire()]
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.05)
    e = info.value
    assert isinstance(e, TimeoutError) and isinstance(e, PoolError)
    msg = str(e)
    for part in ("'orders-db'", "0.05 s", "size 2/2", "leased 2", "idle 0", "waiting 0"):
        assert part in msg, f"{part!r} not in {msg!r}"
    s = pool.stats()
    assert s.timeouts == 1 and s.waiting == 0
    for lease in held:
        lease.release()


def test_pool_timeout_names_the_leases_the_calling_thread_holds(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, name="nested")
    with pool.lease() as conn:
        assert conn is not None
        with pytest.raises(PoolTimeout, match="calling thread itself holds 1 of them"):
            with pool.lease(timeout=0.02):
                pass
        with pytest.raises(PoolTimeout, match="calling thread itself holds 1"):
            pool.query([{"GetStatus": {}}], retry=RetryPolicy(deadline=0.05))
    # Held by another thread: no such hint, the usual advice instead.
    t, box = start(lambda: pool.acquire(timeout=JOIN))
    join(t)
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.02)
    assert "calling thread" not in str(info.value) and "raise max_size" in str(info.value)
    box["result"].release()


def test_pool_timeout_message_counts_other_waiters(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, name="p")
    held = pool.acquire()
    t, box = start(lambda: pool.acquire(timeout=JOIN))
    wait_until(lambda: pool.stats().waiting == 1, what="a waiter")
    with pytest.raises(PoolTimeout, match="waiting 1"):
        pool.acquire(timeout=0.02)
    held.release()
    join(t)
    box["result"].release()


def test_too_many_waiters(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, max_waiting=1, name="tiny")
    held = pool.acquire()
    t, box = start(lambda: pool.acquire(timeout=JOIN))
    wait_until(lambda: pool.stats().waiting == 1, what="a waiter")
    t0 = time.monotonic()
    with pytest.raises(TooManyWaiters) as info:
        pool.acquire(timeout=JOIN)
    assert time.monotonic() - t0 < JOIN / 2  # at once, not at the deadline
    assert not isinstance(info.value, PoolTimeout)
    assert "'tiny'" in str(info.value) and "max_waiting=1" in str(info.value)
    assert pool.stats().rejected_waiters == 1
    held.release()
    join(t)
    assert "error" not in box
    box["result"].release()


def test_max_waiting_zero_never_waits(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, max_waiting=0)
    with pool.lease():
        with pytest.raises(TooManyWaiters):
            pool.acquire(timeout=JOIN)
    with pool.lease():  # idle connector: no waiting needed
        pass


def test_a_waiter_is_served_by_a_returned_connector(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.acquire()
    conn = held.conn
    t, box = start(lambda: pool.acquire(timeout=JOIN))
    wait_until(lambda: pool.stats().waiting == 1, what="a waiter")
    held.release()
    join(t)
    lease = box["result"]
    assert lease.conn is conn
    s = pool.stats()
    assert s.leases_waited == 1 and s.wait_time_max > 0 and s.waiting == 0
    lease.release()


def test_waiters_are_served_first_come_first_served(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.acquire()
    order: list[int] = []
    threads = []
    for i in range(6):
        def work(i: int = i) -> None:
            with pool.lease(timeout=JOIN) as conn:
                order.append(i)
                conn.query([{"GetStatus": {}}])
        t, _ = start(work)
        threads.append(t)
        wait_until(lambda i=i: pool.stats().waiting == i + 1, what=f"waiter {i}")
    held.release()
    for t in threads:
        join(t)
    assert order == list(range(6))
    assert pool.stats().size == 1


def test_many_threads_never_share_a_connector(make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=4, check_ownership=True)
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait(JOIN)
            for _ in range(200):
                with pool.lease(timeout=JOIN) as conn:
                    conn.query([{"GetStatus": {}}])
        except BaseException as e:  # noqa: B036
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        join(t)
    assert errors == []
    assert sum(c.overlaps for c in template.clones) == 0
    s = pool.stats()
    assert s.leases_granted == 16 * 200
    assert 2 <= s.size <= 4 and s.leased == 0 and s.waiting == 0
    assert s.connectors_opened - sum(s.discarded.values()) == s.size


# ---------------------------------------------------------------------------
# ownership check
# ---------------------------------------------------------------------------


def test_ownership_check_rejects_other_threads_and_use_after_release(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, check_ownership=True)
    with pool.lease() as conn:
        conn.query([{"GetStatus": {}}])
        t, box = start(lambda: conn.query([{"GetStatus": {}}]))
        join(t)
        assert isinstance(box.get("error"), LeaseError)
        assert "thread" in str(box["error"])
    with pytest.raises(LeaseError, match="not leased"):
        conn.query([{"GetStatus": {}}])


def test_ownership_check_is_off_by_default(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pool.lease() as conn:
        pass
    conn.query([{"GetStatus": {}}])  # misuse, but not checked when off


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
    import sys

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
# time: lifetime, idle, keepalive, leaks
# ---------------------------------------------------------------------------


def test_max_lifetime_replaces_old_connectors(make_pool: Any, clock: ShiftedClock) -> None:
    pool = make_pool(min_size=1, max_size=2, max_lifetime=100.0, keepalive_interval=None)
    with pool.lease() as first:
        pass
    clock.advance(101.0)
    # Expired: never handed out, whether caught at checkout or by maintenance.
    with pool.lease() as second:
        assert second is not first
    wait_until(lambda: first.closed, what="expired connector closed")
    assert pool.stats().discarded.get("expired") == 1
    # A lease that outlives the connector's lifetime closes it on return.
    lease = pool.acquire()
    conn = lease.conn
    clock.advance(101.0)
    lease.release()
    wait_until(lambda: conn.closed, what="expired on return")
    assert pool.stats().discarded.get("expired") == 2


def test_lifetime_has_jitter(make_pool: Any) -> None:
    pool = make_pool(min_size=8, max_size=8, max_lifetime=1000.0)
    pool.wait_ready(JOIN)
    with pool._lock:
        lifetimes = [s.expires - s.created for s in pool._idle]
    assert len(lifetimes) == 8
    assert all(950.0 <= x <= 1000.0 for x in lifetimes)
    assert len(set(lifetimes)) > 1


def test_max_idle_shrinks_to_min_size(make_pool: Any, clock: ShiftedClock) -> None:
    pool = make_pool(min_size=1, max_size=4, max_idle=60.0, keepalive_interval=None)
    leases = [pool.acquire() for _ in range(4)]
    for lease in leases:
        lease.release()
    assert pool.stats().size == 4
    clock.advance(30.0)
    kick(pool)
    with pool.lease():  # maintenance ran or not, nothing is old enough
        pass
    assert pool.stats().size == 4
    clock.advance(61.0)
    kick(pool)
    wait_until(lambda: pool.stats().size == 1, what="shrink to min_size")
    assert pool.stats().discarded.get("idle") == 3


def test_keepalive_pings_idle_connectors(make_pool: Any, clock: ShiftedClock,
                                         template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=2, keepalive_interval=30.0, max_idle=None)
    pool.wait_ready(JOIN)
    clock.advance(31.0)
    kick(pool)
    wait_until(lambda: pool.stats().keepalive_pings >= 2, what="two pings")
    for c in template.clones:
        wait_until(lambda c=c: c.queries == [[{"GetStatus": {}}]], what="ping query")
    wait_until(lambda: pool.stats().idle == 2, what="pinged connectors back in the pool")
    # A failing ping discards the connector; the pool refills.
    template.clones[0].fail_ping = True
    clock.advance(31.0)
    kick(pool)
    wait_until(lambda: pool.stats().discarded.get("failed_ping", 0) == 1, what="failed ping")
    wait_until(lambda: template.clones[0].closed, what="close")
    wait_until(lambda: pool.stats().size == 2, what="refill")


def test_keepalive_cadence_holds_when_every_idle_connector_is_due_together(
        make_pool: Any, template: StandIn) -> None:
    # Connectors opened together are due together; after a round that pings
    # all of them, the next round must come one interval later, not at the
    # maintenance loop's default pace (1 s).
    pool = make_pool(min_size=2, max_size=2, keepalive_interval=0.1, max_idle=None)
    pool.wait_ready(JOIN)

    def pings(c: StandIn) -> int:
        return sum(1 for q in list(c.queries) if q == [{"GetStatus": {}}])

    wait_until(lambda: all(pings(c) >= 6 for c in template.clones), timeout=4.0,
               what="six pings each (at 1 s per round this takes 6 s)")


def test_recently_used_connectors_are_not_pinged(make_pool: Any, clock: ShiftedClock) -> None:
    pool = make_pool(min_size=1, max_size=1, keepalive_interval=30.0, max_idle=None)
    for _ in range(5):
        clock.advance(20.0)
        with pool.lease() as conn:
            conn.query([{"FindEntity": {}}])
        kick(pool)
    with pool.lease() as conn:
        assert all(q == [{"FindEntity": {}}] for q in conn.queries)
    assert pool.stats().keepalive_pings == 0


def test_leak_warning_names_the_borrowing_line(make_pool: Any,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aperturedb_pool")
    pool = make_pool(min_size=1, max_size=1, leak_threshold=0.05)
    lease = pool.acquire()  # LEAK-LINE-UNIT
    wait_until(lambda: pool.stats().leaks_reported == 1, what="leak report")
    records = [r for r in caplog.records if "leased for" in r.getMessage()]
    assert len(records) == 1
    text = records[0].getMessage()
    assert __file__ in text and "test_leak_warning_names_the_borrowing_line" in text
    assert "LEAK-LINE-UNIT" in text
    lease.release()
    assert any("came back" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# refill backoff and the unreachable server
# ---------------------------------------------------------------------------


class Flaky(StandIn):
    """clone() fails while ``down`` is set (as a refused connection would)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.attempts = 0

    def clone(self) -> StandIn:
        self.attempts += 1
        if self.down.is_set():
            raise ConnectFailed("could not connect to db:55555: ConnectionRefusedError()")
        return super().clone()


def test_unreachable_server_timeout_then_recovery(make_pool: Any) -> None:
    flaky = Flaky()
    flaky.down.set()
    pool = make_pool(flaky, min_size=1, max_size=2, reconnect_initial=0.01,
                     reconnect_max=0.05, name="down")
    with pytest.raises(PoolTimeout) as info:
        pool.acquire(timeout=0.2)
    msg = str(info.value)
    assert "unreachable" in msg and "refused" in msg.lower()
    s = pool.stats()
    assert s.refill_failures >= 2 and s.size == 0
    # Backoff: far fewer attempts than a busy loop would make.
    assert flaky.attempts < 40
    flaky.down.clear()
    pool.wait_ready(timeout=JOIN)
    with pool.lease(timeout=JOIN) as conn:
        conn.query([{"GetStatus": {}}])
    held = [pool.acquire(timeout=JOIN), pool.acquire(timeout=JOIN)]
    with pytest.raises(PoolTimeout) as info2:
        pool.acquire(timeout=0.01)
    for lease in held:
        lease.release()
    assert "unreachable" not in str(info2.value)


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


# ---------------------------------------------------------------------------
# the lock-free fast paths (see "Locking" in aperturedb_pool/pool.py)
# ---------------------------------------------------------------------------


@pytest.fixture
def preempt_often() -> Any:
    """Switch threads as often as the interpreter allows, so that the fast
    paths are interrupted between their steps (pop, checks, append, the
    second look for waiters) far more often than in normal runs."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(JOIN)
            work(i)
        except BaseException as e:  # noqa: B036 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        join(t)
    return errors


def test_fast_paths_with_background_churn_never_share_and_count_exactly(
        make_pool: Any, template: StandIn, preempt_often: Any) -> None:
    # Plain pool (fast paths on), more threads than connectors (waiters come
    # and go, so fast and locked paths interleave), and a maintenance thread
    # that keeps removing idle connectors to ping, expire and shrink them.
    pool = make_pool(min_size=1, max_size=3, keepalive_interval=0.002, max_lifetime=0.05,
                     max_idle=0.01, timeout=JOIN)
    assert pool._fast
    per_thread = 300

    def work(i: int) -> None:
        for _ in range(per_thread):
            with pool.lease() as conn:
                conn.query([{"FindEntity": {}}])

    assert _run_threads(12, work) == []
    assert sum(c.overlaps for c in template.clones) == 0, "a connector was used by two threads"
    s = pool.stats()
    assert s.leases_granted == 12 * per_thread
    assert s.leased == 0 and s.waiting == 0 and s.idle <= s.size <= 3
    assert s.connectors_opened == s.size + sum(s.discarded.values())
    # Every connector the pool dropped gets closed; none it kept is.
    live = [c for c in template.clones if not c.closed]
    wait_until(lambda: len([c for c in template.clones if not c.closed]) == pool.stats().size,
               what="dropped connectors closed")
    assert len(live) >= pool.stats().size


class _HookedDeque(deque):  # type: ignore[type-arg]
    """A deque that runs a hook once, just before an append, a pop or a
    remove: to force one interleaving of the pool's lock-free paths with
    another thread's work."""

    before_append: Callable[[], None] | None = None
    before_pop: Callable[[], None] | None = None
    before_remove: Callable[[], None] | None = None

    def _run(self, name: str) -> None:
        hook = getattr(self, name)
        setattr(self, name, None)
        if hook is not None:
            hook()

    def append(self, x: Any) -> None:
        self._run("before_append")
        super().append(x)

    def pop(self) -> Any:  # type: ignore[override]
        self._run("before_pop")
        return super().pop()

    def remove(self, x: Any) -> None:
        self._run("before_remove")
        super().remove(x)


def test_a_waiter_that_arrives_during_a_fast_return_is_handed_the_connector(
        make_pool: Any) -> None:
    # The interleaving: the returning thread saw no waiter; a caller then
    # queues (and finds nothing idle) before the returning thread appends.
    # The second look of the return must hand the connector over at once,
    # not leave it idle until the waiter's timed wake-up.
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    box: dict[str, Any] = {}
    queued = threading.Event()

    def waiter() -> None:
        with pool.lease() as c:
            box["conn"] = c

    def start_waiter() -> None:
        t = threading.Thread(target=waiter, daemon=True)
        box["thread"] = t
        t.start()
        wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
        queued.set()

    conn = _return_racing(pool, start_waiter)
    assert queued.is_set()
    # Handed over by the return itself: nothing idle, nobody waiting, even
    # before the waiter thread has run again.
    s = pool.stats()
    assert (s.idle, s.waiting) == (0, 0)
    join(box["thread"])
    assert box["conn"] is conn


def test_a_connector_returned_while_a_caller_queues_is_found_by_its_second_look(
        make_pool: Any) -> None:
    # The other interleaving: the caller found nothing idle, and the fast
    # return (which saw no waiter yet) lands before the caller is queued.
    # The caller's second look, after queuing, must take the connector
    # instead of sleeping until its timed wake-up.
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    held = pool.lease()
    conn = held.__enter__()
    pool._waiters = _HookedDeque(pool._waiters)
    pool._waiters.before_append = lambda: held.__exit__(None, None, None)
    with pool.lease() as got:
        assert got is conn
    s = pool.stats()
    assert s.leases_waited == 0, "the caller slept although the connector was idle"
    assert (s.waiting, s.leases_granted) == (0, 2)


def _return_racing(pool: ConnectionPool, action: Callable[[], Any]) -> Any:
    """Lease a connector and return it on the fast path, with ``action``
    running between the return's checks and its append to _idle."""
    lease = pool.lease()
    conn = lease.__enter__()
    pool._idle = _HookedDeque(pool._idle)
    pool._idle.before_append = action
    lease.__exit__(None, None, None)
    return conn


def test_a_fast_return_that_lands_after_retire_all_is_not_reused(
        make_pool: Any, template: StandIn) -> None:
    # The return passed its generation check, then retire_all() ran (and
    # drained _idle) before the append: the stale slot sits in _idle, and the
    # checkout's own check must turn it away.
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    old = _return_racing(pool, pool.retire_all)
    with pool.lease() as conn:
        assert conn is not old
    wait_until(lambda: old.closed, what="the retired connector closed")
    assert pool.stats().discarded.get("retired") == 1


def test_a_fast_return_that_lands_after_close_closes_its_connector(
        make_pool: Any, template: StandIn) -> None:
    pool = make_pool(min_size=2, max_size=2, timeout=JOIN)
    conn = _return_racing(pool, pool.close)
    assert conn.closed, "closed by the return itself, after close() had drained the pool"
    s = pool.stats()
    assert (s.size, s.idle) == (0, 0)
    with pytest.raises(PoolClosed):
        with pool.lease():
            pass


@pytest.mark.parametrize("threads", [4, 8])
def test_close_racing_fast_paths_closes_every_connector(
        make_pool: Any, template: StandIn, preempt_often: Any, threads: int) -> None:
    # With as many threads as connectors nobody waits, and every return
    # takes the fast path; with more, returns and checkouts mix both paths.
    pool = make_pool(min_size=4, max_size=4, timeout=JOIN)
    pool.wait_ready(JOIN)
    started = threading.Semaphore(0)
    closed_at: list[float] = []
    after_close: list[float] = []  # leases granted that were asked for after close()

    def work(i: int) -> None:
        n = 0
        while True:
            asked = time.monotonic()
            try:
                with pool.lease() as conn:
                    conn.query([{"GetStatus": {}}])  # raises if closed under us
                    if closed_at and asked > closed_at[0]:
                        after_close.append(asked)
            except PoolClosed:
                return
            n += 1
            if n == 50:
                started.release()

    def closer() -> None:
        for _ in range(threads):
            assert started.acquire(timeout=JOIN)
        pool.close()
        closed_at.append(time.monotonic())

    t, box = start(closer)
    errors = _run_threads(threads, work)
    join(t)
    assert "error" not in box
    assert errors == []
    assert after_close == [], "a lease asked for after close() returned was granted"
    s = pool.stats()
    assert (s.size, s.idle, s.leased) == (0, 0, 0)
    wait_until(lambda: all(c.closed for c in template.clones), what="every connector closed")
    assert sum(c.overlaps for c in template.clones) == 0


def test_retire_all_racing_fast_paths_never_hands_out_a_retired_connector(
        make_pool: Any, template: StandIn, preempt_often: Any) -> None:
    pool = make_pool(min_size=3, max_size=3, timeout=JOIN)
    pool.wait_ready(JOIN)
    retired_at: list[float] = []
    old: list[StandIn] = []
    late: list[tuple[float, StandIn]] = []  # (asked at, got) for leases asked after the retire
    stop = threading.Event()
    go = threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            asked = time.monotonic()
            with pool.lease() as conn:
                conn.query([{"GetStatus": {}}])
                if retired_at and asked > retired_at[0]:
                    late.append((asked, conn))
            go.set()

    def retire() -> None:
        assert go.wait(JOIN)
        old.extend(template.clones)
        assert pool.retire_all() >= 3
        retired_at.append(time.monotonic())
        wait_until(lambda: len(late) >= 200, what="leases after the retire")
        stop.set()

    t, box = start(retire)
    errors = _run_threads(6, work)
    join(t)
    assert errors == [] and "error" not in box
    stale = [c for _, c in late if c in old]
    assert stale == [], "a connector retired before the lease was asked for was handed out"
    wait_until(lambda: all(c.closed for c in old), what="retired connectors closed")


def _looping_lease(pool: ConnectionPool, timeout: float | None = None) -> tuple[Any, Any]:
    """Enter a lease as a thread in a loop does: asked right after returning
    the previous one (a return through release() records when this thread
    returned; the no-waiter fast return skips that, as nobody waits)."""
    first = pool.acquire()
    conn = first.conn
    first.release()
    lease = pool.lease(timeout)
    assert lease.__enter__() is conn
    return lease, conn


def test_a_looping_thread_keeps_its_connector_until_a_waiter_is_overdue(
        make_pool: Any, clock: ShiftedClock) -> None:
    # fairness_threshold 1 s: the waiter below is not overdue (at 0.6 s)
    # until the clock is advanced past it.
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=1.0, timeout=JOIN)
    lease, conn = _looping_lease(pool)
    box: dict[str, Any] = {}
    done = threading.Event()

    def waiter() -> None:
        with pool.lease() as c:
            box["conn"] = c
            assert done.wait(JOIN)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
    for _ in range(5):
        # Barging on the lock-free paths: returned and re-taken, no hand-off.
        lease.__exit__(None, None, None)
        lease = pool.lease()
        assert lease.__enter__() is conn
    assert pool.stats().waiting == 1 and "conn" not in box
    clock.advance(2.0)  # the waiter is now overdue: the next return hands over
    lease.__exit__(None, None, None)
    s = pool.stats()
    assert (s.idle, s.waiting, s.leased) == (0, 0, 1), "not handed to the overdue waiter"
    done.set()
    join(t)
    assert box["conn"] is conn
    s = pool.stats()
    assert (s.waiting, s.leases_waited, s.leases_granted) == (0, 1, 8)


def test_a_return_that_is_not_part_of_a_loop_hands_over_at_once(
        make_pool: Any, clock: ShiftedClock) -> None:
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=1.0, timeout=JOIN)
    with pool.lease():
        pass
    clock.advance(0.5)  # a request handler: its next lease is not right after the last
    lease = pool.lease()
    conn = lease.__enter__()
    box: dict[str, Any] = {}

    def waiter() -> None:
        with pool.lease() as c:
            box["conn"] = c

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
    lease.__exit__(None, None, None)  # the waiter is not overdue, yet is served now
    join(t)
    assert box["conn"] is conn


# ---------------------------------------------------------------------------
# interrupted waits, opens racing close(), maintenance racing the fast paths
# ---------------------------------------------------------------------------


def _stop_background(pool: ConnectionPool) -> None:
    """End the maintenance thread so that the test alone runs _maintain."""
    old = pool._bg_wakeup
    pool._bg_wakeup = threading.Event()
    old.set()
    t = pool._bg_thread
    assert t is not None
    t.join(JOIN)
    assert not t.is_alive()


def test_a_waiter_interrupted_by_ctrl_c_leaves_nothing_behind(make_pool: Any) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("interrupt_main needs the test in the main thread")
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    held = pool.lease()
    conn = held.__enter__()

    def interrupt_when_queued() -> None:
        wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
        _thread.interrupt_main()  # what Ctrl-C does

    t, _ = start(interrupt_when_queued)
    with pytest.raises(KeyboardInterrupt):
        with pool.lease():
            pass
    join(t)
    assert pool.stats().waiting == 0, "the interrupted caller is still queued"
    held.__exit__(None, None, None)  # must not go to the interrupted caller
    s = pool.stats()
    assert (s.size, s.idle, s.leased) == (1, 1, 0)
    with pool.lease(timeout=1.0) as again:
        assert again is conn


def test_a_connector_opened_while_close_runs_is_closed() -> None:
    gate = threading.Event()
    made: list[StandIn] = []

    def slow_factory() -> StandIn:
        assert gate.wait(JOIN)  # a connect still running when close() returns
        c = StandIn()
        made.append(c)
        return c

    pool = ConnectionPool(connector_factory=slow_factory, min_size=1, max_size=1,
                          timeout=JOIN)
    try:
        wait_until(lambda: pool._opens_running == 1, what="the opener to start")
        pool.close()
    finally:
        gate.set()
    wait_until(lambda: made and made[0].closed, what="the late connector closed")
    assert pool.stats().size == 0


def test_maintenance_decides_again_after_taking_a_slot(make_pool: Any) -> None:
    # _maintain decides on a copy of _idle; a checkout and return of the same
    # slot can run between that decision and its remove().  The connector was
    # just used: it must not be closed as idle.
    pool = make_pool(min_size=0, max_size=1, max_idle=600.0, max_lifetime=None,
                     keepalive_interval=None)
    with pool.lease() as conn:
        pass
    _stop_background(pool)
    slot = pool._idle[0]
    slot.returned -= 1000.0  # idle for 1000 s: due to be closed (max_idle)

    def use_it_now() -> None:
        with pool.lease() as c:
            c.query([{"FindEntity": {}}])

    pool._idle = _HookedDeque(pool._idle)
    pool._idle.before_remove = use_it_now
    pool._maintain(time.monotonic())
    s = pool.stats()
    assert dict(s.discarded) == {} and (s.size, s.idle) == (1, 1)
    assert not conn.closed


def test_a_fast_checkout_racing_close_gets_pool_closed(make_pool: Any) -> None:
    # The checkout saw an idle connector and read the pool as open; close()
    # then ran to the end (closing that idle one), and a return that had also
    # read it as open appended its slot: the checkout pops that slot and must
    # still refuse it.
    pool = make_pool(min_size=2, max_size=2)
    held = pool.lease()
    conn = held.__enter__()
    assert pool.stats().idle == 1

    def close_then_return() -> None:
        pool.close()
        slot = held._slot
        held._slot = pool_mod._RELEASED  # the first half of a fast return
        slot.returned = time.monotonic()
        deque.append(pool._idle, slot)

    pool._idle = _HookedDeque(pool._idle)
    pool._idle.before_pop = close_then_return
    with pytest.raises(PoolClosed):
        with pool.lease():
            pass
    assert pool._idle.before_pop is None, "the checkout did not pop"
    assert conn.closed
    assert pool.stats().size == 0


def test_a_lease_taken_before_a_fork_is_closed_when_returned_in_the_child(
        make_pool: Any, template: StandIn) -> None:
    # What the child's at-fork hook does, run in place: the pool forgets the
    # parent's connectors.  One of them, leased across the fork, comes back:
    # it is closed (the child's copy), never pooled.
    pool = make_pool(min_size=2, max_size=2)
    held = pool.lease()
    conn = held.__enter__()
    pool._after_fork_in_child()
    held.__exit__(None, None, None)
    assert conn.closed
    with pool.lease() as fresh:
        assert fresh is not conn and fresh not in template.clones[:2]


def test_hand_offs_start_at_sixty_percent_of_the_fairness_threshold(
        make_pool: Any, clock: ShiftedClock) -> None:
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=1.0, timeout=JOIN)
    lease, conn = _looping_lease(pool)
    done = threading.Event()

    def waiter() -> None:
        with pool.lease():
            assert done.wait(JOIN)

    t, box = start(waiter)
    wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
    clock.advance(0.5)  # waited 50% of the threshold: the loop keeps its connector
    lease.__exit__(None, None, None)
    lease = pool.lease()
    assert lease.__enter__() is conn
    assert pool.stats().waiting == 1
    clock.advance(0.2)  # 70%: overdue, the next return hands over
    lease.__exit__(None, None, None)
    s = pool.stats()
    assert (s.waiting, s.leased, s.idle) == (0, 1, 0)
    done.set()
    join(t)
    assert "error" not in box


def test_a_caller_interrupted_right_after_queuing_leaves_no_waiter(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    held = pool.lease()
    conn = held.__enter__()
    real_grow = pool._maybe_grow

    def interrupted() -> None:  # Ctrl-C landing just after the caller queued
        pool._maybe_grow = real_grow
        raise KeyboardInterrupt

    pool._maybe_grow = interrupted
    with pytest.raises(KeyboardInterrupt):
        with pool.lease():
            pass
    assert pool.stats().waiting == 0
    held.__exit__(None, None, None)
    with pool.lease(timeout=1.0) as again:
        assert again is conn


def test_dropping_a_stale_connector_for_a_waiter_starts_the_refill(make_pool: Any) -> None:
    # A return appended a connector retired meanwhile; handing idle
    # connectors to the waiter drops it instead, and the refill that replaces
    # it must start now, not at the next maintenance round.
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    held = pool.lease()
    held.__enter__()
    _stop_background(pool)
    t, box = start(lambda: pool.lease().__enter__())
    wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
    pool.retire_all()
    pool._bg_wakeup = threading.Event()  # the stopped thread's, cleared
    slot = held._slot
    held._slot = pool_mod._RELEASED
    deque.append(pool._idle, slot)  # the fast return's append, after the retire
    pool._settle()
    assert pool.stats().discarded.get("retired") == 1
    assert pool._bg_wakeup.is_set(), "the refill was not started"
    pool.close()
    join(t)
    assert isinstance(box.get("error"), PoolClosed)


# ---------------------------------------------------------------------------
# fairness under CPU-bound load
# ---------------------------------------------------------------------------


def _queue_waiter(pool: ConnectionPool, since: float) -> Any:
    """A waiter queued by hand (no thread): whether a return hands it the
    connector or keeps it idle shows in ``waiter._slot``, and nothing sleeps."""
    waiter = pool_mod._Waiter(since)
    with pool._lock:
        pool._waiters.append(waiter)
        pool._queue_changed()
    return waiter


def test_a_cpu_bound_process_stretches_the_hand_off_threshold(
        make_pool: Any, frozen_clock: FrozenClock, cpu_clock: dict[str, float]) -> None:
    clock = frozen_clock
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)  # thresholds 10 ms and 100 ms
    assert (pool.stats().cpu_bound, pool.stats().handoff_after) == (False, pytest.approx(0.006))
    with pool._lock:
        pool._sample_cpu(clock())  # the first sample only marks the start
    clock.advance(0.2)
    lease, conn = _looping_lease(pool, timeout=0.0)
    waiter = _queue_waiter(pool, clock())
    with pool._lock:
        pool._sample_cpu(clock())  # 1.0 core over 0.2 s: CPU-bound
    s = pool.stats()
    assert (s.cpu_bound, s.handoff_after) == (True, pytest.approx(0.06))
    clock.advance(0.03)  # overdue at 10 ms, not at 100 ms: the loop keeps its connector
    lease.__exit__(None, None, None)
    assert waiter._slot is None
    lease = pool.lease(timeout=0)
    assert lease.__enter__() is conn
    clock.advance(0.04)  # 70 ms: overdue at 100 ms too, the next return hands over
    lease.__exit__(None, None, None)
    assert waiter._slot is not None and waiter._slot.conn is conn
    pool._abandon_wait(waiter)  # the connector goes back
    with pool.lease(timeout=0) as again:
        assert again is conn


def test_the_overdue_point_follows_a_change_of_threshold_while_callers_wait(
        make_pool: Any, frozen_clock: FrozenClock) -> None:
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    waiter = _queue_waiter(pool, frozen_clock())
    # (No assert under the pool's lock: a failing one would repr the pool,
    # which takes the lock.)
    seen = [pool._overdue_at]
    for bound in (True, False):
        with pool._lock:
            pool._set_cpu_bound(bound)
        seen.append(pool._overdue_at)
    assert seen == pytest.approx([waiter.since + 0.006, waiter.since + 0.06,
                                  waiter.since + 0.006])
    pool._abandon_wait(waiter)
    assert pool._overdue_at == math.inf


def test_a_long_cpu_bound_threshold_keeps_its_verdict_between_rare_hand_offs(
        make_pool: Any, frozen_clock: FrozenClock, cpu_clock: dict[str, float]) -> None:
    # With a 2 s threshold, hand-offs (where samples are taken) can be 1.5 s
    # apart while callers still wait: that is not a quiet spell.
    pool = make_pool(min_size=1, max_size=1, cpu_bound_fairness_threshold=2.0)

    def sample_after(gap: float) -> bool:
        frozen_clock.advance(gap)
        with pool._lock:
            pool._sample_cpu(frozen_clock())
        return pool._cpu_bound

    sample_after(0.0)
    assert sample_after(0.2)
    assert sample_after(1.5), "a 1.5 s gap under a 2 s threshold was taken for a quiet spell"
    assert not sample_after(4.5)  # longer than twice the threshold: contention stopped


def test_cpu_bound_detection_has_hysteresis_and_forgets_quiet_spells(
        make_pool: Any, frozen_clock: FrozenClock, cpu_clock: dict[str, float]) -> None:
    clock = frozen_clock
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=0.02,
                     cpu_bound_fairness_threshold=0.5)

    def sample(cores: float, span: float = 0.1) -> tuple[bool, float]:
        cpu_clock["cores"] = cores
        clock.advance(span)
        with pool._lock:
            pool._sample_cpu(clock())
        s = pool.stats()
        return s.cpu_bound, round(s.handoff_after, 6)

    with pool._lock:
        pool._sample_cpu(clock())
    assert sample(0.8) == (False, 0.012)  # below 0.85 cores: not CPU-bound
    assert sample(0.95) == (True, 0.3)
    assert sample(0.7) == (True, 0.3)  # stays until it drops below 0.65
    assert sample(0.6) == (False, 0.012)
    assert sample(1.0) == (True, 0.3)
    # Counted: the two windows that ran at the longer threshold.
    assert pool.stats().cpu_bound_seconds == pytest.approx(0.2)
    # Contention came back after 5 s without hand-offs: that window says
    # nothing about now, and the pool starts over fair.
    assert sample(1.0, span=5.0) == (False, 0.012)
    assert sample(1.0) == (True, 0.3)
    # No sample for longer than the window allows (contention stopped): the
    # verdict lapses.
    clock.advance(pool._fair.window_max + 0.1)
    s = pool.stats()
    assert (s.cpu_bound, round(s.handoff_after, 6)) == (False, 0.012)
    assert s.cpu_bound_seconds == pytest.approx(0.2)
    assert pool.stats(reset=True).cpu_bound_seconds > 0
    assert pool.stats().cpu_bound_seconds == 0


@pytest.mark.parametrize("options", [{"cpu_bound_fairness_threshold": None},
                                     {"fairness_threshold": 0.0},
                                     {"fairness_threshold": 0.5,
                                      "cpu_bound_fairness_threshold": 0.1}])
def test_cpu_bound_stretch_can_be_turned_off(
        make_pool: Any, clock: ShiftedClock, monkeypatch: pytest.MonkeyPatch,
        options: dict[str, Any]) -> None:
    # None turns it off, strict first come first served (0) is kept under
    # load too, and a value below fairness_threshold never shortens it.
    monkeypatch.setattr(lease_mod, "_process_time", clock)  # always 1 core busy
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN, **options)
    before = pool.stats().handoff_after
    for _ in range(3):
        clock.advance(0.2)
        held = pool.acquire()
        t, box = start(lambda: pool.acquire().release())
        wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
        held.release()  # not a loop (the clock moved): a hand-off
        join(t)
        assert "error" not in box
    s = pool.stats()
    assert s.leases_waited == 3
    assert (s.cpu_bound, s.handoff_after) == (False, before)


@pytest.mark.parametrize("name", ["cpu_bound_fairness_threshold", "fairness_threshold"])
@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), ("0.1", TypeError),
                                         (True, TypeError)])
def test_bad_fairness_thresholds_are_named(make_pool: Any, name: str, value: Any,
                                           error: type) -> None:
    with pytest.raises(error, match=name):
        make_pool(**{name: value})


def test_a_caller_queuing_after_a_quiet_spell_gets_the_normal_threshold(
        make_pool: Any, frozen_clock: FrozenClock, cpu_clock: dict[str, float]) -> None:
    clock = frozen_clock  # 1 core busy throughout (cpu_clock)
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    with pool._lock:
        pool._sample_cpu(clock())
        clock.advance(0.2)
        pool._sample_cpu(clock())
    assert pool._cpu_bound
    clock.advance(1.5)  # no hand-off since: contention stopped
    lease, conn = _looping_lease(pool, timeout=0.0)
    # A real caller queues (the lapse is applied when it joins an empty queue).
    t, box = start(lambda: pool.lease(timeout=JOIN).__enter__())
    wait_until(lambda: pool._waiters, what="the caller to queue")
    assert not pool._cpu_bound and pool._handoff_after == pytest.approx(0.006)
    clock.advance(0.008)  # overdue at 10 ms (not at 100 ms): the next return hands over
    lease.__exit__(None, None, None)
    s = pool.stats()
    assert (s.waiting, s.leased, s.idle) == (0, 1, 0), "not handed to the overdue waiter"
    join(t)
    assert box["result"] is conn


def test_a_hand_off_the_waiter_abandons_is_not_counted_as_a_lease_that_waited(
        make_pool: Any) -> None:
    # The waiter is interrupted after a connector was handed to it but before
    # it took it: the connector goes back, and the statistics count no lease.
    pool = make_pool(min_size=1, max_size=1, timeout=JOIN)
    held = pool.acquire()
    conn = held.conn
    waiter = pool_mod._Waiter(pool_mod._monotonic() - 0.25)
    with pool._lock:
        pool._waiters.append(waiter)
        pool._queue_changed()
    held.release()  # not a loop: handed over to the waiter
    assert waiter._slot is not None and waiter._slot.conn is conn
    s = pool.stats()
    assert (s.leases_waited, s.waiting) == (1, 0) and s.wait_time_total >= 0.25
    pool._abandon_wait(waiter)  # what an interrupted waiter does
    s = pool.stats()
    assert (s.leases_waited, s.wait_time_total, s.idle, s.leased) == (0, 0.0, 1, 0)
    assert s.leases_granted == 1
    with pool.lease(timeout=1.0) as again:
        assert again is conn


def test_a_change_of_the_cpu_bound_verdict_is_logged_outside_the_lock(
        make_pool: Any, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=1, max_size=1, name="busy")
    held_lock_while_logging: list[bool] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "CPU-bound" in record.getMessage():
                held_lock_while_logging.append(pool._lock.locked())

    probe = Probe(level=logging.DEBUG)
    on_thread: list[bool] = []
    real_emit = probe.emit

    def emit(record: logging.LogRecord) -> None:
        on_thread.append(threading.current_thread() is pool._bg_thread)
        real_emit(record)

    probe.emit = emit  # type: ignore[method-assign]
    pool_mod.logger.addHandler(probe)
    try:
        with caplog.at_level(logging.DEBUG, logger="aperturedb_pool"):
            with pool._lock:
                pool._set_cpu_bound(True)
            wait_until(lambda: held_lock_while_logging, what="the background thread to log")
    finally:
        pool_mod.logger.removeHandler(probe)
    assert held_lock_while_logging == [False] and on_thread == [True]
    assert any("pool 'busy': the process is CPU-bound; connectors go first come, first "
               "served after 60 ms" in r.getMessage() for r in caplog.records)


def test_a_connector_a_waiter_takes_at_its_timed_wake_up_then_abandons_is_not_counted(
        make_pool: Any, clock: ShiftedClock) -> None:
    # The other way a waiter gets a connector: at its timed wake-up it takes
    # one left idle by a loop (not handed over).  Interrupted right after, its
    # wait must not stay counted either.
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=1.0, timeout=JOIN)
    lease, conn = _looping_lease(pool)
    real_count = pool._count_wait

    def count_then_interrupt(waited: float) -> None:
        real_count(waited)
        if threading.current_thread() is not threading.main_thread():
            raise KeyboardInterrupt  # lands right after the wait was counted

    pool._count_wait = count_then_interrupt  # type: ignore[method-assign]
    t, box = start(lambda: pool.lease(timeout=JOIN).__enter__())
    wait_until(lambda: pool.stats().waiting == 1, what="the caller to queue")
    clock.advance(0.3)  # waited 0.3 s, not overdue (0.6 s): the loop's return keeps it idle
    lease.__exit__(None, None, None)
    join(t)  # its timed wake-up took the idle connector, then was interrupted
    assert isinstance(box.get("error"), KeyboardInterrupt)
    s = pool.stats()
    assert (s.leases_waited, s.wait_time_total, s.waiting, s.idle) == (0, 0.0, 0, 1)
    with pool.lease(timeout=0) as again:
        assert again is conn
