"""The lease hand-off: ``Lease``, slots and waiters, the lock-free fast paths
(in ``Lease``) and the locked slow paths (``_LeasePaths``, which
``ConnectionPool`` inherits) side by side.

Map
---
A lease's call graph (``=>`` marks the lock-free fast paths)::

    pool.lease() -> Lease                       pool.acquire() -> _ManualLease
    Lease.__enter__                              (no fast path: _acquire)
      => _idle.pop(); the checkout rule inlined (_checkout_problem)
      else _acquire
             _pop_idle under the lock, or _wait_for_slot:
               _serve_from_idle (waiters in order) / _wait_queued (own lock)
             _checkout_problem -> _discard_checked_out -> _drop_and_regrow; again
    Lease.__exit__                               pool.release(lease) / lease.release()
      => nobody waits: _idle.append; then waiters or close() seen -> _settle
      => a looping thread, no waiter overdue: keep it idle (_hand_out_stranded)
      else _release: return_health, _unusable -> _drop_and_regrow
                     or _park_or_hand_off (-> _handoff to the oldest waiter)

A slot's states (where it is, and its ``holder``)::

    opening --(_open_one)--> idle: in _idle, holder None
    idle --(checkout: pop)--> leased: holder the Lease, lease._slot the slot
    idle --(_handoff)--> handed: holder a _Waiter, waiter._slot the slot --> leased
    idle --(maintenance)--> pinged: out of _idle, holder _MAINTENANCE --> idle / handed
    leased --(return)--> idle / handed / dropped
    any --(_drop)--> dropped: out of _all, its connector queued in _to_close,
                     closed by _close_pending outside the lock
    in passage: out of _idle with no holder pointing back (between two
                statements of a lease path); lost if it stays so (see Interruptions)

Which lock guards which field (``ConnectionPool._lock``, "the lock", unless
said otherwise; the list is complete: see the annotations of ``_LeasePaths``)::

    the lock     _waiters, _size, _all, _pinging, _opening, _open_requests,
                 _opens_running, _to_close, _opened, _closed, _generation,
                 _c, _discarded, _granted_base, _open_failures,
                 _last_open_error, _unreachable_since, _next_open_at,
                 _permanent_at, _fair (the fairness policy), _cpu_note,
                 _overdue_at, _ready_waiters, _shared_data_override,
                 _bg_thread (written), each slot's suspect, a waiter's _slot
                 and waited
    no lock      _idle (atomic deque operations; see below), _tls (per
                 thread), _bg_wakeup (SimpleQueue), _long_wait_wakeup (a hint)
    hints        _fast, _overdue_at, _generation, _waiters (their truth), read
                 by the fast paths without the lock, written under it
    set once     options (timeout, max_size, ...), _options, _plain, _template,
                 _factory, _clone, _is_read_only,
                 _metrics and _lease_type (set under the lock by
                 aperturedb_pool.metrics; the recorder's lock is only ever
                 taken after the pool's)
    the holder   a slot's in_flight, phase, uses, owner, leased_at while leased;
                 its other fields change under the lock while it changes hands,
                 or by the one thread that took it from _idle

Locking (the argument for thread safety)
----------------------------------------
``ConnectionPool._lock`` (a plain ``threading.Lock``) guards every mutable field
of the pool but the few in the table above (the "no lock", "hints" and "set
once" rows).  It is held only for short, non-blocking bookkeeping: never
across a network call, a sleep or a wait.  Decisions are taken under the
lock; waiting (on a waiter's own lock) and I/O (probes, opening, closing,
pinging) happen outside it.  Every acquisition is a ``with`` statement (see
"Interruptions").

The exception is ``_idle``, the deque of idle slots.  Its single-item
operations (``append``, ``pop``, ``popleft``, ``remove``, ``copy``, ``[0]``)
are atomic: one C call each, holding the GIL throughout (``remove`` compares
by identity because ``_Slot`` defines no ``__eq__``, so no Python code runs
inside it).  The Lease fast paths use ``_idle`` without the pool lock:
checkout is ``_idle.pop()`` (when nobody waits, or barging is allowed: see
"Fairness" in ``aperturedb_pool._fairness``), return is ``_idle.append()``.
Rules that make this safe:

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
  keep-return (inlined in ``Lease.__exit__``) deliberately leaves its slot idle although
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

Fairness: see ``aperturedb_pool._fairness``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import threading
import time
import traceback
from collections import deque
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Generic

from aperturedb_pool import _validate
from aperturedb_pool import connectors as _connectors
from aperturedb_pool._fairness import FairnessPolicy
from aperturedb_pool.errors import (
    LeaseError,
    OutcomeUnknown,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
)
from aperturedb_pool.health import PEER_CLOSED, TLS_READABLE, probe_socket, socket_of

if TYPE_CHECKING:
    from aperturedb_pool._options import PoolOptions
    from aperturedb_pool.retry import RetryPolicy

logger = logging.getLogger("aperturedb_pool")

if TYPE_CHECKING:  # a default (PEP 696) for users' type checkers; plain at run time
    from typing_extensions import TypeVar as _TypeVar

    C = _TypeVar("C", bound=_connectors.Connector, default=Any)
else:
    from typing import TypeVar as _TypeVar

    C = _TypeVar("C", bound=_connectors.Connector)  # a pool's connector: what leases give

_monotonic = time.monotonic  # replaced by tests (tests/_support.py: set_pool_clock)
_process_time = time.process_time  # replaced by tests
_LOOP_GAP = 0.001  # a thread asking again within this of its last return loops
# A waiter whose timed wake-ups have backed off to this (it has waited about
# twice as long) wakes the background thread at each of them.
_LONG_WAIT = 0.08
_get_ident = threading.get_ident
_ids = itertools.count(1)


class DiscardReason(str, Enum):
    """Why the pool closed a connector: the keys of ``PoolStats.discarded`` and
    the ``reason`` label of the metrics.  A ``str`` subclass, so each member
    equals its string (``DiscardReason.EXPIRED == "expired"``); the counters
    store the plain string."""

    CLOSED = "closed"  # the pool closed
    RETIRED = "retired"  # its generation was retired (retire_all, the server went away)
    EXPIRED = "expired"  # past max_lifetime
    IDLE = "idle"  # idle longer than max_idle, above min_size
    PROBE = "probe"  # its socket showed a problem (checkout probe, or after an error)
    INTERRUPTED = "interrupted"  # a query was interrupted: an answer may still come
    BROKEN = "broken"  # discarded by its holder, or an error the pool cannot observe
    FAILED_PING = "failed_ping"  # the keepalive ping failed
    RECLAIMED = "reclaimed"  # an acquire() lease dropped without release()
    LOST = "lost"  # left in no one's hands by an interruption
    FOREIGN = "foreign"  # leased before a fork, or reclaimed (not counted)


def return_health(slot: _Slot, error: BaseException | None) -> DiscardReason | None:
    """Health on return: a connector whose query was interrupted (an answer
    may still come), or that failed in a way the pool cannot observe, or
    whose socket shows a problem after an error, is discarded.  (The fast
    return, taken only without an error, inlines it as ``not slot.in_flight``.)"""
    if slot.in_flight or (error is not None and not slot.tracked):
        return DiscardReason.INTERRUPTED if error is not None else DiscardReason.BROKEN
    if error is not None and slot.poller is not None and \
            probe_socket(socket_of(slot.conn)) is not None:
        return DiscardReason.PROBE
    return None


def stale_reason(slot: _Slot, generation: int, now: float) -> DiscardReason | None:
    """The one staleness rule of a slot: its generation was retired, or it is
    past its lifetime.  None: still usable, as far as its age tells.  (The
    Lease fast paths inline it: ``slot.generation == pool._generation and
    now < slot.expires``; tests/test_lease_rules.py holds both to the same
    cases.)"""
    if slot.generation != generation:
        return DiscardReason.RETIRED
    if now >= slot.expires:
        return DiscardReason.EXPIRED
    return None


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


class _ReleasedMark:
    """``Lease._slot`` once the lease ended.  ``in_flight`` is true so that the
    fast return path, which must test it anyway, turns away a second release."""

    in_flight = True

    def __repr__(self) -> str:
        return "<released>"


_RELEASED: Any = _ReleasedMark()


class Lease(Generic[C]):
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

    def __init__(self, pool: _LeasePaths, timeout: float | None) -> None:
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

    def __enter__(self) -> C:
        # Fast path: an idle connector, and nobody waiting or barging allowed
        # (see "Fairness"), nothing to check.  It takes no lock (see "Locking"
        # in the module doc) and is inlined here because a lease is the
        # pool's hot path: it mirrors _checkout_problem (the rule _acquire,
        # which handles every other case, calls; tests/test_lease_rules.py
        # holds both to the same cases).  ``_fast`` is cleared by close()
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
                            return slot.conn  # type: ignore[no-any-return]
                        pool._discard_checked_out(slot)
            pool._acquire(self)
            return self.conn  # type: ignore[no-any-return]
        except BaseException as e:
            # Interrupted after the connector became this lease's: the with
            # statement will not call __exit__, so give it back now (it was
            # never used).
            if fresh and self._slot is not None and self._slot is not _RELEASED:
                self._pool._release(self, e)
            raise

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        # The fast returns mirror return_health (no error: only in_flight
        # counts), _unusable and, for a looping thread, the keep-idle branch
        # of _release (tests/test_lease_rules.py holds both to the same cases).
        try:
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
        except BaseException as e:
            # Interrupted before the connector went back (the lease still
            # points at it): give it back now.  The exception's traceback keeps
            # this lease referenced, so the maintenance thread could not tell
            # it from a lease still in use.  Past that point (the lease no
            # longer points at it) the slot is found lost and recovered.
            held = self._slot
            if held is not None and held is not _RELEASED:
                self._pool._release(self, ev if ev is not None else e)
            raise

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


class _ManualLease(Lease[C]):
    """The lease returned by ``acquire()``.  One dropped without ``release()`` is
    found by the maintenance thread (nothing but its slot refers to it any
    more: see "Interruptions") and its connector closed, with a ResourceWarning."""

    # _granted: when acquire() returned it, kept only while the pool is
    # instrumented (its use time; see aperturedb_pool.metrics).
    __slots__ = ("_granted",)
    _granted: float



def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: S110 - closing a broken connector may fail; it is gone either way
        pass


class _LeasePaths:
    """The locked paths of a lease: checkout, waiting, hand-off and return.

    A base of ``ConnectionPool``, which sets every field below (in
    ``__init__`` and ``_init_state``); the comment says what guards it (see
    the table in the module doc).
    """

    # Set once (at construction; options are documented on ConnectionPool).
    name: str
    timeout: float
    min_size: int
    max_size: int
    max_waiting: int | None
    max_lifetime: float | None
    max_idle: float | None
    keepalive_interval: float | None
    tcp_keepalive: tuple[float, float, int] | None
    query_timeout: float | None
    connect_timeout: float
    probe_after: float
    fairness_threshold: float
    cpu_bound_fairness_threshold: float | None
    leak_threshold: float | None
    check_ownership: bool
    reconnect_initial: float
    reconnect_max: float
    retry: RetryPolicy
    _options: PoolOptions
    _plain: bool  # no per-lease extras: the fast paths apply
    _template: Any
    _factory: Callable[[], Any] | None
    _clone: Callable[[], Any]
    _is_read_only: Callable[[Any], bool]  # retry.is_read_only, for query()
    # Set once under the lock by aperturedb_pool.metrics.
    _metrics: Any
    _lease_type: type[Lease[Any]]
    # The lock, and what it guards.
    _lock: threading.Lock
    _waiters: deque[_Waiter]  # lock (the fast paths read its truth)
    _size: int  # lock; == len(_all)
    _all: set[_Slot]  # lock: every live slot (idle, leased, pinged)
    _pinging: int  # lock: slots out of _idle for a keepalive ping
    _opening: int  # lock: opens requested or running
    _open_requests: int  # lock: opens requested, not started
    _opens_running: int  # lock
    _to_close: list[tuple[Any, str]]  # lock: connectors dropped, to close outside it
    _opened: bool  # lock
    _closed: bool  # lock
    _generation: int  # lock (the fast paths read it)
    _c: dict[str, Any]  # lock: the counters of stats()
    _discarded: dict[str, int]  # lock
    _granted_base: int  # lock
    _open_failures: int  # lock: consecutive failed background opens
    _last_open_error: BaseException | None  # lock
    _unreachable_since: float | None  # lock
    _next_open_at: float  # lock
    _permanent_at: float  # lock
    _fair: FairnessPolicy  # lock
    _cpu_note: tuple[bool, float] | None  # lock: a change of verdict to log
    _overdue_at: float  # lock (the fast paths read it)
    _ready_waiters: list[threading.Lock]  # lock
    _shared_data_override: Any  # lock (written in a forked child only)
    _bg_thread: threading.Thread | None  # lock
    # Without the lock.
    _idle: deque[_Slot]  # atomic single operations (see "Locking")
    _fast: bool  # written under the lock, read as a hint
    _tls: _ThreadMarks  # per thread
    _bg_wakeup: Any  # a _Wakeup (SimpleQueue): any thread
    _long_wait_wakeup: float  # a hint: a race costs one wake-up more

    if TYPE_CHECKING:  # provided by ConnectionPool and the maintenance work
        def _ensure_bg(self) -> None: ...
        def _on_peer_closed(self, slot: _Slot, why: str) -> None: ...
        def _notify_ready(self) -> None: ...

    def _acquire(self, lease: Lease[Any]) -> None:
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
            # never handed out.  The test before the rule only spares a slot
            # that surely passes it the calls (as the fast path does).
            if (self._closed or slot.generation != self._generation or
                    now >= slot.expires or now - slot.returned > self.probe_after):
                reason = self._checkout_problem(slot, now)
                if reason is not None:
                    self._discard_checked_out(slot, reason)
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

    def _discard_checked_out(self, slot: _Slot, reason: DiscardReason | None = None) -> None:
        # A slot taken for a checkout that cannot be handed out, and why
        # (None from the fast path, which inlines the rule: the reason is
        # taken again here; a failed probe marked the slot in flight).
        with self._lock:
            closed = self._closed
            if slot in self._all:
                if reason is None or closed:
                    reason = self._unusable(slot, _monotonic()) or DiscardReason.PROBE
                self._drop_and_regrow(slot, reason)
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
                    self._drop(slot, DiscardReason.CLOSED)
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
            reason = stale_reason(slot, self._generation, now)
            if reason is not None:
                self._drop_and_regrow(slot, reason)
                continue
            if self._waiters[0] is me:
                self._waiters.popleft()
                self._queue_changed()
                slot.holder = me
                me._slot = slot
                return slot
            self._handoff(slot)
        return None

    def _wait_for_slot(self, lease: Lease[Any], start: float, deadline: float,
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
        reason = self._unusable(slot, _monotonic())
        if reason is not None:
            self._drop_and_regrow(slot, reason)
        else:
            self._park_or_hand_off(slot)

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

    def _release(self, lease: Lease[Any], error: BaseException | None,
                 reason: DiscardReason | None = None) -> None:
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
        # re-take this connector (see aperturedb_pool._fairness).  A
        # fast-path checkout did not wait: it asked when it got the slot.
        req = slot.leased_at if self._plain else lease._req
        looper = self._asked_right_after_return(req)
        self._tls.released = now
        if slot.lease_stack is not None:
            self._note_return(slot, now)
        drop_reason = reason
        if reason is None and (error is not None or slot.in_flight):  # (else healthy)
            drop_reason = return_health(slot, error)
        slot.returned = now
        closed_now = False
        with self._lock:
            if slot not in self._all:
                # Leased before a fork, or reclaimed: not part of the pool's
                # accounting any more.
                self._to_close.append((slot.conn, DiscardReason.FOREIGN.value))
                closed_now = True
                wake = False
            else:
                if isinstance(error, OutcomeUnknown):
                    self._c["unknown_outcomes"] += 1
                if drop_reason is None and (self._closed or now >= slot.expires or
                                            slot.generation != self._generation):
                    drop_reason = self._unusable(slot, now)  # (else usable)
                if drop_reason is not None:
                    self._drop_and_regrow(slot, drop_reason)
                    wake = True
                    closed_now = self._closed
                else:
                    wake = False
                    if looper and now < self._overdue_at:
                        # Kept idle for the loop's next lease (the fast
                        # keep-return in Lease.__exit__ inlines this).
                        slot.holder = None
                        self._idle.append(slot)
                    else:
                        self._park_or_hand_off(slot)
        if wake:
            self._bg_wakeup.set()
        if closed_now:
            self._close_pending()
        if error is not None and getattr(error, "peer_closed", False):
            self._on_peer_closed(slot, f"a connector failed: {error}")

    # -- the rules: each defined once (the Lease fast paths inline some of
    #    them; tests/test_lease_rules.py holds both copies to the same cases)
    def _unusable(self, slot: _Slot, now: float) -> DiscardReason | None:
        # Why ``slot`` may be neither handed out nor kept, as far as the
        # pool's state and the slot's age tell (None: it may).  Inlined by
        # both fast paths as ``pool._fast and slot.generation ==
        # pool._generation and now < slot.expires``.
        if self._closed:
            return DiscardReason.CLOSED
        return stale_reason(slot, self._generation, now)

    def _checkout_problem(self, slot: _Slot, now: float) -> DiscardReason | None:
        # The checkout rule (Lease.__enter__ inlines it): unusable, or idle
        # for longer than probe_after and its socket shows a problem.
        reason = self._unusable(slot, now)
        if reason is None and now - slot.returned > self.probe_after and self._unhealthy(slot):
            return DiscardReason.PROBE
        return reason

    def _park_or_hand_off(self, slot: _Slot, *, oldest_end: bool = False) -> None:
        # Under the lock, by the slot's owner: give it to the oldest waiter,
        # or park it idle: at the newest end (just used), or at the oldest
        # end when it was not just used (new, or pinged).
        if self._waiters:
            self._handoff(slot)
        else:
            slot.holder = None
            if oldest_end:
                self._idle.appendleft(slot)
            else:
                self._idle.append(slot)

    def _drop_and_regrow(self, slot: _Slot, reason: DiscardReason) -> None:
        # Under the lock: drop, then ask for connectors for the waiters.
        self._drop(slot, reason)
        self._maybe_grow()

    def _drop(self, slot: _Slot, reason: DiscardReason) -> None:
        # Under the lock: forget slot and have the background thread close it.
        # The counters hold the reason's plain string (stats keys, labels).
        key = reason.value
        self._all.discard(slot)
        self._granted_base += slot.uses
        self._size -= 1
        self._discarded[key] = self._discarded.get(key, 0) + 1
        self._to_close.append((slot.conn, key))
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

    def _close_pending(self) -> None:
        with self._lock:
            todo, self._to_close = self._to_close, []
        for conn, _reason in todo:
            _close_quietly(conn)
        if todo:
            with self._lock:
                self._c["connectors_closed"] += len(todo)
