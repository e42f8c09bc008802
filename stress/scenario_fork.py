"""fork: a parent under load forks children that use the pool they inherited.

The parent runs 8 threads through a pool of 8 (echo reads through
``pool.query`` and on leased connectors, uniquely-keyed writes) for the whole
run.  Three times during the run, while those threads are mid-lease, it forks
4 children (``os.fork``, as multiprocessing's fork start method and gunicorn
``--preload`` do).  Each child uses the inherited pool object as is: 60 calls
(echo reads through ``pool.query``, echo reads on a leased connector, writes),
then ``pool.close()``, and reports through a pipe.

Invariants: every child exits 0 with every call answered correctly, on
connectors of its own (it opened some); the parent's threads see no failure and
no wrong answer; the parent's connectors are undisturbed (none discarded, none
reopened: a child that wrote to, shut down or closed an inherited socket would
break them); the server's sharing detector stays at 0 (a child writing on a
parent's socket would trip it); every acknowledged write, parent's or child's,
is stored exactly once; no lease leaks.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

from _scenario import Scenario, echo_ok, echo_query, run_threads, seed_echo, start_server

THREADS = 8
POOL = 8
KEYS = 256
CHILDREN = 4
ROUNDS = 3
CHILD_CALLS = 60


def child_work(pool: Any, tag: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    res: dict[str, Any] = {"pid": os.getpid(), "calls": 0, "errors": [], "mismatches": 0,
                           "writes": []}
    for n in range(CHILD_CALLS):
        k = rng.randrange(KEYS)
        try:
            if n % 3 == 0:
                response, _ = pool.query(echo_query(k))
                ok = echo_ok(response, k)
            elif n % 3 == 1:
                with pool.lease() as conn:
                    response, _ = conn.query(echo_query(k))
                ok = echo_ok(response, k)
            else:
                key = f"{tag}-{n}"
                response, _ = pool.query([{"AddEntity": {"class": "W",
                                                         "properties": {"key": key}}}])
                ok = isinstance(response, list) and response[0]["AddEntity"]["status"] == 0
                if ok:
                    res["writes"].append(key)
            if not ok:
                res["mismatches"] += 1
        except Exception as e:
            if len(res["errors"]) < 5:
                res["errors"].append(f"{type(e).__name__}: {e}")
            else:
                res["errors"].append("...")
        res["calls"] += 1
    st = pool.stats()
    res.update(opened=st.connectors_opened, size=st.size, leased=st.leased,
               discarded=dict(st.discarded))
    pool.close()
    return res


def fork_child(pool: Any, tag: str, seed: int) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the parent's code
        code = 1
        try:
            os.close(r)
            signal.alarm(60)  # bounded even if something hangs
            res = child_work(pool, tag, seed)
            code = 0 if (not res["errors"] and not res["mismatches"]) else 1
            data = json.dumps(res).encode()
        except BaseException as e:
            data = json.dumps({"crash": f"{type(e).__name__}: {e}"}).encode()
        try:
            os.write(w, data[:60000])
            os.close(w)
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def reap(pid: int, r: int, timeout: float) -> tuple[int | None, dict[str, Any]]:
    end = time.monotonic() + timeout
    status = None
    while time.monotonic() < end:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.02)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    try:
        return status, json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return status, {"crash": "unreadable report"}


def main(argv: list[str] | None = None) -> int:
    sc = Scenario("fork", __doc__, duration=15.0, quick=6.0, argv=argv)
    from aperturedb_pool import ConnectionPool

    srv = start_server()
    try:
        pool = ConnectionPool(srv.connector(), min_size=POOL, max_size=POOL, timeout=30.0,
                              name="fork-parent")
        pool.wait_ready(15)
        seed_echo(pool, KEYS)
        base = pool.stats()
        lock = threading.Lock()
        parent = {"calls": 0, "errors": [], "mismatches": 0}
        acked: list[str] = []
        deadline = time.monotonic() + sc.duration

        def worker(i: int) -> None:
            rng = random.Random(sc.seed * 100 + i)
            n = 0
            while time.monotonic() < deadline:
                k = rng.randrange(KEYS)
                r = rng.random()
                try:
                    if r < 0.4:
                        with pool.lease() as conn:
                            response, _ = conn.query(echo_query(k))
                            time.sleep(rng.uniform(0, 0.003))  # hold it across a fork
                        ok = echo_ok(response, k)
                    elif r < 0.8:
                        response, _ = pool.query(echo_query(k))
                        ok = echo_ok(response, k)
                    else:
                        n += 1
                        key = f"p{i}-{n}"
                        response, _ = pool.query([{"AddEntity": {"class": "W",
                                                                 "properties": {"key": key}}}])
                        ok = response[0]["AddEntity"]["status"] == 0
                        if ok:
                            with lock:
                                acked.append(key)
                    with lock:
                        parent["calls"] += 1
                        if not ok:
                            parent["mismatches"] += 1
                except Exception as e:
                    with lock:
                        parent["errors"].append(f"{type(e).__name__}: {e}")

        children: list[tuple[int | None, dict[str, Any]]] = []

        def forker() -> None:
            start = time.monotonic()
            for rnd in range(ROUNDS):
                at = start + sc.duration * (0.2 + 0.25 * rnd)
                time.sleep(max(0.0, at - time.monotonic()))
                pids = [fork_child(pool, f"c{rnd}-{j}", sc.seed * 1000 + rnd * 10 + j)
                        for j in range(CHILDREN)]
                for pid, r in pids:
                    children.append(reap(pid, r, 60.0))

        t = threading.Thread(target=forker, name="forker")
        t.start()
        crashes = run_threads(THREADS, worker, "fork", sc.duration + 60)
        t.join(ROUNDS * 70)
        st = pool.stats()
        counters = srv.counters()
        stored = srv.dump()
        child_acked = [k for _, res in children for k in res.get("writes", [])]
        keys = collections.Counter(o["properties"].get("key") for o in stored
                                   if o.get("class") == "W")
        all_acked = acked + child_acked
        bad_children = [(status, res) for status, res in children
                        if status != 0 or res.get("errors") or res.get("mismatches")
                        or "crash" in res or not res.get("calls")]
        sc.figure(children=len(children), child_calls=sum(r.get("calls", 0) for _, r in children),
                  child_opened=[r.get("opened") for _, r in children][:4],
                  parent_calls=parent["calls"], parent_opened=st.connectors_opened,
                  parent_discarded=dict(st.discarded),
                  sharing_violations=counters["sharing_violations"])
        sc.check("no parent thread crashed or hung", not crashes and not t.is_alive(), crashes)
        sc.check(f"all {ROUNDS * CHILDREN} children forked, ran and exited 0",
                 len(children) == ROUNDS * CHILDREN and not bad_children,
                 f"{len(children)} reaped; failed: {bad_children[:2]}")
        sc.check("children used connectors of their own",
                 all(r.get("opened", 0) >= 1 for _, r in children),
                 [r.get("opened") for _, r in children])
        sc.check("the parent's threads saw no failure and no wrong answer",
                 not parent["errors"] and parent["mismatches"] == 0,
                 f"errors {parent['errors'][:3]}, mismatches {parent['mismatches']}")
        sc.check("the parent's connectors were undisturbed (none discarded or reopened)",
                 not st.discarded and st.connectors_opened == base.connectors_opened,
                 f"discarded {dict(st.discarded)}, opened {base.connectors_opened} -> "
                 f"{st.connectors_opened}")
        sc.check("sharing_violations == 0", counters["sharing_violations"] == 0,
                 counters["sharing_violations"])
        dup = {k: c for k, c in keys.items() if c > 1}
        missing = [k for k in all_acked if k not in keys]
        sc.check("every acknowledged write stored exactly once", not dup and not missing,
                 f"duplicated {list(dup)[:5]}, missing {missing[:5]}")
        sc.check_no_leak(st, "no lease leaked in the parent")
        pool.close()
    finally:
        srv.stop()
    return sc.finish()


if __name__ == "__main__":
    sys.exit(main())
