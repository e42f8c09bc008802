"""asyncio: ``AsyncConnectionPool``, the pool for coroutines, on worker threads.

The SDK's ``Connector`` is blocking, and a blocking call on the event loop's
thread stalls every task of the loop for as long as it lasts.  This module gives
coroutines the thread pool of ``aperturedb_pool.pool`` (same options, same
errors, same ``PoolStats``) with every network exchange on a worker thread::

    async with AsyncConnectionPool(template, min_size=2, max_size=8) as pool:
        async with pool.lease() as conn:
            response, blobs = await conn.query(q, blobs)
        response, blobs = await pool.query(q)      # under the retry policy

Design
------
One ``ConnectionPool`` (``sync_pool``) owns the connectors: opening, health
checks, keepalive, retirement, the retry policy.  On top of it:

* **Workers.** ``max_size`` daemon threads per pool, started by ``open()``
  (never more: a connector is only ever used by a worker, and at most
  ``max_size`` connectors exist, so a further thread could only wait).  A
  worker runs one task's request at a time, a *job*: a lease job acquires a
  connector from ``sync_pool`` (``acquire()``, on the worker), hands the task
  an ``AsyncConnector`` and then runs that task's queries on that connector, in
  order, until the task ends the lease; a query job runs ``sync_pool``'s retry
  policy (``ConnectionPool._run_policy``: the same attempts, deadlines and
  error classification as ``ConnectionPool.query``), with the exchange itself
  done by this module's code (below).  One thread acquires and uses each
  connector, so the sync pool's per-thread rules hold unchanged
  (``check_ownership``).  Plus one *aborter* thread per pool (cancellation,
  below).  ``open()``, ``wait_ready()`` and ``close()`` run on
  ``asyncio.to_thread`` (they start and join threads).
* **A worker keeps its connector while query jobs are queued.**  The first
  attempt of a query job runs on the sync ``Lease`` the worker holds
  (``_Hold``), and a successful one leaves it held (``_run_policy(hold=)``)
  rather than returning it and leasing again for the next job: a lease and a
  return per query (the lock-free fast paths, but still a few microseconds of
  the one core the GIL gives all threads) become one per burst.  The worker
  returns it, through the ordinary return (``Lease.__exit__``, whose rules
  then decide: kept idle, handed to a waiter, or dropped):

  - when no job is queued, before it delivers the answer of its last job (so
    a task that sees its query done finds the connector back, as after
    ``ConnectionPool.query``) and in any case before it blocks for work: an
    idle worker holds nothing, so idle connectors are in ``sync_pool``'s idle
    list as before: pinged (``keepalive_interval``), shrunk (``max_idle``),
    probed at checkout, closed by ``close()``;
  - before a job runs, when the held connector may not serve it
    (``_Hold.ready``): past its ``max_lifetime``, its generation retired
    (``retire_all()``, the server went away), ``sync_pool`` closed (its
    ``_fast`` flag, cleared by ``close()``), a thread or worker waiting for a
    connector of ``sync_pool`` (the return hands it over under the sync
    pool's fairness rules: a stream of queued tasks never starves it), or
    per-lease extras on (leak tracking, ownership checks, metrics: they time
    leases, so nothing is held across jobs then);
  - when the attempt fails: the attempt's lease ends as any attempt's does
    (a connector whose query was interrupted or cancelled is discarded;
    retries lease their own connectors);
  - before a lease job: a lease is always acquired for it.

  Each query still counts as a lease granted in ``stats()``.  The held
  connector is used back to back, so the checkout probe (for connectors idle
  longer than ``probe_after``) has nothing to catch; the connector's own
  pre-send probe still applies (``connectors``).
* **Ending a lease.** An error, a discard, a cancelled query or a closed pool:
  the worker ends the lease (a release with an error probes the socket).  A
  clean end with no query under way is done on the loop's thread itself:
  ``Lease.release()`` with no error is bookkeeping (no socket call: the
  connector goes idle or to a waiting worker), and every answer of the lease
  was delivered, so its worker is done with the connector; the worker is then
  only told to go back to the queue.  This saves a round trip per lease.
* **The event loop's thread** only does bookkeeping: it creates futures,
  appends jobs, puts commands on queues, sets futures' results, and (clean
  lease ends, ``stats()``) takes ``sync_pool``'s lock, which is only ever held
  for short bookkeeping, never across a network call or a wait.  No socket
  call, no sleep.  Workers report back through ``loop.call_soon_threadsafe``,
  one wake-up of the loop per batch of results (``_Shared.drain``), so every
  future is touched only on its loop's thread.
* **Waiting in order.** Jobs wait in one FIFO deque (``_Shared.jobs``); each
  appended job comes with one token on ``_Shared.wake`` (a ``SimpleQueue``,
  where idle workers block).  A worker takes a token, then the oldest job
  (``popleft``).  A task that gives up on a job still in the deque removes it
  (``remove``).  Both are single C calls on a deque, atomic under the GIL:
  whoever removes a job from the deque owns it, exactly one of the worker that
  will run it and the task that withdraws it.  A withdrawn job leaves a spare
  token: some worker wakes, finds no job (or the next one) and goes on.
  ``timeout`` is one deadline from the request: a loop timer (one for all
  queued jobs, due at the earliest deadline) fails a job still in the deque
  with ``PoolTimeout`` at its deadline, and a worker that took it passes the
  time left to ``sync_pool.acquire``.  ``max_waiting`` counts the
  tasks that wait for a worker (jobs in the deque beyond the idle workers):
  more get ``TooManyWaiters`` at once; workers waiting for a connector count
  against it in ``sync_pool`` as threads would.

Locks: the pool's own state (``_loop``, ``_opened``, ``_closed``, the
counters, the sweep timer) and each ``AsyncLease``'s are touched only on the
loop's thread, and need none.  The deques ``jobs``, ``idle`` and ``results``
are shared, used only through atomic single operations (``append``,
``popleft``, ``remove``, ``copy``, ``len``); ``_Shared.posted`` is a hint
whose races cost one extra wake-up, never a lost result (see ``_deliver``).
A worker's ``_Hold`` (the lease it holds) is touched by that worker only:
the held ``Lease`` is the sync pool's, used as a leaseholder uses it (its
slot's ``in_flight``, ``phase`` and ``uses`` are the holder's, see
``aperturedb_pool._lease``), and the fields ``_Hold.ready`` reads without the
sync pool's lock (``_fast``, ``_generation``, ``_waiters``, ``_metrics``) are
the hints the sync pool's own fast paths read so: a stale value keeps the
connector one job longer or returns it one job early, and the return itself
re-checks under the sync pool's rules.  Each request's ``_Abort`` (its job is
one: one object per request) needs no lock either: ``aborted`` is written
once, by the loop's thread, and the connector of an exchange in flight sits
in a one-item list (``_Abort.cell``, a new one per exchange) from which the
worker and the aborter thread each try to take it with ``list.pop()``, a
single C call, atomic under the GIL: exactly one gets it (see
"Cancellation").  ``sync_pool``'s locking is its own (see
``aperturedb_pool.pool``).  Free-threaded builds are not claimed (as for
``sync_pool``: see ``aperturedb_pool._lease``).

Cancellation
------------
``asyncio.timeout()`` and ``wait_for`` cancel the task: every case below holds
for them too.

* **While waiting for a connector, job still queued:** the task removes its
  job from the deque; it took nothing, and no worker will see it.
* **While a worker is acquiring for it:** the worker gets the connector (or
  fails) and reports to the loop; there the future is found cancelled and the
  lease is ended at once (returned unused).  A grant that reached the future
  just before the task was cancelled (the task had not resumed yet) is ended by
  the task itself on its way out.  Either way the connector goes back.
* **With a query in flight** (``conn.query`` or ``pool.query``): the task sees
  ``CancelledError`` at once (nothing is awaited after the cancellation).  It
  marks the request aborted (``_Abort.aborted``) and hands it to the aborter
  thread.  The worker publishes the connector of each exchange (``cell``)
  before it reads ``aborted`` and sends: either it sees ``aborted`` and sends
  nothing, or the aborter, which reads ``cell`` after ``aborted`` was set,
  finds the connector there.  The aborter takes it out of ``cell`` (``pop``)
  and shuts its socket down.  When the exchange ends the worker takes it
  out in turn: if the aborter got it first, the worker shuts the socket
  down too (so it is shut before the connector goes back, whatever the
  aborter's timing) and fails the exchange: a shut-down connector is never
  returned as healthy; if the worker got it, the aborter never touches it,
  so a connector back in the pool is never shut down by a late abort.  The
  blocked read ends at once (EOF), the worker reports to a future nobody
  awaits, and:
  a lease whose query was cancelled refuses further queries
  (``ConnectorUnusable``) and discards its connector when it ends, so the
  connector, owed an answer or shut down, is closed and the pool replaces it;
  ``pool.query`` ends its attempt with a private exception that the retry
  policy never retries, and ``sync_pool`` discards the connector (in flight,
  or failing its probe after the shutdown).  Not retired with it: the other
  connectors (the failure is ours, not the server's).
* **Not abortable at once:** a connector not connected yet (the SDK connects
  inside its first query) has no socket to shut down: that exchange runs to its
  end on its worker, which then shuts it down (the connector is discarded).
  A retry policy's backoff sleep also runs to its end (up
  to ``RetryPolicy.max_delay``), then the next attempt is not made.  In both
  cases the task has already gone; a worker is busy a little longer.

Event loops
-----------
A pool belongs to the loop it was opened on: its workers post to that loop.
Using it from another loop raises ``WrongEventLoop`` naming both; create one
pool per loop (in each loop's startup or lifespan).  Any loop implementation
with ``call_soon_threadsafe`` works (uvloop included).  Pools are not shared
across a ``fork()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import queue
import socket
import threading
import time
import warnings
import weakref
from collections import deque
from types import TracebackType
from typing import Any, Callable, Final

from aperturedb_pool import _validate
from aperturedb_pool._lease import stale_reason
from aperturedb_pool.errors import (
    ConnectorUnusable,
    LeaseError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
)
from aperturedb_pool.health import socket_of
from aperturedb_pool.pool import ConnectionPool, Lease
from aperturedb_pool.retry import RetryPolicy, check_policy
from aperturedb_pool.stats import PoolStats

__all__ = ["AsyncConnectionPool", "AsyncLease", "AsyncConnector", "WrongEventLoop"]

_monotonic = time.monotonic
_Future = asyncio.Future
_running_loop = asyncio.get_running_loop
#: A worker serving a lease checks this often whether its loop was closed
#: under it (the task can then never end the lease).
_ORPHAN_CHECK: Final = 1.0


class WrongEventLoop(PoolError, RuntimeError):
    """An ``AsyncConnectionPool`` was used from an event loop it does not belong to."""


class _Abandoned(Exception):
    """Raised on a worker thread: the task that asked for this exchange was
    cancelled.  Not a ``ConnectorError``: no retry policy retries it."""


class _Abort:
    """Cancellation of one request's exchanges (see "Cancellation").

    ``aborted`` is written once, by the loop's thread, and read by the worker.
    ``cell`` is None or a one-item list holding the connector the worker is
    exchanging on (a new list per exchange), published by the worker; the
    worker (when the exchange ends) and the aborter thread (to shut it down)
    each try to take the connector out with ``list.pop()``, one atomic C call
    under the GIL: exactly one of them gets it, and that one decides."""

    __slots__ = ("aborted", "cell")

    def __init__(self) -> None:
        self.aborted = False
        self.cell: list[Any] | None = None


def _shut(conn: Any) -> None:
    """Shut ``conn``'s socket down (if it has one): its pending read ends with
    EOF, and its probe fails, so the pool discards it when it comes back."""
    sock = socket_of(conn)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _take_back(cell: list[Any], conn: Any) -> bool:
    """On the worker, as the exchange ends: take ``conn`` back from ``cell``.
    True: taken, and the aborter can no longer touch it.  False: the aborter
    took it first and shuts its socket down (or is about to); it is shut down
    here too, before the connector goes back, so the return's probe discards
    it whatever the aborter's timing."""
    try:
        cell.pop()
    except IndexError:
        _shut(conn)
        return False
    return True


