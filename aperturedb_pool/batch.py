"""Batch loading with threads: :func:`run_batches`.

::

    from aperturedb_pool import ConnectionPool
    from aperturedb_pool.batch import run_batches

    def add_people(conn, batch):
        q = [{"AddEntity": {"class": "Person", "properties": p}} for p in batch]
        response, _ = conn.query(q)
        if not isinstance(response, list):        # a failed transaction
            raise RuntimeError(f"transaction failed: {response}")
        return None

    with ConnectionPool(template, max_size=4) as pool:
        result = run_batches(pool, add_people, people, batch_size=100, threads=16,
                             progress=lambda p: print(f"{p.done}/{p.total}"))
    for failure in result.failed:                  # nothing is lost: retry them later
        print(failure.index, failure.error)

Each call of ``fn(conn, batch)`` holds a lease of its own for its whole
duration and runs under the pool's retry policy through
:meth:`ConnectionPool.run`: a batch whose connection failed before anything
was sent is retried on a fresh connector; a batch whose outcome is unknown
(the request was sent, no answer came) is retried only when ``fn`` is
declared idempotent (``@aperturedb_pool.retry.idempotent``, or
``idempotent=True`` here), otherwise it is listed as failed with
:class:`~aperturedb_pool.OutcomeUnknown` - never sent twice.

Every batch ends up in exactly one of ``result.acknowledged`` (``fn``
returned), ``result.failed`` (with the exception) or ``result.skipped`` (never
started because the run was stopped by ``max_failures``).

Threads: pass ``threads=N`` and the call creates a ``ThreadPoolExecutor`` for
its own duration and shuts it down before returning; or pass your own
``executor=`` (it is neither shut down nor kept), and ``threads`` then bounds
how many batches are submitted to it at once.  There is no hidden global
executor.  Batches are read from the iterable lazily, at most ``threads``
ahead, so a generator of millions of items is never materialized.
``progress`` is called in the calling thread, once per finished batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Callable

from aperturedb_pool import _validate
from aperturedb_pool.errors import PoolError

__all__ = [
    "BatchAborted",
    "BatchError",
    "BatchFailure",
    "BatchProgress",
    "BatchResult",
    "chunks",
    "run_batches",
]


@dataclass(frozen=True)
class BatchFailure:
    """A batch that failed: its position in the input, the batch itself, the error."""

    index: int
    batch: Any
    error: BaseException

    @property
    def maybe_executed(self) -> bool:
        """True when the server may have executed the batch (its outcome is unknown)."""
        return bool(getattr(self.error, "maybe_executed", False))


@dataclass(frozen=True)
class BatchProgress:
    """What ``progress`` receives after each finished batch."""

    #: batches finished (acknowledged + failed)
    done: int
    acknowledged: int
    failed: int
    #: items in acknowledged batches (batches without ``len()`` count as 1)
    items_acknowledged: int
    #: number of batches when the input has a length, else None
    total: int | None
    elapsed: float
    #: index and error of the batch that just finished
    index: int
    error: BaseException | None


@dataclass
class BatchResult:
    """The outcome of :func:`run_batches`.

    ``acknowledged``: indices (in input order) of the batches whose call
    returned; ``results``: what those calls returned, by index, when not None;
    ``failed``: :class:`BatchFailure` for each batch whose call raised (after
    the retries the policy allowed); ``skipped``: ``(index, batch)`` pairs
    never started because the run was stopped.
    """

    acknowledged: list[int] = field(default_factory=list)
    results: dict[int, Any] = field(default_factory=dict)
    failed: list[BatchFailure] = field(default_factory=list)
    skipped: list[tuple[int, Any]] = field(default_factory=list)
    items_acknowledged: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every batch was acknowledged."""
        return not self.failed and not self.skipped

    @property
    def total(self) -> int:
        return len(self.acknowledged) + len(self.failed) + len(self.skipped)

    def unfinished_batches(self) -> list[Any]:
        """The failed and skipped batches, in input order: feed them to a new run."""
        pairs = [(f.index, f.batch) for f in self.failed] + list(self.skipped)
        return [b for _, b in sorted(pairs, key=lambda p: p[0])]

    def raise_for_failures(self) -> None:
        """Raise :class:`BatchError` unless every batch was acknowledged."""
        if not self.ok:
            raise BatchError(self)

    def __str__(self) -> str:
        return (f"{len(self.acknowledged)} batches acknowledged ({self.items_acknowledged} "
                f"items), {len(self.failed)} failed, {len(self.skipped)} skipped in "
                f"{self.elapsed:.2f} s")


