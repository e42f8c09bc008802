"""Shared test setup.

The SDK writes ``error.<timestamp>.log`` into the working directory unless
ADB_LOG_FILE is empty; set it before any test module imports ``aperturedb``.
"""

import os

os.environ.setdefault("ADB_LOG_FILE", "")


# -- fixtures of the pool's unit tests (stand-in connectors, shifted clocks) ---
from typing import Any, Iterator  # noqa: E402

import _support  # noqa: E402
import pytest  # noqa: E402

from aperturedb_pool.testing._standin import StandIn  # noqa: E402


@pytest.fixture
def template() -> StandIn:
    return StandIn()


@pytest.fixture
def make_pool(template: StandIn) -> Iterator[Any]:
    from aperturedb_pool import ConnectionPool

    pools: list[ConnectionPool] = []

    def make(tmpl: Any = None, **kw: Any) -> ConnectionPool:
        kw.setdefault("timeout", 5.0)
        p = ConnectionPool(template if tmpl is None else tmpl, **kw)
        pools.append(p)
        if tmpl is None and kw.get("open", True):
            # Start from a ready pool (min_size opens run in the background);
            # tests about failing opens assert on their own.
            try:
                p.wait_ready(2.0)
            except Exception:  # noqa: S110
                pass
        return p

    yield make
    for p in pools:
        p.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _support.ShiftedClock:
    c = _support.ShiftedClock()
    _support.set_pool_clock(monkeypatch, c)
    return c


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> _support.FrozenClock:
    c = _support.FrozenClock()
    _support.set_pool_clock(monkeypatch, c)
    return c


@pytest.fixture
def cpu_clock(frozen_clock: _support.FrozenClock,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The process's CPU time as the pool samples it: it grows at
    ``cores`` x the frozen clock's time (set ``cores`` to change the load)."""
    import aperturedb_pool._lease as lease_mod

    busy = {"cores": 1.0, "cpu": 0.0, "at": frozen_clock()}

    def process_time() -> float:
        now = frozen_clock()
        busy["cpu"] += (now - busy["at"]) * busy["cores"]
        busy["at"] = now
        return busy["cpu"]

    monkeypatch.setattr(lease_mod, "_process_time", process_time)
    return busy
