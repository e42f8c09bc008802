"""An exception at every line the lease paths run: the suite hunts for the next
interruption defect instead of waiting for a user to find it.

A first run of ``_injection.Scenario`` records every line (and function entry)
of the package that a caller's thread passes: leasing and returning (fast and
locked paths), a query interrupted inside a lease and the caller asking again,
``pool.query``, ``pool.run``, waiting for a connector, handing one to a waiter,
a looping thread keeping its connector while a caller waits.  Then, for each of
those points, a fresh pool runs the scenario again with an exception raised
there, as a signal handler would (alternately ``KeyboardInterrupt``-like and an
ordinary ``Exception``).  After each run, from other threads:

* ``stats()`` returns; nothing is left waiting or leased;
* ``max_size`` leases are held at once within 5 s (a slot lost to the
  interruption is back in service: returned, or closed and replaced);
* every connector answers a keyed ``FindEntity`` with its own key, and every
  answer the scenario read was its own;
* ``close()`` returns.

The suite runs a third of the points (every third one, from an offset that
changes every day, so three days of CI cover them all; one run would cost the
suite a minute or two on this machine): ``ADB_INJECTION_SHARE=1`` runs every
point, ``ADB_INJECTION_OFFSET`` fixes the offset to re-run a day's sample.  The
exhaustive hunt, every line and after every *call* (where CPython really
delivers such exceptions), with both kinds at every point, is
``stress/scenario_injection.py``.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

import datetime  # noqa: E402
import logging  # noqa: E402
from typing import Iterator  # noqa: E402

import _injection as inj  # noqa: E402
import pytest  # noqa: E402
from _support import wait_until  # noqa: E402

import aperturedb_pool._maintenance as maintenance_mod  # noqa: E402
from aperturedb_pool._lease import Lease  # noqa: E402
from aperturedb_pool.testing.server import EmbeddedServer  # noqa: E402


def _sample(points: list[inj.Point]) -> tuple[list[tuple[int, inj.Point]], str]:
    """Every ``share``-th point from ``offset`` (see the module doc), with their
    index among all points, and how they were chosen."""
    share = int(os.environ.get("ADB_INJECTION_SHARE", "3"))
    offset = int(os.environ.get("ADB_INJECTION_OFFSET",
                                datetime.date.today().toordinal() % max(share, 1)))
    chosen = [(i, p) for i, p in enumerate(points) if share <= 1 or i % share == offset]
    return chosen, (f"{len(chosen)} of {len(points)} points (ADB_INJECTION_SHARE={share}, "
                    f"ADB_INJECTION_OFFSET={offset})")


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer().start()
    inj.seed(srv)
    try:
        yield srv
    finally:
        srv.stop()


def test_an_exception_at_every_line_of_the_lease_paths_breaks_nothing(
        server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A slot lost to an interruption is declared lost after this long (1 s in
    # production); every run recovers well within the checks' 5 s.
    monkeypatch.setattr(maintenance_mod, "_LOST_GRACE", 0.05)
    caplog.set_level(logging.CRITICAL, logger="aperturedb_pool")
    recorder = inj.Injector("lines")
    assert inj.run_once(server, recorder) == []
    points = sorted(recorder.seen, key=recorder.seen.__getitem__)
    files = {os.path.basename(p[0]) for p in points}
    # The scenario reaches the paths it exists for.
    assert {"pool.py", "_lease.py", "connectors.py", "retry.py"} <= files, files
    assert len(points) > 200, len(points)

    chosen, how = _sample(points)
    print(how)
    findings: list[str] = []
    fired = 0
    for i, point in chosen:
        kind = inj.Interrupt if i % 2 == 0 else inj.SoftTimeLimit
        injector = inj.Injector("lines", point, lambda kind=kind: kind("injected"))
        for finding in inj.run_once(server, injector):
            findings.append(f"{os.path.basename(point[0])}:{point[1]} ({point[2]}, "
                            f"{kind.__name__}): {finding}")
        fired += injector.fired
    assert findings == [], how
    # Runs differ a little (thread timing): nearly every point is reached again.
    assert fired >= 0.95 * len(chosen), (fired, how)
    assert server.counters()["sharing_violations"] == 0


def test_a_lease_interrupted_while_it_returns_gives_its_connector_back(
        server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A caller that keeps the exception keeps the interrupted frames, and the
    # lease with them (a REPL keeps the last traceback, a logger its
    # exc_info): the maintenance thread cannot tell that lease from one in
    # use.  Interrupted at any line of its return, before the connector went
    # back, the lease gives it back itself; past that point the slot is found
    # lost and replaced.  Either way every slot comes back.
    monkeypatch.setattr(maintenance_mod, "_LOST_GRACE", 0.05)
    code = Lease.__exit__.__code__
    lines = {line for _, _, line in code.co_lines() if line is not None}
    pool = inj.make_pool(server)
    try:
        def one() -> None:
            with pool.lease(timeout=inj.LEASE_TIMEOUT) as conn:
                assert inj.keys_of(conn.query(inj.find(1))[0]) == [1]

        recorder = inj.Injector("lines")
        recorder.run(one)
        points = [p for p in recorder.seen
                  if p[0] == code.co_filename and p[1] in lines and p[2] == "line"]
        assert len(points) >= 5, points
        kept = []
        for point in points:
            injector = inj.Injector("lines", point)
            with pytest.raises(inj.Interrupt) as info:
                injector.run(one)
            assert injector.fired
            kept.append(info.value)  # its traceback, and the lease, stay alive
            # At once, or once the slot is declared lost (stats() recovers it).
            wait_until(lambda: pool.stats().leased == 0, f"line {point[1]}'s slot back",
                       timeout=3.0)
        with pool.lease(timeout=1.0) as a, pool.lease(timeout=1.0) as b:
            assert inj.keys_of(a.query(inj.find(2))[0]) == [2]
            assert inj.keys_of(b.query(inj.find(3))[0]) == [3]
        assert len(kept) == len(points)
    finally:
        pool.close()