class BatchError(PoolError):
    """Some batches were not acknowledged; ``result`` is the full :class:`BatchResult`."""

    def __init__(self, result: BatchResult) -> None:
        first = result.failed[0] if result.failed else None
        msg = str(result)
        if first is not None:
            msg += f"; first failure: batch {first.index}: {type(first.error).__name__}: " \
                   f"{first.error}"
        super().__init__(msg)
        self.result = result


class BatchAborted(PoolError):
    """The ``progress`` callback raised: the run stopped.  ``result`` holds what
    happened until then (batches not started are in ``skipped``); the
    callback's exception is the ``__cause__``."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__(f"batch run aborted by its progress callback: {result}")
        self.result = result


def chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` consecutive items (the last may be shorter), read lazily."""
    _validate.integer("batch_size", size, minimum=1)
    it = iter(iterable)
    while True:
        batch = list(itertools.islice(it, size))
        if not batch:
            return
        yield batch


def _items(batch: Any) -> int:
    return len(batch) if isinstance(batch, Sized) else 1


class _Call:
    """``fn`` with the idempotency the caller declared (``pool.run`` reads ``.idempotent``)."""

    __slots__ = ("fn", "idempotent", "__name__")

    def __init__(self, fn: Callable[..., Any], idempotent: bool) -> None:
        self.fn = fn
        self.idempotent = idempotent
        self.__name__ = getattr(fn, "__name__", "batch")

    @classmethod
    def of(cls, fn: Callable[..., Any], idempotent: bool | None) -> _Call:
        """``fn`` with ``idempotent``, or with its own ``idempotent`` mark when None."""
        if idempotent is None:
            idempotent = bool(getattr(fn, "idempotent", False))
        return cls(fn, idempotent)

    def __call__(self, conn: Any, batch: Any) -> Any:
        return self.fn(conn, batch)


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def run_batches(pool: Any, fn: Callable[[Any, Any], Any], batches: Iterable[Any], *,
                batch_size: int | None = None, threads: int | None = None,
                executor: cf.Executor | None = None,
                progress: Callable[[BatchProgress], Any] | None = None,
                retry: Any = None, idempotent: bool | None = None,
                max_failures: int | None = None) -> BatchResult:
    """Run ``fn(conn, batch)`` for every batch, on threads, each call holding a lease.

    pool
        A :class:`~aperturedb_pool.ConnectionPool`.
    fn
        Called as ``fn(conn, batch)`` with a leased connector; its return value
        (when not None) is kept in ``result.results``.  Raise to mark the batch
        failed (e.g. when the response reports a failed transaction).
    batches
        An iterable of batches; with ``batch_size``, an iterable of items cut
        into lists of that size (see :func:`chunks`).
    threads
        Batches running at once.  Default: the executor's ``max_workers`` when
        one is given, else the pool's ``max_size``.
    executor
        Run on this ``ThreadPoolExecutor`` instead of a private one.
    progress
        Called with a :class:`BatchProgress` after every finished batch, in the
        calling thread.  If it raises, no further batch is started, the running
        ones are waited for, and :class:`BatchAborted` is raised.
    retry
        A :class:`~aperturedb_pool.RetryPolicy` for each batch (default: the
        pool's).
    idempotent
        Declare ``fn`` safe to run twice (so unknown outcomes are retried);
        default: ``fn``'s own ``idempotent`` attribute (``@retry.idempotent``).
    max_failures
        Stop after more than this many failed batches: the batches not yet
        started are listed in ``result.skipped``.  Default: never stop.

    Returns a :class:`BatchResult`; never raises for a failed batch
    (``result.raise_for_failures()`` does).
    """
    if isinstance(executor, cf.ProcessPoolExecutor):
        raise TypeError("executor: batches share the pool's connectors, which cannot cross "
                        "processes; pass a ThreadPoolExecutor")
    _check_run_options(threads=threads, max_failures=max_failures, batch_size=batch_size)
    call = _Call.of(fn, idempotent)

    def task(batch: Any) -> Any:
        return _run_one_batch(pool, call, batch, retry)

    own = executor is None
    if executor is None:
        workers = threads or pool.max_size
        executor = cf.ThreadPoolExecutor(max_workers=workers,
                                         thread_name_prefix="aperturedb-batch")
        window = workers
    else:
        window = threads or getattr(executor, "_max_workers", None) or pool.max_size
    run = executor.submit
    clean_exit = False
    try:
        result = _drive_batches(lambda batch: run(task, batch), batches,
                               batch_size=batch_size, window=window, progress=progress,
                               max_failures=max_failures, cancel_queued=True)
        clean_exit = True
    except BatchAborted:
        clean_exit = True
        raise
    finally:
        if own:
            executor.shutdown(wait=clean_exit, cancel_futures=not clean_exit)
    return result


