"""ConnectionPool: exclusive leases of SDK connectors, kept healthy, handed out fairly.

Locking (the argument for thread safety)
----------------------------------------
``ConnectionPool._lock`` (a plain ``threading.Lock``) guards every mutable field
of the pool but the few listed below: ``_waiters``, ``_size``, ``_all`` (the set
of live slots), ``_pinging``, ``_opening``, ``_opens_running``, ``_opened``,
``_closed``, ``_generation``, the counters in ``_c``, ``_discarded`` and
``_granted_base``, the background work (``_to_close``, ``_open_requests``),
the refill state (``_open_failures``, ``_last_open_error``,
``_unreachable_since``, ``_next_open_at``, ``_permanent_at``), the fairness
state (``_overdue_at``, ``_handoff_after``, ``_cpu_bound``, ``_cpu_mark``,
``_cpu_next``, ``_cpu_note``), ``_ready_waiters``, and each slot's ``suspect``.
It is held only for short, non-blocking bookkeeping: never across a network
call, a sleep or a wait.  Decisions are taken under the lock; waiting (on a
waiter's own lock) and I/O (probes, opening, closing, pinging) happen outside
it.  Every acquisition is a ``with`` statement (see "Interruptions").

Not guarded by the lock: ``_idle`` (below); ``_fast``, ``_overdue_at`` and
``_generation`` read as hints by the fast paths (written under the lock);
``_long_wait_wakeup`` (a hint: a race costs one wake-up more); ``_tls``
(per thread); ``_bg_wakeup`` (``SimpleQueue``, safe from any thread);
``_metrics`` and ``_lease_type`` (set once, under the lock, when the pool is
instrumented by ``aperturedb_pool.metrics``; read by slow paths and
``lease()``; the recorder's own lock is only ever taken after the pool's).

The exception is ``_idle``, the deque of idle slots.  Its single-item
operations (``append``, ``pop``, ``popleft``, ``remove``, ``copy``, ``[0]``)
are atomic: one C call each, holding the GIL throughout (``remove`` compares
by identity because ``_Slot`` defines no ``__eq__``, so no Python code runs
inside it).  The Lease fast paths use ``_idle`` without the pool lock:
checkout is ``_idle.pop()`` (when nobody waits, or barging is allowed: see
"Fairness"), return is ``_idle.append()``.  Rules that make this safe:

* Ownership: whoever removes a slot from ``_idle`` owns it, and only the
  owner of a slot puts it back (a return, a hand-off, the maintenance thread
  after a ping, an opener with a new connector).  A slot is therefore never in
  ``_idle`` twice, never in ``_idle`` while someone holds it, and never handed
  to two holders.
* Code under the lock never checks ``_idle`` and then pops: it pops and
  handles ``IndexError`` (``_pop_idle``), because a fast-path caller may have
  taken the last slot in between.  Nothing iterates ``_idle`` itself: scans
  use ``_idle.copy()``, and decide again after their ``remove()`` succeeds
  (the slot may have been leased and returned since the copy).
* ``_idle`` is never replaced (only in a forked child, where one thread exists).
* A fast return appends first and reads ``_waiters`` and ``_fast`` second; a
  new waiter is added to ``_waiters`` first and pops ``_idle`` second (under
  the lock).  Either the waiter finds the returned slot, or the returning
  thread sees the waiter and settles under the lock (``_settle``: hand idle
  slots to waiters, or close them if the pool closed).  ``close()`` clears
  ``_fast`` before draining ``_idle`` the same way.  A looping thread's
  keep-return (``_keeps_for``) deliberately leaves its slot idle although
  callers wait: it re-reads only ``_fast``; waiters reach such slots through
  the lease paths once they are overdue, a later looping return
  (``_hand_out_stranded``), or their own timed wake-up.
* A fast checkout re-checks what it needs after the pop (generation, expiry,
  ``_fast``, the probe); a slot that fails goes through the locked path to be
  dropped.
* The fast paths read ``_fast``, ``_waiters``, ``_overdue_at`` (when the
  oldest waiter becomes overdue; rewritten under the lock with every change
  of ``_waiters`` or of ``_handoff_after``), ``_generation`` and
  ``probe_after`` without the lock, and a waiter reads ``_handoff_after`` to
  time its first wake-up.  Such a read only picks the path; what matters is
  re-checked as above, so a stale value costs a detour through the locked
  path or a later hand-off, never a wrong hand-out.
* Free-threaded builds (no GIL) are not claimed: the handshake above needs the
  append to one deque to be visible before the read of the other, which the
  GIL's total order gives and per-object locks are not argued to give here.

Each waiter owns a ``threading.Lock`` that is created locked; a connector is
handed to the waiter by setting ``waiter.slot`` under the pool lock, removing
the waiter from ``_waiters`` and releasing the waiter's lock.  A waiter that
times out re-takes the pool lock and checks ``waiter.slot`` before giving up,
so a connector handed to it at the last moment is never lost.

A slot's fields are written under the pool lock while it changes hands, or by
the one thread that took it from ``_idle``; while it is leased only the
leaseholder touches ``in_flight``, ``phase`` and ``uses`` (through the lease
and the connector wrappers).  The maintenance thread removes an idle slot from
``_idle`` (``remove``, under the lock) before pinging it, so a ping and a lease
never overlap.  Counts that include slots in passage between ``_idle`` and a
leaseholder (``leased`` in the stats) are exact whenever no fast path runs at
that instant, and off by the slots in passage otherwise; a retired slot that a
racing return appended after ``retire_all()`` counts as idle until the next
checkout or maintenance round drops it.

Interruptions
-------------
CPython delivers a signal handler's exception (``KeyboardInterrupt``, a soft
time limit) and an asynchronous exception at a function's entry, at a backward
jump and right after a call returns: between almost any two statements, and
between a C call such as ``deque.pop()`` returning and the store of its result.
What the pool guarantees under such an exception, anywhere in its code or the
caller's:

* No lock is left held.  The pool lock is only taken by ``with`` (an exception
  cannot land between a ``with``'s acquisition and its cleanup taking effect);
  other threads are woken by single C calls (a waiter's own lock,
  ``SimpleQueue.put`` for the background thread, a per-caller lock for
  ``wait_ready``), never through ``threading.Condition``/``Event``, whose
  Python code could be interrupted holding their inner lock.  The SDK's shared
  session lock is only watched (``connectors``), never taken by the pool.
* No connector owed an answer is used again.  A connector counts requests
  whose write started minus responses read in full (``Phase.outstanding``):
  above zero, it refuses to send (``ConnectorUnusable``) and is discarded when
  its lease ends, whichever exchange (the caller's, a session refresh, the
  SDK's re-send after a rejected session) was interrupted.
* No wait outlives its bound: a lease's timeout is one absolute deadline, and a
  retry policy's deadline bounds every read, write and wait for the session
  lock of the attempt.
* A slot no one will return comes back.  Each slot names its ``holder``: the
  Lease or _Waiter it was given to (set before the holder's own reference),
  ``_MAINTENANCE`` while pinged, None while idle.  The background thread (each
  round, at most every second; sooner when callers have waited long) and
  ``stats()`` look at every live slot out of ``_idle`` (``_find_lost``): a
  holder that nothing else refers to (``sys.getrefcount``) can never return it
  (a dropped ``acquire()`` lease warns with a ResourceWarning); a slot with no
  holder, or whose holder does not point back, that stays so unchanged for
  ``_LOST_GRACE`` (1 s) was lost between two statements of a lease path.  Both
  are closed and replaced (never reused: a thread starved of the GIL for that
  second in the middle of a lease path would find its connector closed, its
  query failing, never shared).  A waiter taken off the queue by an interrupted
  hand-off queues again at its next timed wake-up.
* Where a lease path can, it undoes its own interruption at once: an
  interrupted wait puts back a connector handed to it (``_abandon_wait``), a
  lease interrupted after its connector was assigned but before ``__enter__``
  returned gives it back (the ``with`` statement will not call ``__exit__``).

What cannot be guaranteed in CPython, and what happens then:

* An exception that lands in the caller's ``__exit__`` call before its first
  statement leaves the slot with its lease: it is recovered (closed and
  replaced) once nothing refers to the lease any more, which is when the
  exception and its traceback are gone.  A caller that keeps the exception
  (or its frames) keeps the slot out of service until then.
* Library code the pool calls (``logging`` handlers, ``warnings``) takes
  Python-level locks of its own, which an asynchronous exception can leave
  held; the pool logs from callers' threads only on rare paths (a failed
  probe, a retirement, a recovered slot).
* A signal handler's ``OSError`` (``TimeoutError`` included) raised during a
  read or write is indistinguishable from a transport failure: it surfaces as
  ``QueryTimeout``/``OutcomeUnknown`` (chained to it).

``tests/test_injection.py`` raises at every line of the package the lease
paths run; ``stress/scenario_injection.py`` after every call too, with both
kinds of exception; ``stress/scenario_asyncexc.py`` sends about 5,000 real
asynchronous exceptions a second into 16 threads.  None hangs, answers
wrongly or loses a slot for good.

Fairness
--------
A releasing thread that will immediately ask again (a batch loop: it returned
the previous connector and nobody used the pool since) may re-take the
connector it just returned ("barging"): no thread wake-up sits between two
leases, which keeps connectors busy, and under the GIL a wake-up is expensive
(the woken thread must win the GIL back: ~50-100 us on a busy 2-core machine).
Barging is bounded: once the oldest waiter has waited ``_handoff_after``
seconds, every returned connector is handed directly to the oldest waiter
(first come, first served) until no waiter is that old.  ``_handoff_after`` is
``_HANDOFF_SHARE`` (60%) of ``fairness_threshold`` (at least 1 ms; 0 when the
threshold is 0: strict first come, first served); the rest of the threshold is
the margin for the hand-off itself (the next return, the woken thread's
wake-up).  Each hand-off costs a thread switch, which under the GIL costs the
whole process tens of microseconds, so the threshold trades the longest wait
against throughput: with N threads sharing M connectors a thread waits about
``_handoff_after`` for a turn, then keeps its connector for about
``_handoff_after`` x M / (N - M).
Threads that do not loop (request handlers) always hand off directly, so a
returned connector never sits idle while someone waits.

Barging runs on the lock-free paths too: a checkout may pop an idle connector
while callers wait if the oldest has waited less than ``_handoff_after``
(``_overdue_at`` is still ahead), and a looping thread's clean return leaves its
connector idle for its own next lease under the same condition.  Waiters are
not woken when they become overdue (a wake-up costs a thread switch): the
lease paths read the oldest waiter's age and hand over from then on.

CPU-bound processes.  Rotating connectors among N threads on M connectors with
waits of at most W takes about (N - M) / W hand-offs per second (24 / 6 ms =
4,000 per second for 32 threads on 8), and each costs a thread switch: about
30 us of CPU on a 2-core VM (the sleep and wake-up, the futex wake, the slow
paths).  While the process has CPU to spare that costs nobody anything; while
it is CPU-bound (under the GIL one core runs Python, so the switch time is
taken from every thread's queries) it cost 15-20% of the throughput of 32
threads on 8 connectors.  So the pool samples the process's CPU time at
hand-offs (at most every 0.1 s: one ``process_time()`` under the lock) and,
while it grows at 0.85 x wall time or more (until it drops below 0.65), uses
``cpu_bound_fairness_threshold`` (0.1 s) instead: ten times fewer hand-offs,
waits up to about 60 ms.  A verdict lapses when no sample was taken for a
second, or twice the longer threshold if that is longer (no hand-off:
contention stopped), so a caller that queues after a quiet spell gets the
normal threshold.  ``process_time()`` also counts threads running outside the
GIL (native code), so such a process can be judged CPU-bound; a GIL-bound
process starved by its host or a CPU quota can stay below 0.85 and keep the
normal threshold.  ``stats()`` shows ``cpu_bound``, ``handoff_after`` and
``cpu_bound_seconds``; changes of the verdict are logged at DEBUG.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import queue
import random
import socket
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from aperturedb_pool import _validate
from aperturedb_pool import connectors as _connectors
from aperturedb_pool._fairness import FairnessPolicy
from aperturedb_pool._options import PoolOptions
from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
    LeaseError,
    OutcomeUnknown,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ServerUnreachable,
    TooManyWaiters,
)
from aperturedb_pool.health import PEER_CLOSED, TLS_READABLE, probe_socket, socket_of
from aperturedb_pool.stats import PoolStats

if TYPE_CHECKING:
    from aperturedb_pool.shared import PooledConnector

logger = logging.getLogger("aperturedb_pool")

T = TypeVar("T")

_monotonic = time.monotonic
_MAX_PARALLEL_OPENS = 2
_LOOP_GAP = 0.001  # a thread asking again within this of its last return loops
# CPU-bound detection (see "Fairness" and aperturedb_pool._fairness).
_process_time = time.process_time  # replaced by tests
# A slot out of the pool with no holder pointing back at it for this long was
# lost to an interruption (see "Interruptions"; tests shorten it).
_LOST_GRACE = 1.0


def _unreferenced_count() -> int:
    # sys.getrefcount of a holder that nothing but its slot refers to, seen
    # through the same code shape as _find_lost (the slot's attribute, a
    # local variable, getrefcount's argument: 3 on CPython 3.10-3.13; newer
    # interpreters may borrow some of these references, so it is measured).
    class Slot:
        __slots__ = ("holder",)
        holder: Any

    class Holder:
        __slots__ = ("_slot",)

    slot = Slot()
    slot.holder = Holder()
    holder = slot.holder
    return sys.getrefcount(holder)


_HOLDER_UNREFERENCED = _unreferenced_count()
# A waiter whose timed wake-ups have backed off to this (it has waited about
# twice as long) wakes the background thread at each of them.
_LONG_WAIT = 0.08
_get_ident = threading.get_ident
_ids = itertools.count(1)

# Every live pool, so a forked child can reset them (see _after_fork_in_child).
_all_pools: "weakref.WeakSet[ConnectionPool]" = weakref.WeakSet()


class _Slot:
    """The pool's record of one connector."""

    __slots__ = ("conn", "id", "created", "expires", "returned", "generation", "in_flight",
                 "phase", "poller", "owner", "check_owner", "leased_at", "lease_stack",
                 "leak_reported", "keepalive_due", "tracked", "jitter", "uses", "holder",
                 "suspect", "__weakref__")

    def __init__(self, conn: Any, generation: int, now: float, lifetime: float | None,
                 keepalive: float | None) -> None:
        self.conn = conn
        self.id = next(_ids)
        self.created = now
        # Lifetime and keepalive carry up to -5% jitter so connectors opened
        # together do not expire or ping together.
        self.expires = now + lifetime * (1.0 - 0.05 * random.random()) if lifetime else math.inf
        self.returned = now
        self.generation = generation
        self.in_flight = False
        self.tracked = True  # False: queries cannot be observed (see connectors.instrument)
        self.phase = _connectors.Phase()
        self.poller: Any = None
        self.owner: int | None = None
        self.check_owner: Callable[[], None] | None = None
        self.leased_at = 0.0
        self.lease_stack: list[str] | None = None
        self.leak_reported = False
        self.uses = 0  # leases granted; written only by the thread holding the slot
        # Who may put this slot back (see "Interruptions"): the Lease or
        # _Waiter it was given to, _MAINTENANCE while the background thread
        # pings it, None while idle.  Set before the holder's own reference.
        self.holder: Any = None
        # (since, signature) while the maintenance thread suspects that no one
        # will put this slot back (see ConnectionPool._find_lost).
        self.suspect: tuple[float, tuple[int, int, float]] | None = None
        # This connector's keepalive period factor: connectors used together
        # are not pinged together.
        self.jitter = 1.0 - 0.1 * random.random()
        self.keepalive_due = now + keepalive * self.jitter if keepalive else math.inf