def _exchange(abort: _Abort, conn: Any, q: Any, blobs: Any) -> Any:
    """On a worker: ``conn.query(q, blobs)`` unless its task gave up first.

    Published first, ``aborted`` read second; the loop sets ``aborted`` before
    it hands the request to the aborter, which reads ``cell`` after: either
    this thread sees ``aborted`` (and sends nothing), or the aborter finds the
    connector in ``cell``."""
    abort.cell = cell = [conn]
    if abort.aborted:
        _take_back(cell, conn)
        raise _Abandoned("the task was cancelled before its query was sent")
    try:
        result = conn.query(q, blobs)
    except BaseException as e:
        if not _take_back(cell, conn):
            raise _Abandoned("the task was cancelled during its query; the connection "
                             "was shut down") from e
        raise
    if not _take_back(cell, conn):
        # Answered, but taken by the aborter: shut down, unusable now.
        raise _Abandoned("the task was cancelled as its answer arrived; the connection "
                         "was shut down")
    return result


def _aborter_loop(requests: queue.SimpleQueue[_Abort | None]) -> None:
    while True:
        abort = requests.get()
        if abort is None:
            return
        cell = abort.cell
        if cell is None:
            # No exchange published yet: the worker reads ``aborted`` (set
            # before the request was queued here) after publishing, and
            # sends nothing.
            continue
        try:
            conn = cell.pop()
        except IndexError:  # that exchange ended; a later one sees ``aborted``
            continue
        # Ends the worker's blocked read now; the connector is then
        # discarded (never reused: see _take_back).
        _shut(conn)


