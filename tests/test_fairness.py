"""The fairness policy on its own: no pool, no threads, the time passed in."""

from __future__ import annotations

import pytest

from aperturedb_pool._fairness import CPU_WINDOW, FairnessPolicy, handoff_share


@pytest.mark.parametrize("threshold, share", [(0.0, 0.0), (0.001, 0.001), (0.01, 0.006),
                                              (0.1, 0.06), (2.0, 1.2)])
def test_barging_stops_at_a_share_of_the_threshold_with_a_floor(threshold: float,
                                                                share: float) -> None:
    assert handoff_share(threshold) == pytest.approx(share)


@pytest.mark.parametrize("normal, cpu_bound, detects", [(0.01, 0.1, True), (0.01, None, False),
                                                        (0.0, 0.1, False), (0.5, 0.1, False)])
def test_the_stretch_is_off_unless_it_lengthens_a_nonzero_threshold(
        normal: float, cpu_bound: float | None, detects: bool) -> None:
    f = FairnessPolicy(normal, cpu_bound)
    assert f.detects is detects
    assert f.handoff_after == handoff_share(normal)


def _feed(f: FairnessPolicy, t: float, cpu: float, cores: float, span: float = 0.1
          ) -> tuple[float, float, bool]:
    t += span
    cpu += cores * span
    changed = f.sample(t, cpu)
    return t, cpu, changed


def test_verdicts_enter_high_leave_low_and_lapse_after_a_quiet_spell() -> None:
    f = FairnessPolicy(0.02, 0.5)
    t, cpu = 100.0, 0.0
    assert not f.sample(t, cpu)  # the first sample only marks
    assert f.next_sample == pytest.approx(t + CPU_WINDOW)
    t, cpu, changed = _feed(f, t, cpu, 0.8)
    assert (changed, f.cpu_bound, f.handoff_after) == (False, False, pytest.approx(0.012))
    t, cpu, changed = _feed(f, t, cpu, 0.95)
    assert (changed, f.cpu_bound, f.handoff_after) == (True, True, pytest.approx(0.3))
    t, cpu, changed = _feed(f, t, cpu, 0.7)  # hysteresis: stays above 0.65
    assert (changed, f.cpu_bound) == (False, True)
    t, cpu, changed = _feed(f, t, cpu, 0.6)
    assert (changed, f.cpu_bound) == (True, False)
    assert f.bound_seconds == pytest.approx(0.2)  # two windows at the longer threshold
    t, cpu, changed = _feed(f, t, cpu, 1.0)
    assert f.cpu_bound
    # A window longer than window_max decides nothing: fair again.
    t, cpu, changed = _feed(f, t, cpu, 1.0, span=f.window_max + 0.5)
    assert (changed, f.cpu_bound) == (True, False)
    t, cpu, changed = _feed(f, t, cpu, 1.0)
    assert f.cpu_bound
    assert not f.forget_stale(t + f.window_max)  # not older than the window yet
    assert f.forget_stale(t + f.window_max + 0.01)
    assert (f.cpu_bound, f.handoff_after) == (False, pytest.approx(0.012))
    assert not f.forget_stale(t + 100)  # nothing to forget twice


def test_a_long_threshold_widens_the_window() -> None:
    f = FairnessPolicy(0.01, 2.0)
    assert f.window_max == 4.0
    f.sample(0.0, 0.0)
    f.sample(0.2, 0.2)
    assert f.cpu_bound
    f.sample(1.7, 1.7)  # 1.5 s between hand-offs under a 2 s threshold: still contended
    assert f.cpu_bound
    f.sample(6.2, 6.2)  # 4.5 s: contention stopped in between
    assert not f.cpu_bound


def test_reset_forgets_everything() -> None:
    f = FairnessPolicy(0.01, 0.1)
    f.sample(0.0, 0.0)
    f.sample(0.2, 0.2)
    f.sample(0.4, 0.4)
    assert f.cpu_bound and f.bound_seconds > 0
    f.reset()
    assert (f.cpu_bound, f.mark, f.next_sample, f.bound_seconds) == (False, None, 0.0, 0.0)
    assert f.handoff_after == f.normal
