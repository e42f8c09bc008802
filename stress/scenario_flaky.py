"""flaky: a loopback TCP proxy resets or delays connections mid-request.

The pool (16 threads, pool of 8, per-query timeout 0.25 s) talks to the server
through ``_proxy.FlakyProxy``, which faults 3% of requests at a precise point:
reset before the request reaches the server, half-way through the request,
after the server ran it (answer dropped), half-way through the answer, or by
holding the answer 0.05-0.5 s (past the query timeout, so a late answer
arrives on a connection its caller gave up on); 1% of connections are also
reset during the hello.  Half the calls are echo reads (``FindEntity`` of a
unique key), half are uniquely-keyed writes whose query also finds the written
key back (``AddEntity`` + ``FindEntity`` in one transaction): every answer,
read or write, carries a value unique to its query.

Invariants (as the restarts scenario): no read fails; no answer is ever
delivered to the wrong query (every echo matches); every write acknowledged,
``OutcomeUnknown`` or failed with a clear ``PoolError``; no write stored
twice; every acknowledged write stored; nothing stored that was reported
failed; stored = acknowledged + (0..unknown); sharing detector at 0; no lease
leaks; every fault mode was exercised.
"""

from __future__ import annotations

import sys
import time

from _proxy import MODES, FlakyProxy
from _scenario import Scenario, run_threads, seed_echo, start_server, wait_until
from _writes import Ledger, check_ledger, worker_loop

THREADS = 16
POOL = 8
KEYS = 512


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("flaky", __doc__, duration=30.0, quick=10.0, argv=argv,
                  extra=lambda p: p.add_argument("--p-fault", type=float, default=0.03,
                                                 help="fraction of requests faulted (0.03)"))
    from aperturedb_pool import ConnectionPool

    srv = start_server()
    proxy = FlakyProxy(("127.0.0.1", srv.port), p_fault=0.0, p_hello=0.0,
                       delay=(0.05, 0.5), seed=sc.seed).start()
    try:
        template = srv.connector(port=proxy.port)
        pool = ConnectionPool(template, min_size=POOL, max_size=POOL, timeout=30.0,
                              query_timeout=0.25, name="flaky")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        proxy.p_fault = sc.args.p_fault
        proxy.p_hello = 0.01
        ledger = Ledger()
        deadline = time.monotonic() + sc.duration
        crashes = run_threads(
            THREADS, lambda i: worker_loop(pool, ledger, i, sc.seed * 100 + i, deadline, KEYS,
                                           echo_writes=True),
            "flaky", sc.duration + 90)
        proxy.set_faults(False)
        refilled = wait_until(lambda: pool.stats().size == POOL, 10)
        st = pool.stats()
        counters = srv.counters()
        faults = proxy.counters()
        stored = srv.dump()
        sc.figure(requests=faults["requests"],
                  faults={m: faults[m] for m in (*MODES, "reset_hello")},
                  retries=st.retries, discarded=dict(st.discarded), opened=st.connectors_opened,
                  sharing_violations=counters["sharing_violations"])
        check_ledger(sc, ledger, stored)
        sc.check("no thread crashed or hung", not crashes, crashes)
        sc.check("every fault mode was exercised", all(faults[m] > 0 for m in MODES),
                 {m: faults[m] for m in MODES})
        sc.check("sharing_violations == 0", counters["sharing_violations"] == 0,
                 counters["sharing_violations"])
        sc.check_no_leak(st)
        sc.check("the pool is full again", refilled, f"size {st.size}/{POOL}")
        sc.figure(errors=dict(ledger.errors_by_kind))
        pool.close()
    finally:
        proxy.stop()
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
