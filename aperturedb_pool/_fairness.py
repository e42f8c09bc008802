"""The fairness policy: when barging stops, and whether the process is CPU-bound.

A plain object with no lock and no clock of its own (the pool calls it under
its lock and passes the time), so it can be tested without a pool.  What the
policy decides and why is argued in the "Fairness" section of
``aperturedb_pool._lease``; in short:

* ``handoff_after``: once the oldest waiter has waited this long, returned
  connectors go to waiters first come, first served (no more barging).  It is
  ``HANDOFF_SHARE`` of the fairness threshold in force, at least
  ``MIN_HANDOFF_AFTER`` (0 for a threshold of 0: strict first come, first
  served).
* The threshold in force is ``fairness_threshold``, or the longer
  ``cpu_bound_fairness_threshold`` while the process is CPU-bound: its CPU
  time, sampled at hand-offs at most every ``CPU_WINDOW`` seconds, grows at
  ``CPU_BOUND_ENTER`` x wall time or more (until it drops below
  ``CPU_BOUND_LEAVE``).  A window longer than ``window_max`` (contention
  stopped for a while) decides nothing and lifts the verdict.
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
