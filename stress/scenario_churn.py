"""churn: 64 threads share a pool of 8 with random holds and random exceptions.

Each thread loops for the duration: it leases a connector (``with pool.lease()``,
or ``acquire()``/``release()`` one time in five), runs 0-3 echo reads on it
(``FindEntity`` of a unique key: the answer must carry that key back), holds it
for a random time (0 to 20 ms), and one lease in seven raises an exception of
its own, before, between or after the queries.  One operation in forty is a
``pool.query`` with a 0.3 ms timeout and no retry against a server that adds
0-1 ms of latency: the query is interrupted mid-flight and its connector must be
discarded (its late answer would otherwise reach the next caller).  The pool's
debug ownership check is on.

Invariants: the server's sharing detector stays at 0; every answer matches its
query; no lease leaks (leased 0 and waiting 0 at the end); stats add up (leases
granted = leases taken by the threads; connectors discarded = the interrupted
queries, for that reason only: an exception between queries costs no
reconnect; size = opened - discarded <= 8; the server holds exactly the pool's
connections); no lease timed out; every thread was served.
"""

from __future__ import annotations

import random
import sys
import threading
import time

from _benchkit import jain_index as jain
from _scenario import (
    Scenario,
    echo_ok,
    echo_query,
    run_threads,
    seed_echo,
    server_settled,
    start_server,
)

THREADS = 64
POOL = 8
KEYS = 512


class Boom(Exception):
    """The application's own error, raised inside a lease."""


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("churn", __doc__, duration=20.0, quick=6.0, argv=argv)
    from aperturedb_pool import ConnectionPool, QueryTimeout, RetryPolicy

    srv = start_server(latency=(0.0, 0.001))
    try:
        template = srv.connector()
        pool = ConnectionPool(template, min_size=2, max_size=POOL, timeout=30.0,
                              check_ownership=True, name="churn")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        base = pool.stats()
        base_find = srv.counters()["requests_by_command"].get("FindEntity", 0)
        deadline = time.monotonic() + sc.duration
        per_thread = [dict(leases=0, queries=0, booms=0, timeouts=0, interrupted=0,
                           mismatches=0, other=0) for _ in range(THREADS)]
        other_errors: list[str] = []
        lock = threading.Lock()
        no_retry = RetryPolicy.no_retry()

        def body(conn: object, rng: random.Random, st: dict) -> None:
            st["leases"] += 1
            n = rng.randint(0, 3)
            boom_at = rng.randint(0, n) if rng.random() < 1 / 7 else -1
            for i in range(n + 1):
                if i == boom_at:
                    raise Boom(f"application error after {i} queries")
                if i == n:
                    break
                k = rng.randrange(KEYS)
                response, _ = conn.query(echo_query(k))  # type: ignore[attr-defined]
                st["queries"] += 1
                if not echo_ok(response, k):
                    st["mismatches"] += 1
            r = rng.random()
            hold = 0.0 if r < 0.4 else rng.uniform(0, 0.002) if r < 0.9 else rng.uniform(0, 0.02)
            if hold:
                time.sleep(hold)

        def worker(i: int) -> None:
            rng = random.Random(sc.seed * 1000 + i)
            st = per_thread[i]
            while time.monotonic() < deadline:
                r = rng.random()
                try:
                    if r < 1 / 40:
                        k = rng.randrange(KEYS)
                        st["leases"] += 1
                        try:
                            response, _ = pool.query(echo_query(k), timeout=0.0003,
                                                     retry=no_retry)
                        except QueryTimeout:
                            st["interrupted"] += 1
                            continue
                        st["queries"] += 1
                        if not echo_ok(response, k):
                            st["mismatches"] += 1
                    elif r < 0.2:
                        lease = pool.acquire()
                        try:
                            body(lease.conn, rng, st)
                        except BaseException as e:
                            lease.release(e)
                            raise
                        lease.release()
                    else:
                        with pool.lease() as conn:
                            body(conn, rng, st)
                except Boom:
                    st["booms"] += 1
                except TimeoutError:
                    st["timeouts"] += 1
                except Exception as e:
                    st["other"] += 1
                    with lock:
                        if len(other_errors) < 5:
                            other_errors.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])

        crashes = run_threads(THREADS, worker, "churn", sc.duration + 60)
        settled, server_open, size = server_settled(srv, pool)
        st = pool.stats()
        counters = srv.counters()
        tot = {k: sum(t[k] for t in per_thread) for k in per_thread[0]}
        leases = [t["leases"] for t in per_thread]
        discarded = dict(st.discarded)
        finds = counters["requests_by_command"].get("FindEntity", 0) - base_find

        sc.figure(leases=tot["leases"], queries=tot["queries"], app_exceptions=tot["booms"],
                  interrupted=tot["interrupted"], opened=st.connectors_opened,
                  discarded=discarded, jain=round(jain(leases), 4), min_leases=min(leases),
                  wait_max_ms=round(st.wait_time_max * 1000, 1),
                  sharing_violations=counters["sharing_violations"])
        sc.check("no thread crashed or hung", not crashes, crashes)
        sc.check("no unexpected error", tot["other"] == 0, other_errors)
        sc.check("sharing_violations == 0", counters["sharing_violations"] == 0,
                 counters["sharing_violations"])
        sc.check("every answer matches its query", tot["mismatches"] == 0, tot["mismatches"])
        sc.check_no_leak(st, "no lease leaked: leased == 0, waiting == 0")
        sc.check("no lease timed out", tot["timeouts"] == 0 and st.timeouts == 0,
                 f"callers saw {tot['timeouts']}, stats {st.timeouts}")
        sc.check("leases granted == leases taken",
                 st.leases_granted - base.leases_granted == tot["leases"],
                 f"stats {st.leases_granted - base.leases_granted}, threads {tot['leases']}")
        sc.check("discarded only for interrupted queries, once each",
                 set(discarded) <= {"interrupted"} and
                 discarded.get("interrupted", 0) == tot["interrupted"],
                 f"discarded {discarded}, interrupted queries {tot['interrupted']}")
        sc.check("exceptions between queries cost no reconnect",
                 st.connectors_opened <= POOL + tot["interrupted"],
                 f"opened {st.connectors_opened}, interrupted {tot['interrupted']}")
        sc.check("size == opened - discarded, within max_size",
                 st.size == st.connectors_opened - sum(discarded.values()) and st.size <= POOL
                 and st.size == st.idle,
                 f"size {st.size}, idle {st.idle}, opened {st.connectors_opened}, "
                 f"discarded {sum(discarded.values())}")
        sc.check("server connections == pool size (no connection leak)", settled,
                 f"server {server_open}, pool {size}")
        sc.check("server saw each read once (interrupted ones at most once)",
                 tot["queries"] <= finds <= tot["queries"] + tot["interrupted"],
                 f"server {finds}, answered {tot['queries']}, interrupted {tot['interrupted']}")
        sc.check("every thread was served", min(leases) > 0, f"min {min(leases)}")
        sc.check("the scenario exercised its faults",
                 tot["booms"] > 0 and tot["interrupted"] > 0,
                 f"exceptions {tot['booms']}, interrupted {tot['interrupted']}")
        pool.close()
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
