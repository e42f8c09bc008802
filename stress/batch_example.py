"""The README's batch-loading example, timed against a server process.

    python stress/batch_example.py [--people 20000] [--threads 16] [--max-size 4]
                                   [--batch-size 100] [--again]

Loads ``--people`` Person entities with the README's ``load`` function (a
conditional add per person, ``if_not_found`` on ``id``) through
``run_batches`` and a ``ConnectionPool``, against ``aperturedb-pool serve`` in a
child process, and prints the wall time, the batches acknowledged and failed,
and the entities stored. ``--again`` loads the same people a second time
(every add finds its person: nothing new is stored). Exits 1 if a batch failed
or the store does not hold exactly ``--people`` entities.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ADB_LOG_FILE", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aperturedb_pool import ConnectionPool  # noqa: E402
from aperturedb_pool.batch import run_batches  # noqa: E402
from aperturedb_pool.retry import idempotent  # noqa: E402
from aperturedb_pool.testing.process import ServerProcess  # noqa: E402


@idempotent                       # safe to re-send: a conditional add
def load(conn, batch):  # type: ignore[no-untyped-def]  # the README's code, verbatim
    q = [{"AddEntity": {"class": "Person", "properties": p,
                        "if_not_found": {"id": ["==", p["id"]]}}} for p in batch]
    response, _ = conn.query(q)
    if not isinstance(response, list):
        raise RuntimeError(f"transaction failed: {response}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--max-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--again", action="store_true", help="then load the same people again")
    args = ap.parse_args()
    people = [{"id": i, "name": f"person {i}", "age": i % 90} for i in range(args.people)]
    ok = True
    with ServerProcess() as server:
        template = server.connector(retry_interval_seconds=0.05)
        rounds = ["first load"] + (["second load"] if args.again else [])
        for label in rounds:
            started = time.monotonic()
            with ConnectionPool(template, max_size=args.max_size) as pool:
                result = run_batches(pool, load, people, batch_size=args.batch_size,
                                     threads=args.threads)
            elapsed = time.monotonic() - started
            stored = sum(1 for o in server.dump() if o["class"] == "Person")
            print(f"{label}: {elapsed:.1f} s, {len(result.acknowledged)} batches acknowledged, "
                  f"{len(result.failed)} failed, {stored} Person entities stored")
            ok = ok and not result.failed and stored == args.people
        template.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
