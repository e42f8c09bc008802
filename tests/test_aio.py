"""AsyncConnectionPool (``aperturedb_pool.aio``) with the real SDK ``Connector``
over loopback, against the embedded server, on asyncio's loop and on uvloop.

The proofs of issue 17: cancellation at any point takes nothing and leaks
nothing (the 500-task run), a cancelled query's connector is discarded and
replaced without retiring the others, waiters are served in order, timeouts
and ``max_waiting`` raise the sync pool's errors, one pool per event loop.
The FastAPI example is served by uvicorn in ``tests/test_readme.py``.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before anything imports aperturedb

import asyncio  # noqa: E402
import functools  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Awaitable, Callable  # noqa: E402

import _support  # noqa: E402
import pytest  # noqa: E402

from aperturedb_pool import (  # noqa: E402
    ConnectorUnusable,
    LeaseError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    RetryPolicy,
    TooManyWaiters,
)
from aperturedb_pool.aio import AsyncConnectionPool, WrongEventLoop  # noqa: E402

JOIN = 20.0  # upper bound of any wait in this module
wait_until = functools.partial(_support.wait_until, timeout=JOIN)


def _loop_factories() -> list[Any]:
    kinds = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the test extra where it builds
        kinds.append(pytest.param(None, id="uvloop",
                                  marks=pytest.mark.skip(reason="uvloop not installed")))
    else:
        kinds.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return kinds


@pytest.fixture(params=_loop_factories())
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Runs a coroutine function to completion on a new loop of the kind under test."""
    factory = request.param

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        loop = factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(main(), JOIN * 3))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return runner


def tag(k: int) -> list[dict[str, Any]]:
    """A read whose answer names ``k``: only its own answer can match."""
    return [{"FindEntity": {"with_class": "Tag", "constraints": {"k": ["==", k]},
                            "results": {"list": ["k"]}}}]


def answer(response: Any) -> int:
    (ent,) = response[0]["FindEntity"]["entities"]
    return int(ent["k"])


def load_tags(server: Any, n: int) -> None:
    conn = server.connector()
    conn.query([{"AddEntity": {"class": "Tag", "properties": {"k": k}}} for k in range(n)])
    conn.close()


def test_lease_query_stats_close(adb_server: Any, run: Any) -> None:
    load_tags(adb_server, 3)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=2, max_size=4,
                                       name="basic") as pool:
            await pool.wait_ready(JOIN)
            async with pool.lease() as conn:
                response, blobs = await conn.query(tag(1))
                assert answer(response) == 1 and blobs == []
                assert pool.stats().leased == 1
            response, _ = await pool.query(tag(2))
            assert answer(response) == 2
            lease = await pool.acquire()
            assert lease.conn is not None and answer((await lease.conn.query(tag(0)))[0]) == 0
            await lease.release()  # awaiting is optional: done once it is back
            s = pool.stats()
            with pytest.raises(LeaseError, match="already released"):
                lease.release()
            with pytest.raises(LeaseError, match="lease has ended"):
                await conn.query(tag(1))
            assert (s.leased, s.waiting, s.size, s.name) == (0, 0, 2, "basic")
            assert s.leases_granted == 3
        assert pool.closed
        with pytest.raises(PoolClosed):
            await pool.query(tag(1))

    run(main)
    assert adb_server.counters()["sharing_violations"] == 0
    wait_until(lambda: adb_server.counters()["open"] == 0, "the pool's connections closed")


def test_not_open_and_bad_arguments(adb_server: Any, run: Any) -> None:
    with pytest.raises(TypeError, match="no open= option"):
        AsyncConnectionPool(adb_server.connector(), open=True)
    with pytest.raises(ValueError, match="max_size must be an int >= 1"):
        AsyncConnectionPool(adb_server.connector(), max_size=0)

    async def main() -> None:
        pool = AsyncConnectionPool(adb_server.connector())
        with pytest.raises(PoolError, match=r"not open: call 'await pool.open\(\)'"):
            await pool.query(tag(1))
        await pool.open()
        with pytest.raises(ValueError, match="timeout must be a non-negative number"):
            pool.lease(timeout=-1)
        with pytest.raises(TypeError, match="retry must be a RetryPolicy"):
            await pool.query(tag(1), retry={"max_attempts": 2})
        await pool.close()
        await pool.close()  # idempotent

    run(main)


