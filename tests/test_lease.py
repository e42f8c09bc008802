"""The lease hand-off (``aperturedb_pool._lease``) with stand-in connectors:
leasing and returning, waiting, the ownership check.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from typing import Any

import _support
import pytest
from _support import (
    JOIN,
    discarded,
    join,
    start,
)

from aperturedb_pool import (
    LeaseError,
    PoolError,
    PoolTimeout,
    RetryPolicy,
    TooManyWaiters,
)
from aperturedb_pool.testing._standin import StandIn

wait_until = functools.partial(_support.wait_until, timeout=JOIN)


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
