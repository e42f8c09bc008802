"""Raise an exception, as a signal handler would, at a chosen point of the package.

CPython delivers a signal handler's exception (a ``KeyboardInterrupt``, a soft
time limit) and an asynchronous exception at function entry, at backward
jumps and right after a call returns.  ``Injector`` models that with a trace
function on one thread:

* ``points="lines"``: before each line and at each function entry (``call``);
* ``points="calls"``: additionally after every instruction that called
  something (the trace's ``opcode`` event of the next instruction), which is
  where the exception lands between a C call such as ``deque.pop()`` returning
  and the next store.

A first run records every point of the package (``aperturedb_pool/``, the
embedded server in ``testing/`` excluded) the scenario passes, in order; each
later run raises at the first occurrence of one point.  Used by
``tests/test_injection.py`` (lines, every point) and
``stress/scenario_injection.py`` (calls, every point, and both exception
kinds).
"""

from __future__ import annotations

import dis
import functools
import gc
import os
import sys
import threading
from types import CodeType, FrameType
from typing import Any, Callable

import aperturedb_pool

PACKAGE_DIR = os.path.dirname(os.path.abspath(aperturedb_pool.__file__))
_EXCLUDED = os.path.join(PACKAGE_DIR, "testing") + os.sep

Point = tuple[str, int, str]
_NOP = dis.opmap["NOP"]  # (file name, line or instruction offset, event kind)


class Interrupt(BaseException):
    """Raised like KeyboardInterrupt (not an Exception)."""


class SoftTimeLimit(Exception):
    """Raised like a signal handler's ordinary exception (a soft time limit)."""


@functools.lru_cache(maxsize=None)
def _ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(PACKAGE_DIR + os.sep) and not path.startswith(_EXCLUDED)


@functools.lru_cache(maxsize=None)
def _after_calls(code: CodeType) -> frozenset[int]:
    # Offsets of the instructions that follow a call instruction.
    offsets = set()
    previous_was_call = False
    for ins in dis.get_instructions(code):
        if previous_was_call and ins.opname != "CACHE":
            offsets.add(ins.offset)
            previous_was_call = False
        if ins.opname.startswith("CALL"):
            previous_was_call = True
    return frozenset(offsets)


class Injector:
    """Records the points a thread passes, or raises at one of them."""

    def __init__(self, points: str = "lines", target: Point | None = None,
                 exc: Callable[[], BaseException] = lambda: Interrupt("injected")) -> None:
        assert points in ("lines", "calls")
        self.opcodes = points == "calls"
        self.target = target
        self.exc = exc
        self.seen: dict[Point, int] = {}   # recording: point -> order of first passage
        self.fired = False

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on this thread with the injector's trace installed."""
        sys.settrace(self._global)
        try:
            return fn()
        finally:
            sys.settrace(None)

    def install(self) -> None:
        sys.settrace(self._global)

    def _hit(self, point: Point) -> None:
        if self.target is None:
            if point not in self.seen:
                self.seen[point] = len(self.seen)
        elif not self.fired and point == self.target:
            self.fired = True
            sys.settrace(None)
            raise self.exc()

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.fired or not _ours(frame.f_code.co_filename):
            return None
        if self.opcodes:
            frame.f_trace_opcodes = True
        self._hit((frame.f_code.co_filename, frame.f_code.co_firstlineno, "call"))
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.fired:
            return None
        code = frame.f_code
        if event == "line":
            # A line whose first instruction is a NOP (a bare ``try:``) is no
            # point where CPython delivers an exception (only calls, function
            # entries and backward jumps check for one); an exception raised
            # there by a trace function would even escape a ``with`` block
            # without its __exit__ (CPython 3.11 leaves such NOPs outside the
            # block's exception table).  The next line is the same point.
            if code.co_code[frame.f_lasti] != _NOP:
                self._hit((code.co_filename, frame.f_lineno, "line"))
        elif event == "opcode" and frame.f_lasti in _after_calls(code):
            self._hit((code.co_filename, frame.f_lasti, f"after-call:{code.co_name}"))
        return self._local


def record(scenario: Callable[[Injector], Any], points: str = "lines") -> list[Point]:
    """Every point ``scenario`` passes, in the order first passed."""
    inj = Injector(points)
    scenario(inj)
    return sorted(inj.seen, key=inj.seen.__getitem__)


def in_thread(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, result or exception).

    An exception is handed back without its traceback: a caller that caught
    an interruption and moved on keeps no frame of the pool's alive."""
    box: list[Any] = []

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: B036 - handed to the caller
            e.__traceback__ = None
            e.__context__ = e.__cause__ = None
            box.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive(), box[0] if box else None)


# ---------------------------------------------------------------------------
# The scenario: every path a caller's thread takes through the pool
# ---------------------------------------------------------------------------

def find(k: int) -> list:
    return [{"FindEntity": {"with_class": "K", "constraints": {"k": ["==", k]},
                            "results": {"list": ["k"]}}}]


def keys_of(response: Any) -> Any:
    try:
        return [e["k"] for e in response[0]["FindEntity"]["entities"]]
    except (KeyError, IndexError, TypeError):
        return response