def _check_run_options(*, threads: int | None, max_failures: int | None,
                       batch_size: int | None, threads_name: str = "threads") -> None:
    _validate.integer(threads_name, threads, minimum=1, optional=True)
    _validate.integer("max_failures", max_failures, minimum=0, optional=True)
    _validate.integer("batch_size", batch_size, minimum=1, optional=True)


def _run_one_batch(pool: Any, call: _Call, batch: Any, retry: Any) -> Any:
    """One batch: ``call(conn, batch)`` through ``pool.run`` under the retry policy.

    Returns what the call returned, or a :class:`_Failed` holding the exception
    (a failed batch is reported in the result, never raised).  Where the batch
    runs (a thread of this process, a Dask worker) is the caller's business.
    """
    try:
        return pool.run(call, batch, retry=retry)
    except Exception as e:  # reported in the result, never lost
        return _Failed(e)


def _drive_batches(submit: Callable[[Any], cf.Future[Any]], batches: Iterable[Any], *,
                  batch_size: int | None, window: int,
                  progress: Callable[[BatchProgress], Any] | None,
                  max_failures: int | None, cancel_queued: bool,
                  lost: Callable[[BaseException], BaseException] | None = None
                  ) -> BatchResult:
    """The bookkeeping of a batch run, whatever runs the batches.

    ``submit(batch)`` starts one batch and returns a future of what
    :func:`_run_one_batch` returned.  At most ``window`` batches are in flight;
    the input is read lazily.  Every batch ends in exactly one of
    ``acknowledged``, ``failed`` or ``skipped``.  When the run stops
    (``max_failures``, or ``progress`` raised), batches not yet submitted are
    skipped; with ``cancel_queued`` the submitted ones whose future can still be
    cancelled are skipped too (a ``ThreadPoolExecutor`` cancels only batches
    that never started; an executor whose futures can be cancelled while their
    batch runs, like Dask's, must pass False: its submitted batches finish).
    ``lost`` turns an exception raised by the executor itself (not by the
    batch, which :func:`_run_one_batch` catches) into the batch's error.
    """
    total: int | None = None
    if isinstance(batches, Sized):
        n = len(batches)
        total = n if batch_size is None else -(-n // batch_size)
    source: Iterable[Any] = batches if batch_size is None else chunks(batches, batch_size)

    result = BatchResult()
    started = time.monotonic()
    pending: dict[cf.Future[Any], tuple[int, Any]] = {}
    numbered = enumerate(source)
    stopping = False
    abort: BaseException | None = None
    done_count = 0
    clean_exit = False
    try:
        while True:
            while not stopping and len(pending) < window:
                nxt = next(numbered, None)
                if nxt is None:
                    break
                pending[submit(nxt[1])] = nxt
            if not pending:
                break
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: pending[f][0]):
                index, batch = pending.pop(fut)
                if fut.cancelled():
                    result.skipped.append((index, batch))
                    continue
                exc = fut.exception()
                if exc is not None:
                    value: Any = _Failed(exc if lost is None else lost(exc))
                else:
                    value = fut.result()
                error: BaseException | None = None
                if isinstance(value, _Failed):
                    error = value.error
                    result.failed.append(BatchFailure(index, batch, error))
                else:
                    result.acknowledged.append(index)
                    result.items_acknowledged += _items(batch)
                    if value is not None:
                        result.results[index] = value
                done_count += 1
                if (error is not None and max_failures is not None and
                        len(result.failed) > max_failures):
                    stopping = True
                if progress is not None and abort is None:
                    try:
                        progress(BatchProgress(
                            done=done_count, acknowledged=len(result.acknowledged),
                            failed=len(result.failed),
                            items_acknowledged=result.items_acknowledged, total=total,
                            elapsed=time.monotonic() - started, index=index, error=error))
                    except Exception as e:
                        abort = e
                        stopping = True
            if stopping and cancel_queued:
                # Batches submitted but not started are skipped; running ones finish.
                for fut in list(pending):
                    if fut.cancel():
                        result.skipped.append(pending.pop(fut))
        if stopping:
            # Batches never read from the input are skipped too (when it is finite
            # and already in memory; a generator is left where it stopped).
            if isinstance(batches, Sized):
                result.skipped.extend(numbered)
        clean_exit = True
    finally:
        if not clean_exit:
            for fut in pending:
                fut.cancel()
    result.acknowledged.sort()
    result.failed.sort(key=lambda f: f.index)
    result.skipped.sort(key=lambda p: p[0])
    result.elapsed = time.monotonic() - started
    if abort is not None:
        raise BatchAborted(result) from abort
    return result
