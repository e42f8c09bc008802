"""restarts: the server restarts every 5 s under 32 threads of reads and unique writes.

32 threads share a pool of 8 for the duration; half their calls are echo reads
(``pool.query(FindEntity of a unique key)``: retried by the policy after a
transport failure) and half are uniquely-keyed writes (``pool.query(AddEntity
{key})``: never re-sent once sent).  Every 5 s (2 s with --quick) the server
restarts: every connection is dropped and every session forgotten (requests
waiting on the server's 0-2 ms latency are lost unexecuted).  Between restarts,
about every 0.7 s, the server executes the next ``AddEntity`` and closes the
connection without answering (the write ran; its caller cannot know).

Invariants: no read fails and every answer matches its query; every write is
acknowledged, ``OutcomeUnknown`` or failed with a clear ``PoolError``; no
write is stored twice; every acknowledged write is stored; nothing stored was
reported as failed; stored = acknowledged + (0..unknown); the server's sharing
detector stays at 0; no lease leaks; the pool is full again at the end.
"""

from __future__ import annotations

import sys
import threading
import time

from _scenario import Scenario, run_threads, seed_echo, server_settled, start_server, wait_until
from _writes import Ledger, check_ledger, worker_loop

THREADS = 32
POOL = 8
KEYS = 512


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("restarts", __doc__, duration=30.0, quick=10.0, argv=argv,
                  extra=lambda p: p.add_argument("--every", type=float, default=None,
                                                 help="seconds between restarts (default 5, "
                                                      "--quick 2)"))
    every = sc.args.every or (2.0 if sc.args.quick else 5.0)
    from aperturedb_pool import ConnectionPool

    srv = start_server(latency=(0.0, 0.002))
    try:
        pool = ConnectionPool(srv.connector(), min_size=POOL, max_size=POOL, timeout=30.0,
                              name="restarts")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        ledger = Ledger()
        stop = threading.Event()
        faults = {"restarts": 0, "close_after_write": 0, "control_errors": []}
        deadline = time.monotonic() + sc.duration

        def chaos() -> None:
            next_restart = time.monotonic() + every
            while not stop.wait(0.7):
                try:
                    if time.monotonic() >= next_restart:
                        srv.restart()
                        faults["restarts"] += 1
                        next_restart += every
                    else:
                        srv.close_after_next_request(True, "AddEntity")
                        faults["close_after_write"] += 1
                except Exception as e:  # reported: the scenario did not run as designed
                    faults["control_errors"].append(repr(e))

        chaos_t = threading.Thread(target=chaos, name="chaos", daemon=True)
        chaos_t.start()
        crashes = run_threads(
            THREADS, lambda i: worker_loop(pool, ledger, i, sc.seed * 100 + i, deadline, KEYS,
                                           echo_writes=False),
            "restarts", sc.duration + 90)
        stop.set()
        chaos_t.join(10)
        refilled = wait_until(lambda: pool.stats().size == POOL, 10)
        settled, server_open, size = server_settled(srv, pool)
        st = pool.stats()
        counters = srv.counters()
        stored = srv.dump()
        sc.figure(restarts=faults["restarts"], closed_after_write=counters["fault_closed"],
                  retries=st.retries, retired=st.discarded.get("retired", 0),
                  opened=st.connectors_opened, generation=st.generation,
                  sharing_violations=counters["sharing_violations"])
        check_ledger(sc, ledger, stored)
        sc.check("no thread crashed or hung", not crashes, crashes)
        sc.check("faults were injected as designed",
                 faults["restarts"] >= max(1, int(sc.duration / every) - 1)
                 and counters["fault_closed"] > 0 and not faults["control_errors"],
                 faults)
        sc.check("sharing_violations == 0", counters["sharing_violations"] == 0,
                 counters["sharing_violations"])
        sc.check_no_leak(st)
        sc.check("the pool is full again and the server holds its connections",
                 refilled and settled, f"size {st.size}/{POOL}, server {server_open}, "
                                       f"pool {size}")
        sc.figure(errors=dict(ledger.errors_by_kind))
        pool.close()
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
