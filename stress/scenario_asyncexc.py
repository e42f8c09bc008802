"""asyncexc: real asynchronous exceptions, thousands a second, into threads using the pool.

16 threads share a pool of 4 (``with pool.lease()`` with a caught interruption
and a second query inside the lease, ``acquire()``/``release()``,
``pool.query``, ``pool.run``, contended: four threads per connector).  A
separate thread raises an exception in a random one of them, about 5,000 times
a second, with ``PyThreadState_SetAsyncExc``: CPython delivers it at the next
function entry, backward jump or return from a call, anywhere in the pool, the
SDK or the workers' own code.  Workers catch it and go on.

Every answer is a keyed ``FindEntity`` (the answer must carry its key back).
Every second (and at the end) the main thread checks that ``stats()`` returns
within 5 s.  After the load, with no more exceptions: within 5 s every slot is
back in service (``max_size`` leases held at once), every connector answers its
own key, ``close()`` returns.

Invariants: 0 hangs (a watchdog dumps every stack and fails the run), 0 wrong
answers, the server's sharing detector 0, every slot back within 5 s.
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading
import time
from typing import Any

from _scenario import Scenario, echo_ok, echo_query, seed_echo, start_server

THREADS = 16
POOL = 4
KEYS = 256
RATE = 5000.0  # exceptions per second, in all


class AsyncInterrupt(Exception):
    """Raised asynchronously in a worker (an ordinary exception, as a soft time limit)."""


class AsyncKeyboardInterrupt(BaseException):
    """Raised asynchronously in a worker (not an Exception, as KeyboardInterrupt)."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


def _raise_in(thread_id: int, exc: type) -> None:
    _set_async_exc(thread_id, exc)


