"""A hypothesis state machine driving ConnectionPool with stand-in connectors.

Run twice: with the lease fast paths on, and with every lease on the locked
paths (``_support.without_fast_paths``), so both copies of each lease rule meet
the same invariants.  Random sequences of: leases (``with``-style and ``acquire()``), clean returns,
returns after a query failed inside the lease (connector discarded), after a
KeyboardInterrupt inside a query (discarded), after an exception in the
caller's own code between queries (kept), explicit discards, queries on held
connectors, waiter threads with short timeouts, ``retire_all()``, ``close()``
and time passing (a shifted clock injected as the pool modules' ``_monotonic``:
lifetimes, idle shrinking and keepalive pings happen without sleeping).

Invariants checked after every step:

* no connector is ever leased to two holders at once, used by two threads at
  once, or handed out closed; a held connector is never closed under its holder;
* ``0 <= size <= max_size`` and ``idle + leased <= size``;
* counts agree with the stats: leased, waiting, leases granted and timeouts
  (exact whenever no waiter thread is running), connectors opened =
  size + discarded, one discard per interrupted query;
* every waiter thread ends served, timed out (``PoolTimeout``) or told the pool
  closed (``PoolClosed``), within a bound.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import _support
import pytest
from _support import ShiftedClock
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

import aperturedb_pool._maintenance as maintenance_mod
import aperturedb_pool.pool as pool_mod
from aperturedb_pool import ConnectionPool, PoolClosed, PoolTimeout
from aperturedb_pool.testing._standin import StandIn

JOIN = 10.0  # bound of joins and leases that must succeed
WAIT = 2.0  # bound of waits for the background thread to close connectors


wait_until = functools.partial(_support.wait_until, timeout=WAIT, poll=0.001)


@dataclass(eq=False)
class Held:
    kind: str  # "with" or "acquire"
    lease: Any
    conn: StandIn
    slot: Any  # the pool's record, to read generation and expiry


class PoolMachine(RuleBasedStateMachine):
    leases = Bundle("leases")
    # True: leases take the lock-free fast paths where they apply; False:
    # every lease takes the locked paths (LockedPathsMachine), so both copies
    # of each lease rule meet the same invariants.
    fast = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = ShiftedClock()
        self._restore_clock = _support.swap_pool_clock(self.clock)
        self.template = StandIn()
        self.pool: ConnectionPool | None = None
        self.held: dict[int, Held] = {}          # my leases, by id(conn)
        self.holders: dict[int, str] = {}        # every current holder, by id(conn)
        self.holders_lock = threading.Lock()
        self.waiters: list[tuple[threading.Thread, dict[str, Any]]] = []
        self.granted = 0
        self.timeouts = 0
        self.interrupted = 0
        self.closed = False
        self.violations: list[str] = []

    # -- helpers ---------------------------------------------------------------
    @property
    def p(self) -> ConnectionPool:
        assert self.pool is not None
        return self.pool

    def take(self, conn: StandIn, who: str) -> None:
        with self.holders_lock:
            if id(conn) in self.holders:
                self.violations.append(f"{who} got a connector held by {self.holders[id(conn)]}")
            self.holders[id(conn)] = who
        if conn.closed:
            self.violations.append(f"{who} was handed a closed connector")

    def give_back(self, conn: StandIn) -> None:
        with self.holders_lock:
            self.holders.pop(id(conn), None)

    def join_waiters(self) -> None:
        for t, box in self.waiters:
            t.join(JOIN)
            assert not t.is_alive(), "a waiter was neither served nor timed out"
            outcome = box.get("outcome")
            assert outcome in ("served", "timeout", "closed"), box
            if outcome == "served":
                self.granted += 1
            elif outcome == "timeout":
                self.timeouts += 1
        self.waiters = []

    def quiesce(self) -> None:
        """No waiter threads and no background opens in progress."""
        self.join_waiters()
        if not self.closed:
            wait_until(lambda: self.p.stats().opening == 0, "background opens to finish")

    # -- setup -----------------------------------------------------------------
    @initialize(min_size=st.integers(0, 3), extra=st.integers(0, 3),
                keepalive=st.sampled_from([None, 20.0]),
                lifetime=st.sampled_from([None, 100.0]),
                max_idle=st.sampled_from([None, 50.0]))
    def setup(self, min_size: int, extra: int, keepalive: float | None,
              lifetime: float | None, max_idle: float | None) -> None:
        self.max_size = max(1, min_size + extra)
        self.pool = ConnectionPool(
            self.template, min_size=min_size, max_size=self.max_size, timeout=JOIN,
            keepalive_interval=keepalive, max_lifetime=lifetime, max_idle=max_idle,
            reconnect_initial=0.001, reconnect_max=0.01, name="machine")
        if not self.fast:
            _support.without_fast_paths(self.pool)

    # -- leasing ---------------------------------------------------------------
    @rule(target=leases, kind=st.sampled_from(["with", "acquire"]))
    def lease(self, kind: str) -> Any:
        pool = self.p

        def get(timeout: float) -> tuple[Any, StandIn]:
            if kind == "with":
                lease = pool.lease(timeout=timeout)
                return lease, lease.__enter__()
            lease = pool.acquire(timeout=timeout)
            return lease, lease.conn

        if self.closed:
            with pytest.raises(PoolClosed):
                get(0.0)
            return multiple()
        if len(self.held) >= self.max_size:
            # Every connector is mine: nobody can serve this one.
            with pytest.raises(PoolTimeout):
                get(0.0)
            self.timeouts += 1
            return multiple()
        lease, conn = get(JOIN)
        # The locked paths ran when the fast paths are off (only they note
        # when the lease was asked for).
        assert self.fast or hasattr(lease, "_req")
        self.granted += 1
        self.take(conn, "main")
        h = Held(kind, lease, conn, lease._slot)
        self.held[id(conn)] = h
        return h

    @rule(h=leases)
    def query_on_held(self, h: Held) -> None:
        if id(h.conn) not in self.held:
            return  # already returned through another path
        response, _ = h.conn.query([{"FindEntity": {}}])
        assert response == [{"FindEntity": {"status": 0, "returned": 0}}]

    @rule(h=consumes(leases),
          how=st.sampled_from(["clean", "query_failed", "keyboard", "caller_error", "discard"]))
    def give_lease_back(self, h: Held, how: str) -> None:
        if id(h.conn) not in self.held:
            return
        pool, conn = self.p, h.conn
        error: BaseException | None = None
        if how in ("query_failed", "keyboard"):
            conn.fail_next = RuntimeError("query failed") if how == "query_failed" \
                else KeyboardInterrupt()
            try:
                conn.query([{"FindEntity": {}}])
            except BaseException as e:  # noqa: B036 - KeyboardInterrupt is the point
                error = e
            assert error is not None
        elif how == "caller_error":
            conn.query([{"FindEntity": {}}])
            error = ValueError("the caller's own code failed between queries")
        # What the pool must decide, known before returning.
        generation = pool.stats().generation
        now = self.clock()
        retired = h.slot.generation != generation
        expired = now >= h.slot.expires
        near_expiry = abs(now - h.slot.expires) < 1.0
        discard_expected = how in ("query_failed", "keyboard", "discard")

        del self.held[id(conn)]
        self.give_back(conn)
        if how == "discard":
            h.lease.discard()
        elif h.kind == "with":
            h.lease.__exit__(None if error is None else type(error), error, None)
        else:
            h.lease.release(error)

        if discard_expected:
            if how != "discard":
                self.interrupted += 1
            wait_until(lambda: conn.closed, "a discarded connector to be closed")
        elif self.closed:
            assert conn.closed, "returned to a closed pool: must be closed at once"
        elif retired or expired:
            wait_until(lambda: conn.closed, "a retired/expired connector to be closed")
        elif not near_expiry:
            assert not conn.closed, f"a healthy connector was closed ({how})"
        assert pool.stats().discarded.get("interrupted", 0) == self.interrupted

    # -- waiters ---------------------------------------------------------------
    @precondition(lambda self: self.pool is not None and len(self.waiters) < 4)
    @rule(timeout=st.sampled_from([0.0, 0.005, 0.03]))
    def spawn_waiter(self, timeout: float) -> None:
        pool = self.p
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                with pool.lease(timeout=timeout) as conn:
                    self.take(conn, "waiter")
                    try:
                        conn.query([{"GetStatus": {}}])
                    finally:
                        self.give_back(conn)
                box["outcome"] = "served"
            except PoolTimeout:
                box["outcome"] = "timeout"
            except PoolClosed:
                box["outcome"] = "closed"
            except BaseException as e:  # noqa: B036 - reported by join_waiters
                box["outcome"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.waiters.append((t, box))

    @rule()
    def wait_for_waiters(self) -> None:
        self.join_waiters()

    # -- pool-wide operations ----------------------------------------------------
    @precondition(lambda self: self.pool is not None)
    @rule()
    def retire_all(self) -> None:
        pool = self.p
        self.quiesce()
        before = list(self.template.clones)
        n = pool.retire_all()
        if self.closed:
            assert n == 0
            return
        assert len(self.held) <= n <= self.max_size
        mine = {id(h.conn) for h in self.held.values()}
        # Idle ones now; leased ones stay open until they come back.
        wait_until(lambda: all(c.closed for c in before if id(c) not in mine),
                   "retired idle connectors to be closed")
        assert not any(h.conn.closed for h in self.held.values())

    @precondition(lambda self: self.pool is not None)
    @rule()
    def close(self) -> None:
        self.join_waiters()
        self.p.close()
        self.closed = True
        mine = {id(h.conn) for h in self.held.values()}
        wait_until(lambda: all(c.closed for c in self.template.clones if id(c) not in mine),
                   "idle connectors to be closed")
        self.p.close()  # idempotent

    @precondition(lambda self: self.pool is not None)
    @rule(bound=st.booleans())
    def cpu_load_changes(self, bound: bool) -> None:
        # The process turns CPU-bound or stops being so (as _sample_cpu
        # decides at a hand-off), possibly while callers wait: the threshold
        # changes under them, and _overdue_at must follow (invariant below).
        p = self.p
        with p._lock:
            # A fresh sample, so that the verdict holds until time passes
            # (a verdict without one lapses at the next stats()).
            p._fair.mark = (pool_mod._monotonic(), 0.0)
            p._set_cpu_bound(bound)
            queue = p._waiters
            got = p._overdue_at
            want = queue[0].since + p._handoff_after if queue else math.inf
        assert got == want

    @precondition(lambda self: self.pool is not None)
    @rule(dt=st.sampled_from([1.0, 10.0, 25.0, 60.0, 120.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.offset += dt
        self.p._bg_wakeup.set()  # run maintenance now

    # -- invariants --------------------------------------------------------------
    @invariant()
    def no_violations(self) -> None:
        assert self.violations == []
        clones = list(self.template.clones)
        assert sum(c.overlaps for c in clones) == 0, "two threads used one connector at once"
        assert sum(c.late_use for c in clones) == 0, "a closed connector was queried"
        assert not any(h.conn.closed for h in self.held.values()), \
            "a connector was closed under its holder"

    @invariant()
    def counts_are_consistent(self) -> None:
        if self.pool is None:
            return
        s = self.p.stats()
        assert 0 <= s.size <= self.max_size
        assert s.idle + s.leased <= s.size or (self.closed and s.size == 0 and s.idle == 0)
        assert len(self.held) <= s.leased <= self.max_size
        opened = s.connectors_opened
        # Clones not yet counted as opened are opens in flight: at most one
        # per opener thread.
        assert (opened <= len(self.template.clones) <=
                opened + maintenance_mod._MAX_PARALLEL_OPENS)
        dropped = sum(s.discarded.values())
        if self.closed:
            assert opened >= s.size + dropped
        else:
            assert opened == s.size + dropped
        assert s.connectors_closed <= opened
        with self.p._lock:
            # The fast paths decide barging from _overdue_at alone: it must
            # follow the queue through every change (queue, serve, time out,
            # close).
            queue = self.p._waiters
            expected = (queue[0].since + self.p._handoff_after if queue else math.inf)
            assert self.p._overdue_at == expected
        if not self.waiters:
            assert s.leased == len(self.held)
            assert s.waiting == 0
            assert s.leases_granted == self.granted
            assert s.timeouts == self.timeouts

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.join_waiters()
                for h in list(self.held.values()):
                    del self.held[id(h.conn)]
                    self.give_back(h.conn)
                    if h.kind == "with":
                        h.lease.__exit__(None, None, None)
                    else:
                        h.lease.release()
                self.p.close()
                s = self.p.stats()
                assert s.leased == 0 and s.idle == 0 and s.size == 0 and s.waiting == 0
                wait_until(lambda: all(c.closed for c in self.template.clones),
                           "every connector closed after close()")
                wait_until(lambda: self.p.stats().connectors_closed ==
                           self.p.stats().connectors_opened, "closed == opened")
        finally:
            self._restore_clock()


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_pool_state_machine = PoolMachine.TestCase


class LockedPathsMachine(PoolMachine):
    fast = False


LockedPathsMachine.TestCase.settings = PoolMachine.TestCase.settings
test_pool_state_machine_on_the_locked_paths = LockedPathsMachine.TestCase