def test_waiters_are_served_in_order_and_cancelled_ones_take_nothing(
        adb_server: Any, run: Any) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            order: list[int] = []
            holder = await pool.acquire()

            async def waiter(i: int) -> None:
                async with pool.lease() as conn:
                    order.append(i)
                    await conn.query([{"GetStatus": {}}])

            tasks = []
            for i in range(6):
                tasks.append(asyncio.ensure_future(waiter(i)))
                await asyncio.sleep(0)  # each queues before the next
            await asyncio.sleep(0.01)
            assert pool.stats().waiting == 6
            tasks[2].cancel()  # queued: removed, takes nothing
            tasks[4].cancel()
            await asyncio.sleep(0)
            assert pool.stats().waiting == 4
            granted = pool.stats().leases_granted
            holder.release()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert order == [0, 1, 3, 5]
            s = pool.stats()
            assert s.leases_granted == granted + 4 and s.leased == 0 and s.waiting == 0
            assert dict(s.discarded) == {}

    run(main)


def test_a_lease_obtained_after_its_task_was_cancelled_goes_back(adb_server: Any,
                                                                 run: Any) -> None:
    # The worker is inside sync_pool.acquire() (a thread holds the only
    # connector) when its task is cancelled; the connector it then gets must
    # come back to the pool, not stay with a worker nobody talks to.
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            await pool.wait_ready(JOIN)
            sync_lease = await asyncio.to_thread(pool.sync_pool.acquire)
            task = asyncio.ensure_future(pool.acquire())
            await asyncio.to_thread(wait_until, lambda: pool.sync_pool.stats().waiting == 1,
                                    "the worker waiting in the sync pool")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(sync_lease.release)
            # The only connector is free again (else this times out).
            async with pool.lease(timeout=5) as conn:
                await conn.query([{"GetStatus": {}}])
            s = pool.stats()
            assert s.leased == 0 and dict(s.discarded) == {} and s.size == 1

    run(main)


@pytest.mark.parametrize("how", ["cancel", "asyncio.timeout", "wait_for"])
@pytest.mark.parametrize("path", ["lease", "pool.query"])
def test_cancelled_in_flight_returns_at_once_and_the_connector_is_replaced(
        adb_server: Any, run: Any, how: str, path: str) -> None:
    load_tags(adb_server, 2)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=2, max_size=2,
                                       retry=RetryPolicy(initial_delay=0.0)) as pool:
            await pool.wait_ready(JOIN)
            adb_server.reset_counters()
            # The answer will not come while we wait.  FindEntity only: the
            # replacement connector's ping (GetStatus) is answered at once,
            # however late this test sets the latency back.
            adb_server.set_latency(30.0, command="FindEntity")

            async def one() -> Any:
                if path == "pool.query":
                    return await pool.query(tag(1))  # a read: retried after a failure
                async with pool.lease() as conn:
                    return await conn.query(tag(1))

            task = asyncio.ensure_future(one())
            await asyncio.to_thread(wait_until, lambda: adb_server.counters()["pending"] == 1,
                                    "the request at the server")
            started = time.monotonic()
            if how == "cancel":
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            elif how == "asyncio.timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await task
            else:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(task, 0.05)
            assert time.monotonic() - started < 1.0  # at once, not after the answer
            adb_server.set_latency(0.0)
            # Discarded, replaced, and never retried: the server dropped the
            # delayed request with its connection and got no other.
            await asyncio.to_thread(
                wait_until, lambda: (pool.stats().discarded.get("interrupted") == 1 and
                                     pool.stats().size == 2), "the connector replaced")
            c = adb_server.counters()
            assert c["requests_by_command"].get("FindEntity") is None and c["pending"] == 0
            # Only that connector: the failure was ours, not the server's.
            s = pool.stats()
            assert s.generation == 0 and "retired" not in s.discarded
            for k in (0, 1, 0, 1):
                assert answer((await pool.query(tag(k)))[0]) == k
            assert pool.stats().leased == 0

    run(main)
    c = adb_server.counters()
    assert c["sharing_violations"] == 0


