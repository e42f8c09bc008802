"""What the retry layer costs a query: client CPU per query of each way to run one.

Run:  python stress/bench_query_cpu.py [--count N] [--rounds R] [--no-network] [--json]

One thread, a pool of 1, ``GetStatus`` against the embedded server in its own
process (so the CPU measured is the client's alone: ``time.thread_time`` of the
calling thread).  Each round runs ``--count`` queries of each way, in turn:

=============  ====================================================================
dedicated      ``conn.query(q)`` on a clone of the template (no pool: the baseline)
lease          ``with pool.lease() as conn: conn.query(q)``
pool.query     ``pool.query(q)``: the lease, the retry policy's first attempt, the
               deadline handed to the connector (issue 15: "the retry layer's
               first attempt must cost almost nothing")
shared         ``pool.connector().query(q)``: ``pool.query`` plus the calling
               thread's last response
=============  ====================================================================

``--no-network`` takes the network out: after each connector's first query
(login, connection) its socket is replaced by a stand-in that takes every
request and answers it at once with the same ``GetStatus`` response frame,
for the SDK's own framing (``dedicated``) and the pool's alike.  What is left
is the Python each way runs per query, with no system call and no server, so
the figures hardly move when other work shares the machine: the way to A/B a
change of the query path on a busy machine.  (The real exchange differs in one
respect the stand-in hides: the pool's connectors read a response in one
``recv_into`` where the SDK makes two reads, so with the network the pool's
ways gain back about a microsecond.)

The report gives, per way, the lowest CPU per query over the rounds (the least
disturbed by other work on the machine) and, from the rounds, the median of
its excess over ``dedicated`` and over ``lease`` in microseconds and of its
ratio to ``dedicated``, each taken within one round (the ways run one after
the other, in an order that rotates from round to round), so that drift of the
machine's speed between rounds cancels out.  Compare two commits
by running this with ``PYTHONPATH`` pointing at each, alternately.  A benchmark,
never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from typing import Any, Callable

os.environ.setdefault("ADB_LOG_FILE", "")

Q = [{"GetStatus": {}}]


def _status_frame() -> bytes:
    """One framed ``GetStatus`` response, as the embedded server sends it."""
    from aperturedb.queryMessage import queryMessage

    msg = queryMessage()
    msg.json = json.dumps([{"GetStatus": {"status": 0, "info": "OK"}}])
    body = msg.SerializeToString()
    return struct.pack("@I", len(body)) + body


class _AnswerAtOnce:
    """A connected socket's stand-in: every request sent is answered at once with
    one ``GetStatus`` frame (whole, or in the SDK's two reads: the length, then
    the body).  Anything else (``fileno`` for the pool's poller, ``close``) goes
    to the real socket, which stays open and idle."""

    _FRAME = b""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._timeout = real.gettimeout()
        if not _AnswerAtOnce._FRAME:
            _AnswerAtOnce._FRAME = _status_frame()
        self._left = b""

    def sendall(self, data: bytes) -> None:
        self._left = self._FRAME

    def recv(self, n: int) -> bytes:
        out, self._left = self._left[:n], self._left[n:]
        return out

    def recv_into(self, buf: Any, n: int = 0) -> int:
        out = self.recv(n or len(buf))
        buf[:len(out)] = out
        return len(out)

    def gettimeout(self) -> float | None:
        return self._timeout

    def settimeout(self, t: float | None) -> None:
        self._timeout = t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/bench_query_cpu.py")
    p.add_argument("--count", type=int, default=2000, help="queries per measurement")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-network", action="store_true",
                   help="answer every query at once from a stand-in socket (see above)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a = p.parse_args(argv)
    if a.count < 1 or a.rounds < 1:
        p.error("--count and --rounds must be at least 1")

    from aperturedb_pool import ConnectionPool
    from aperturedb_pool.testing import ServerProcess

    with ServerProcess("127.0.0.1", 0) as srv:
        template = srv.connector()
        dedicated = template.clone()
        dedicated.query(Q)
        pool = ConnectionPool(template, min_size=1, max_size=1, name="query-cpu")
        pool.wait_ready(30)
        shared = pool.connector()
        if a.no_network:
            dedicated.conn = _AnswerAtOnce(dedicated.conn)
            with pool.lease() as conn:
                conn.query(Q)  # connected (the pool's connectors connect lazily)
                conn.conn = _AnswerAtOnce(conn.conn)

        def lease() -> None:
            with pool.lease() as conn:
                conn.query(Q)

        ways: dict[str, Callable[[], Any]] = {
            "dedicated": lambda: dedicated.query(Q), "lease": lease,
            "pool.query": lambda: pool.query(Q), "shared": lambda: shared.query(Q)}
        for f in ways.values():  # warm-up
            for _ in range(min(a.count, 200)):
                f()
        cpu: dict[str, list[float]] = {k: [] for k in ways}
        names = list(ways)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                f = ways[name]
                t0 = time.thread_time()
                for _ in range(a.count):
                    f()
                cpu[name].append((time.thread_time() - t0) / a.count * 1e6)
        pool.close()

    def within(k: str, base: str, f: Callable[[float, float], float]) -> float:
        return statistics.median(f(x, y) for x, y in zip(cpu[k], cpu[base], strict=True))

    report = {k: {"cpu_us": round(min(v), 2),
                  "over_dedicated_us": round(within(k, "dedicated", lambda x, y: x - y), 2),
                  "over_lease_us": round(within(k, "lease", lambda x, y: x - y), 2),
                  "vs_dedicated": round(within(k, "dedicated", lambda x, y: y / x), 3)}
              for k, v in cpu.items()}
    if a.json:
        print(json.dumps({"count": a.count, "rounds": a.rounds, "no_network": a.no_network,
                          "ways": report}))
        return 0
    print(f"client CPU per GetStatus, one thread, {a.rounds} rounds of {a.count}: the lowest, "
          f"and medians of the differences within a round"
          + (" (no network: answered at once by a stand-in socket)" if a.no_network else ""))
    print(f"{'way':12s} {'cpu_us':>8s} {'+dedicated':>11s} {'+lease':>8s} {'vs dedicated':>13s}")
    for k, r in report.items():
        print(f"{k:12s} {r['cpu_us']:8.2f} {r['over_dedicated_us']:+11.2f} "
              f"{r['over_lease_us']:+8.2f} {r['vs_dedicated']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
