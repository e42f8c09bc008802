"""exhaustion: more waiters than max_waiting, lease timeouts, a leak, a dropped lease.

With real SDK connectors against the embedded server:

1. A pool of 2 (``max_waiting=4``, ``timeout=1``) has both connectors leased by
   holder threads.  4 callers queue up; 6 more must fail at once with
   ``TooManyWaiters`` naming ``max_waiting``; the 4 queued ones must fail after
   their 1 s timeout with ``PoolTimeout`` (also a ``TimeoutError``) whose
   message names the pool, its size, leased, idle and waiting counts and the
   timeout.  ``pool.query`` on the exhausted pool fails the same way at its
   deadline.  Once the holders return, a lease succeeds at once.
2. A pool with ``leak_threshold=0.3`` s: a lease taken with ``acquire()`` and
   held for 1 s must log a WARNING whose stack names this file and the line of
   the ``acquire()`` call, then a follow-up when it comes back.
3. A lease from ``acquire()`` dropped without ``release()`` must be reclaimed
   with a ``ResourceWarning``, its connector closed, ``leased`` back to 0.

Invariants: the errors above, their timing (rejections under 50 ms; timeouts
within [timeout, timeout + 0.3 s]), and stats that add up (rejected waiters 6,
timeouts 5, leaks reported 1, reclaimed 1, nothing leased at the end).
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import threading
import time
import warnings

from _scenario import Scenario, start_server, wait_until

TIMEOUT = 1.0


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("exhaustion", __doc__, duration=0.0, quick=0.0, argv=argv, limit=90)
    from aperturedb_pool import ConnectionPool, PoolTimeout, TooManyWaiters

    srv = start_server()
    try:
        template = srv.connector()
        # -- 1. waiters, rejections, timeouts ------------------------------------------
        pool = ConnectionPool(template, min_size=2, max_size=2, max_waiting=4,
                              timeout=TIMEOUT, name="exhaustion")
        pool.wait_ready(15)
        release = threading.Event()
        held = threading.Barrier(3)

        def holder() -> None:
            with pool.lease() as conn:
                conn.query([{"GetStatus": {}}])
                held.wait(10)
                release.wait(30)

        holders = [threading.Thread(target=holder, daemon=True) for _ in range(2)]
        for t in holders:
            t.start()
        held.wait(10)
        outcomes: list[tuple[str, float, str]] = []
        olock = threading.Lock()

        def waiter() -> None:
            t0 = time.monotonic()
            try:
                with pool.lease():
                    kind, msg = "leased", ""
            except TooManyWaiters as e:
                kind, msg = "TooManyWaiters", str(e)
            except PoolTimeout as e:
                kind, msg = "PoolTimeout" + ("" if isinstance(e, TimeoutError) else "!"), str(e)
            except Exception as e:
                kind, msg = type(e).__name__, str(e)
            with olock:
                outcomes.append((kind, time.monotonic() - t0, msg))

        waiters = []
        queued_ok = True
        for k in range(4):
            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            waiters.append(t)
            queued_ok &= wait_until(lambda k=k: pool.stats().waiting == k + 1, 0.5, 0.005)
        for _ in range(6):
            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            waiters.append(t)
        for t in waiters:
            t.join(TIMEOUT + 5)
        t0 = time.monotonic()
        try:
            pool.query([{"GetStatus": {}}])
            q_kind, q_msg = "answered", ""
        except Exception as e:
            q_kind, q_msg = type(e).__name__, str(e)
        q_time = time.monotonic() - t0
        release.set()
        for t in holders:
            t.join(5)
        t0 = time.monotonic()
        with pool.lease() as conn:
            conn.query([{"GetStatus": {}}])
        after = time.monotonic() - t0
        st = pool.stats()
        pool.close()

        rejected = [o for o in outcomes if o[0] == "TooManyWaiters"]
        timed_out = [o for o in outcomes if o[0] == "PoolTimeout"]
        others = [o for o in outcomes if o[0] not in ("TooManyWaiters", "PoolTimeout")]
        sc.figure(rejected=len(rejected),
                  reject_max_ms=round(max((o[1] for o in rejected), default=0) * 1000, 1),
                  timed_out=len(timed_out),
                  timeout_s=[round(o[1], 3) for o in timed_out])
        sc.check("4 callers queued", queued_ok)
        sc.check("6 callers beyond max_waiting got TooManyWaiters at once",
                 len(rejected) == 6 and all(o[1] < 0.05 for o in rejected),
                 [(round(o[1], 4)) for o in rejected])
        sc.check("TooManyWaiters names max_waiting and the pool",
                 all("max_waiting=4" in o[2] and "'exhaustion'" in o[2] for o in rejected),
                 rejected[0][2] if rejected else "")
        sc.check("4 queued callers got PoolTimeout (a TimeoutError) at their deadline",
                 len(timed_out) == 4 and all(TIMEOUT <= o[1] <= TIMEOUT + 0.3
                                             for o in timed_out),
                 [(o[0], round(o[1], 3)) for o in outcomes if o[0] != "TooManyWaiters"])
        need = ["'exhaustion'", "size 2/2", "leased 2", "idle 0", "waiting", "1 s"]
        sc.check("PoolTimeout message names pool, size, leased, idle, waiting and timeout",
                 bool(timed_out) and all(all(n in o[2] for n in need) for o in timed_out),
                 timed_out[0][2] if timed_out else "")
        sc.check("no other outcome", not others, others)
        sc.check("pool.query on the exhausted pool fails with PoolTimeout at its deadline",
                 q_kind == "PoolTimeout" and TIMEOUT <= q_time <= TIMEOUT + 0.3,
                 f"{q_kind} after {q_time:.3f} s: {q_msg[:200]}")
        sc.check("a lease succeeds at once after the holders return", after < 0.05,
                 f"{after * 1000:.1f} ms")
        sc.check("stats: rejected 6, timeouts 5, leased 0",
                 st.rejected_waiters == 6 and st.timeouts == 5 and st.leased == 0
                 and st.waiting == 0,
                 f"rejected {st.rejected_waiters}, timeouts {st.timeouts}, leased {st.leased}, "
                 f"waiting {st.waiting}")

        # -- 2. a deliberate leak --------------------------------------------------------
        pool = ConnectionPool(template, min_size=1, max_size=2, leak_threshold=0.3,
                              name="leaky")
        pool.wait_ready(15)
        before = len(sc.log.records)

        def leaky() -> int:
            line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
            lease = pool.acquire()
            lease.conn.query([{"GetStatus": {}}])
            time.sleep(1.0)
            lease.release()
            return line

        leak_line = leaky()
        wait_until(lambda: pool.stats().leaks_reported >= 1, 1.0)
        recs = [r for r in sc.log.records[before:] if r.name.startswith("aperturedb_pool")]
        warn = [r.getMessage() for r in recs if r.levelno >= logging.WARNING]
        where = f'File "{__file__}", line {leak_line}, in leaky'
        leak_msgs = [m for m in warn if "leak_threshold" in m]
        sc.figure(leak_line=leak_line, leak_warnings=len(leak_msgs))
        sc.check("the leak warning names the leaking line",
                 len(leak_msgs) == 1 and where in leak_msgs[0],
                 leak_msgs[0][:600] if leak_msgs else f"no leak warning; got {warn[:3]}")
        sc.check("a follow-up is logged when the lease comes back",
                 any("came back" in m for m in warn), warn[-2:])

        # -- 3. a lease dropped without release -------------------------------------------
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def drop() -> None:
                lease = pool.acquire()
                lease.conn.query([{"GetStatus": {}}])
                # no release(): the lease object goes away with this frame

            drop()
            gc.collect()
            st2 = pool.stats()  # reclaims what nothing refers to any more
        rw = [w for w in caught if issubclass(w.category, ResourceWarning)]
        sc.figure(reclaimed=st2.discarded.get("reclaimed", 0))
        sc.check("a dropped lease is reclaimed with a ResourceWarning",
                 len(rw) == 1 and "release()" in str(rw[0].message),
                 [str(w.message) for w in caught][:2])
        sc.check("leak stats: reported 1, reclaimed 1, leased 0",
                 st2.leaks_reported == 1 and st2.discarded.get("reclaimed", 0) == 1
                 and st2.leased == 0,
                 f"leaks_reported {st2.leaks_reported}, discarded {dict(st2.discarded)}, "
                 f"leased {st2.leased}")
        pool.close()
        sc.check("sharing_violations == 0", srv.counters()["sharing_violations"] == 0)
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