# -- results, posted by workers and run on the loop's thread ------------------

def _grant(job: _LeaseJob, lease: Lease) -> None:
    if job.future.done():
        # Cancelled while the worker acquired: the lease goes back unused.
        job.inbox.put(_End(None, False))
    else:
        job.future.set_result(lease)


def _deliver(shared: _Shared, entry: tuple[Any, Any, Any]) -> None:
    """From a worker: queue ``entry`` for ``_Shared.drain`` on the pool's loop:
    ``(future, result, error)`` settles the future, ``(None, fn, args)`` runs
    ``fn(*args)``."""
    shared.results.append(entry)
    # One wake-up of the loop for every batch of results: a wake-up is a
    # system call here and a loop iteration there.  The loop clears
    # ``posted`` before it drains (see _Shared.drain): a result appended
    # after the drain's last look finds it clear and schedules another.
    if not shared.posted:
        shared.posted = True
        loop = shared.loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(shared.drain)
        except RuntimeError:  # the loop is closed: nobody awaits the result
            pass


def _post(shared: _Shared, fn: Callable[..., None], *args: Any) -> bool:
    """From a worker: run ``fn(*args)`` on the pool's loop.  False if the loop
    is closed (nobody will ever run it)."""
    loop = shared.loop
    assert loop is not None
    if loop.is_closed():
        return False
    _deliver(shared, (None, fn, args))
    return not loop.is_closed()


