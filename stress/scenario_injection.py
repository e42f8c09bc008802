"""injection: an exception at every point of the lease paths where CPython can deliver one.

The suite's ``tests/test_injection.py`` raises at a third of the lines the
lease paths run (a different third each day), one exception kind per point.
This run is the exhaustive form: it raises
after every call instruction (where CPython delivers a signal handler's or an
asynchronous exception: the call returned, its result not yet stored), at
every function entry and at every line, and at each point both kinds
(``KeyboardInterrupt``-like and an ordinary ``Exception``), on a fresh pool each
time (the scenario and its checks are ``tests/_injection.py``'s).

Invariants at every point: the traced thread and the helpers finish; ``stats()``
returns from another thread; ``max_size`` leases are held at once within 5 s;
every connector answers its own key and every answer read was its own;
``close()`` returns.  ``--quick``: every line, one kind per point (what the suite
runs a third of).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from _scenario import Scenario

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import _injection as inj  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("injection", __doc__, duration=0.0, quick=0.0, limit=1800.0, argv=argv)
    import aperturedb_pool._maintenance as maintenance_mod
    from aperturedb_pool.testing.server import EmbeddedServer

    maintenance_mod._LOST_GRACE = 0.05  # noqa: SLF001 - lost slots declared lost sooner: faster runs
    logging.getLogger("aperturedb_pool").setLevel(logging.CRITICAL)
    quick = sc.args.quick
    mode = "lines" if quick else "calls"
    srv = EmbeddedServer().start()
    try:
        inj.seed(srv)

        def run(injector: inj.Injector) -> list[str]:
            return inj.run_once(srv, injector)

        recorder = inj.Injector(mode)
        sc.check("the scenario runs clean without injection", run(recorder) == [])
        points = sorted(recorder.seen, key=recorder.seen.__getitem__)
        kinds = [inj.Interrupt, inj.SoftTimeLimit]
        findings: list[str] = []
        runs = fired = 0
        slowest = 0.0
        for i, point in enumerate(points):
            for kind in (kinds[i % 2:i % 2 + 1] if quick else kinds):
                injector = inj.Injector(mode, point, lambda kind=kind: kind("injected"))
                t0 = time.monotonic()
                found = run(injector)
                slowest = max(slowest, time.monotonic() - t0)
                runs += 1
                fired += injector.fired
                findings += [f"{os.path.basename(point[0])}:{point[1]} ({point[2]}, "
                             f"{kind.__name__}): {f}" for f in found]
        by_kind: dict[str, int] = {}
        for p in points:
            by_kind[p[2].split(":")[0]] = by_kind.get(p[2].split(":")[0], 0) + 1
        sc.figure(mode=mode, points=len(points), **by_kind, runs=runs, fired=fired,
                  slowest_run_s=round(slowest, 2), findings=len(findings))
        sc.check("no hang, lost slot, wrong answer or failed check at any point",
                 not findings, findings[:20])
        sc.check("nearly every point is reached again (runs differ a little)",
                 fired >= 0.95 * runs, f"{fired} of {runs}")
        sc.check("sharing_violations == 0", srv.counters()["sharing_violations"] == 0)
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