class _ThreadMarks(threading.local):
    """Per thread: when it last returned a lease of the pool.  The class
    default spares the hot path a missing-attribute exception."""

    released = -math.inf


class _Waiter:
    # ``_slot``: the slot handed to this waiter (the same name as Lease's, so
    # that one test tells whether a slot's holder still holds it).
    __slots__ = ("lock", "_slot", "since", "waited")

    def __init__(self, now: float) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self._slot: _Slot | None = None
        self.since = now
        self.waited = 0.0  # the wait counted when ``_slot`` was given (see _abandon_wait)


class _Maintenance:
    """``_Slot.holder`` while the background thread pings the slot."""

    _slot = None

    def __repr__(self) -> str:
        return "<maintenance>"


_MAINTENANCE: Any = _Maintenance()


class _Wakeup:
    """Wakes the background thread.  ``set()`` is one C call (``SimpleQueue.put``)
    and takes no Python-level lock, so an exception delivered to the thread that
    calls it (a signal handler, an asynchronous exception) cannot leave a lock
    held, as ``threading.Event.set()`` could (its Condition is Python code)."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[None] = queue.SimpleQueue()

    def set(self) -> None:
        self._q.put(None)

    def wait(self, timeout: float | None) -> bool:
        """Wait until ``set()`` was called (since the last wait) or ``timeout``
        passed; True if it was called.  Consumes every call so far."""
        q = self._q
        try:
            q.get(timeout=timeout) if timeout is None or timeout > 0 else q.get_nowait()
        except queue.Empty:
            return False
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                return True


class _ReleasedMark:
    """``Lease._slot`` once the lease ended.  ``in_flight`` is true so that the
    fast return path, which must test it anyway, turns away a second release."""

    in_flight = True

    def __repr__(self) -> str:
        return "<released>"


_RELEASED: Any = _ReleasedMark()


class Lease:
    """A lease of one connector: a context manager, or an explicit handle.

    ``with pool.lease() as conn:`` gives ``conn`` (the connector) to the block
    and returns it to the pool when the block ends, discarding it if a query was
    interrupted.  ``pool.acquire()`` returns an already-acquired Lease whose
    ``conn`` is the connector; call ``release()`` (or ``pool.release(lease)``)
    exactly once.
    """

    # _slot: None before the acquisition, the slot while leased, _RELEASED
    # after.  _req (when a slow-path acquisition started) is set only there:
    # the lease is the hot path, and every store counts.
    __slots__ = ("_pool", "_timeout", "_slot", "_req", "_thread")

    def __init__(self, pool: "ConnectionPool", timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._slot: _Slot | None = None
        # The thread that asked: a PoolTimeout tells a caller that waits for
        # a connector while it holds others of the same pool.
        self._thread = _get_ident()

    _req: float

    @property
    def conn(self) -> Any:
        """The leased connector; None before the acquisition and after the release."""
        slot = self._slot
        return None if slot is None or slot is _RELEASED else slot.conn

    @property
    def _released(self) -> bool:
        return self._slot is _RELEASED

    def __enter__(self) -> Any:
        # Fast path: an idle connector, and nobody waiting or barging allowed
        # (see "Fairness"), nothing to check.  It takes no lock (see "Locking"
        # in the module doc) and is inlined here because a lease is the
        # pool's hot path: keep its rules the same as ConnectionPool._acquire,
        # which handles every other case.  ``_fast`` is cleared by close()
        # before it drains _idle, and read again after the pop: a slot that a
        # racing return appended after the drain is closed, not handed out.
        pool = self._pool
        idle = pool._idle
        fresh = self._slot is None  # (entering a lease twice must not release it)
        try:
            # ``idle`` tested first: popping an empty deque raises, and an
            # exception costs about as much as a whole lease.  Barging (taking
            # an idle connector while callers wait) is allowed until the oldest
            # waiter is overdue; _overdue_at is inf while nobody waits.
            if idle and fresh and pool._fast:
                now = _monotonic()
                if now < pool._overdue_at:
                    try:
                        slot = idle.pop()
                    except IndexError:  # taken since the test
                        pass
                    else:
                        # Holder first, then the lease's own reference: an
                        # interruption in between leaves a slot the maintenance
                        # thread finds (see "Interruptions").
                        slot.holder = self
                        if (slot.generation == pool._generation and now < slot.expires and
                                pool._fast and
                                (now - slot.returned <= pool.probe_after or
                                 slot.poller is None or not pool._unhealthy(slot))):
                            slot.uses += 1
                            slot.leased_at = now
                            self._slot = slot
                            return slot.conn
                        pool._discard_checked_out(slot)
            pool._acquire(self)
            return self.conn
        except BaseException as e:
            # Interrupted after the connector became this lease's: the with
            # statement will not call __exit__, so give it back now (it was
            # never used).
            if fresh and self._slot is not None and self._slot is not _RELEASED:
                self._pool._release(self, e)
            raise

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        slot = self._slot
        if ev is None and slot is not None and not slot.in_flight:  # _RELEASED is in flight
            pool = self._pool
            if pool._fast and slot.generation == pool._generation:
                now = _monotonic()
                if now < slot.expires:
                    if not pool._waiters:
                        # Fast path: a clean return while nobody waits.
                        # Append first, then look for waiters and close()
                        # (see "Locking").
                        self._slot = _RELEASED
                        slot.holder = None
                        slot.returned = now
                        pool._idle.append(slot)
                        if pool._waiters or not pool._fast:
                            pool._settle()
                        return
                    tls = pool._tls
                    if slot.leased_at - tls.released < _LOOP_GAP and now < pool._overdue_at:
                        # A thread in a loop (it asked for this lease right
                        # after returning its previous one) keeps its
                        # connector for its next lease while no waiter is
                        # overdue ("Fairness"): idle, not handed over, so no
                        # thread wake-up.  Inlined (no call, no exception):
                        # with callers waiting this is the hot path.
                        tls.released = now
                        self._slot = _RELEASED
                        slot.holder = None
                        slot.returned = now
                        idle = pool._idle
                        if idle:
                            try:
                                stale = now - idle[0].returned > _LOOP_GAP
                            except IndexError:  # emptied since the test
                                stale = False
                            if stale:
                                # A connector kept by a looping thread that
                                # did not come back (its loop ended) while
                                # callers wait: hand it over now rather than
                                # at a waiter's timed wake-up.
                                pool._hand_out_stranded(now)
                        idle.append(slot)
                        if not pool._fast:
                            pool._settle()
                        return
        self._pool._release(self, ev)

    def release(self, error: BaseException | None = None) -> None:
        """Return the connector.  Pass the exception that ended the work, if any."""
        self._pool._release(self, error)

    def discard(self, error: BaseException | None = None) -> None:
        """Return the connector to be closed rather than reused.

        Pass the error that condemned it, if any: a connector error that says
        the server went away retires the connector's whole generation.
        """
        slot = self._slot
        if slot is not None and slot is not _RELEASED:
            slot.in_flight = True
        self._pool._release(self, error)

    @property
    def active(self) -> bool:
        return self._slot is not None and not self._released

    def __repr__(self) -> str:
        state = "active" if self.active else ("released" if self._released else "pending")
        return f"<Lease {state} of pool {self._pool.name!r}>"


class _ManualLease(Lease):
    """The lease returned by ``acquire()``.  One dropped without ``release()`` is
    found by the maintenance thread (nothing but its slot refers to it any
    more: see "Interruptions") and its connector closed, with a ResourceWarning."""

    # _granted: when acquire() returned it, kept only while the pool is
    # instrumented (its use time; see aperturedb_pool.metrics).
    __slots__ = ("_granted",)
    _granted: float


def _check_duration(name: str, value: float | None, *, allow_none: bool = True,
                    allow_zero: bool = True) -> float | None:
    # (query() calls it by this name.)
    return _validate.duration(name, value, optional=allow_none, allow_zero=allow_zero)


class ConnectionPool:
    """A pool of ApertureDB connectors, each leased to one thread at a time.

    Parameters (all keyword-only but ``template``; seconds for durations):

    template
        An ``aperturedb.Connector`` (or any object with ``clone()``, ``query()``,
        ``close()``).  The pool clones it and never queries through it.  When
        omitted, one is built from the SDK's configuration chain
        (``APERTUREDB_KEY``, ``adb config``, ...).
    min_size (1), max_size (8)
        Connectors kept open at least / at most.
    timeout (30.0)
        Default seconds a ``lease()`` waits before ``PoolTimeout``.
    max_waiting (None)
        Callers allowed to wait at once; more fail at once with ``TooManyWaiters``.
        None: unbounded.
    max_lifetime (3600.0)
        A connector is closed and replaced after about this long (-5% jitter). None: never.
    max_idle (600.0)
        Idle connectors above ``min_size`` are closed after this long. None: never.
    keepalive_interval (60.0)
        Idle connectors are pinged with ``GetStatus`` this often (-10% jitter),
        catching servers and middleboxes that drop idle links. None: off.
    tcp_keepalive ((30, 10, 3))
        TCP keepalive (idle seconds, probe interval, probe count) set on every
        socket; None leaves the SDK's settings.
    query_timeout (None)
        Socket timeout for every query of a pooled connector; a query that times
        out raises ``QueryTimeout`` and its connector is discarded.
    connect_timeout (10.0)
        Bound of the hello and TLS handshake of a new connector and of the
        background pings (the TCP connect itself runs in an opener thread).
    probe_after (0.5)
        A connector idle for longer is probed (a zero-timeout poll) at checkout.
    fairness_threshold (0.01)
        About the longest a waiter is passed over by threads re-taking the
        connector they just returned (barging, which saves a thread wake-up
        per lease): connectors go first come, first served once the oldest
        waiter has waited 60% of it.  Larger values give more throughput
        under contention (fewer hand-offs) and longer waits; 0 gives strict
        first come, first served.
    cpu_bound_fairness_threshold (0.1)
        The ``fairness_threshold`` used while the process is CPU-bound (its CPU
        time grows at 0.85 x wall time or more, until it drops below 0.65).  There
        every hand-off's thread switch costs all threads throughput (tens of
        microseconds of the one core the GIL lets Python use), so the pool
        hands connectors over less often: waits get longer, throughput does
        not drop.  ``stats().cpu_bound`` tells which applies.  Never below
        ``fairness_threshold``; None (or a value at most ``fairness_threshold``,
        or a ``fairness_threshold`` of 0): off.  Must be finite, as must
        ``fairness_threshold``.
    leak_threshold (None)
        Log a WARNING with the borrower's stack when a lease is held longer.
    check_ownership (False)
        Debug: a connector used outside its lease or by another thread raises
        ``LeaseError`` at once.  Free when off.
    retry (None)
        The ``RetryPolicy`` of ``query()`` and ``run()``; None: ``RetryPolicy()``.
    name (None)
        Used in messages and logs; defaults to ``pool-N``.
    open (True)
        Start opening ``min_size`` connectors now (in the background; see
        ``wait_ready()``).  With False, ``open()`` starts the pool.
    reconnect_initial (0.05), reconnect_max (2.0)
        Backoff bounds (full jitter) of background opens while the server is down.
    """

    _counter = itertools.count(1)

    _metrics: Any
    _lease_type: type

    def __init__(self, template: Any = None, *, min_size: int = 1, max_size: int = 8,
                 timeout: float = 30.0, max_waiting: int | None = None,
                 max_lifetime: float | None = 3600.0, max_idle: float | None = 600.0,
                 keepalive_interval: float | None = 60.0,
                 tcp_keepalive: tuple[float, float, int] | None = (30.0, 10.0, 3),
                 query_timeout: float | None = None, connect_timeout: float = 10.0,
                 probe_after: float = 0.5,
                 fairness_threshold: float = 0.01,
                 cpu_bound_fairness_threshold: float | None = 0.1,
                 leak_threshold: float | None = None,
                 check_ownership: bool = False, retry: Any = None, name: str | None = None,
                 open: bool = True, reconnect_initial: float = 0.05,
                 reconnect_max: float = 2.0,
                 connector_factory: Callable[[], Any] | None = None) -> None:
        # Every option is checked (and normalized) by PoolOptions, which
        # config.py uses too.
        o = PoolOptions(
            min_size=min_size, max_size=max_size, timeout=timeout, max_waiting=max_waiting,
            max_lifetime=max_lifetime, max_idle=max_idle, keepalive_interval=keepalive_interval,
            tcp_keepalive=tcp_keepalive, query_timeout=query_timeout,
            connect_timeout=connect_timeout, probe_after=probe_after,
            fairness_threshold=fairness_threshold,
            cpu_bound_fairness_threshold=cpu_bound_fairness_threshold,
            leak_threshold=leak_threshold, check_ownership=check_ownership, retry=retry,
            reconnect_initial=reconnect_initial, reconnect_max=reconnect_max)
        self._options = o
        # Plain instance attributes (the lease paths read some of them).
        self.min_size = o.min_size
        self.max_size = o.max_size
        self.max_waiting = o.max_waiting
        self.timeout = o.timeout
        self.max_lifetime = o.max_lifetime
        self.max_idle = o.max_idle
        self.keepalive_interval = o.keepalive_interval
        self.tcp_keepalive = o.tcp_keepalive
        self.query_timeout = o.query_timeout
        self.connect_timeout = o.connect_timeout
        self.probe_after = o.probe_after
        self.fairness_threshold = o.fairness_threshold
        self.cpu_bound_fairness_threshold = o.cpu_bound_fairness_threshold
        self.leak_threshold = o.leak_threshold
        self.check_ownership = o.check_ownership
        self.retry = o.retry_policy
        self.reconnect_initial = o.reconnect_initial
        self.reconnect_max = o.reconnect_max
        # When barging stops, and whether the process is CPU-bound (guarded
        # by _lock; see aperturedb_pool._fairness).
        self._fair = FairnessPolicy(o.fairness_threshold, o.cpu_bound_fairness_threshold)

        if template is None and connector_factory is None:
            template = _connectors.default_template()
        self._template = template
        self._factory = connector_factory
        self._clone: Callable[[], Any]
        if template is not None:
            if connector_factory is not None:
                raise TypeError("pass template or connector_factory, not both")
            self._clone = _connectors.clone_factory(template)
        else:
            if not callable(connector_factory):
                raise TypeError(f"connector_factory must be callable, got {connector_factory!r}")
            self._clone = connector_factory

        from aperturedb_pool.retry import is_read_only
        self._is_read_only = is_read_only  # for query(): no import statement per call
        # True when leases need no per-lease extras (ownership check, leak
        # tracking): the Lease fast paths apply.  Disabled features cost nothing.
        self._plain = not self.check_ownership and self.leak_threshold is None
        # The Lease fast paths are on: plain, and not closed (cleared by close()).
        self._fast = self._plain
        self.name = name if name is not None else f"pool-{next(self._counter)}"

        # Set by aperturedb_pool.metrics when the pool is instrumented: the
        # recorder its slow paths report to (None: nothing is recorded, and
        # the lease paths are exactly those of a pool never instrumented), and
        # the Lease class lease() and query() create (a timing subclass then).
        self._metrics = None
        self._lease_type = Lease
        self._lock = threading.Lock()
        self._init_state()
        self._bg_wakeup = _Wakeup()
        self._bg_thread: threading.Thread | None = None
        self._tls = _ThreadMarks()  # per thread: when it last returned a lease
        _all_pools.add(self)
        if open:
            self.open()

    # -- state -------------------------------------------------------------
    def _init_state(self) -> None:
        # Everything below is guarded by self._lock, but _idle (see "Locking").
        self._idle: deque[_Slot] = deque()
        self._waiters: deque[_Waiter] = deque()
        # When the oldest waiter becomes overdue (its ``since`` plus
        # _handoff_after; inf while nobody waits): barging is allowed before
        # it.  Rewritten under the lock by _queue_changed after every change
        # of _waiters; the fast paths read it without the lock (see "Locking").
        self._overdue_at = math.inf
        # Fairness under CPU-bound load (_sample_cpu): no sample, no verdict.
        self._fair.reset()
        self._cpu_note: tuple[bool, float] | None = None  # a change to log
        self._all: set[_Slot] = set()  # every live slot: idle, leased, being pinged
        self._size = 0  # == len(self._all)
        self._pinging = 0  # slots out of _idle for a keepalive ping
        self._opening = 0
        self._open_requests = 0
        self._to_close: list[tuple[Any, str]] = []
        self._opens_running = 0
        # Callers of wait_ready(), each blocked on its own lock (created
        # locked): released by _notify_ready when the pool's readiness may
        # have changed.  A plain lock's release is one C call, which an
        # interruption cannot split (a Condition's notify is Python code).
        self._ready_waiters: list[threading.Lock] = []
        self._closed = False
        self._opened = False
        self._generation = 0
        self._open_failures = 0  # consecutive failed background opens
        self._last_open_error: BaseException | None = None
        self._unreachable_since: float | None = None
        self._next_open_at = 0.0
        # When an open last failed for good (a misconfiguration, see
        # diagnose): opens then wait (_next_open_at inf) for the next lease.
        self._permanent_at = -math.inf
        self._c: dict[str, Any] = dict(
            leases_waited=0, wait_time_total=0.0, wait_time_max=0.0,
            timeouts=0, rejected_waiters=0, connectors_opened=0, connectors_closed=0,
            keepalive_pings=0, probes=0, refill_failures=0, retries=0, give_ups=0,
            unknown_outcomes=0, leaks_reported=0)
        self._discarded: dict[str, int] = {}
        self._shared_data_override: Any = None
        # Leases granted: this plus the live slots' ``uses`` (a dropped slot's
        # count moves here), so the hot path counts without the lock.
        self._granted_base = 0
        # When a long waiter may next wake the background thread (a hint,
        # read and written without the lock: a race costs one wake-up more).
        self._long_wait_wakeup = 0.0

    def open(self, wait: bool = False, timeout: float | None = None) -> "ConnectionPool":
        """Start the pool: open ``min_size`` connectors in the background.

        With ``wait=True``, block until they are open (see ``wait_ready``).
        """
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            if not self._opened:
                self._opened = True
                self._open_requests = max(0, self.min_size - self._size - self._opening)
                self._opening += self._open_requests
        self._ensure_bg()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until ``min_size`` connectors are open.

        Fails fast: an open that failed for a reason retrying cannot fix (bad
        credentials, certificate, protocol) is raised at once.  Otherwise raises
        ``PoolTimeout`` after ``timeout`` seconds (default: the pool's timeout),
        chained to the last open error.
        """
        timeout = self.timeout if timeout is None else timeout
        if self._bg_thread is None and self._opened:
            self._ensure_bg()  # first use in a forked child
        deadline = _monotonic() + timeout
        while True:
            ready = threading.Lock()
            ready.acquire()
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if self._size >= self.min_size:
                    return
                err = self._last_open_error
                if err is not None and (getattr(err, "permanent", False) or
                                        not isinstance(err, ConnectorError)):
                    raise err
                left = deadline - _monotonic()
                if left <= 0:
                    raise PoolTimeout(
                        f"pool {self.name!r}: {self._size} of min_size {self.min_size} "
                        f"connectors open after {timeout:.3g} s; last error: {err!r}") from err
                self._ready_waiters.append(ready)
            ready.acquire(timeout=left)

    def _notify_ready(self) -> None:
        # Under the lock: wake every wait_ready() caller to look again.
        for ready in self._ready_waiters:
            try:
                ready.release()
            except RuntimeError:  # pragma: no cover - released already
                pass
        self._ready_waiters.clear()

    # -- leasing -----------------------------------------------------------
    def lease(self, timeout: float | None = None) -> Lease:
        """A context manager that leases one connector: ``with pool.lease() as conn:``.

        Waits up to ``timeout`` seconds (default: the pool's ``timeout``).
        """
        if timeout is not None:
            _validate.duration("timeout", timeout, optional=False)
        # Read, then called: ``self._lease_type(...)`` would be a method-call
        # lookup that CPython 3.11 cannot specialize for a class held in an
        # attribute (about 25 ns per lease).
        make = self._lease_type
        return make(self, timeout)

    def acquire(self, timeout: float | None = None) -> Lease:
        """Lease a connector now; return the Lease (``lease.conn`` is the connector).

        For frameworks whose request start and end are separate hooks.  Release
        with ``lease.release()`` or ``pool.release(lease)``; a lease dropped
        without release is reclaimed (its connector closed) with a ResourceWarning.
        """
        if timeout is not None:
            _validate.duration("timeout", timeout, optional=False)
        lease = _ManualLease(self, timeout)
        try:
            self._acquire(lease)
            if self._metrics is not None:
                lease._granted = _monotonic()
        except BaseException as e:
            # Interrupted once the connector was the lease's: nobody will
            # release it.
            if lease._slot is not None and lease._slot is not _RELEASED:
                self._release(lease, e)
            raise
        return lease

    def release(self, lease: Lease, error: BaseException | None = None) -> None:
        """Return a lease obtained from ``acquire()``."""
        if not isinstance(lease, Lease) or lease._pool is not self:
            raise LeaseError(f"release() takes a Lease of pool {self.name!r}, got {lease!r}")
        self._release(lease, error)

    def _acquire(self, lease: Lease) -> None:
        if lease._slot is not None:
            raise LeaseError("this lease is already acquired; use a new pool.lease()")
        start = _monotonic()
        timeout = (self.timeout if lease._timeout is None else
                   _validate.duration("timeout", lease._timeout, optional=False))
        # One absolute deadline for the whole acquisition: a connector that
        # turns out unusable after a wait is replaced within the same time.
        deadline = start + timeout
        me = _get_ident()
        lease._req = start
        while True:
            now = _monotonic()
            slot = None
            with self._lock:
                if not self._closed and now < self._overdue_at:
                    slot = self._pop_idle()
                    if slot is not None:
                        slot.holder = lease
            if slot is None:
                slot = self._wait_for_slot(lease, start, deadline, timeout)
                now = _monotonic()
            # Outside the lock: a connector the pool could know is unusable is
            # never handed out.
            if (slot.generation != self._generation or now >= slot.expires or self._closed or
                    (now - slot.returned > self.probe_after and self._unhealthy(slot))):
                self._discard_checked_out(slot)
                continue
            break
        slot.owner = me
        # When this lease was asked for (a fast-path checkout stores the same:
        # it asks and gets at once): the looping test of the return compares
        # it with the thread's previous return.  With leak tracking, when it
        # was granted (the age the leak warning reports).
        slot.leased_at = start
        slot.uses += 1
        if self.leak_threshold is not None:
            slot.leased_at = _monotonic()
            slot.lease_stack = traceback.format_stack(limit=18)[:-2]  # drop _acquire + its caller here
            slot.leak_reported = False
        lease._slot = slot

    def _unhealthy(self, slot: _Slot) -> bool:
        sock = socket_of(slot.conn)
        if sock is None or slot.poller is None:
            return False  # a stand-in, or an SDK connector that never connected
        self._c["probes"] += 1  # approximate under races; statistics only
        reason = probe_socket(sock)
        if reason is not None:
            logger.info("pool %r: connector %d failed its checkout probe: %s",
                        self.name, slot.id, reason)
            if reason in (PEER_CLOSED, TLS_READABLE):
                # The server went away: retire every connector opened before now.
                self._on_peer_closed(slot, "the server closed a connection")
            slot.in_flight = True
            return True
        return False

    def _discard_checked_out(self, slot: _Slot) -> None:
        # A slot taken for a checkout that cannot be handed out.
        with self._lock:
            closed = self._closed
            if slot in self._all:
                reason = ("closed" if closed else
                          "retired" if slot.generation != self._generation else
                          "probe" if slot.in_flight else "expired")
                self._drop(slot, reason)
                self._maybe_grow()
        if closed:
            self._close_pending()
        else:
            self._bg_wakeup.set()

    def _asked_right_after_return(self, asked: float) -> bool:
        # The looping test (the fast keep-return in Lease.__exit__ inlines
        # it): was this lease asked for within _LOOP_GAP of the calling
        # thread's previous return?
        return asked - self._tls.released < _LOOP_GAP

    def _hand_out_stranded(self, now: float) -> None:
        with self._lock:
            idle = self._idle
            while self._waiters:
                try:
                    oldest = idle[0]
                except IndexError:
                    return
                if now - oldest.returned <= _LOOP_GAP:
                    return
                # Only fast-path checkouts pop without the lock, from the
                # right: popleft gives ``oldest`` unless they took it.
                try:
                    got = idle.popleft()
                except IndexError:
                    return
                if got is not oldest:  # pragma: no cover - see above
                    idle.appendleft(got)
                    return
                self._handoff(got)

    def _pop_idle(self) -> _Slot | None:
        # The newest idle slot, or None.  Never "check, then pop" alone: a
        # fast-path checkout may take the last slot in between, so the pop
        # is guarded too.  The check first spares the common empty case an
        # exception (which costs about as much as a whole lease).
        idle = self._idle
        if idle:
            try:
                return idle.pop()
            except IndexError:
                pass
        return None

    def _take_all_idle(self) -> list[_Slot]:
        # Under the lock: remove every idle slot (oldest first) and own them.
        taken = []
        idle = self._idle
        while True:
            try:
                taken.append(idle.popleft())
            except IndexError:
                return taken

    def _settle(self) -> None:
        # A fast return saw waiters or a closed pool after it appended its
        # slot to _idle: hand idle slots to the waiters, or close them.
        with self._lock:
            closed = self._closed
            if closed:
                for slot in self._take_all_idle():
                    self._drop(slot, "closed")
            else:
                self._serve_from_idle()
        if closed:
            self._close_pending()

    def _serve_from_idle(self, me: _Waiter | None = None) -> _Slot | None:
        # Under the lock: hand idle slots to the waiters in order, dropping
        # those not worth a waiter's turn (retired, expired).  When ``me``
        # reaches the head of the queue it leaves the queue and the slot is
        # returned to it instead of handed over.
        now = _monotonic()
        while self._waiters:
            slot = self._pop_idle()
            if slot is None:
                return None
            if slot.generation != self._generation or now >= slot.expires:
                self._drop(slot, "retired" if slot.generation != self._generation
                           else "expired")
                self._maybe_grow()
                continue
            if self._waiters[0] is me:
                self._waiters.popleft()
                self._queue_changed()
                slot.holder = me
                me._slot = slot
                return slot
            self._handoff(slot)
        return None

    def _wait_for_slot(self, lease: Lease, start: float, deadline: float,
                       timeout: float) -> _Slot:
        # ``start``: when the lease was asked for (the waiter's place in the
        # fairness order); ``deadline``: when the whole acquisition gives up.
        waiter = _Waiter(start)
        slot: _Slot | None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            if not self._opened:
                raise PoolError(f"pool {self.name!r} is not open: it was created with "
                                f"open=False; call pool.open() first")
            # An idle connector may have appeared since the first look: it is
            # this caller's unless a waiter is overdue, then it is owed to that
            # waiter (handing it over frees a place in the queue; this caller
            # queues behind).
            slot = self._pop_idle()
            if slot is not None:
                if start < self._overdue_at:
                    slot.holder = lease
                    return slot
                self._handoff(slot)
            if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
                self._c["rejected_waiters"] += 1
                raise TooManyWaiters(
                    f"pool {self.name!r}: {len(self._waiters)} callers already waiting "
                    f"(max_waiting={self.max_waiting}); size {self._size}/{self.max_size}, "
                    f"leased {self._leased_count()}. Raise max_waiting or max_size, or shed "
                    f"load")
            if not self._waiters:  # contention starts (again)
                self._forget_stale_cpu_bound(start)
            if self._next_open_at == math.inf:  # opens failed for good: one more try
                self._next_open_at = 0.0
                self._bg_wakeup.set()
            try:
                self._waiters.append(waiter)
                self._queue_changed()
                # Appended before this second look (see "Locking"): a fast
                # return either left its slot for this look or sees the waiter.
                slot = self._serve_from_idle(waiter)
                if slot is not None:
                    slot.holder = lease
                    return slot
                self._maybe_grow()
            except BaseException:
                # Interrupted here (nobody can hand this waiter a slot while
                # the lock is held): leave no waiter behind.
                self._remove_waiter(waiter)
                raise
        try:
            slot = self._wait_queued(waiter, start, deadline, timeout)
            # The lease becomes the holder while this frame still refers to
            # the waiter: a waiter only its slot refers to was abandoned (see
            # _find_lost).
            slot.holder = lease
            return slot
        except BaseException:
            # Interrupted (KeyboardInterrupt, a signal handler) or failed:
            # never leave a queued waiter behind, nor a connector handed to it.
            self._abandon_wait(waiter)
            raise

    def _abandon_wait(self, waiter: _Waiter) -> None:
        with self._lock:
            self._remove_waiter(waiter)
            slot, waiter._slot = waiter._slot, None
            if slot is not None:
                # Given, then abandoned: the caller got no lease, so its wait
                # is not counted as a lease that waited (the longest wait
                # stays: it was waited).
                c = self._c
                c["leases_waited"] = max(0, c["leases_waited"] - 1)
                c["wait_time_total"] = max(0.0, c["wait_time_total"] - waiter.waited)
                if self._metrics is not None:
                    self._metrics.unwaited(waiter.waited)
                self._put_back(slot)
        self._close_pending_if_closed()

    def _put_back(self, slot: _Slot) -> None:
        # Under the lock: a slot taken for someone who will not use it.
        if self._closed or slot.generation != self._generation:
            self._drop(slot, "closed" if self._closed else "retired")
            self._maybe_grow()
        elif self._waiters:
            self._handoff(slot)
        else:
            slot.holder = None
            self._idle.append(slot)

    def _close_pending_if_closed(self) -> None:
        # After close() the background thread is gone: whoever drops a
        # connector then closes it.
        if self._closed and self._to_close:
            self._close_pending()

    def _wait_queued(self, waiter: _Waiter, start: float, deadline: float,
                     timeout: float) -> _Slot:
        lock = self._lock
        slot: _Slot | None
        if self._bg_thread is None and self._opened:
            self._ensure_bg()  # first use in a forked child
        # Wait outside the pool lock.  No wake-up is needed when this waiter
        # becomes overdue: from then on the lease paths see it and hand
        # connectors over instead of barging, which serves it within about
        # one hold.  The first timed wake-up, 1 ms after that (5 ms after
        # the request at the earliest), catches a connector left idle by
        # looping threads that did not come back (their loops ended); each
        # wake-up costs a thread switch, so later ones back off.
        ha = self._fair.handoff_after
        slice_ = max(0.005, start + ha + 0.001 - _monotonic())
        while True:
            left = deadline - _monotonic()
            got = waiter.lock.acquire(timeout=min(max(left, 0.0), slice_)) if left > 0 else False
            if got:
                slot = waiter._slot
                if slot is None:  # woken by close()
                    raise PoolClosed(f"pool {self.name!r} was closed while waiting")
                break
            with lock:
                if waiter._slot is not None:  # handed over as we timed out
                    slot = waiter._slot
                    break
                now = _monotonic()
                if self._closed:
                    self._remove_waiter(waiter)
                    raise PoolClosed(f"pool {self.name!r} was closed while waiting")
                if waiter not in self._waiters:
                    # A hand-off interrupted between taking this waiter off
                    # the queue and giving it the connector: queue again, at
                    # the head (its connector is found by the maintenance
                    # thread).
                    self._waiters.appendleft(waiter)
                    self._queue_changed()
                # Idle connectors left by barging threads go to the waiters
                # in order, this one included.
                slot = self._serve_from_idle(waiter)
                if slot is not None:
                    waiter._slot = slot  # recorded: see _abandon_wait
                    waiter.waited = now - start
                    self._count_wait(waiter.waited)
                    break
                if self._permanent_at >= start and self._size == 0 and \
                        self._next_open_at == math.inf and self._last_open_error is not None:
                    # An open since this request failed for a reason retrying
                    # cannot fix, and no connector can come back.
                    self._remove_waiter(waiter)
                    raise copy.copy(self._last_open_error) from None
                if now >= deadline:
                    self._remove_waiter(waiter)  # "waiting" counts the other callers
                    self._c["timeouts"] += 1
                    raise PoolTimeout(self._timeout_message(timeout))
                self._maybe_grow()
            if slice_ >= _LONG_WAIT and now >= self._long_wait_wakeup:
                # Waiting long: let the background thread look for connectors
                # lost to an interruption now rather than at its next round
                # (at most every _LONG_WAIT, whatever the number of waiters).
                self._long_wait_wakeup = now + _LONG_WAIT
                self._bg_wakeup.set()
            slice_ = min(max(slice_ * 2, 0.005), 0.25)
        # ``waiter._slot`` stays set until the caller holds the slot: an
        # interruption before then is undone by _abandon_wait.
        return slot

    def _remove_waiter(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        self._queue_changed()

    def _queue_changed(self) -> None:
        # Under the lock, after every change of _waiters.
        waiters = self._waiters
        self._overdue_at = waiters[0].since + self._fair.handoff_after if waiters else math.inf

    def _timeout_message(self, timeout: float) -> str:
        # Called under the lock.
        msg = (f"pool {self.name!r}: no connector available within {timeout:.3g} s "
               f"(size {self._size}/{self.max_size}, leased {self._leased_count()}, "
               f"idle {len(self._idle)}, waiting {len(self._waiters)}, "
               f"opening {self._opening})")
        mine = self._held_by_caller()
        if mine:
            msg += (f"; the calling thread itself holds {mine} of them: a lease taken (or "
                    f"pool.query() called) inside another lease of the same pool waits for "
                    f"a connector this thread will not return before it gets one. Query "
                    f"through the connector you hold, or raise max_size above the leases "
                    f"one thread holds at once")
        if self._unreachable_since is not None:
            msg += (f"; the server has been unreachable for "
                    f"{_monotonic() - self._unreachable_since:.1f} s "
                    f"(last error: {self._last_open_error!r})")
        elif not mine:
            msg += ("; raise max_size or timeout, or hold leases for less time "
                    "(leak_threshold finds leases held too long)")
        return msg

    def _held_by_caller(self) -> int:
        # Under the lock, when a lease timed out: how many connectors leases
        # asked for by the calling thread hold now.
        me = _get_ident()
        return sum(1 for s in self._all
                   if isinstance(s.holder, Lease) and s.holder._thread == me and
                   s.holder._slot is s)

    def _handoff(self, slot: _Slot) -> None:
        # Under the lock: give slot to the oldest waiter.  Its wait is counted
        # here, so the woken thread goes straight to its connector (the time
        # it takes to wake up is time the connector sits unused).
        waiter = self._waiters.popleft()
        self._queue_changed()
        now = _monotonic()
        fair = self._fair
        if now >= fair.next_sample and fair.detects:
            self._sample_cpu(now)
        waiter.waited = now - waiter.since
        self._count_wait(waiter.waited)
        slot.holder = waiter
        waiter._slot = slot
        waiter.lock.release()

    def _sample_cpu(self, now: float) -> None:
        # Under the lock, at a hand-off (so only under contention), at most
        # every CPU_WINDOW: is the process CPU-bound?  Then each hand-off's
        # thread switch costs every thread throughput, and the longer
        # threshold applies (see "Fairness").
        if self._fair.sample(now, _process_time()):
            self._verdict_changed()

    def _set_cpu_bound(self, bound: bool) -> None:
        # Under the lock.
        self._fair.set_cpu_bound(bound)
        self._verdict_changed()

    def _verdict_changed(self) -> None:
        # Under the lock: the threshold in force changed.  The background
        # thread logs the change (no logging under the lock: a slow handler
        # would stall every lease).
        self._queue_changed()
        self._cpu_note = (self._fair.cpu_bound, self._fair.handoff_after)
        self._bg_wakeup.set()

    @property
    def _handoff_after(self) -> float:
        return self._fair.handoff_after

    @property
    def _cpu_bound(self) -> bool:
        return self._fair.cpu_bound

    def _log_cpu_note(self) -> None:
        with self._lock:
            note, self._cpu_note = self._cpu_note, None
        if note is not None:
            logger.debug("pool %r: %s; connectors go first come, first served after %.0f ms",
                         self.name, "the process is CPU-bound" if note[0] else
                         "the process is no longer CPU-bound", note[1] * 1e3)

    def _forget_stale_cpu_bound(self, now: float) -> None:
        # Under the lock: contention starts again, or stats are read.
        if self._fair.forget_stale(now):
            self._verdict_changed()

    def _count_wait(self, waited: float) -> None:
        # Under the lock.
        c = self._c
        c["leases_waited"] += 1
        c["wait_time_total"] += waited
        if waited > c["wait_time_max"]:
            c["wait_time_max"] = waited
        if self._metrics is not None:
            self._metrics.waited(waited)

    def _leased_count(self) -> int:
        # Under the lock.  Slots in passage count as leased (see "Locking").
        return max(0, self._size - len(self._idle) - self._pinging)

    def _maybe_grow(self) -> None:
        # Under the lock: ask the background thread for connectors while there
        # are more waiters than connectors on their way, up to max_size.
        if self._closed or not self._opened:
            return
        want = min(len(self._waiters) - self._opening,
                   self.max_size - self._size - self._opening)
        if want > 0:
            self._opening += want
            self._open_requests += want
            self._bg_wakeup.set()

    def _release(self, lease: Lease, error: BaseException | None,
                 reason: str | None = None) -> None:
        slot = lease._slot
        if slot is None or slot is _RELEASED:
            if slot is _RELEASED:
                raise LeaseError("this lease was already released")
            raise LeaseError("this lease was never acquired")
        lease._slot = _RELEASED
        slot.owner = None
        now = _monotonic()
        if self._metrics is not None and isinstance(lease, _ManualLease):
            self._metrics.released(lease, now)
        # A thread that asked for this lease right after returning its
        # previous one is in a loop: it will ask again at once, so it may
        # re-take this connector (see the module doc on fairness).  A
        # fast-path checkout did not wait: it asked when it got the slot.
        req = slot.leased_at if self._plain else lease._req
        looper = self._asked_right_after_return(req)
        self._tls.released = now
        if slot.lease_stack is not None:
            self._note_return(slot, now)
        # Health on return: interrupted queries and dirty sockets are discarded.
        drop_reason = reason
        if drop_reason is None:
            if slot.in_flight or (error is not None and not slot.tracked):
                drop_reason = "interrupted" if error is not None else "broken"
            elif error is not None and slot.poller is not None and \
                    probe_socket(socket_of(slot.conn)) is not None:
                drop_reason = "probe"
            elif now >= slot.expires:
                drop_reason = "expired"
        slot.returned = now
        closed_now = False
        with self._lock:
            if slot not in self._all:
                # Leased before a fork, or reclaimed: not part of the pool's
                # accounting any more.
                self._to_close.append((slot.conn, "foreign"))
                closed_now = True
                wake = False
            else:
                if isinstance(error, OutcomeUnknown):
                    self._c["unknown_outcomes"] += 1
                if drop_reason is not None or self._closed or slot.generation != self._generation:
                    if drop_reason is None:
                        drop_reason = "closed" if self._closed else "retired"
                    self._drop(slot, drop_reason)
                    self._maybe_grow()
                    wake = True
                    closed_now = self._closed
                else:
                    wake = False
                    if self._waiters and (not looper or now >= self._overdue_at):
                        self._handoff(slot)
                    else:
                        slot.holder = None
                        self._idle.append(slot)
        if wake:
            self._bg_wakeup.set()
        if closed_now:
            self._close_pending()
        if error is not None and getattr(error, "peer_closed", False):
            self._on_peer_closed(slot, f"a connector failed: {error}")

    def _drop(self, slot: _Slot, reason: str) -> None:
        # Under the lock: forget slot and have the background thread close it.
        self._all.discard(slot)
        self._granted_base += slot.uses
        self._size -= 1
        self._discarded[reason] = self._discarded.get(reason, 0) + 1
        self._to_close.append((slot.conn, reason))
        if self._opened and not self._closed:
            need = self.min_size - self._size - self._opening
            if need > 0:
                self._opening += need
                self._open_requests += need
                self._bg_wakeup.set()  # every drop site: the refill starts now

    def _note_return(self, slot: _Slot, now: float) -> None:
        if slot.leak_reported:
            logger.warning("pool %r: connector %d came back after %.3f s (it was reported as "
                           "possibly leaked)", self.name, slot.id, now - slot.leased_at)
        slot.lease_stack = None
        slot.leak_reported = False

    # -- retirement, closing -----------------------------------------------
    def retire_all(self) -> int:
        """Retire every connector open now: idle ones are closed at once, leased
        ones when they come back; new connectors replace them.  Use after a
        server restart or a credentials change.  Returns how many were retired."""
        return self._retire_generation(None, "retire_all() called")

    def _on_peer_closed(self, slot: _Slot, why: str) -> None:
        """The server closed ``slot``'s connection: did it go away, or did one
        connection die?  The other connectors of the same generation that are
        not in the middle of a query are probed (a zero-timeout poll, which
        reads nothing): if one of them was closed too, the server went away
        (restart, crash) and the whole generation is retired at once; if all
        look healthy, only this connector was lost (a proxy reset, an idle
        timeout) and the others stay.  With no sibling to probe, the pool
        retires: the safe side when it cannot tell."""
        with self._lock:
            if self._closed or slot.generation != self._generation:
                return
            siblings = [s for s in self._all
                        if s is not slot and s.generation == slot.generation and
                        s.poller is not None and not s.in_flight]
        for s in siblings:
            sock = socket_of(s.conn)
            if sock is not None and probe_socket(sock) in (PEER_CLOSED, TLS_READABLE):
                break
        else:
            if siblings:
                logger.info("pool %r: %s; %d other connector(s) look healthy: only this one "
                            "is replaced", self.name, why, len(siblings))
                return
        self._retire_generation(slot.generation, why)

    def _retire_generation(self, generation: int | None, _reason: str) -> int:
        # Retire the current generation, unless the failing connector belongs
        # to an older one: then it was already retired with its siblings, and
        # the connectors opened since are not suspect.
        with self._lock:
            if self._closed or (generation is not None and generation != self._generation):
                return 0
            self._generation += 1
            n = len(self._all)
            for slot in self._take_all_idle():
                self._drop(slot, "retired")
            self._maybe_grow()
        if n:
            logger.warning("pool %r: retired %d connector(s): %s", self.name, n, _reason)
        self._bg_wakeup.set()
        return n

    def close(self, timeout: float | None = 0.0) -> None:
        """Close the pool.  Idempotent.

        Every waiter gets ``PoolClosed``; idle connectors are closed now; leased
        ones are closed when they come back.  With ``timeout`` > 0, wait that long
        for leases to come back, then close the rest under their holders (whose
        queries then fail).  The background thread is stopped.
        """
        with self._lock:
            already = self._closed
            self._closed = True
            self._fast = False
            waiters = list(self._waiters)
            self._waiters.clear()
            self._queue_changed()
            # _closed is set first: a fast return that appends after this
            # drain sees it and closes its slot (_settle).
            for slot in self._take_all_idle():
                self._drop(slot, "closed")
            self._open_requests = 0
            self._opening = 0
            self._notify_ready()
        for w in waiters:
            w.lock.release()  # slot None: the waiter raises PoolClosed
        if timeout and not already:
            deadline = _monotonic() + timeout
            while _monotonic() < deadline:
                with self._lock:
                    if not self._all:
                        break
                time.sleep(0.01)
            with self._lock:
                held = [slot.conn for slot in self._all]
            for conn in held:
                # A socket is shut down, not closed: the holder's pending read
                # ends with EOF (OutcomeUnknown) and the connector is closed
                # when it comes back.  Objects without a socket are closed.
                sock = socket_of(conn)
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                    else:
                        conn.close()
                except (OSError, AttributeError):
                    pass
        self._bg_wakeup.set()
        t = self._bg_thread
        if t is not None and t is not threading.current_thread() and t.is_alive():
            t.join(timeout=5.0)
        self._close_pending()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.stats()}>"

    # -- stats ---------------------------------------------------------------
    def stats(self, reset: bool = False) -> PoolStats:
        """An immutable snapshot; with ``reset=True`` the counters restart at zero.

        Leases dropped without release are reclaimed first (see "Interruptions").
        """
        self._recover_lost(_monotonic())
        with self._lock:
            self._forget_stale_cpu_bound(_monotonic())
            c = dict(self._c)
            fair = self._fair
            c["cpu_bound_seconds"] = fair.bound_seconds
            uses = sum(s.uses for s in self._all)
            c["leases_granted"] = self._granted_base + uses
            s = PoolStats(
                name=self.name, min_size=self.min_size, max_size=self.max_size,
                size=self._size, idle=len(self._idle), leased=self._leased_count(),
                waiting=len(self._waiters), opening=self._opening,
                discarded=dict(self._discarded), generation=self._generation,
                cpu_bound=fair.cpu_bound, handoff_after=fair.handoff_after, **c)
            if reset:
                for k in self._c:
                    self._c[k] = 0.0 if isinstance(self._c[k], float) else 0
                fair.bound_seconds = 0.0
                self._discarded = {}
                self._granted_base = -uses
                if self._metrics is not None:
                    self._metrics.counters_reset(s)  # exported counters stay monotonic
        return s

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    # -- queries through the retry policy ------------------------------------
    def connector(self) -> "PooledConnector":
        """A connector every thread may share (``aperturedb_pool.shared``).

        Looks like an SDK ``Connector`` to the SDK's helpers (``ParallelLoader``,
        ``ParallelQuery``, ``Utils``, ``execute_query``); each of its queries
        runs through ``query()`` below, on a connector leased for that query.
        A pool built from a ``connector_factory`` (no template) leases one
        connector here to copy the SDK attributes (``host``, ``config``, ...).
        """
        from aperturedb_pool.shared import PooledConnector

        return PooledConnector(self)

    def query(self, q: Any, blobs: Any = None, *, idempotent: bool | None = None,
              timeout: float | None = None, retry: Any = None) -> Any:
        """Run one query under the retry policy; returns what ``Connector.query`` returns.

        Each attempt leases a connector (bounded by the policy's remaining
        deadline) and discards it if the attempt failed.  A transport failure
        after the request was sent is retried only when the query is
        idempotent: every command a read (see ``retry.is_read_only``), or
        ``idempotent=True``.  Otherwise ``OutcomeUnknown`` is raised, carrying the
        query, and the query is never re-sent.  ``timeout`` is the per-query
        bound of each attempt's whole exchange, request and response (default:
        the pool's ``query_timeout``, a bound of each read); the policy's
        ``deadline`` bounds every attempt's exchange too.  Past either,
        ``QueryTimeout`` (an unknown outcome) and the connector is discarded.
        """
        if idempotent is None:
            idempotent = self._is_read_only(q)
        blobs = [] if blobs is None else blobs
        qt = None if timeout is None else _check_duration("timeout", timeout, allow_zero=False)
        # Each attempt is conn.query(q, blobs), run by _run_policy itself (no
        # closure per call).
        return self._run_policy(None, idempotent=idempotent, retry=retry,
                                describe=lambda: _describe_query(q), q=q, blobs=blobs,
                                attempt_timeout=qt)

    def run(self, fn: Callable[..., T], *args: Any, retry: Any = None, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` with a leased connector, under the policy.

        The callable is retried after a transport failure only if it declares
        itself idempotent (``fn.idempotent = True``, e.g. with the
        ``retry.idempotent`` decorator); a connect failure (nothing sent) is
        always retried.
        """
        idem = bool(getattr(fn, "idempotent", False))
        return self._run_policy(lambda conn: fn(conn, *args, **kwargs), idempotent=idem,
                                retry=retry, describe=getattr(fn, "__name__", "callable"))

    def _run_policy(self, body: Callable[[Any], T] | None, *, idempotent: bool, retry: Any,
                    describe: str | Callable[[], str], q: Any = None, blobs: Any = None,
                    attempt_timeout: float | None = None) -> T:
        # body None: each attempt is conn.query(q, blobs).
        policy = self.retry if retry is None else retry

        def one_attempt(remaining: float | None) -> T:
            started = _monotonic()
            wait = self.timeout if remaining is None else max(0.0, min(self.timeout, remaining))
            # The pool's Lease (its fast paths; a timing subclass when
            # instrumented), released below on every path.
            make = self._lease_type  # (see lease())
            lease = make(self, wait)
            try:
                conn = lease.__enter__()
            except PoolTimeout as e:
                with self._lock:
                    down = self._unreachable_since
                    err = self._last_open_error
                if down is not None:
                    raise ServerUnreachable(
                        f"pool {self.name!r}: the server has been unreachable for "
                        f"{_monotonic() - down:.1f} s (last error: {err!r}); gave up at the "
                        f"deadline. Check that the server is up and reachable") from e
                raise
            slot = lease._slot
            phase = slot.phase if slot is not None and slot.tracked else None
            # The policy's deadline (and the per-call timeout) bound the
            # exchange itself, not only the wait for a connector: the
            # connector's wrappers bound every read by it.  Cleared before the
            # connector goes back: an interruption before the clearing skips
            # the return too (the slot is then recovered, never reused with a
            # stale deadline).
            until = None if remaining is None else started + remaining
            if attempt_timeout is not None:
                own = _monotonic() + attempt_timeout
                until = own if until is None else min(until, own)
            if phase is not None:
                # Far deadlines are watched by the background thread
                # (_expire_overdue), near ones bound the socket (connectors).
                phase.watched = True
                phase.expired = False
                phase.deadline = until
            reached = phase.reached if phase is not None else 0
            try:
                result = conn.query(q, blobs) if body is None else body(conn)
            except BaseException as e:
                if phase is not None:
                    phase.deadline = None
                    phase.watched = False
                lease.__exit__(type(e), e, None)  # counts an unknown outcome
                if (isinstance(e, ConnectFailed) and not idempotent and phase is not None and
                        phase.reached > reached):
                    # This query was not sent, but an earlier one of the same
                    # unit may have run: the unit as a whole must not be re-run.
                    unknown = OutcomeUnknown(
                        f"{describe if isinstance(describe, str) else describe()}: the "
                        f"connection failed after an earlier query of this "
                        f"unit reached the server ({e}); the unit may have partly run, and is "
                        f"not re-run because it is not declared idempotent", query=e.query)
                    self._count("unknown_outcomes")
                    raise unknown from e
                raise
            if phase is not None:
                phase.deadline = None
                phase.watched = False
            lease.__exit__(None, None, None)
            return result

        try:
            return policy.call(one_attempt, idempotent=idempotent, describe=describe,
                               on_retry=self._on_retry)
        except (ConnectorError, ServerUnreachable) as e:
            self._count("give_ups")
            if self._metrics is not None and isinstance(e, OutcomeUnknown) and not idempotent:
                self._metrics.write_not_retried()
            raise

    def _on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        self._count("retries")
        if self._metrics is not None:
            self._metrics.retried(exc)

    # -- background work -------------------------------------------------------
    def _ensure_bg(self) -> None:
        with self._lock:
            t = self._bg_thread
            if t is not None and t.is_alive():
                return
            t = threading.Thread(target=_maintenance_loop, args=(weakref.ref(self),
                                                                self._bg_wakeup),
                                 name=f"aperturedb-pool-{self.name}", daemon=True)
            self._bg_thread = t
        t.start()
        self._bg_wakeup.set()

    def _close_pending(self) -> None:
        with self._lock:
            todo, self._to_close = self._to_close, []
        for conn, _reason in todo:
            _close_quietly(conn)
        if todo:
            with self._lock:
                self._c["connectors_closed"] += len(todo)

    def _new_connector(self) -> tuple[Any, _Slot]:
        conn = self._clone()
        if self._shared_data_override is not None and hasattr(conn, "shared_data"):
            conn.shared_data = self._shared_data_override
        with self._lock:
            gen = self._generation
        slot = _Slot(conn, gen, _monotonic(), self.max_lifetime, self.keepalive_interval)
        if self.check_ownership:
            # Installed for the connector's whole life: outside a lease its
            # owner is None and any query raises.
            slot.check_owner = _connectors.OwnershipCheck(slot)
        slot.tracked = _connectors.instrument(conn, slot, tcp_keepalive=self.tcp_keepalive,
                                              query_timeout=self.query_timeout,
                                              probe_after=self.probe_after,
                                              connect_timeout=self.connect_timeout)
        try:
            if hasattr(conn, "_connect"):
                conn.connect()
                # One round trip: authenticates the shared session if needed and
                # proves the connection works before anyone leases it.
                slot.owner = _get_ident()
                self._ping(conn, slot)
                slot.owner = None
        except BaseException:
            _close_quietly(conn)
            raise
        return conn, slot

    def _ping(self, conn: Any, slot: _Slot) -> None:
        # Bounded by connect_timeout, so that a server that stopped answering
        # cannot hold the background thread (or an opener) forever: through
        # the connector's deadline (which bounds every read, the session steps
        # before the request and the wait for the session lock), or, for an
        # object the pool cannot observe, its socket's timeout.
        if slot.tracked:
            slot.phase.watched = False  # bounded by the socket: no one watches the watcher
            slot.phase.deadline = _monotonic() + self.connect_timeout
            try:
                response, _ = conn.query([{"GetStatus": {}}])
            finally:
                slot.phase.deadline = None
        else:
            sock = socket_of(conn)
            bounded = sock is not None and hasattr(sock, "settimeout")
            if bounded:
                sock.settimeout(self.connect_timeout)
            try:
                response, _ = conn.query([{"GetStatus": {}}])
            finally:
                if bounded and socket_of(conn) is sock:
                    try:
                        sock.settimeout(self.query_timeout)
                    except OSError:
                        pass
        if not (isinstance(response, list) and response and
                isinstance(response[0], dict) and
                response[0].get("GetStatus", {}).get("status") == 0):
            raise ConnectorError(f"unexpected GetStatus response: {str(response)[:200]}")

    def _open_worker(self) -> None:
        ok = False
        try:
            ok = self._open_one()
        finally:
            with self._lock:
                self._opens_running -= 1
                if not ok and not self._closed:
                    self._open_requests += 1
            self._bg_wakeup.set()
            self._close_pending_if_closed()  # opened while close() ran

    def _open_one(self) -> bool:
        """Open one requested connector (background thread).  True on success."""
        started = _monotonic()
        try:
            conn, slot = self._new_connector()
        except BaseException as e:  # noqa: B902 - reported, then retried with backoff
            now = _monotonic()
            with self._lock:
                self._open_failures += 1
                self._c["refill_failures"] += 1
                self._last_open_error = e
                if self._unreachable_since is None:
                    self._unreachable_since = now
                delay = random.uniform(0, min(self.reconnect_max, self.reconnect_initial *
                                              2 ** (self._open_failures - 1)))
                permanent = getattr(e, "permanent", False)
                if permanent:  # retrying cannot fix it: the next lease tries once more
                    delay, self._permanent_at = math.inf, now
                self._next_open_at = now + delay
                self._notify_ready()
            if permanent:
                logger.log(logging.WARNING if self._open_failures == 1 else logging.DEBUG,
                           "pool %r: opening a connector failed: %s", self.name, e)
                return False
            logger.warning("pool %r: opening a connector failed (%d in a row): %s; next try "
                           "in %.3f s", self.name, self._open_failures, e, delay)
            return False
        with self._lock:
            self._opening = max(0, self._opening - 1)
            self._open_failures = 0
            self._unreachable_since = None
            self._last_open_error = None
            self._c["connectors_opened"] += 1
            if self._metrics is not None:
                self._metrics.created(_monotonic() - started)
            if self._closed:
                self._to_close.append((conn, "closed"))
                return True
            self._size += 1
            self._all.add(slot)
            if self._waiters:
                self._handoff(slot)
            else:
                self._idle.appendleft(slot)
            self._notify_ready()
        return True

    def _maintain(self, now: float) -> float:
        """One round of background work; returns seconds until the next round."""
        next_round = min(1.0, self._recover_lost(now), self._expire_overdue(now))
        self._log_cpu_note()
        # Opens requested by waiters, shrinking and min_size: each in an
        # opener thread, so that a slow or hanging connect never stalls the
        # maintenance of the connectors already open.
        while True:
            with self._lock:
                if (self._closed or self._open_requests <= 0 or
                        self._opens_running >= _MAX_PARALLEL_OPENS):
                    break
                if now < self._next_open_at:
                    next_round = min(next_round, self._next_open_at - now)
                    break
                self._open_requests -= 1
                self._opens_running += 1
            threading.Thread(target=self._open_worker, daemon=True,
                             name=f"aperturedb-pool-{self.name}-open").start()
        self._close_pending()
        with self._lock:
            if self._closed:
                return next_round
            pings: list[_Slot] = []
            # Idle connectors: expire, shrink, keepalive (oldest are leftmost).
            # A snapshot, and remove() what is dropped or pinged: a fast-path
            # checkout may take any of these slots meanwhile (remove() then
            # fails and the slot is theirs).
            keep: list[_Slot] = []
            excess = self._size - self.min_size
            idle = self._idle
            for slot in idle.copy():
                if self._idle_verdict(slot, now, excess) is None:
                    keep.append(slot)
                    continue
                try:
                    idle.remove(slot)
                except ValueError:
                    continue  # checked out meanwhile
                # Ours now, and its fields cannot change any more: decide
                # again (it may have been leased and returned since the copy).
                verdict = self._idle_verdict(slot, now, excess)
                if verdict is None:
                    idle.append(slot)  # used since the copy: the newest end
                    keep.append(slot)
                    continue
                if verdict == "ping":
                    slot.holder = _MAINTENANCE
                    pings.append(slot)
                    self._pinging += 1
                else:
                    if verdict == "idle":
                        excess -= 1
                    self._drop(slot, verdict)
            if self.keepalive_interval:
                for slot in keep:
                    next_round = min(next_round, max(0.01, self._ping_due(slot) - now))
                if pings:
                    # Pinged now, due again one (jittered) interval from now.
                    next_round = min(next_round, max(0.01, 0.9 * self.keepalive_interval))
            if self.leak_threshold is not None:
                next_round = min(next_round, max(0.01, self.leak_threshold / 2))
            leaked = []
            if self.leak_threshold is not None:
                for slot in self._all:
                    if slot.lease_stack is not None and not slot.leak_reported:
                        age = now - slot.leased_at
                        if age >= self.leak_threshold:
                            slot.leak_reported = True
                            self._c["leaks_reported"] += 1
                            leaked.append((slot, age, slot.lease_stack))
                        else:
                            next_round = min(next_round, self.leak_threshold - age)
        for slot, age, stack in leaked:
            logger.warning("pool %r: connector %d leased for %.3f s (leak_threshold %.3g s); "
                           "leased at:\n%s", self.name, slot.id, age, self.leak_threshold,
                           "".join(stack or []))
        if pings:
            # Each ping may take up to connect_timeout: they run in a thread
            # of their own, so this thread goes on watching deadlines and
            # looking for lost slots meanwhile.
            threading.Thread(target=self._keepalive_all, args=(pings,), daemon=True,
                             name=f"aperturedb-pool-{self.name}-ping").start()
        self._close_pending()
        return next_round

    def _keepalive_all(self, slots: list[_Slot]) -> None:
        for slot in slots:
            self._keepalive(slot)
        self._close_pending_if_closed()

    def _expire_overdue(self, now: float) -> float:
        """Shut down the sockets of pool queries past their (far) deadline (the
        background thread; see connectors.Phase.watched).  Returns seconds until
        the next watched deadline."""
        due = math.inf
        overdue: list[tuple[_Slot, float]] = []
        with self._lock:
            for slot in self._all:
                phase = slot.phase
                deadline = phase.deadline
                if deadline is None or not phase.watched or phase.bound is not None:
                    continue
                late = deadline + _connectors.TIMEOUT_SLACK
                if now >= late:
                    overdue.append((slot, deadline))
                else:
                    due = min(due, late)
        for slot, deadline in overdue:
            phase = slot.phase
            if phase.deadline is deadline and slot.in_flight:  # still that query
                phase.expired = True
                sock = socket_of(slot.conn)
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # its read ends now
                except (OSError, AttributeError):
                    pass
        return max(0.01, due - now)

    def _recover_lost(self, now: float) -> float:
        """Close and replace the connectors no one will ever return (the
        background thread each round, and stats(); see "Interruptions").
        Returns seconds until a suspect is due."""
        with self._lock:
            closed = self._closed
            lost, dropped, due = self._find_lost(now)
            for slot in dropped:
                self._drop(slot, "reclaimed")
            for slot in lost:
                self._drop(slot, "lost")
            if (lost or dropped) and not closed:
                self._maybe_grow()
        if closed and (lost or dropped):
            self._close_pending()  # no background thread after close()
        for _ in dropped:
            warnings.warn(f"a lease of pool {self.name!r} was dropped without release(); its "
                          f"connector is closed (call release() or use 'with pool.lease()')",
                          ResourceWarning, stacklevel=1)
        if lost:
            logger.warning("pool %r: %d connector(s) left in no one's hands by an interrupted "
                           "lease or return; closed and replaced", self.name, len(lost))
        if due < math.inf and threading.current_thread() is not self._bg_thread:
            self._bg_wakeup.set()  # a suspect seen from stats(): the next round decides
        return max(0.01, due - now)

    def _find_lost(self, now: float) -> tuple[list[_Slot], list[_Slot], float]:
        # Under the lock.  A live slot out of _idle and not pinged is held
        # while its holder's _slot is the slot and something besides the slot
        # refers to the holder (a thread's frame, the with statement's exit,
        # the caller's variable).  A holder only the slot refers to can never
        # return it: "dropped", reclaimed at once.  A slot with no holder, or
        # a holder that does not point back, is either in passage (between
        # two statements of a lease path) or lost there: it is lost when it
        # stays so, unchanged, for _LOST_GRACE.  A lease path that resumes
        # after that (a thread starved of the GIL that long) finds its
        # connector closed: its query fails, it is never shared.
        idle = set(self._idle.copy())
        lost: list[_Slot] = []
        dropped: list[_Slot] = []
        due = math.inf
        for slot in self._all:
            holder = slot.holder
            if holder is _MAINTENANCE or (holder is None and slot in idle):
                slot.suspect = None
                continue
            if holder is not None and holder._slot is slot:
                # The slot's reference, this frame's and getrefcount's own
                # argument: nothing else.
                if sys.getrefcount(holder) <= _HOLDER_UNREFERENCED:
                    # A lease from acquire() the caller let go of; or a
                    # ``with`` lease whose return was interrupted at its
                    # start, or a waiter whose thread left without taking
                    # its connector (lost to an interruption).
                    (dropped if isinstance(holder, _ManualLease) else lost).append(slot)
                else:
                    slot.suspect = None
                continue
            sign = (id(holder), slot.uses, slot.returned)
            suspect = slot.suspect
            if suspect is None or suspect[1] != sign:
                slot.suspect = (now, sign)
                due = min(due, now + _LOST_GRACE)
            elif now - suspect[0] >= _LOST_GRACE:
                lost.append(slot)
            else:
                due = min(due, suspect[0] + _LOST_GRACE)
        return lost, dropped, due

    def _idle_verdict(self, slot: _Slot, now: float, excess: int) -> str | None:
        # Under the lock: what maintenance does with an idle slot (None: keep).
        if slot.generation != self._generation:
            return "retired"
        if now >= slot.expires:
            return "expired"
        if (self.max_idle is not None and excess > 0 and
                now - slot.returned >= self.max_idle):
            return "idle"
        if self.keepalive_interval and now >= self._ping_due(slot):
            return "ping"
        return None

    def _ping_due(self, slot: _Slot) -> float:
        # A connector used recently needs no ping: due one (jittered) interval
        # after its last use or ping, whichever is later.
        return max(slot.keepalive_due, slot.returned + (self.keepalive_interval or 0.0) *
                   slot.jitter)

    def _keepalive(self, slot: _Slot) -> None:
        ok = True
        reason = ""
        try:
            probe = probe_socket(socket_of(slot.conn)) if slot.poller is not None else None
            if probe is not None:
                ok, reason = False, probe
            else:
                slot.owner = _get_ident()
                try:
                    self._ping(slot.conn, slot)
                finally:
                    slot.owner = None
        except Exception as e:
            ok, reason = False, f"failed_ping: {e}"
        now = _monotonic()
        with self._lock:
            self._c["keepalive_pings"] += 1
            self._pinging -= 1
            if not ok or self._closed or slot.generation != self._generation:
                self._drop(slot, "failed_ping" if not ok else
                           "closed" if self._closed else "retired")
            else:
                # ``returned`` stays the time of the last use: max_idle counts
                # from it, pings do not make a connector "used".
                slot.keepalive_due = now + (self.keepalive_interval or 0.0) * slot.jitter
                if self._waiters:
                    self._handoff(slot)
                else:
                    slot.holder = None
                    self._idle.appendleft(slot)
        if not ok:
            logger.info("pool %r: connector %d failed its keepalive (%s)", self.name, slot.id,
                        reason)
            if reason in (PEER_CLOSED, TLS_READABLE):
                self._on_peer_closed(slot, "keepalive found a closed connection")

    # -- fork ----------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        # Only the forking thread exists in the child.  Every lock may have
        # been held by a thread that no longer exists: replace them.  The
        # inherited connectors belong to the parent: never write to them or
        # shut them down; forget them without touching their sockets.
        old = list(self._all)
        self._lock = threading.Lock()
        self._bg_wakeup = _Wakeup()
        self._bg_thread = None
        self._tls = _ThreadMarks()
        was_open, was_closed = self._opened, self._closed
        generation = self._generation
        self._init_state()
        # Slots leased before the fork and returned in the child are foreign.
        self._generation = generation + 1
        _forget_without_closing(s.conn for s in old)
        template = self._template
        shared = getattr(template, "shared_data", None)
        if shared is not None:
            # The SDK's shared session lock may be held by a parent thread.
            self._shared_data_override = SimpleNamespace(
                session=getattr(shared, "session", None), lock=threading.Lock())
        self._closed = was_closed
        self._fast = self._plain and not was_closed
        if was_open and not was_closed:
            self._opened = True
            self._opening = self._open_requests = self.min_size
            # The background thread starts on first use (starting threads
            # inside an at-fork hook is not safe).


def _describe_query(q: Any) -> str:
    try:
        if isinstance(q, list):
            return "query " + "+".join(next(iter(c)) for c in q if isinstance(c, dict) and c)
    except Exception:  # pragma: no cover
        pass
    return "query"


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: S110 - closing a broken connector may fail; it is gone either way
        pass


_graveyard: list[Any] = []


def _forget_without_closing(conns: Iterator[Any]) -> None:
    # In a forked child: detach the inherited sockets (the parent still uses
    # them) so that garbage collection can never close, shut down or write to
    # them, then drop our references.
    for conn in conns:
        sock = socket_of(conn)
        if sock is not None:
            try:
                # Closing the child's copy of the descriptor sends nothing to
                # the server (the parent still holds the socket); keeping it
                # would hold the server connection open after the parent
                # closed it.
                os.close(sock.detach())
            except Exception:
                _graveyard.append(conn)  # keep it alive forever rather than risk a close
                continue
            conn.conn = None
            conn.connected = False


def _maintenance_loop(pool_ref: "weakref.ref[ConnectionPool]", wakeup: _Wakeup) -> None:
    """The background thread: holds the pool only through a weak reference, so a
    pool dropped without close() is still garbage-collected (and the thread ends)."""
    delay = 0.0
    while True:
        wakeup.wait(delay)
        pool = pool_ref()
        if pool is None:
            return
        if pool._bg_wakeup is not wakeup:  # forked child: a new event and thread exist
            return
        try:
            delay = pool._maintain(_monotonic())
            stop = pool._closed
        except Exception:  # pragma: no cover - must never kill the thread
            logger.exception("pool %r: maintenance round failed", pool.name)
            delay, stop = 1.0, False
        del pool
        if stop:
            return


def _after_fork_in_child() -> None:
    for pool in list(_all_pools):
        try:
            pool._after_fork_in_child()
        except Exception:  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["ConnectionPool", "Lease", "PoolError"]
