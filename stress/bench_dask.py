"""Dask ingest: the SDK's own Dask path against a pool per worker (issue 18).

    python stress/bench_dask.py [--entities 10000] [--batch-size 100] [--workers 2]
                                [--threads-per-worker 1] [--max-connections N]
                                [--skip-sdk] [--json]

The same CSV of ``--entities`` people (``EntityClass,id,name``) is loaded into an
emptied embedded server running in its own process, three ways:

==========  =================================================================
sdk         ``ParallelLoader(connector).ingest(EntityDataCSV(csv, use_dask=True),
            batchsize, numthreads=--workers)``: the SDK's ``DaskManager`` starts a
            ``LocalCluster(n_workers=--workers)`` for the run (one thread per
            worker on a 2-core machine); each partition builds a connector from
            the configuration and logs in, each batch runs a ``ParallelQuery``
            whose worker thread opens a clone of its own
ours-cold   a ``LocalCluster`` of the same shape started for the run, a
            ``PoolPlugin`` registered, ``run_batches_on_dask`` of the same
            commands (the SDK's ``EntityDataCSV`` builds them), the cluster
            closed: the same work the SDK's path does, start to end
ours-warm   the same run again on the cluster still up (data cleared first):
            the pools are open, only the batches are timed
==========  =================================================================

Reported for each: wall time (ratios against ``sdk``), connections opened (the
server's ``accepted``), logins (``authenticate``), the most connections open at
once (``peak_open``), and a check that every entity was stored exactly once.
This is a benchmark, not a test: the exit status does not depend on the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("ADB_LOG_FILE", "")


def _load(conn: Any, batch: list[tuple[list[Any], list[bytes]]]) -> None:
    """One transaction of the batch's commands (what ParallelQuery sends)."""
    q: list[Any] = []
    blobs: list[bytes] = []
    for commands, b in batch:
        q.extend(commands)
        blobs.extend(b)
    response, _ = conn.query(q, blobs)
    if not isinstance(response, list):
        raise RuntimeError(f"failed transaction: {response}")


def _check(server: Any, n: int) -> str:
    ids = [o["properties"]["id"] for o in server.dump() if o["class"] == "Person"]
    if sorted(ids) == list(range(n)):
        return "ok"
    return f"MISMATCH: {len(ids)} stored, {len(set(ids))} distinct, {n} expected"


def _counters(server: Any) -> dict[str, int]:
    c = server.counters()
    return {k: c[k] for k in ("accepted", "authenticate", "peak_open")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--max-connections", type=int, default=None,
                    help="the plugin's budget (default: workers x threads)")
    ap.add_argument("--skip-sdk", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from aperturedb.Connector import Connector
    from aperturedb.EntityDataCSV import EntityDataCSV
    from aperturedb.ParallelLoader import ParallelLoader
    from distributed import Client, LocalCluster

    from aperturedb_pool.dask import PoolPlugin, run_batches_on_dask
    from aperturedb_pool.testing import ServerProcess

    n = args.entities
    budget = args.max_connections or args.workers * args.threads_per_worker
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, ServerProcess() as server:
        csv = os.path.join(tmp, "people.csv")
        with open(csv, "w") as f:
            f.write("EntityClass,id,name\n")
            f.writelines(f"Person,{i},person {i}\n" for i in range(n))
        plain = EntityDataCSV(csv)
        items = [plain[i] for i in range(len(plain))]

        if not args.skip_sdk:
            server.clear_store()
            server.reset_counters()
            conn = Connector(host="127.0.0.1", port=server.port, user="admin",
                             password="admin", use_ssl=False)
            t0 = time.monotonic()
            loader = ParallelLoader(conn)
            loader.ingest(EntityDataCSV(csv, use_dask=True), batchsize=args.batch_size,
                          numthreads=args.workers)
            wall = time.monotonic() - t0
            conn.close()
            runs["sdk"] = dict(wall=wall, errors=loader.error_counter, **_counters(server),
                               check=_check(server, n))
            print(f"sdk        {runs['sdk']}", file=sys.stderr)

        server.clear_store()
        server.reset_counters()
        t0 = time.monotonic()
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
        try:
            client.register_plugin(PoolPlugin(host="127.0.0.1", port=server.port, user="admin",
                                              password="admin", use_ssl=False,
                                              max_connections=budget))
            result = run_batches_on_dask(client, _load, items, batch_size=args.batch_size)
            cold_run = result.elapsed
            client.close()
            cluster.close()
            wall = time.monotonic() - t0
            runs["ours-cold"] = dict(wall=wall, run=cold_run, errors=len(result.failed),
                                     **_counters(server), check=_check(server, n))
            print(f"ours-cold  {runs['ours-cold']}", file=sys.stderr)

            cluster = LocalCluster(n_workers=args.workers,
                                   threads_per_worker=args.threads_per_worker,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
            client.register_plugin(PoolPlugin(host="127.0.0.1", port=server.port, user="admin",
                                              password="admin", use_ssl=False,
                                              max_connections=budget, min_size=budget))
            # Warm: every pool open and logged in before the clock starts.
            client.gather(client.map(_warm, range(budget * 4), pure=False))
            server.clear_store()
            server.reset_counters()
            t0 = time.monotonic()
            result = run_batches_on_dask(client, _load, items, batch_size=args.batch_size)
            wall = time.monotonic() - t0
            runs["ours-warm"] = dict(wall=wall, errors=len(result.failed), **_counters(server),
                                     check=_check(server, n))
            print(f"ours-warm  {runs['ours-warm']}", file=sys.stderr)
        finally:
            client.close()
            cluster.close()

    report: dict[str, Any] = dict(entities=n, batch_size=args.batch_size,
                                  workers=args.workers,
                                  threads_per_worker=args.threads_per_worker,
                                  max_connections=budget, runs=runs)
    if "sdk" in runs:
        report["wall_ratio_vs_sdk"] = {k: round(v["wall"] / runs["sdk"]["wall"], 4)
                                       for k, v in runs.items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{n} entities, batches of {args.batch_size}, {args.workers} workers x "
              f"{args.threads_per_worker} threads, budget {budget}")
        print(f"{'run':10} {'wall s':>8} {'x sdk':>7} {'opened':>7} {'logins':>7} "
              f"{'peak':>5}  check")
        for name, r in runs.items():
            ratio = report.get("wall_ratio_vs_sdk", {}).get(name)
            print(f"{name:10} {r['wall']:8.2f} {'' if ratio is None else f'{ratio:.3f}':>7} "
                  f"{r['accepted']:7d} {r['authenticate']:7d} {r['peak_open']:5d}  "
                  f"{r['check']}, {r['errors']} errors")
    return 0


def _warm(_: int) -> int:
    from aperturedb_pool.dask import get_pool

    response, _ = get_pool().query([{"GetStatus": {}}])
    return int(response[0]["GetStatus"]["status"])


if __name__ == "__main__":
    sys.exit(main())
