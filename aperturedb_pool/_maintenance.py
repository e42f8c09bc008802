"""The pool's background work: one task per job, run by one thread per pool.

``_maintenance_loop`` is the thread (it holds the pool only through a weak
reference).  Each round (``_maintain``) runs the tasks in turn, each returning
when it wants the next round:

* ``_recover_lost``: leases no one will return (see "Interruptions" in
  ``aperturedb_pool._lease``): closed and replaced, with a warning;
* ``_expire_overdue``: queries past their (far) deadline: their sockets shut;
* ``_log_cpu_note``: a change of the CPU-bound verdict, logged outside the lock;
* ``_refill``: opens requested by waiters and ``min_size``, each in an opener
  thread (``_open_worker``/``_open_one``, with the reconnect backoff), so that
  a hanging connect never stalls the rest;
* ``_tend_idle``: idle connectors expired, retired or idle too long (shrink)
  are dropped, those due a keepalive ping are taken out for ``_keepalive_all``
  (its own thread: a ping may take up to ``connect_timeout``);
* ``_report_leaks``: leases held past ``leak_threshold`` are logged with their
  stack;
* ``_close_pending``: dropped connectors are closed, outside the lock.

All of them take the pool lock only for bookkeeping, never across I/O.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import sys
import threading
import time
import warnings
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any

from aperturedb_pool import connectors as _connectors
from aperturedb_pool._lease import (
    _MAINTENANCE,
    DiscardReason,
    _close_quietly,
    _LeasePaths,
    _ManualLease,
    _Slot,
    stale_reason,
)
from aperturedb_pool.errors import ConnectorError
from aperturedb_pool.health import PEER_CLOSED, TLS_READABLE, probe_socket, socket_of
from aperturedb_pool.retry import FullJitterBackoff

if TYPE_CHECKING:
    from aperturedb_pool.pool import ConnectionPool

logger = logging.getLogger("aperturedb_pool")

_monotonic = time.monotonic  # replaced by tests (tests/_support.py: set_pool_clock)
_get_ident = threading.get_ident
_MAX_PARALLEL_OPENS = 2
# A slot out of the pool with no holder pointing back at it for this long was
# lost to an interruption (see "Interruptions"; tests shorten it).
_LOST_GRACE = 1.0


class IdleVerdict(str, Enum):
    """What a maintenance round does with an idle connector (None: keep it)."""

    PING = "ping"  # due a keepalive ping
    RETIRED = "retired"  # dropped: its generation was retired
    EXPIRED = "expired"  # dropped: past max_lifetime
    IDLE = "idle"  # dropped: idle longer than max_idle, above min_size

    @property
    def discard_reason(self) -> DiscardReason:
        return DiscardReason(self.value)


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



class _MaintenanceWork(_LeasePaths):
    """The background work of ``ConnectionPool`` (a base of it)."""

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
                # The retry policy's wait (full jitter, doubling, capped).
                delay = FullJitterBackoff(self.reconnect_initial, 2.0,
                                          self.reconnect_max).compute(self._open_failures)
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
                self._to_close.append((conn, DiscardReason.CLOSED.value))
                return True
            self._size += 1
            self._all.add(slot)
            self._park_or_hand_off(slot, oldest_end=True)
            self._notify_ready()
        return True

    def _maintain(self, now: float) -> float:
        """One round of background work, one task per job (see the module
        doc); returns seconds until the next round."""
        next_round = min(1.0, self._recover_lost(now), self._expire_overdue(now))
        self._log_cpu_note()
        next_round = min(next_round, self._refill(now))
        self._close_pending()
        next_round = min(next_round, self._tend_idle(now), self._report_leaks(now))
        self._close_pending()
        return next_round

    def _refill(self, now: float) -> float:
        """Start the opens requested by waiters and ``min_size``, each in an
        opener thread (a slow or hanging connect never stalls the maintenance
        of the connectors already open), at most _MAX_PARALLEL_OPENS at once
        and not before the reconnect backoff allows.  Returns seconds until
        the backoff ends (inf: nothing to wait for)."""
        while True:
            with self._lock:
                if (self._closed or self._open_requests <= 0 or
                        self._opens_running >= _MAX_PARALLEL_OPENS):
                    return math.inf
                if now < self._next_open_at:
                    return self._next_open_at - now
                self._open_requests -= 1
                self._opens_running += 1
            threading.Thread(target=self._open_worker, daemon=True,
                             name=f"aperturedb-pool-{self.name}-open").start()

    def _tend_idle(self, now: float) -> float:
        """Idle connectors: drop the retired, expired and (above min_size)
        idle-too-long ones, and take those due a keepalive ping out of _idle
        for ``_keepalive_all`` (a thread of its own: a ping may take up to
        connect_timeout).  Returns seconds until the next ping is due."""
        next_round = math.inf
        pings: list[_Slot] = []
        with self._lock:
            if self._closed:
                return next_round
            # Oldest are leftmost.  A snapshot, and remove() what is dropped
            # or pinged: a fast-path checkout may take any of these slots
            # meanwhile (remove() then fails and the slot is theirs).
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
                if verdict is IdleVerdict.PING:
                    slot.holder = _MAINTENANCE
                    pings.append(slot)
                    self._pinging += 1
                else:
                    if verdict is IdleVerdict.IDLE:
                        excess -= 1
                    self._drop(slot, verdict.discard_reason)
            if self.keepalive_interval:
                for slot in keep:
                    next_round = min(next_round, max(0.01, self._ping_due(slot) - now))
                if pings:
                    # Pinged now, due again one (jittered) interval from now.
                    next_round = min(next_round, max(0.01, 0.9 * self.keepalive_interval))
        if pings:
            # This thread goes on watching deadlines and looking for lost
            # slots meanwhile.
            threading.Thread(target=self._keepalive_all, args=(pings,), daemon=True,
                             name=f"aperturedb-pool-{self.name}-ping").start()
        return next_round

    def _report_leaks(self, now: float) -> float:
        """Log (once each) the leases held longer than leak_threshold, with
        the stack that took them.  Returns seconds until the next may be due."""
        threshold = self.leak_threshold
        if threshold is None:
            return math.inf
        next_round = max(0.01, threshold / 2)
        leaked = []
        with self._lock:
            if self._closed:
                return next_round
            for slot in self._all:
                if slot.lease_stack is not None and not slot.leak_reported:
                    age = now - slot.leased_at
                    if age >= threshold:
                        slot.leak_reported = True
                        self._c["leaks_reported"] += 1
                        leaked.append((slot, age, slot.lease_stack))
                    else:
                        next_round = min(next_round, threshold - age)
        for slot, age, stack in leaked:
            logger.warning("pool %r: connector %d leased for %.3f s (leak_threshold %.3g s); "
                           "leased at:\n%s", self.name, slot.id, age, threshold,
                           "".join(stack or []))
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
                self._drop(slot, DiscardReason.RECLAIMED)
            for slot in lost:
                self._drop(slot, DiscardReason.LOST)
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

    def _idle_verdict(self, slot: _Slot, now: float, excess: int) -> IdleVerdict | None:
        # Under the lock: what maintenance does with an idle slot (None: keep).
        stale = stale_reason(slot, self._generation, now)
        if stale is not None:
            return IdleVerdict(stale.value)
        if (self.max_idle is not None and excess > 0 and
                now - slot.returned >= self.max_idle):
            return IdleVerdict.IDLE
        if self.keepalive_interval and now >= self._ping_due(slot):
            return IdleVerdict.PING
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
            dropped = DiscardReason.FAILED_PING if not ok else self._unusable(slot, now)
            if dropped is not None:
                self._drop(slot, dropped)
            else:
                # ``returned`` stays the time of the last use: max_idle counts
                # from it, pings do not make a connector "used".
                slot.keepalive_due = now + (self.keepalive_interval or 0.0) * slot.jitter
                self._park_or_hand_off(slot, oldest_end=True)
        if not ok:
            logger.info("pool %r: connector %d failed its keepalive (%s)", self.name, slot.id,
                        reason)
            if reason in (PEER_CLOSED, TLS_READABLE):
                self._on_peer_closed(slot, "keepalive found a closed connection")

    def _log_cpu_note(self) -> None:
        with self._lock:
            note, self._cpu_note = self._cpu_note, None
        if note is not None:
            logger.debug("pool %r: %s; connectors go first come, first served after %.0f ms",
                         self.name, "the process is CPU-bound" if note[0] else
                         "the process is no longer CPU-bound", note[1] * 1e3)
