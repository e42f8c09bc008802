"""The fairness policy: when barging stops, and whether the process is CPU-bound.

A plain object with no lock and no clock of its own (the pool calls it under
its lock and passes the time), so it can be tested without a pool.  The lease
paths (``aperturedb_pool._lease``) read ``handoff_after`` through the pool's
``_overdue_at`` (when the oldest waiter becomes overdue); the pool samples at
hand-offs.  Why:

Fairness
--------
A releasing thread that will immediately ask again (a batch loop: it returned
the previous connector and nobody used the pool since) may re-take the
connector it just returned ("barging"): no thread wake-up sits between two
leases, which keeps connectors busy, and under the GIL a wake-up is expensive
(the woken thread must win the GIL back: ~50-100 us on a busy 2-core machine).
Barging is bounded: once the oldest waiter has waited ``handoff_after``
seconds, every returned connector is handed directly to the oldest waiter
(first come, first served) until no waiter is that old.  ``handoff_after`` is
``HANDOFF_SHARE`` (60%) of ``fairness_threshold`` (at least 1 ms; 0 when the
threshold is 0: strict first come, first served); the rest of the threshold is
the margin for the hand-off itself (the next return, the woken thread's
wake-up).  Each hand-off costs a thread switch, which under the GIL costs the
whole process tens of microseconds, so the threshold trades the longest wait
against throughput: with N threads sharing M connectors a thread waits about
``handoff_after`` for a turn, then keeps its connector for about
``handoff_after`` x M / (N - M).
Threads that do not loop (request handlers) always hand off directly, so a
returned connector never sits idle while someone waits.

Barging runs on the lock-free paths too: a checkout may pop an idle connector
while callers wait if the oldest has waited less than ``handoff_after``
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

MIN_HANDOFF_AFTER = 0.001
HANDOFF_SHARE = 0.6  # of fairness_threshold: barging stops when the oldest waited this
CPU_WINDOW = 0.1
CPU_WINDOW_MAX = 1.0
CPU_BOUND_ENTER = 0.85  # cores: the GIL is (nearly) always held
CPU_BOUND_LEAVE = 0.65


def handoff_share(threshold: float) -> float:
    """The oldest waiter's wait after which barging stops, for ``threshold``."""
    return max(MIN_HANDOFF_AFTER, threshold * HANDOFF_SHARE) if threshold > 0 else 0.0


class FairnessPolicy:
    """One pool's fairness state.  Not thread-safe: its owner serializes calls
    (the pool: under its lock)."""

    __slots__ = ("normal", "stretched", "detects", "window_max", "cpu_bound", "handoff_after",
                 "mark", "next_sample", "bound_seconds")

    def __init__(self, fairness_threshold: float,
                 cpu_bound_fairness_threshold: float | None) -> None:
        # Barging stops once the oldest waiter has waited handoff_after; the
        # rest of the threshold is the margin for the hand-off itself (the
        # wait for the next return and the woken thread's wake-up).
        longer = fairness_threshold
        if cpu_bound_fairness_threshold is not None and fairness_threshold > 0:
            longer = max(fairness_threshold, cpu_bound_fairness_threshold)
        self.normal = handoff_share(fairness_threshold)
        self.stretched = handoff_share(longer)
        # False when the CPU-bound stretch is off (None, a shorter value, or
        # strict first come, first served): no sampling at all.
        self.detects = self.stretched != self.normal
        # While CPU-bound, hand-offs (where samples are taken) come at least
        # about every ``stretched``: a gap of twice the longer threshold (or
        # a second) means contention stopped.
        self.window_max = max(CPU_WINDOW_MAX, 2.0 * longer)
        self.reset()

    def reset(self) -> None:
        """Forget every sample and verdict (a new pool, a forked child)."""
        self.cpu_bound = False
        self.handoff_after = self.normal
        self.mark: tuple[float, float] | None = None  # the last (wall, process CPU) sample
        self.next_sample = 0.0
        self.bound_seconds = 0.0  # wall time spent at the longer threshold, between samples

    def sample(self, now: float, cpu: float) -> bool:
        """A sample of the process's CPU time ``cpu`` at wall time ``now``
        (callers sample when ``now >= next_sample`` and ``detects``).  True
        when the verdict changed."""
        mark, self.mark = self.mark, (now, cpu)
        self.next_sample = now + CPU_WINDOW
        if mark is None:
            return False
        span = now - mark[0]
        if span > self.window_max:
            bound = False  # a quiet spell in the window: start over, fair
        else:
            if self.cpu_bound:  # the longer threshold applied in this window
                self.bound_seconds += span
            busy = (cpu - mark[1]) / span
            bound = busy >= (CPU_BOUND_LEAVE if self.cpu_bound else CPU_BOUND_ENTER)
        if bound == self.cpu_bound:
            return False
        self.set_cpu_bound(bound)
        return True

    def set_cpu_bound(self, bound: bool) -> None:
        """Apply a verdict (the pool then re-times its overdue point)."""
        self.cpu_bound = bound
        self.handoff_after = self.stretched if bound else self.normal

    def forget_stale(self, now: float) -> bool:
        """Contention starts again (or stats are read): a CPU-bound verdict
        whose last sample is older than ``window_max`` says nothing about now
        and is lifted.  True when it was."""
        mark = self.mark
        if self.cpu_bound and (mark is None or now - mark[0] > self.window_max):
            self.set_cpu_bound(False)
            return True
        return False