def test_a_lease_whose_query_was_cancelled_refuses_more_queries(adb_server: Any,
                                                                run: Any) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            await pool.wait_ready(JOIN)
            adb_server.set_latency(30.0, command="FindEntity")  # (not the pings)
            async with pool.lease() as conn:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await conn.query(tag(0))
                adb_server.set_latency(0.0)
                with pytest.raises(ConnectorUnusable, match="was cancelled"):
                    await conn.query([{"GetStatus": {}}])
            # Discarded when the lease ended (its answer was still owed).
            assert dict(pool.stats().discarded) == {"broken": 1}
            async with pool.lease() as conn:
                assert (await conn.query([{"GetStatus": {}}]))[0][0]["GetStatus"]["status"] == 0

    run(main)


def test_timeout_and_max_waiting_raise_the_sync_pools_errors(adb_server: Any,
                                                             run: Any) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1,
                                       max_waiting=1, name="tiny") as pool:
            holder = await pool.acquire()
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match=r"pool 'tiny': no connector available "
                                                  r"within 0.2 s"):
                async with pool.lease(timeout=0.2):
                    pass
            assert 0.2 <= time.monotonic() - started < 2.0
            queued = asyncio.ensure_future(pool.query([{"GetStatus": {}}]))
            await asyncio.sleep(0.01)
            with pytest.raises(TooManyWaiters, match=r"max_waiting=1"):
                await pool.query([{"GetStatus": {}}])
            s = pool.stats()
            assert (s.waiting, s.timeouts, s.rejected_waiters) == (1, 1, 1)
            holder.release()
            assert (await queued)[0][0]["GetStatus"]["status"] == 0
            # A pool that is closed fails its waiters with PoolClosed.
            holder = await pool.acquire()
            waiting = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0.01)
            await pool.close()
            with pytest.raises(PoolClosed, match="closed while waiting"):
                await waiting
            holder.release()

    run(main)


def test_each_queued_task_keeps_its_own_deadline(adb_server: Any, run: Any) -> None:
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            holder = await pool.acquire()
            long = asyncio.ensure_future(pool.acquire(timeout=5))
            await asyncio.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match="within 0.1 s"):  # behind a longer one
                await pool.acquire(0.1)
            assert time.monotonic() - started < 2.0 and not long.done()
            await holder.release()
            await (await long).release()  # the first in line got it
            assert pool.stats().timeouts == 1

    run(main)


