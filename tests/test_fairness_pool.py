"""Fairness in a pool: the CPU-bound threshold as leases see it (the policy
on its own is tested in ``test_fairness.py``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any

import _support
import pytest
from _support import (
    JOIN,
    FrozenClock,
    ShiftedClock,
    join,
    looping_lease,
    start,
)

import aperturedb_pool._lease as lease_mod
import aperturedb_pool.pool as pool_mod
from aperturedb_pool import (
    ConnectionPool,
)

wait_until = functools.partial(_support.wait_until, timeout=JOIN)


# ---------------------------------------------------------------------------
# fairness under CPU-bound load
# ---------------------------------------------------------------------------


def _queue_waiter(pool: ConnectionPool, since: float) -> Any:
    """A waiter queued by hand (no thread): whether a return hands it the
    connector or keeps it idle shows in ``waiter._slot``, and nothing sleeps."""
    waiter = lease_mod._Waiter(since)
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
    lease, conn = looping_lease(pool, timeout=0.0)
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
    lease, conn = looping_lease(pool, timeout=0.0)
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
    waiter = lease_mod._Waiter(lease_mod._monotonic() - 0.25)
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
    lease, conn = looping_lease(pool)
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