# -- jobs ---------------------------------------------------------------------

class _End:
    """The command that ends a lease job; ``done`` (if any) is settled once the
    connector is back in ``sync_pool``."""

    __slots__ = ("error", "discard", "done", "returned")

    def __init__(self, error: BaseException | None, discard: bool,
                 done: asyncio.Future[None] | None = None, *, returned: bool = False) -> None:
        self.error = error
        self.discard = discard
        self.done = done
        self.returned = returned  # the loop returned the connector itself


class _Hold:
    """One worker thread's own state, touched by that thread only: ``lease``,
    the ``sync_pool`` Lease the worker holds between query jobs (see
    "Workers" in the module doc), or None."""

    __slots__ = ("lease",)

    def __init__(self) -> None:
        self.lease: Lease | None = None

    def ready(self, pool: ConnectionPool) -> bool:
        """Whether the next query job may run on a held lease (this one, or
        one its first attempt leases) and keep it.  A held lease that may not
        serve it is returned first (``Lease.__exit__``: the return rule then
        decides whether it stays idle, goes to a waiter or is dropped)."""
        # Only for plain leases: leak tracking, ownership checks and metrics
        # time each lease, which a hold would stretch over many queries.
        ok = pool._fast and pool._metrics is None
        lease = self.lease
        if lease is not None:
            slot = lease._slot
            assert slot is not None
            # The pool's staleness rule (generation, lifetime: stale_reason,
            # which the fast return inlines), with pool._fast in ``ok``, and
            # nobody waits in sync_pool (a waiting thread or worker is served
            # by the return).
            if (ok and not pool._waiters and
                    stale_reason(slot, pool._generation, _monotonic()) is None):
                slot.uses += 1  # a lease granted per query, as without the hold
                return True
            self.let_go()
        return ok

    def let_go(self) -> None:
        """Return the held lease, if any (a clean return: no query under way)."""
        lease = self.lease
        if lease is not None:
            self.lease = None
            lease.__exit__(None, None, None)