def test_one_pool_per_loop_and_a_clear_error_from_another(adb_server: Any) -> None:
    load_tags(adb_server, 4)
    pools: dict[int, AsyncConnectionPool] = {}
    errors: list[BaseException] = []
    opened = threading.Barrier(2, timeout=JOIN)
    crossed = threading.Barrier(2, timeout=JOIN)

    def thread(i: int) -> None:
        async def main() -> None:
            async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=2,
                                           name=f"loop{i}") as pool:
                pools[i] = pool
                await asyncio.to_thread(opened.wait)
                with pytest.raises(WrongEventLoop, match=rf"pool 'loop{1 - i}' belongs to the "
                                                         r"event loop it was opened on"):
                    await pools[1 - i].query(tag(i))
                await asyncio.to_thread(crossed.wait)
                got = await asyncio.gather(*[pool.query(tag(k)) for k in range(4)])
                assert [answer(r) for r, _ in got] == [0, 1, 2, 3]
        try:
            asyncio.run(main())
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    ts = [threading.Thread(target=thread, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(JOIN)
    assert not errors, errors
    assert adb_server.counters()["sharing_violations"] == 0


def test_500_tasks_on_8_connectors_with_a_fifth_cancelled_at_random_points(
        adb_server: Any, run: Any) -> None:
    n_tags = 50
    load_tags(adb_server, n_tags)
    rng = random.Random(17)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=8, max_size=8,
                                       timeout=JOIN) as pool:
            await pool.wait_ready(JOIN)
            adb_server.set_latency((0.0005, 0.004))
            wrong: list[tuple[int, int]] = []
            done = [0]
            leased: set[int] = set()  # tasks holding a lease (their query in flight)

            async def job(i: int) -> None:
                for j in range(3):
                    k = (i * 3 + j) % n_tags
                    if (i + j) % 2:
                        response, _ = await pool.query(tag(k))
                    else:
                        async with pool.lease() as conn:
                            leased.add(i)
                            try:
                                response, _ = await conn.query(tag(k))
                            finally:
                                leased.discard(i)
                    if answer(response) != k:
                        wrong.append((k, answer(response)))
                    done[0] += 1
                    await asyncio.sleep(0)

            tasks = [asyncio.ensure_future(job(i)) for i in range(500)]
            # Cancel 100 at random points: queued for a worker, waiting for a
            # connector, in flight on a lease or in pool.query, between queries.
            left = set(range(500))
            for _ in range(100):
                await asyncio.sleep(rng.uniform(0, 0.003))
                running = sorted(leased & left)
                pick = rng.choice(running) if running and rng.random() < 0.5 else \
                    rng.choice(sorted(left))
                left.discard(pick)
                tasks[pick].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)
                        and not isinstance(r, asyncio.CancelledError)]
            assert failures == []
            assert wrong == []
            cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
            assert 0 < cancelled <= 100 and done[0] >= 400 * 3
            adb_server.set_latency(0.0)
            # Every lease back; every discarded connector replaced; the server
            # holds exactly the pool's 8 connections again.
            s = await asyncio.to_thread(
                wait_until, lambda: (lambda s: s if s.leased == 0 and s.size == 8 and
                                     s.idle == 8 else None)(pool.stats()), "every lease back")
            assert s.waiting == 0 and s.generation == 0
            await asyncio.to_thread(wait_until, lambda: adb_server.counters()["open"] == 8,
                                    "the server's connections back to 8")
            assert sum(s.discarded.values()) == s.connectors_opened - 8
            # Many were cancelled with their query in flight: those connectors
            # were discarded (never reused) and replaced.
            assert s.discarded.get("interrupted", 0) >= 10, dict(s.discarded)
            # The pool still answers right on every connector.
            got = await asyncio.gather(*[pool.query(tag(k)) for k in range(n_tags)])
            assert [answer(r) for r, _ in got] == list(range(n_tags))

    run(main)
    c = adb_server.counters()
    assert c["sharing_violations"] == 0
    wait_until(lambda: adb_server.counters()["open"] == 0, "the pool's connections closed")


def test_no_query_runs_on_the_event_loop_thread(adb_server: Any, run: Any) -> None:
    template = adb_server.connector()
    threads: set[int] = set()

    def factory() -> Any:
        conn = template.clone()
        sdk_query = conn.query

        def query(q: Any, blobs: Any = None) -> Any:  # under the pool's own wrapper
            threads.add(threading.get_ident())
            return sdk_query(q, blobs)
        conn.query = query
        return conn

    async def main() -> int:
        async with AsyncConnectionPool(connector_factory=factory, min_size=2, max_size=4,
                                       check_ownership=True) as pool:
            async def lease_one() -> None:
                async with pool.lease() as conn:
                    await conn.query([{"GetStatus": {}}])
            await asyncio.gather(*[lease_one() for _ in range(20)],
                                 *[pool.query([{"GetStatus": {}}]) for _ in range(20)])
        return threading.get_ident()

    loop_thread = run(main)
    assert threads and loop_thread not in threads
    assert adb_server.counters()["requests_by_command"]["GetStatus"] >= 40


