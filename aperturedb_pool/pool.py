"""ConnectionPool: exclusive leases of SDK connectors, kept healthy, handed out fairly.

``ConnectionPool`` is the one entry point; its work lives in modules named by
concern (see ARCHITECTURE.md for the map):

* ``aperturedb_pool._lease``: the ``Lease``, slots and waiters, the lease
  fast paths and locked slow paths, and the locking and interruption
  arguments (which lock guards which field);
* ``aperturedb_pool._fairness``: when barging stops, CPU-bound detection;
* ``aperturedb_pool._maintenance``: the background thread's tasks (refill,
  expiry and shrink, keepalive, lost leases, leak reports);
* ``aperturedb_pool._options``: the validated options;
* ``aperturedb_pool._fork``: a forked child's pools start over.

This module holds the pool's public methods (construction, ``open``,
``lease``/``acquire``/``release``, retirement, ``close``, ``stats``) and the
queries through the retry policy (``query``, ``run``).
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from aperturedb_pool import _fork, _validate
from aperturedb_pool import connectors as _connectors
from aperturedb_pool._fairness import FairnessPolicy
from aperturedb_pool._lease import (  # noqa: F401 - old private names, imported by tests
    _LOOP_GAP,
    _MAINTENANCE,
    _RELEASED,
    C,
    DiscardReason,
    Lease,
    _ManualLease,
    _Slot,
    _ThreadMarks,
    _Waiter,
)
from aperturedb_pool._maintenance import (  # noqa: F401 - old private names
    _MAX_PARALLEL_OPENS,
    _MaintenanceWork,
    _Wakeup,
)
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
)
from aperturedb_pool.health import PEER_CLOSED, TLS_READABLE, probe_socket, socket_of
from aperturedb_pool.retry import RetryPolicy, check_policy, is_read_only
from aperturedb_pool.stats import PoolStats

if TYPE_CHECKING:
    from aperturedb_pool.shared import PooledConnector

logger = logging.getLogger("aperturedb_pool")

T = TypeVar("T")

_monotonic = time.monotonic  # replaced by tests (tests/_support.py: set_pool_clock)


class ConnectionPool(_MaintenanceWork, Generic[C]):
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

    def __init__(self, template: C | None = None, *, min_size: int = 1, max_size: int = 8,
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
                 connector_factory: Callable[[], C] | None = None) -> None:
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
        _fork.register(self)
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
    def lease(self, timeout: float | None = None) -> Lease[C]:
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

    def acquire(self, timeout: float | None = None) -> Lease[C]:
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

    def release(self, lease: Lease[C], error: BaseException | None = None) -> None:
        """Return a lease obtained from ``acquire()``."""
        if not isinstance(lease, Lease) or lease._pool is not self:
            raise LeaseError(f"release() takes a Lease of pool {self.name!r}, got {lease!r}")
        self._release(lease, error)

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
                self._drop(slot, DiscardReason.RETIRED)
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
                self._drop(slot, DiscardReason.CLOSED)
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

    def __enter__(self) -> ConnectionPool[C]:
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
              timeout: float | None = None, retry: RetryPolicy | None = None) -> Any:
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
        if blobs is None:
            blobs = []
        qt = None if timeout is None else _validate.duration("timeout", timeout, optional=False,
                                                             allow_zero=False)
        return self._run_policy(self.retry if retry is None else check_policy(retry),
                                None, q, blobs, qt, idempotent, None)

    def run(self, fn: Callable[..., T], *args: Any, retry: RetryPolicy | None = None,
            **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` with a leased connector, under the policy.

        The callable is retried after a transport failure only if it declares
        itself idempotent (``fn.idempotent = True``, e.g. with the
        ``retry.idempotent`` decorator); a connect failure (nothing sent) is
        always retried.
        """
        def body(conn: Any) -> T:
            return fn(conn, *args, **kwargs)

        return self._run_policy(self.retry if retry is None else check_policy(retry),
                                body, None, None, None, bool(getattr(fn, "idempotent", False)),
                                getattr(fn, "__name__", "callable"))

    def _run_policy(self, policy: RetryPolicy, body: Callable[[Any], T] | None, q: Any,
                    blobs: Any, attempt_timeout: float | None, idempotent: bool | None,
                    label: str | None, hold: Any = None) -> T:
        """``query()`` and ``run()`` (and ``aperturedb_pool.aio``) under ``policy``.

        ``body`` None: each attempt is ``conn.query(q, blobs)``; otherwise
        ``body(conn)``.  ``idempotent`` None: judged from ``q`` (only if an
        attempt fails).  ``label`` None: the query, described from ``q``.
        ``attempt_timeout`` bounds each attempt's exchange (see ``query``).
        The first attempt is made here, inline; the policy (tenacity's loop,
        ``_retry_after``) is reached only after it failed.

        ``hold`` (``aperturedb_pool.aio``'s workers): an object whose
        ``lease`` attribute is a Lease its thread holds across calls, or None.
        The first attempt runs on that lease's connector (none: it leases one
        as usual) and, if it succeeds, leaves the lease in ``hold.lease``
        instead of returning it; if it fails, the lease is ended as any
        attempt's (discarded if the exchange was interrupted) and
        ``hold.lease`` is None.  Retries lease and return as usual.
        """
        started = _monotonic()
        try:
            return self._attempt(started, policy.deadline, body, q, blobs, attempt_timeout,
                                 idempotent, label, hold)
        except ConnectorError as e:
            first = e
        return self._retry_after(first, started, policy, body, idempotent, label, q, blobs,
                                 attempt_timeout)

    def _retry_after(self, first: ConnectorError, started: float, policy: RetryPolicy,
                     body: Callable[[Any], T] | None, idempotent: bool | None,
                     label: str | None, q: Any, blobs: Any,
                     attempt_timeout: float | None) -> T:
        """After ``_run_policy``'s first attempt (started at ``started``) failed
        with ``first``: the rest under ``policy``, in ``RetryPolicy.resume``
        (tenacity's loop).  Nothing is built before a failure (no closure, no
        label, no idempotency check): nearly every call succeeds at once.
        """
        idem: bool = self._is_read_only(q) if idempotent is None else idempotent
        describe: str | Callable[[], str] = (label if label is not None
                                             else lambda: _describe_query(q))
        try:
            return policy.resume(
                first,
                lambda remaining: self._attempt(_monotonic(), remaining, body, q, blobs,
                                                attempt_timeout, idem, label),
                started=started, idempotent=idem, describe=describe, on_retry=self._on_retry)
        except (ConnectorError, ServerUnreachable) as e:
            self._count("give_ups")
            if self._metrics is not None and isinstance(e, OutcomeUnknown) and not idem:
                self._metrics.write_not_retried()
            raise

    def _attempt(self, started: float, remaining: float | None,
                 body: Callable[[Any], T] | None, q: Any, blobs: Any,
                 attempt_timeout: float | None, idempotent: bool | None,
                 label: str | None, hold: Any = None) -> T:
        """One attempt of ``query()``/``run()``: lease, run, give back (discarding on failure).

        With ``hold`` (see ``_run_policy``): on ``hold.lease`` if set, and kept
        there after a success."""
        lease = None if hold is None else hold.lease
        if lease is None:
            wait = self.timeout
            if remaining is not None and remaining < wait:
                wait = remaining if remaining > 0.0 else 0.0
            # The pool's Lease (its fast paths; a timing subclass when
            # instrumented), released below on every path.
            make = self._lease_type  # (see lease())
            lease = make(self, wait)
            try:
                conn = lease.__enter__()
            except PoolTimeout as e:
                with self._lock:
                    down = self._unreachable_since
                if down is None:
                    raise
                # No connector because none could be opened: nothing was sent, a
                # connect failure for the policy to retry until its deadline, when
                # it raises ServerUnreachable (in one place: RetryPolicy.resume).
                raise ConnectFailed(f"{e}; nothing was sent") from e
        else:
            # Held: ``hold.lease`` stays set until the lease ends (below),
            # so whoever holds ``hold`` can always give it back.
            conn = lease._slot.conn  # type: ignore[union-attr]
        slot = lease._slot
        phase = slot.phase if slot is not None and slot.tracked else None
        # The policy's deadline (and the per-call timeout) bound the exchange
        # itself, not only the wait for a connector: the connector's wrappers
        # bound every read by it.  Cleared before the connector goes back: an
        # interruption before the clearing skips the return too (the slot is
        # then recovered, never reused with a stale deadline).
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
            if hold is not None:
                hold.lease = None  # ends below (its __exit__ gives it back if interrupted)
            lease.__exit__(type(e), e, None)  # counts an unknown outcome
            if isinstance(e, ConnectFailed) and phase is not None and phase.reached > reached:
                if idempotent is None:
                    idempotent = self._is_read_only(q)
                if not idempotent:
                    # This query was not sent, but an earlier one of the same
                    # unit may have run: the unit as a whole must not be re-run.
                    what = label if label is not None else _describe_query(q)
                    unknown = OutcomeUnknown(
                        f"{what}: the connection failed after an earlier query of this "
                        f"unit reached the server ({e}); the unit may have partly run, and is "
                        f"not re-run because it is not declared idempotent", query=e.query)
                    self._count("unknown_outcomes")
                    raise unknown from e
            raise
        if phase is not None:
            phase.deadline = None
            phase.watched = False
        if hold is not None:
            hold.lease = lease  # kept: its holder returns it
            return result
        lease.__exit__(None, None, None)
        return result

    def _on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        self._count("retries")
        if self._metrics is not None:
            self._metrics.retried(exc)

    # -- fork ----------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        _fork.reset_in_child(self)  # (see aperturedb_pool._fork)


def _describe_query(q: Any) -> str:
    try:
        if isinstance(q, list):
            return "query " + "+".join(next(iter(c)) for c in q if isinstance(c, dict) and c)
    except Exception:  # pragma: no cover
        pass
    return "query"


__all__ = ["ConnectionPool", "Lease", "PoolError"]
