"""The background work (``aperturedb_pool._maintenance``) with stand-in
connectors: lifetime, idle shrink, keepalive, leak reports, refill backoff and
the unreachable server.  Time runs on a shifted clock, so nothing sleeps for it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import _support
import pytest
from _support import (
    JOIN,
    Flaky,
    ShiftedClock,
    kick,
)

from aperturedb_pool import (
    PoolTimeout,
)
from aperturedb_pool.testing._standin import StandIn

wait_until = functools.partial(_support.wait_until, timeout=JOIN)


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