def seed(server: Any, n: int = 200) -> None:
    conn = server.connector()
    try:
        conn.query([{"AddEntity": {"class": "K", "properties": {"k": k}}} for k in range(n)])
    finally:
        conn.close()


LEASE_TIMEOUT = 5.0   # every lease of the scenario and of the checks
POLL = 0.001


def _until(pred: Callable[[], Any], stop: threading.Event, timeout: float) -> bool:
    # For the helper threads: wait for a state of the pool nothing signals
    # (a caller queued), bounded, and cut short when the scenario ended.
    waited = 0.0
    while not pred():
        if stop.is_set() or waited > timeout:
            return False
        stop.wait(POLL)
        waited += POLL
    return True


class Scenario:
    """One run on a fresh pool: ``traced()`` runs in the traced thread, the
    helpers in their own (untraced) threads; ``check()`` afterwards."""

    def __init__(self, pool: Any, max_size: int) -> None:
        self.pool = pool
        self.max_size = max_size
        self.violations: list[str] = []
        self.stop = threading.Event()
        self.helpers: list[threading.Thread] = []
        self.steps = 0

    # -- answers -------------------------------------------------------------
    def expect(self, response: Any, k: int, where: str) -> None:
        got = keys_of(response)
        if got != [k]:
            self.violations.append(f"{where}: asked for key {k}, got {got!r}")

    def _helper(self, fn: Callable[[], None]) -> None:
        def body() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a helper's failure is not a finding
                if not self.stop.is_set() and not _expected_failure(e):
                    self.violations.append(f"helper failed: {e!r}")

        t = threading.Thread(target=body, daemon=True)
        self.helpers.append(t)
        t.start()

    # -- the traced thread ---------------------------------------------------
    def traced(self) -> None:
        from aperturedb_pool import ConnectFailed, ConnectorError, ConnectorUnusable, RetryPolicy

        pool = self.pool
        # 1. a lease; a query interrupted in it is caught and the caller asks again
        with pool.lease(timeout=LEASE_TIMEOUT) as conn:
            try:
                self.expect(conn.query(find(1))[0], 1, "lease")
            except (Interrupt, SoftTimeLimit):
                try:
                    self.expect(conn.query(find(2))[0], 2, "lease, after a caught interruption")
                except (ConnectorUnusable, ConnectorError):
                    pass  # refused or failed: never another query's answer
        self.steps = 1
        # 2. pool.query and pool.run (the retry policy's paths)
        self.expect(pool.query(find(3))[0], 3, "pool.query")

        def unit(c: Any) -> None:
            self.expect(c.query(find(4))[0], 4, "pool.run")

        pool.run(unit)
        # the policy's retry loop (RetryPolicy.resume, on tenacity): a unit
        # whose first attempt fails before anything was sent, then runs
        failed: list[int] = []

        def retried(c: Any) -> None:
            if not failed:
                failed.append(1)
                raise ConnectFailed("scripted: the first attempt failed; nothing was sent")
            self.expect(c.query(find(9))[0], 9, "pool.run, retried")

        pool.run(retried, retry=RetryPolicy(max_attempts=2, deadline=LEASE_TIMEOUT,
                                            initial_delay=0.0))
        self.steps = 2
        # 3. this thread waits: a helper holds every connector, then returns one
        held = threading.Event()
        done = threading.Event()

        def holder() -> None:
            leases = [pool.acquire(timeout=LEASE_TIMEOUT) for _ in range(self.max_size)]
            try:
                held.set()
                _until(lambda: pool._waiters, self.stop, LEASE_TIMEOUT)
                leases.pop().release()
                _until(done.is_set, self.stop, LEASE_TIMEOUT)
            finally:
                for lease in leases:
                    lease.release()

        self._helper(holder)
        try:
            held.wait(LEASE_TIMEOUT)
            with pool.lease(timeout=LEASE_TIMEOUT) as conn:
                self.expect(conn.query(find(5))[0], 5, "lease after a wait")
        finally:
            done.set()
        self.steps = 3
        # 4. a helper waits; this thread hands it a connector
        asked = threading.Event()

        def waiter() -> None:
            if not _until(asked.is_set, self.stop, LEASE_TIMEOUT):
                return
            with pool.lease(timeout=LEASE_TIMEOUT) as c:
                self.expect(c.query(find(6))[0], 6, "lease handed over")

        self._helper(waiter)
        # Two with statements, not a list of leases exited in a finally: a
        # list in this frame (kept alive by the exception's traceback through
        # the checks) would hold a lease an interruption kept from being
        # returned, as any caller's own reference does.
        assert self.max_size == 2
        with pool.lease(timeout=LEASE_TIMEOUT) as first, pool.lease(timeout=LEASE_TIMEOUT):
            asked.set()
            _until(lambda: pool._waiters, self.stop, LEASE_TIMEOUT)
            self.expect(first.query(find(7))[0], 7, "lease held while a caller waits")
        self.steps = 4
        # 5. a looping thread keeps its connector while a caller waits
        queued = threading.Event()

        def late_waiter() -> None:
            if not _until(queued.is_set, self.stop, LEASE_TIMEOUT):
                return
            with pool.lease(timeout=LEASE_TIMEOUT) as c:
                self.expect(c.query(find(8))[0], 8, "lease after a loop")

        self._helper(late_waiter)
        others = [pool.acquire(timeout=LEASE_TIMEOUT) for _ in range(self.max_size - 1)]
        try:
            queued.set()
            for i in range(4):
                with pool.lease(timeout=LEASE_TIMEOUT) as conn:
                    if i == 0:
                        _until(lambda: pool._waiters, self.stop, LEASE_TIMEOUT)
                    self.expect(conn.query(find(10 + i))[0], 10 + i, "looping lease")
        finally:
            for lease in others:
                lease.release()
        self.steps = 5
        pool.stats()

    # -- afterwards ----------------------------------------------------------
    def check(self, finished: bool, outcome: Any) -> list[str]:
        """The pool after the run: findings (empty: all is well)."""
        from aperturedb_pool import PoolStats

        found = list(self.violations)
        if not finished:
            found.append("the traced thread hung")
        elif isinstance(outcome, BaseException) and not isinstance(
                outcome, (Interrupt, SoftTimeLimit)) and not _expected_failure(outcome):
            found.append(f"the traced thread failed: {outcome!r}")
        # The caller handled the interruption and moved on: its frames (and
        # any lease they still referred to, as a caller's own variable does)
        # are gone.  A lease nothing refers to any more must come back.
        _forget_frames(outcome)
        outcome = None
        gc.collect()
        self.stop.set()
        for t in self.helpers:
            t.join(2 * LEASE_TIMEOUT)
            if t.is_alive():
                found.append("a helper thread hung")
        pool = self.pool
        ok, stats = in_thread(pool.stats, 5.0)
        if not ok or not isinstance(stats, PoolStats):
            found.append(f"stats() from another thread did not return: {stats!r}")
            return found
        ok, got = in_thread(self._hold_all, 3 * LEASE_TIMEOUT)
        if not ok:
            found.append("holding max_size leases at once hung")
        elif got:
            found.append(got)
        ok, stats = in_thread(pool.stats, 5.0)
        if ok and isinstance(stats, PoolStats) and (stats.waiting or stats.leased):
            found.append(f"after the checks: waiting {stats.waiting}, leased {stats.leased}")
        ok, _ = in_thread(pool.close, 5.0)
        if not ok:
            found.append("close() did not return")
        return found

    def _hold_all(self) -> str | None:
        # Every slot back in service within LEASE_TIMEOUT (a lost one is
        # recovered and replaced), and every connector answers its own key.
        pool = self.pool
        leases = []
        try:
            for i in range(self.max_size):
                try:
                    leases.append(pool.acquire(timeout=LEASE_TIMEOUT))
                except Exception as e:  # noqa: BLE001
                    return f"lease {i + 1} of max_size {self.max_size} failed: {e!r}"
            for i, lease in enumerate(leases):
                k = 100 + i
                got = keys_of(lease.conn.query(find(k))[0])
                if got != [k]:
                    return f"a connector answered key {k} with {got!r}"
            return None
        finally:
            for lease in leases:
                lease.release()


