"""Each lease rule is written once (``aperturedb_pool._lease``), but the lock-free
fast paths of ``Lease`` inline some of them.  Here both copies meet the same
cases: every case runs on a pool with the fast paths on and on one whose
leases all take the locked paths, and must end the same way.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import _support
import pytest

from aperturedb_pool import ConnectionPool
from aperturedb_pool._lease import DiscardReason, return_health, stale_reason

PATHS = ["fast", "locked"]


@pytest.fixture
def unread_socket() -> Iterator[socket.socket]:
    """A socket with a byte nobody asked for: the checkout probe rejects it."""
    a, b = socket.socketpair()
    b.sendall(b"x")
    try:
        yield a
    finally:
        a.close()
        b.close()


def _pool(make_pool: Any, paths: str) -> ConnectionPool:
    pool = make_pool(min_size=1, max_size=1, max_lifetime=100.0, keepalive_interval=None,
                     timeout=_support.JOIN)
    if paths == "locked":
        _support.without_fast_paths(pool)
    return pool


def _the_idle_slot(pool: ConnectionPool) -> Any:
    _support.wait_until(lambda: pool.stats().idle == 1, "the connector to open",
                        timeout=_support.JOIN)
    return pool._idle[0]


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("case, reason", [("fresh", None), ("retired", "retired"),
                                          ("expired", "expired"), ("probe", "probe")])
def test_the_checkout_rule_is_the_same_on_both_paths(
        make_pool: Any, clock: _support.ShiftedClock, unread_socket: socket.socket,
        paths: str, case: str, reason: str | None) -> None:
    pool = _pool(make_pool, paths)
    slot = _the_idle_slot(pool)
    first = slot.conn
    if case == "retired":
        with pool._lock:
            pool._generation += 1
    elif case == "expired":
        slot.expires = clock() - 1.0
    elif case == "probe":
        first.conn = unread_socket  # what the pool probes (health.socket_of)
        slot.poller = object()
        slot.returned = clock() - pool.probe_after - 1.0
    expected = None if case == "fresh" else DiscardReason(reason)
    if case != "probe":  # (the probe itself is not run twice: it counts)
        assert pool._checkout_problem(slot, clock()) == expected
    lease = pool.lease()
    with lease as conn:
        assert (conn is first) == (reason is None)
        # Only the locked paths note when the lease was asked for.
        assert hasattr(lease, "_req") == (paths == "locked" or reason is not None)
    first.conn = None
    assert dict(pool.stats().discarded) == ({} if reason is None else {reason: 1})


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("case, reason", [("clean", None), ("retired", "retired"),
                                          ("expired", "expired"), ("broken", "broken"),
                                          ("closed", "closed")])
def test_the_return_rule_is_the_same_on_both_paths(
        make_pool: Any, clock: _support.ShiftedClock, paths: str, case: str,
        reason: str | None) -> None:
    pool = _pool(make_pool, paths)
    _the_idle_slot(pool)
    lease = pool.lease()
    conn = lease.__enter__()
    slot = lease._slot
    if case == "retired":
        with pool._lock:
            pool._generation += 1
    elif case == "expired":
        clock.advance(200.0)
    elif case == "broken":
        slot.in_flight = True  # a query never answered
    elif case == "closed":
        pool.close()
    if reason is not None and case != "broken":
        expected = DiscardReason(reason)
        assert pool._unusable(slot, clock()) == expected
    lease.__exit__(None, None, None)
    s = pool.stats()
    assert dict(s.discarded) == ({} if reason is None else {reason: 1})
    assert s.leased == 0
    if reason is None:  # kept idle, and leased again
        assert s.idle == 1
        with pool.lease() as again:
            assert again is conn


class _Slot:
    def __init__(self, generation: int = 0, expires: float = 10.0, in_flight: bool = False,
                 tracked: bool = True) -> None:
        self.generation = generation
        self.expires = expires
        self.in_flight = in_flight
        self.tracked = tracked
        self.poller = None
        self.conn = None


def test_stale_reason_and_return_health_cases() -> None:
    slot: Any = _Slot()
    assert stale_reason(slot, 0, 5.0) is None
    assert stale_reason(slot, 1, 5.0) is DiscardReason.RETIRED
    assert stale_reason(slot, 0, 10.0) is DiscardReason.EXPIRED
    assert stale_reason(slot, 1, 10.0) is DiscardReason.RETIRED  # retired first
    assert return_health(slot, None) is None
    assert return_health(slot, ValueError()) is None  # an error of the caller's own code
    assert return_health(_Slot(in_flight=True), None) is DiscardReason.BROKEN  # type: ignore[arg-type]
    assert return_health(_Slot(in_flight=True), OSError()) is DiscardReason.INTERRUPTED  # type: ignore[arg-type]
    assert return_health(_Slot(tracked=False), OSError()) is DiscardReason.INTERRUPTED  # type: ignore[arg-type]
    # The enum's members are the strings the stats and metrics have always used.
    assert DiscardReason.EXPIRED == "expired" and {"expired": 1}.get(DiscardReason.EXPIRED) == 1


@pytest.mark.parametrize("paths", PATHS)
@pytest.mark.parametrize("overdue", [False, True])
def test_a_looping_return_keeps_or_hands_over_the_same_on_both_paths(
        make_pool: Any, frozen_clock: _support.FrozenClock, paths: str, overdue: bool) -> None:
    # A thread in a loop keeps its connector idle for its next lease while no
    # waiter is overdue (barging), and hands it to the oldest waiter once one is.
    import aperturedb_pool._lease as lease_mod

    pool = _pool(make_pool, paths)  # fairness_threshold 0.01: overdue after 6 ms
    _the_idle_slot(pool)
    lease, conn = _support.looping_lease(pool)
    waiter = lease_mod._Waiter(frozen_clock() - (1.0 if overdue else 0.0))
    with pool._lock:
        pool._waiters.append(waiter)
        pool._queue_changed()
    lease.__exit__(None, None, None)
    if overdue:
        assert waiter._slot is not None and waiter._slot.conn is conn
    else:
        assert waiter._slot is None and pool.stats().idle == 1
    pool._abandon_wait(waiter)  # the connector goes back (or the waiter leaves the queue)
    with pool.lease(timeout=0) as again:
        assert again is conn
