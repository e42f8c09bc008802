"""The SDK's ParallelLoader: its own connections against the pool's (issue 15).

    python stress/bench_helpers.py [--entities 100000] [--rounds 4] [--threads 16]
                                   [--pool-size 4] [--batch-size 100] [--blob-size 1024]
                                   [--no-pin] [--json]

Each round ingests ``--entities`` entities (an ``AddEntity`` and a connected
``AddBlob`` of ``--blob-size`` bytes each, ``--batch-size`` per transaction,
``--threads`` worker threads) twice, in alternating order, into an emptied
embedded server running in its own process:

=====  ======================================================================
sdk    ``ParallelLoader(connector).ingest(...)`` on a fresh clone of the
       template: the SDK's own way, a clone per worker thread (16 connections,
       plus the connector and the loader's ``Utils`` clone)
pool   ``ParallelLoader(pool.connector()).ingest(...)`` on a warm pool of
       ``--pool-size`` connectors (4): every query leases one
=====  ======================================================================

Time is measured from the loader's construction to the last answer (a
``response_handler`` on the generator notes when each batch was answered):
``ingest()`` itself returns only at the next whole second of its polling loop.
The report gives both medians, the median of the per-round ratios
``pool / sdk`` (entities per second), the connections each side opened
(the server's ``accepted``), and checks every run stored each entity once.
Runs of 20,000 entities (about 0.3 s) measure mostly the start of a run and
swing by a factor of two here; the default of 100,000 takes about 2 s a run.
Target (issue 15): pool within 10% of sdk (ratio >= 0.9), with a quarter of
the connections.  Pinning as in ``bench_e2e.py``.

This is a benchmark, not a test: the exit status does not depend on the target.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("ADB_LOG_FILE", "")

from _benchkit import machine_facts  # noqa: E402
from bench_e2e import _pin, _sdk_version  # noqa: E402


class _Adds(list):
    """(commands, blobs) per entity; notes when the last batch was answered."""

    answered = 0.0

    def response_handler(self, query: Any, blobs: Any, response: Any, rblobs: Any) -> None:
        self.answered = time.monotonic()


def _adds(n: int, blob: bytes) -> _Adds:
    return _Adds(([{"AddEntity": {"class": "Item", "properties": {"key": i}, "_ref": 1}},
                   {"AddBlob": {"properties": {"key": i}, "connect": {"ref": 1}}}], [blob])
                 for i in range(n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/bench_helpers.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--blob-size", type=int, default=1024)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from aperturedb.ParallelLoader import ParallelLoader

    from aperturedb_pool import ConnectionPool
    from aperturedb_pool.testing import ServerProcess

    # The loader's progress bar and INFO lines are not the measurement.
    logging.getLogger("aperturedb").setLevel(logging.WARNING)
    facts = machine_facts()
    blob = os.urandom(a.blob_size)
    runs: dict[str, list[dict[str, Any]]] = {"sdk": [], "pool": []}
    with ServerProcess("127.0.0.1", 0) as srv:
        pinned = not a.no_pin and _pin(srv)
        template = srv.connector()
        pool = ConnectionPool(template, min_size=a.pool_size, max_size=a.pool_size,
                              name="helpers")
        pool.wait_ready(30)
        checker = template.clone()

        def run(side: str) -> dict[str, Any]:
            srv.clear_store()
            srv.reset_counters()
            data = _adds(a.entities, blob)
            client = template.clone() if side == "sdk" else pool.connector()
            t0 = time.monotonic()
            loader = ParallelLoader(client)
            loader.ingest(data, batchsize=a.batch_size, numthreads=a.threads)
            elapsed = data.answered - t0
            client.close()
            c = srv.counters()
            stored, _ = checker.query([{"FindEntity": {"with_class": "Item",
                                                       "results": {"count": True}}}])
            return {"seconds": elapsed, "per_s": a.entities / elapsed,
                    "errors": loader.error_counter,
                    "stored": stored[0]["FindEntity"]["count"],
                    "connections": c["accepted"], "sharing_violations": c["sharing_violations"]}

        run("pool")  # warm-up, not recorded
        run("sdk")
        for r in range(a.rounds):
            order = ("sdk", "pool") if r % 2 == 0 else ("pool", "sdk")
            got = {side: run(side) for side in order}
            got["pool"]["ratio"] = got["pool"]["per_s"] / got["sdk"]["per_s"]
            for side in order:
                runs[side].append(got[side])
            print(f"round {r + 1}/{a.rounds}: sdk {got['sdk']['per_s']:.0f}/s, pool "
                  f"{got['pool']['per_s']:.0f}/s, ratio {got['pool']['ratio']:.3f}",
                  file=sys.stderr, flush=True)
        pool.close()
        checker.close()

    ratios = [x["ratio"] for x in runs["pool"]]
    report = {
        "machine": facts, "pinned": pinned, "sdk": _sdk_version(), "entities": a.entities,
        "threads": a.threads, "pool_size": a.pool_size, "batch_size": a.batch_size,
        "blob_size": a.blob_size, "rounds": a.rounds,
        "ratio_median": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
        "sides": {side: {
            "per_s_median": statistics.median(x["per_s"] for x in rs),
            "connections": sorted({x["connections"] for x in rs}),
            "errors": sum(x["errors"] for x in rs),
            "all_stored_once": all(x["stored"] == a.entities for x in rs),
            "sharing_violations": sum(x["sharing_violations"] for x in rs)}
            for side, rs in runs.items()},
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    m = facts
    print(f"ParallelLoader ingest of {a.entities} entities ({a.blob_size} B blobs, batches of "
          f"{a.batch_size}, {a.threads} threads), SDK {report['sdk']}, {a.rounds} rounds; "
          + ("server pinned to CPU 1, client to CPU 0" if pinned else "not pinned"))
    print(f"machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, "
          f"load {m['loadavg_1m']}, {m['date']}, git {m['git']}")
    for side, s in report["sides"].items():
        print(f"{side:<5} {s['per_s_median']:>9.0f} entities/s (median)  connections "
              f"{s['connections']}  errors {s['errors']}  each stored once: "
              f"{s['all_stored_once']}  sharing violations {s['sharing_violations']}")
    verdict = "met" if report["ratio_median"] >= 0.9 else "MISSED"
    print(f"pool / sdk: {report['ratio_median']:.3f} (median; rounds "
          f"{' '.join(f'{x:.2f}' for x in ratios)}); target >= 0.9: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