def _forget_frames(outcome: Any) -> None:
    """Drop the frames an exception (and those chained to it) keeps alive."""
    seen: set[int] = set()
    todo = [outcome]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__context__, e.__cause__, *getattr(e, "attempts", ())]


def _expected_failure(e: BaseException) -> bool:
    # What an interrupted scenario may legitimately see afterwards: a
    # connector refused or failed (never a wrong answer), a timeout of a
    # helper whose partner was interrupted.
    from aperturedb_pool import ConnectorError, LeaseError, PoolTimeout

    return isinstance(e, (ConnectorError, LeaseError, PoolTimeout, Interrupt, SoftTimeLimit))


# ---------------------------------------------------------------------------
# One run: a fresh pool, the scenario in a traced thread, the checks
# ---------------------------------------------------------------------------

MAX_SIZE = 2


def make_pool(server: Any) -> Any:
    from aperturedb_pool import ConnectionPool, RetryPolicy

    pool = ConnectionPool(server.connector(), min_size=MAX_SIZE, max_size=MAX_SIZE,
                          timeout=LEASE_TIMEOUT, fairness_threshold=0.05,
                          retry=RetryPolicy(max_attempts=2, deadline=LEASE_TIMEOUT,
                                            initial_delay=0.01))
    pool.wait_ready(LEASE_TIMEOUT)
    return pool


def run_once(server: Any, injector: Injector) -> list[str]:
    """The scenario on a fresh pool with ``injector``: the findings."""
    sc = Scenario(make_pool(server), MAX_SIZE)
    finished, outcome = in_thread(lambda: injector.run(sc.traced), 6 * LEASE_TIMEOUT)
    findings = sc.check(finished, outcome)
    if injector.target is None and sc.steps < 5:
        findings.append(f"the scenario stopped at step {sc.steps}: {outcome!r}")
    return findings