def test_a_dropped_acquired_lease_is_discarded_with_a_warning(adb_server: Any, run: Any) -> None:
    import gc

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            lease = await pool.acquire()
            await lease.conn.query([{"GetStatus": {}}])  # type: ignore[union-attr]
            with pytest.warns(ResourceWarning, match="dropped without release"):
                del lease
                gc.collect()
            # Its worker discarded the connector; the pool opens another.
            async with pool.lease(timeout=JOIN) as conn:
                await conn.query([{"GetStatus": {}}])
            assert sum(pool.stats().discarded.values()) == 1

    run(main)


# -- a worker keeps its connector while query jobs are queued ------------------

def _count_checkouts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``Lease.__enter__`` (a sync-pool checkout) on every thread."""
    from aperturedb_pool._lease import Lease

    calls = [0]
    enter = Lease.__enter__

    def counting(self: Any) -> Any:
        calls[0] += 1
        return enter(self)

    monkeypatch.setattr(Lease, "__enter__", counting)
    return calls


def _burst(pool: AsyncConnectionPool, keys: list[int]) -> Any:
    return asyncio.gather(*[pool.query(tag(k)) for k in keys], return_exceptions=True)


def test_a_worker_keeps_its_connector_while_queries_are_queued(
        adb_server: Any, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    load_tags(adb_server, 4)
    checkouts = _count_checkouts(monkeypatch)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1) as pool:
            await pool.wait_ready(JOIN)
            adb_server.set_latency(0.002)  # the other 39 queue behind the first
            before = (checkouts[0], pool.stats().leases_granted)
            got = await _burst(pool, [k % 4 for k in range(40)])
            assert [answer(r) for r, _ in got] == [k % 4 for k in range(40)]
            # One checkout served the queued queries (a few more if the queue
            # ran dry for a moment), each still counted as a lease granted;
            # and the connector was back before the last answer was delivered.
            assert checkouts[0] - before[0] <= 5, checkouts[0] - before[0]
            s = pool.stats()
            assert s.leases_granted - before[1] == 40
            assert (s.leased, s.idle, s.size, dict(s.discarded)) == (0, 1, 1, {})

    run(main)
    assert adb_server.counters()["sharing_violations"] == 0


def test_a_connector_held_for_a_burst_is_pinged_once_idle(adb_server: Any, run: Any) -> None:
    # After the burst the worker has nothing queued: the connector is back in
    # the sync pool, idle, where the keepalive pings it.
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1,
                                       keepalive_interval=0.3) as pool:
            await pool.wait_ready(JOIN)
            adb_server.set_latency(0.002)
            got = await _burst(pool, [0] * 30)
            assert not [r for r in got if isinstance(r, BaseException)]
            adb_server.set_latency(0.0)
            pings = pool.stats().keepalive_pings
            await asyncio.to_thread(
                wait_until, lambda: pool.stats().keepalive_pings > pings, "a keepalive ping")
            s = pool.stats()
            assert (s.leased, s.idle, dict(s.discarded)) == (0, 1, {})

    load_tags(adb_server, 1)
    run(main)


@pytest.mark.parametrize("why", ["expired", "retired"])
def test_a_held_connector_is_still_retired_between_queued_queries(
        adb_server: Any, run: Any, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    # The worker holds the connector while queries queue behind a slow one;
    # the connector comes due (max_lifetime passes, or retire_all()): the next
    # queued query runs on a new connector, the old one is closed.
    from aperturedb_pool import aio

    load_tags(adb_server, 2)
    clock = _support.ShiftedClock()
    _support.set_pool_clock(monkeypatch, clock)
    monkeypatch.setattr(aio, "_monotonic", clock)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1,
                                       max_lifetime=600.0, timeout=JOIN) as pool:
            await pool.wait_ready(JOIN)
            adb_server.reset_counters()
            adb_server.set_latency(0.2)
            burst = asyncio.ensure_future(_burst(pool, [0, 1, 0, 1]))
            await asyncio.to_thread(wait_until, lambda: adb_server.counters()["pending"] == 1,
                                    "the first query at the server")
            if why == "expired":
                clock.advance(700.0)
            else:
                assert pool.sync_pool.retire_all() == 1
            # Dropped as the second query starts, not after the burst (each
            # query takes 0.2 s at the server: the fourth is far off).
            await asyncio.to_thread(wait_until, lambda: pool.stats().discarded.get(why) == 1,
                                    "the held connector dropped")
            assert adb_server.counters()["requests_by_command"]["FindEntity"] < 4
            assert not burst.done()
            adb_server.set_latency(0.0)
            got = await burst
            assert [answer(r) for r, _ in got] == [0, 1, 0, 1]
            s = pool.stats()
            assert dict(s.discarded) == {why: 1}, dict(s.discarded)
            assert (s.leased, s.size, s.connectors_opened) == (0, 1, 2)
            assert adb_server.counters()["accepted"] == 1  # one new connection

    run(main)
    assert adb_server.counters()["sharing_violations"] == 0


def test_a_cancelled_query_on_a_held_connector_discards_it(adb_server: Any, run: Any) -> None:
    load_tags(adb_server, 2)

    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1,
                                       timeout=JOIN) as pool:
            await pool.wait_ready(JOIN)
            adb_server.reset_counters()
            adb_server.set_latency(0.2)
            first = asyncio.ensure_future(pool.query(tag(0)))
            second = asyncio.ensure_future(pool.query(tag(1)))  # queued: runs on the hold
            assert answer((await first)[0]) == 0
            await asyncio.to_thread(
                wait_until, lambda: adb_server.counters()["requests_by_command"]
                .get("FindEntity", 0) == 1 and adb_server.counters()["pending"] == 1,
                "the second query at the server")
            # (Not applied to a request already there; nor to the replacement's ping.)
            adb_server.set_latency(30.0, command="FindEntity")
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            adb_server.set_latency(0.0)
            await asyncio.to_thread(
                wait_until, lambda: (pool.stats().discarded.get("interrupted") == 1 and
                                     pool.stats().size == 1), "the connector replaced")
            for k in (1, 0):
                assert answer((await pool.query(tag(k)))[0]) == k
            s = pool.stats()
            assert (s.leased, s.idle, s.generation) == (0, 1, 0)

    run(main)
    assert adb_server.counters()["sharing_violations"] == 0


def test_a_thread_waiting_in_the_sync_pool_is_served_while_queries_are_queued(
        adb_server: Any, run: Any) -> None:
    # 100 queries queued behind each other keep the only worker busy for about
    # 2 s: a worker that kept its connector for as long as jobs are queued
    # would make the thread wait that long.  It must get the connector within
    # about a job (and the fairness threshold), well inside 1 s.
    async def main() -> None:
        async with AsyncConnectionPool(adb_server.connector(), min_size=1, max_size=1,
                                       timeout=JOIN) as pool:
            await pool.wait_ready(JOIN)
            adb_server.reset_counters()
            adb_server.set_latency(0.02)
            burst = asyncio.ensure_future(asyncio.gather(
                *[pool.query([{"GetStatus": {}}]) for _ in range(100)]))
            await asyncio.to_thread(wait_until, lambda: adb_server.counters()["pending"] == 1,
                                    "the first query at the server")
            r = await asyncio.to_thread(pool.sync_pool.query, [{"GetStatus": {}}],
                                        retry=RetryPolicy(max_attempts=1, deadline=1.0))
            assert r[0][0]["GetStatus"]["status"] == 0
            assert not burst.done()  # served while the tasks' queries were still queued
            adb_server.set_latency(0.0)
            assert len(await burst) == 100
            s = pool.stats()
            assert (s.leased, s.idle, dict(s.discarded), s.timeouts) == (0, 1, {}, 0)

    run(main)


# -- the cancellation hand-off of one exchange (pure logic, stand-ins) ----------

class _Sock:
    def __init__(self) -> None:
        self.shut = 0

    def shutdown(self, how: int) -> None:
        self.shut += 1


class _Conn:
    """A stand-in whose query runs ``during`` (the aborter, at that moment)."""

    def __init__(self, during: Callable[[], None] | None = None) -> None:
        self.conn = _Sock()
        self.during = during
        self.sent = 0

    def query(self, q: Any, blobs: Any) -> Any:
        self.sent += 1
        if self.during is not None:
            self.during()
        return "answer"


def _abort_now(abort: Any) -> None:
    """What the loop and the aborter thread do for a cancelled request."""
    import queue

    from aperturedb_pool import aio

    abort.aborted = True
    requests: Any = queue.SimpleQueue()
    requests.put(abort)
    requests.put(None)
    aio._aborter_loop(requests)


def test_an_exchange_and_its_abort_decide_exactly_once() -> None:
    from aperturedb_pool import aio

    # Aborted before the worker published: nothing sent, nothing shut down.
    abort = aio._Abort()
    _abort_now(abort)
    conn = _Conn()
    with pytest.raises(aio._Abandoned, match="before its query was sent"):
        aio._exchange(abort, conn, "q", [])
    assert (conn.sent, conn.conn.shut) == (0, 0)

    # Aborted during the exchange: the aborter shuts the socket down, and the
    # worker, finding the connector taken, shuts it down too and fails.
    abort = aio._Abort()
    conn = _Conn(lambda: _abort_now(abort))
    with pytest.raises(aio._Abandoned, match="as its answer arrived"):
        aio._exchange(abort, conn, "q", [])
    assert (conn.sent, conn.conn.shut) == (1, 2)

    # Aborted after the exchange ended: the worker took the connector back,
    # so a late abort never shuts down a connector that went back to the pool.
    abort = aio._Abort()
    conn = _Conn()
    assert aio._exchange(abort, conn, "q", []) == "answer"
    _abort_now(abort)
    assert (conn.sent, conn.conn.shut) == (1, 0)
    # ... and the next exchange of the same request (a lease's next query, a
    # retry) sees the abort and sends nothing.
    with pytest.raises(aio._Abandoned, match="before its query was sent"):
        aio._exchange(abort, conn, "q", [])
    assert (conn.sent, conn.conn.shut) == (1, 0)


def test_closing_while_workers_hold_connectors_leaks_nothing(adb_server: Any, run: Any) -> None:
    # Workers hold their connectors while queries are queued; close() comes
    # in the middle of the stream: every task ends (an answer or PoolClosed),
    # every connector is closed, the sync pool's books balance.
    load_tags(adb_server, 4)

    async def main() -> None:
        pool = AsyncConnectionPool(adb_server.connector(), min_size=4, max_size=4,
                                   timeout=JOIN)
        await pool.open(wait=True, timeout=JOIN)
        adb_server.set_latency(0.001)
        wrong: list[int] = []

        async def stream(i: int) -> None:
            while True:
                response, _ = await pool.query(tag(i % 4))
                if answer(response) != i % 4:
                    wrong.append(i)

        tasks = [asyncio.ensure_future(stream(i)) for i in range(32)]
        await asyncio.to_thread(
            wait_until, lambda: pool.sync_pool.stats().leases_granted > 200, "queries flowing")
        await pool.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, PoolClosed) for r in results), results
        assert wrong == []
        adb_server.set_latency(0.0)
        s = await asyncio.to_thread(
            wait_until, lambda: (lambda s: s if s.size == 0 else None)(pool.sync_pool.stats()),
            "every connector closed")
        assert (s.leased, s.idle, s.waiting) == (0, 0, 0)
        assert s.connectors_closed == s.connectors_opened == 4
        assert set(s.discarded) <= {"closed"}

    run(main)
    wait_until(lambda: adb_server.counters()["open"] == 0, "the server's connections closed")
    assert adb_server.counters()["sharing_violations"] == 0
