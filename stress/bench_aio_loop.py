"""The event loop's own CPU per ``AsyncConnectionPool.query``, workers stubbed out.

    python stress/bench_aio_loop.py [--tasks 64] [--duration 1.5] [--rounds 3]

``bench_aio.py`` measures the whole path, whose figure moves with the load of
a shared machine by more than a change to the loop's part does.  This
measures that part alone, on one thread: 64 tasks ``await pool.query(q)``;
each job is taken from the queue and answered at once, on the loop's thread,
through the same ``_deliver`` / ``drain`` path a worker uses (no worker thread,
no network, no connector: the pool is never opened).  The figure is
``time.thread_time()`` of the loop's thread per query: the task's steps, the
future, the job, ``_submit``, the batch drain and the wake-up of the task.
The report gives each round and the median (lower is better).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("ADB_LOG_FILE", "")

Q: list[dict[str, Any]] = [{"GetStatus": {}}]


async def one_round(tasks: int, duration: float) -> float:
    from aperturedb_pool import aio

    class NeverCloned:
        """A template the pool accepts; never used (the pool is not opened)."""

        def _unused(self, *args: Any) -> Any:
            raise AssertionError("not used")

        clone = query = close = _unused

    pool = aio.AsyncConnectionPool(NeverCloned(), min_size=0, max_size=8, name="loop-only")
    loop = asyncio.get_running_loop()
    pool._loop = pool._shared.loop = loop  # adopted, not opened: no thread starts
    shared = pool._shared

    class AnswerAtOnce:
        """Stands in for the workers' wake queue: answers each job as queued."""

        def put(self, _token: Any) -> None:
            job = shared.jobs.popleft()
            aio._deliver(shared, (job.future, None, None))

    shared.wake = AnswerAtOnce()  # type: ignore[assignment]
    stop = False
    done = 0

    async def run() -> None:
        nonlocal done
        while not stop:
            await pool.query(Q)
            done += 1

    ts = [asyncio.ensure_future(run()) for _ in range(tasks)]
    await asyncio.sleep(0.2)  # warm-up
    done = 0
    c0 = time.thread_time()
    await asyncio.sleep(duration)
    c1 = time.thread_time()
    n = done
    stop = True
    await asyncio.gather(*ts)
    return (c1 - c0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stress/bench_aio_loop.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--duration", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    runs = [asyncio.run(one_round(a.tasks, a.duration)) for _ in range(a.rounds)]
    print(f"loop thread CPU per pool.query, {a.tasks} tasks, workers stubbed out: "
          f"median {statistics.median(runs):.2f} us (rounds "
          f"{' '.join(f'{x:.2f}' for x in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
