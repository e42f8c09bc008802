"""The lock-free fast paths of the lease (see "Locking" in
``aperturedb_pool._lease``), and interruptions racing them: interrupted waits,
opens racing ``close()``, maintenance racing the fast paths.
"""

from __future__ import annotations

import _thread
import functools
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import _support
import pytest
from _support import (
    JOIN,
    ShiftedClock,
    join,
    looping_lease,
    start,
)

import aperturedb_pool._lease as lease_mod
from aperturedb_pool import (
    ConnectionPool,
    PoolClosed,
)
from aperturedb_pool.testing._standin import StandIn

wait_until = functools.partial(_support.wait_until, timeout=JOIN)


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


def test_a_looping_thread_keeps_its_connector_until_a_waiter_is_overdue(
        make_pool: Any, clock: ShiftedClock) -> None:
    # fairness_threshold 1 s: the waiter below is not overdue (at 0.6 s)
    # until the clock is advanced past it.
    pool = make_pool(min_size=1, max_size=1, fairness_threshold=1.0, timeout=JOIN)
    lease, conn = looping_lease(pool)
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
        held._slot = lease_mod._RELEASED  # the first half of a fast return
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
    lease, conn = looping_lease(pool)
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
    held._slot = lease_mod._RELEASED
    deque.append(pool._idle, slot)  # the fast return's append, after the retire
    pool._settle()
    assert pool.stats().discarded.get("retired") == 1
    assert pool._bg_wakeup.is_set(), "the refill was not started"
    pool.close()
    join(t)
    assert isinstance(box.get("error"), PoolClosed)