class _Job(_Abort):
    # A job is its request's _Abort (one object per request, not two).
    __slots__ = ("future", "wait", "deadline", "__weakref__")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        # _Abort's fields, set here: one call less per request.
        self.aborted = False
        self.cell = None
        self.future = future
        self.wait = 0.0  # seconds it may wait for a connector (set by _submit)
        self.deadline = 0.0  # time.monotonic() when that wait ends

    def run(self, shared: _Shared, hold: _Hold) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _LeaseJob(_Job):
    # inbox: the task's commands, (q, blobs, future) or _End, run in order.
    __slots__ = ("inbox",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        super().__init__(future)
        self.inbox: queue.SimpleQueue[tuple[Any, Any, asyncio.Future[Any]] | _End] = \
            queue.SimpleQueue()

    def run(self, shared: _Shared, hold: _Hold) -> None:
        loop = shared.loop
        assert loop is not None
        # A lease is acquired for the task (an _ManualLease: the task ends it,
        # possibly on the loop's thread), never served from the worker's hold.
        hold.let_go()
        try:
            lease = shared.pool.acquire(max(0.0, self.deadline - _monotonic()))
        except BaseException as e:
            _deliver(shared, (self.future, None, e))
            return
        if not _post(shared, _grant, self, lease):
            lease.release()
            return
        conn = lease.conn
        inbox = self.inbox
        while True:
            try:
                cmd = inbox.get(timeout=_ORPHAN_CHECK)
            except queue.Empty:
                if loop.is_closed():  # no task can end this lease any more
                    lease.discard()
                    return
                continue
            if isinstance(cmd, _End):
                if cmd.returned:
                    return
                try:
                    if cmd.discard:
                        lease.discard(cmd.error)
                    else:
                        lease.release(cmd.error)
                except BaseException as e:  # pragma: no cover - a bug: tell the task
                    if cmd.done is not None:
                        _deliver(shared, (cmd.done, None, e))
                    raise
                if cmd.done is not None:
                    _deliver(shared, (cmd.done, None, None))
                return
            q, blobs, fut = cmd
            try:
                result = _exchange(self, conn, q, blobs)
            except BaseException as e:
                _deliver(shared, (fut, None, e))
            else:
                _deliver(shared, (fut, result, None))


class _QueryJob(_Job):
    __slots__ = ("q", "blobs", "idempotent", "timeout", "retry")

    def __init__(self, future: asyncio.Future[Any], q: Any, blobs: Any, idempotent: bool | None,
                 timeout: float | None, retry: RetryPolicy | None) -> None:
        # _Job's fields, set here: no super() call per query.
        self.aborted = False
        self.cell = None
        self.future = future
        self.wait = 0.0
        self.deadline = 0.0
        self.q = q
        self.blobs = blobs
        self.idempotent = idempotent
        self.timeout = timeout
        self.retry = retry

    def __call__(self, conn: Any) -> Any:
        # The body of each attempt (no closure per query).
        return _exchange(self, conn, self.q, self.blobs)

    def run(self, shared: _Shared, hold: _Hold) -> None:
        if self.aborted:
            return
        pool = shared.pool
        try:
            # ConnectionPool.query's own path (attempt leases, deadlines,
            # error classification), with this module's exchange as the body;
            # its first attempt on the held lease, if any, which it keeps in
            # ``hold`` if the attempt succeeds (see "Workers").
            result = pool._run_policy(
                pool.retry if self.retry is None else self.retry, self, self.q, self.blobs,
                self.timeout, self.idempotent, None, hold if hold.ready(pool) else None)
        except BaseException as e:
            _deliver(shared, (self.future, None, e))
            return
        if not shared.jobs:
            # No job queued: the connector goes back before the task learns
            # that its query is done (as pool.query leaves it), not after.
            hold.let_go()
        _deliver(shared, (self.future, result, None))


class _Shared:
    """What the worker threads see: never the AsyncConnectionPool itself, so
    a pool dropped without close() can be collected (its finalizer stops them)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        # The pool's loop, set by open() before any worker starts.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.jobs: deque[_Job] = deque()
        self.wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.idle: deque[int] = deque()  # one entry per worker blocked on ``wake``
        self.aborts: queue.SimpleQueue[_Abort | None] = queue.SimpleQueue()
        # Results posted by workers (_deliver), run on the loop by drain();
        # ``posted``: a drain is scheduled.
        self.results: deque[tuple[Any, Any, Any]] = deque()
        self.posted = False
        self.workers = 0
        self.stopping = False

    def drain(self) -> None:
        # On the loop's thread.  Cleared first: see _deliver.
        self.posted = False
        results = self.results
        while True:
            try:
                fut, x, y = results.popleft()
            except IndexError:
                return
            try:
                if fut is None:
                    x(*y)
                elif not fut.done():  # (done: cancelled, the task has gone)
                    if y is None:
                        fut.set_result(x)
                    else:
                        fut.set_exception(y)
            except Exception as e:  # pragma: no cover - the callbacks only settle futures
                assert self.loop is not None
                self.loop.call_exception_handler({"message": "aperturedb_pool.aio: a result "
                                                  "could not be delivered", "exception": e})

    def stop(self) -> None:
        # Any thread (close(), or the finalizer of a pool never closed).
        self.stopping = True
        for _ in range(self.workers):
            self.wake.put(None)
        self.aborts.put(None)


def _worker_loop(shared: _Shared, me: int) -> None:
    jobs, wake, idle = shared.jobs, shared.wake, shared.idle
    take = wake.get
    hold = _Hold()
    while True:
        try:
            # A token already there (jobs are queued): no need to be counted
            # idle (``idle`` feeds max_waiting) for an instant, and the held
            # lease, if any, serves the next job.
            take(False)
        except queue.Empty:
            # Nothing queued: the held connector goes back to sync_pool
            # before this thread blocks (idle there: pinged, shrunk, leased
            # by threads, closed by close()).
            hold.let_go()
            idle.append(me)
            take()
            idle.remove(me)
        try:
            job = jobs.popleft()
        except IndexError:  # a withdrawn job's token, or the stop signal
            hold.let_go()
            if shared.stopping:
                return
            continue
        job.run(shared, hold)


def _start_threads(shared: _Shared, count: int, name: str) -> None:
    shared.workers = count
    threading.Thread(target=_aborter_loop, args=(shared.aborts,), daemon=True,
                     name=f"aperturedb-pool-aio-{name}-abort").start()
    for i in range(count):
        threading.Thread(target=_worker_loop, args=(shared, i), daemon=True,
                         name=f"aperturedb-pool-aio-{name}-{i}").start()


# -- the public API -------------------------------------------------------------

class AsyncConnector:
    """A leased connector for coroutines: ``await conn.query(q, blobs)``.

    Each query runs on the lease's worker thread, in the order asked.  Valid
    until its lease ends."""

    __slots__ = ("_lease",)

    def __init__(self, lease: AsyncLease) -> None:
        self._lease = lease

    async def query(self, q: Any, blobs: Any = None) -> Any:
        """``Connector.query`` on the leased connector: ``(response, blobs)``.

        One attempt, as a leased connector makes in the sync pool (errors are
        classified: ``ConnectFailed``, ``OutcomeUnknown``...).  Cancelled, the
        exchange is aborted and the connector discarded when the lease ends
        (see the module doc, "Cancellation")."""
        return await self._lease._query(q, blobs)

    @property
    def lease(self) -> AsyncLease:
        return self._lease

    def __repr__(self) -> str:
        return f"<AsyncConnector of {self._lease!r}>"


_PENDING, _ACTIVE, _ENDED = "pending", "active", "released"


class AsyncLease:
    """A lease of one connector for coroutines: ``async with pool.lease() as conn:``.

    ``await pool.acquire()`` returns one already acquired: end it with
    ``release()`` or ``discard()`` (plain methods: no await), exactly once.
    """

    # _sync: the sync pool's Lease its worker acquired; _queries: queries sent
    # whose task has not resumed yet (see _end).
    __slots__ = ("_pool", "_timeout", "_job", "_state", "_conn", "_sync", "_queries",
                 "__weakref__")

    def __init__(self, pool: AsyncConnectionPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._job: _LeaseJob | None = None
        self._state = _PENDING
        self._conn: AsyncConnector | None = None
        self._sync: Lease | None = None
        self._queries = 0

    @property
    def conn(self) -> AsyncConnector | None:
        """The leased connector; None before the acquisition and after the end."""
        return self._conn if self._state is _ACTIVE else None

    @property
    def active(self) -> bool:
        return self._state is _ACTIVE

    async def __aenter__(self) -> AsyncConnector:
        await self._acquire()
        assert self._conn is not None
        return self._conn

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Back in the pool when the block is left (its stats say so).  A
        # cancellation landing here stops the wait only: the lease has ended.
        await self._end(ev, False)

    def release(self, error: BaseException | None = None) -> asyncio.Future[None]:
        """Return the connector.  Pass the exception that ended the work, if any.

        Returns a future that is done once the connector is back in the pool
        (its worker runs the release); awaiting it is optional."""
        return self._end(error, False)

    def discard(self, error: BaseException | None = None) -> asyncio.Future[None]:
        """Return the connector to be closed rather than reused (see ``release``)."""
        return self._end(error, True)

    async def _acquire(self) -> None:
        if self._state is not _PENDING:
            raise LeaseError("this lease was already acquired; use a new pool.lease()")
        pool = self._pool
        loop = pool._check_loop()
        job = _LeaseJob(loop.create_future())
        pool._submit(job, self._timeout)
        lease = await pool._wait(job)
        assert isinstance(lease, Lease)
        self._sync = lease
        self._job = job
        self._conn = AsyncConnector(self)
        self._state = _ACTIVE

    def _end(self, error: BaseException | None, discard: bool) -> asyncio.Future[None]:
        if self._state is not _ACTIVE:
            raise LeaseError("this lease was already released" if self._state is _ENDED else
                             "this lease was never acquired")
        loop = self._pool._check_loop()
        job = self._job
        assert job is not None
        self._state = _ENDED
        # The AsyncConnector points at its lease; the lease lets go of it, so
        # an ended lease leaves no reference cycle: refcounting frees it and
        # everything it holds (job, futures, the sync lease) at once.  Left to
        # the cyclic collector, a stream of leases made it run a full
        # collection every few seconds, a pause of 30 ms on the event loop.
        self._conn = None
        done: asyncio.Future[None] = loop.create_future()
        sync = self._sync
        if (error is None and not discard and not job.aborted and not self._queries and
                not self._pool._closed and sync is not None):
            # A clean end with no query under way: the worker is done with the
            # connector (every answer was delivered, so its exchange ended),
            # and a clean return is bookkeeping only (no socket call: see the
            # module doc), so it is done here, saving the loop a wake-up.  The
            # worker is told to stop serving the lease.
            sync.release()
            job.inbox.put(_End(None, False, None, returned=True))
            done.set_result(None)
            return done
        # Otherwise the worker ends the lease.  A query of this lease was
        # cancelled: its connector is owed an answer or shut down, never reused.
        job.inbox.put(_End(error, discard or job.aborted, done))
        return done

    async def _query(self, q: Any, blobs: Any) -> Any:
        if self._state is not _ACTIVE:
            raise LeaseError("this connector's lease has ended (use it only inside the "
                             "'async with pool.lease()' block)")
        job = self._job
        assert job is not None
        if job.aborted:
            raise ConnectorUnusable(
                "a query of this lease was cancelled, so its connector may still be owed that "
                "query's answer (or was shut down); the query was not sent. End the lease (the "
                "connector is discarded) and lease another one", query=q)
        loop = self._pool._check_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        job.inbox.put((q, [] if blobs is None else blobs, fut))
        self._queries += 1
        try:
            return await fut
        except asyncio.CancelledError:
            self._pool._abort(job)
            raise
        finally:
            self._queries -= 1

    def __del__(self) -> None:
        # Dropped while active (an acquire() never released): the worker
        # would serve it for ever.  SimpleQueue.put is safe from any thread.
        if self._state is _ACTIVE and self._job is not None:
            self._state = _ENDED
            self._job.inbox.put(_End(None, True))
            warnings.warn(f"a lease of pool {self._pool.name!r} was dropped without release(); "
                          f"its connector is closed", ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        return f"<AsyncLease {self._state} of pool {self._pool.name!r}>"


class AsyncConnectionPool:
    """A pool of ApertureDB connectors for asyncio code (see the module doc).

    ``template`` and every keyword are ``ConnectionPool``'s (``min_size``,
    ``max_size``, ``timeout``, ``max_waiting``, ``retry``, ``query_timeout``,
    ...), but ``open``: the pool starts with ``await pool.open()`` or
    ``async with AsyncConnectionPool(...) as pool:``, and belongs to that
    event loop.
    """

    def __init__(self, template: Any = None, **options: Any) -> None:
        if "open" in options:
            raise TypeError("AsyncConnectionPool takes no open= option: start it with "
                            "'await pool.open()' or 'async with AsyncConnectionPool(...)', "
                            "on the event loop that will use it")
        self._sync = ConnectionPool(template, open=False, **options)
        self._shared = _Shared(self._sync)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = False
        self._closed = False
        self._timeouts = 0  # tasks that timed out waiting for a worker
        self._rejected = 0  # tasks refused by max_waiting
        # The timer that fails queued jobs at their deadline (_sweep_jobs).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        # Stops the threads of a pool dropped without close() (they refer to
        # _shared only, never to this object).
        self._stop_threads = weakref.finalize(self, self._shared.stop)

    # -- lifecycle ----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._sync.name

    @property
    def sync_pool(self) -> ConnectionPool:
        """The thread pool underneath: for threads of this process, or metrics
        (``aperturedb_pool.metrics``).  Its stats do not count waiting tasks."""
        return self._sync

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self, wait: bool = False, timeout: float | None = None
                   ) -> AsyncConnectionPool:
        """Start the pool on the running event loop: connectors open in the
        background.  With ``wait=True``, also ``await wait_ready(timeout)``."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._shared.loop = loop
        elif loop is not self._loop:
            raise self._wrong_loop(loop)
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if not self._opened:
            self._opened = True
            await asyncio.to_thread(self._start)
        if wait:
            await self.wait_ready(timeout)
        return self

    def _start(self) -> None:
        self._sync.open()
        _start_threads(self._shared, self._sync.max_size, self.name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until ``min_size`` connectors are open (``ConnectionPool.wait_ready``,
        on a helper thread: if cancelled, that thread waits out ``timeout``)."""
        self._check_loop()
        await asyncio.to_thread(self._sync.wait_ready, timeout)

    async def close(self, timeout: float | None = 0.0) -> None:
        """Close the pool.  Idempotent.  Tasks waiting for a connector get
        ``PoolClosed``; leased connectors close when their leases end (with
        ``timeout`` > 0: as ``ConnectionPool.close``)."""
        if self._closed:
            return
        if self._loop is not None:
            self._check_loop()
        self._closed = True
        jobs = self._shared.jobs
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                break
            if not job.future.done():
                job.future.set_exception(PoolClosed(f"pool {self.name!r} was closed while "
                                                    f"waiting"))
        if self._sweep is not None:
            self._sweep.cancel()
        await asyncio.to_thread(self._sync.close, timeout)
        self._stop_threads()

    async def __aenter__(self) -> AsyncConnectionPool:
        return await self.open()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncConnectionPool {self.stats()}>"

    # -- leasing --------------------------------------------------------------
    def lease(self, timeout: float | None = None) -> AsyncLease:
        """``async with pool.lease() as conn:`` leases one connector for the block.

        Waits up to ``timeout`` seconds (default: the pool's ``timeout``), in
        order of request, without blocking the event loop."""
        if timeout is not None:
            _validate.duration("timeout", timeout, optional=False)
        return AsyncLease(self, timeout)

    async def acquire(self, timeout: float | None = None) -> AsyncLease:
        """Lease a connector now; end the lease with ``release()`` or ``discard()``."""
        lease = self.lease(timeout)
        await lease._acquire()
        return lease

    async def query(self, q: Any, blobs: Any = None, *, idempotent: bool | None = None,
                    timeout: float | None = None, retry: RetryPolicy | None = None) -> Any:
        """``ConnectionPool.query`` for coroutines: one query under the retry policy.

        The same arguments, errors and retry rules: reads are retried after a
        transport failure, a write whose outcome is unknown never is
        (``OutcomeUnknown``); ``timeout`` bounds each attempt's exchange.
        Cancelled, the query's exchange is aborted and no attempt follows."""
        # idempotent None is judged on the worker, and only if an attempt
        # fails (_run_policy): nothing on the loop's thread per query.
        if timeout is not None:
            _validate.duration("timeout", timeout, optional=False, allow_zero=False)
        if retry is not None:
            check_policy(retry)
        loop = _running_loop()
        if loop is not self._loop:
            self._check_loop()  # raises
        # asyncio.Future(loop=) rather than loop.create_future(): the same
        # future, one Python call less (any loop: uvloop's included).
        job = _QueryJob(_Future(loop=loop), q, [] if blobs is None else blobs,
                        None if idempotent is None else bool(idempotent), timeout, retry)
        self._submit(job, None)
        try:  # self._wait(job), inline: one coroutine less per query
            return await job.future
        except BaseException:
            self._withdraw(job)
            raise

    # -- internals (all on the loop's thread) ---------------------------------
    def _check_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is None:
                raise PoolError(f"pool {self.name!r} is not open: call 'await pool.open()' "
                                f"(or use 'async with AsyncConnectionPool(...)') first")
            raise self._wrong_loop(loop)
        return loop

    def _wrong_loop(self, loop: asyncio.AbstractEventLoop) -> WrongEventLoop:
        return WrongEventLoop(
            f"pool {self.name!r} belongs to the event loop it was opened on ({self._loop!r}) "
            f"and was used from another one ({loop!r}): its worker threads deliver results "
            f"to its own loop only. Create one AsyncConnectionPool per event loop (for "
            f"example in each loop's startup or lifespan)")

    def _submit(self, job: _Job, timeout: float | None) -> None:
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        sync = self._sync
        shared = self._shared
        jobs = shared.jobs
        mw = sync.max_waiting
        if mw is not None and len(jobs) - len(shared.idle) >= mw:
            self._rejected += 1
            s = sync.stats()
            raise TooManyWaiters(
                f"pool {self.name!r}: {len(jobs)} tasks already waiting (max_waiting={mw}); "
                f"size {s.size}/{s.max_size}, leased {s.leased}. Raise max_waiting or "
                f"max_size, or shed load")
        job.wait = sync.timeout if timeout is None else timeout
        job.deadline = deadline = _monotonic() + job.wait
        jobs.append(job)
        shared.wake.put(None)
        if deadline < self._sweep_at:
            self._schedule_sweep(deadline)

    async def _wait(self, job: _Job) -> Any:
        try:
            return await job.future
        except BaseException:
            self._withdraw(job)
            raise

    def _schedule_sweep(self, at: float) -> None:
        # One timer for every queued job (a timer per job costs every query):
        # due at the earliest deadline among them.
        assert self._loop is not None
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = at
        self._sweep = self._loop.call_later(max(0.0, at - _monotonic()), self._sweep_jobs)

    def _sweep_jobs(self) -> None:
        # Jobs still queued at their deadline fail with PoolTimeout (a worker
        # that took one waits for a connector no longer than the same
        # deadline).  ``copy()`` is atomic; each job is then removed alone.
        self._sweep = None
        self._sweep_at = math.inf
        now = _monotonic()
        due = math.inf
        for job in self._shared.jobs.copy():
            if job.deadline <= now:
                self._expire(job)
            else:
                due = min(due, job.deadline)
        if due < math.inf and not self._closed:
            self._schedule_sweep(due)

    def _expire(self, job: _Job) -> None:
        try:
            self._shared.jobs.remove(job)
        except ValueError:  # taken by a worker since the copy
            return
        if not job.future.done():
            self._timeouts += 1
            s = self.stats()
            job.future.set_exception(PoolTimeout(
                f"pool {self.name!r}: no connector available within {job.wait:.3g} s (size "
                f"{s.size}/{s.max_size}, leased {s.leased}, idle {s.idle}, waiting {s.waiting}, "
                f"opening {s.opening}); every connector was leased or in a query the whole "
                f"time: raise max_size or timeout, or hold leases for less time"))

    def _withdraw(self, job: _Job) -> None:
        # The task stops waiting for ``job`` (cancelled, timed out, failed).
        try:
            self._shared.jobs.remove(job)
            return  # no worker took it: nothing to undo
        except ValueError:
            pass
        fut = job.future
        if isinstance(job, _LeaseJob):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted, but cancelled before the task resumed: give it back.
                job.inbox.put(_End(None, False))
            # Otherwise _grant finds the future cancelled and gives it back.
        elif not fut.done() or fut.cancelled():
            self._abort(job)

    def _abort(self, abort: _Abort) -> None:
        abort.aborted = True
        self._shared.aborts.put(abort)

    # -- stats ------------------------------------------------------------------
    def stats(self, reset: bool = False) -> PoolStats:
        """``ConnectionPool.stats()``, with the tasks waiting for a worker counted in
        ``waiting`` (and their timeouts and rejections in the counters)."""
        s = self._sync.stats(reset)
        queued = len(self._shared.jobs)
        out = dataclasses.replace(s, waiting=s.waiting + queued,
                                  timeouts=s.timeouts + self._timeouts,
                                  rejected_waiters=s.rejected_waiters + self._rejected)
        if reset:
            self._timeouts = self._rejected = 0
        return out
