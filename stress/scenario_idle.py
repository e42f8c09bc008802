"""idle: the server closes idle connections sooner than the pool's keepalive interval.

The server closes any connection idle for 1 s; the pool (min = max = 8) pings
idle connectors only every 3 s, so keepalive cannot save them: the pool has to
notice the closed connections itself (its zero-round-trip probe at checkout,
or the check before sending) and replace them without a caller noticing.
16 threads work in bursts of 1-5 calls separated by random pauses of 0-3 s,
and twice during the run every thread pauses 2.5 s at once (every connector
goes stale).  A third of the calls are echo reads through ``pool.query``, a
third uniquely-keyed writes through ``pool.query``, a third echo reads on a
connector leased directly (``with pool.lease() as conn: conn.query(...)``: no
retry layer to hide a stale connector).

Invariants: no caller sees any failure (no exception, every echo matches,
every write acknowledged, none unknown); the server did close idle connections
(the scenario tested something); the pool replaced them (discarded > 0); the
sharing detector stays at 0; no lease leaks.
"""

from __future__ import annotations

import random
import sys
import threading
import time

from _scenario import Scenario, echo_ok, echo_query, run_threads, seed_echo, start_server

THREADS = 16
POOL = 8
KEYS = 256
IDLE_TIMEOUT = 1.0
KEEPALIVE = 3.0


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("idle", __doc__, duration=30.0, quick=12.0, argv=argv)
    from aperturedb_pool import ConnectionPool

    srv = start_server(idle_timeout=IDLE_TIMEOUT)
    try:
        pool = ConnectionPool(srv.connector(), min_size=POOL, max_size=POOL, timeout=30.0,
                              keepalive_interval=KEEPALIVE, name="idle")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        start = time.monotonic()
        deadline = start + sc.duration
        breaks = [start + sc.duration * f for f in (1 / 3, 2 / 3)]
        lock = threading.Lock()
        failures: list[str] = []
        calls = {"query_read": 0, "query_write": 0, "lease_read": 0}

        def fail(what: str) -> None:
            with lock:
                failures.append(what)

        def worker(i: int) -> None:
            rng = random.Random(sc.seed * 100 + i)
            n = 0
            pending_breaks = list(breaks)
            while time.monotonic() < deadline:
                for _ in range(rng.randint(1, 5)):
                    kind = rng.choice(("query_read", "query_write", "lease_read"))
                    k = rng.randrange(KEYS)
                    try:
                        if kind == "query_read":
                            response, _ = pool.query(echo_query(k))
                            if not echo_ok(response, k):
                                fail(f"mismatch: {k} -> {str(response)[:100]}")
                        elif kind == "lease_read":
                            with pool.lease() as conn:
                                response, _ = conn.query(echo_query(k))
                            if not echo_ok(response, k):
                                fail(f"mismatch: {k} -> {str(response)[:100]}")
                        else:
                            n += 1
                            q = [{"AddEntity": {"class": "W", "properties": {"key": f"{i}-{n}"}}}]
                            response, _ = pool.query(q)
                            if not (isinstance(response, list) and
                                    response[0]["AddEntity"]["status"] == 0):
                                fail(f"write not acknowledged: {str(response)[:100]}")
                    except Exception as e:
                        fail(f"{kind}: {type(e).__name__}: {e}")
                    with lock:
                        calls[kind] += 1
                now = time.monotonic()
                if pending_breaks and now >= pending_breaks[0] - 0.5:
                    # Everyone goes quiet until 2.5 s after the break starts.
                    pause = max(0.0, pending_breaks.pop(0) + 2.5 - now)
                else:
                    pause = rng.uniform(0, 3.0)
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

        crashes = run_threads(THREADS, worker, "idle", sc.duration + 60)
        st = pool.stats()
        counters = srv.counters()
        sc.figure(calls=sum(calls.values()), idle_closed=counters["idle_closed"],
                  discarded=dict(st.discarded), probes=st.probes,
                  keepalive_pings=st.keepalive_pings, retries=st.retries,
                  opened=st.connectors_opened)
        sc.check("no thread crashed or hung", not crashes, crashes)
        sc.check("no caller saw a failure", not failures,
                 f"{len(failures)} failures; first: {failures[:3]}")
        sc.check("the server closed idle connections", counters["idle_closed"] > 0,
                 counters["idle_closed"])
        sc.check("the pool replaced closed connectors", sum(st.discarded.values()) > 0,
                 dict(st.discarded))
        sc.check("sharing_violations == 0", counters["sharing_violations"] == 0,
                 counters["sharing_violations"])
        sc.check_no_leak(st)
        pool.close()
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