def _within(fn: Any, timeout: float) -> tuple[bool, Any]:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive(), box[0] if box else None)


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("asyncexc", __doc__, duration=20.0, quick=6.0, argv=argv)
    from aperturedb_pool import ConnectionPool, ConnectorError, LeaseError, PoolError

    srv = start_server()
    try:
        pool = ConnectionPool(srv.connector(), min_size=POOL, max_size=POOL, timeout=5.0,
                              name="asyncexc")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        rng_main = random.Random(sc.seed)
        # An exception that lands in a finalizer (the SDK's Connector.__del__,
        # run by the garbage collector in whichever thread) is printed and
        # ignored by CPython: counted here instead.
        unraisable = [0]

        def count_unraisable(info: Any) -> None:
            unraisable[0] += 1

        sys.unraisablehook = count_unraisable
        stop = threading.Event()
        lock = threading.Lock()
        totals = dict(ops=0, answers=0, wrong=0, interrupted=0, refused=0, pool_errors=0)
        wrong: list[str] = []
        expected = (AsyncInterrupt, AsyncKeyboardInterrupt, ConnectorError, LeaseError,
                    PoolError)

        def count(key: str, n: int = 1) -> None:
            with lock:
                totals[key] += n

        def answer(response: Any, k: int, where: str) -> None:
            if echo_ok(response, k):
                count("answers")
            else:
                count("wrong")
                with lock:
                    if len(wrong) < 10:
                        wrong.append(f"{where}: asked {k}, got {str(response)[:200]}")

        def one_op(rng: random.Random) -> None:
            k = rng.randrange(KEYS)
            r = rng.random()
            if r < 0.4:
                with pool.lease() as conn:
                    try:
                        answer(conn.query(echo_query(k))[0], k, "lease")
                    except (AsyncInterrupt, AsyncKeyboardInterrupt):
                        # Caught inside the lease: ask again on the same connector.
                        k2 = (k + 1) % KEYS
                        answer(conn.query(echo_query(k2))[0], k2, "lease, asked again")
            elif r < 0.6:
                lease = pool.acquire()
                try:
                    answer(lease.conn.query(echo_query(k))[0], k, "acquire")
                finally:
                    lease.release()
            elif r < 0.85:
                answer(pool.query(echo_query(k))[0], k, "pool.query")
            else:
                def unit(conn: Any) -> None:
                    answer(conn.query(echo_query(k))[0], k, "pool.run")
                pool.run(unit)

        def worker(i: int) -> None:
            rng = random.Random(sc.seed * 100 + i)
            # Nested handlers: an exception may land inside a handler too.
            while not stop.is_set():
                try:
                    try:
                        while not stop.is_set():
                            count("ops")
                            try:
                                one_op(rng)
                            except expected as e:
                                count("refused" if isinstance(e, LeaseError) else
                                      "pool_errors" if isinstance(e, PoolError) else
                                      "interrupted")
                    except expected:
                        count("interrupted")
                except expected:
                    count("interrupted")

        threads = [threading.Thread(target=worker, args=(i,), name=f"asyncexc-{i}", daemon=True)
                   for i in range(THREADS)]
        for t in threads:
            t.start()
        ids = [t.ident for t in threads]
        delivered = 0
        stats_ok = True
        end = time.monotonic() + sc.duration
        next_check = time.monotonic() + 1.0
        started = time.monotonic()
        while time.monotonic() < end:
            # Catch up with RATE (sleeps are coarse): a burst, then 1 ms.
            due = int((time.monotonic() - started) * RATE) - delivered
            for _ in range(max(0, due)):
                tid = ids[rng_main.randrange(THREADS)]
                assert tid is not None
                _raise_in(tid, AsyncInterrupt if rng_main.random() < 0.5
                          else AsyncKeyboardInterrupt)
                delivered += 1
            time.sleep(0.001)
            if time.monotonic() >= next_check:
                next_check += 1.0
                ok, _ = _within(pool.stats, 5.0)
                stats_ok = stats_ok and ok
                if not ok:
                    break
        stop.set()
        for t in threads:
            t.join(15.0)
            if t.is_alive():  # blocked where no exception reaches it: free it
                _raise_in(t.ident or 0, AsyncInterrupt)
                t.join(5.0)
        hung = [t.name for t in threads if t.is_alive()]
        sc.figure(seconds=round(sc.duration, 1), exceptions=delivered,
                  rate=round(delivered / sc.duration), **totals,
                  in_finalizers=unraisable[0])

        def hold_all() -> str | None:
            leases = []
            try:
                for _ in range(POOL):
                    leases.append(pool.acquire(timeout=5.0))
                for i, lease in enumerate(leases):
                    k = (KEYS - 1 - i)
                    if not echo_ok(lease.conn.query(echo_query(k))[0], k):
                        return f"a connector answered key {k} wrongly"
                return None
            finally:
                for lease in leases:
                    lease.release()

        t0 = time.monotonic()
        ok_hold, held = _within(hold_all, 15.0)
        recovered = time.monotonic() - t0
        ok_stats, st = _within(pool.stats, 5.0)
        if ok_stats:
            sc.figure(discarded=dict(st.discarded), leases_granted=st.leases_granted,
                      recovered_s=round(recovered, 2))
        sc.check("no worker thread hung", not hung, hung)
        sc.check("stats() returned within 5 s every second", stats_ok)
        sc.check("no answer reached the wrong query", totals["wrong"] == 0, wrong)
        sc.check("every slot back in service within 5 s, each connector answers its own key",
                 ok_hold and held is None and recovered < 5.0,
                 f"finished {ok_hold}, {held}, after {recovered:.2f} s")
        sc.check("nothing left leased or waiting", ok_stats and st.leased == 0 and
                 st.waiting == 0, st if ok_stats else "stats() hung")
        ok_close, _ = _within(pool.close, 5.0)
        sc.check("close() returned", ok_close)
        sc.check("sharing_violations == 0", srv.counters()["sharing_violations"] == 0)
        sc.check("the exceptions landed (workers saw them)", totals["interrupted"] > 0,
                 totals)
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
