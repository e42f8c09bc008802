"""Beyond one machine: one pool per Dask worker, one connection budget for the cluster.

::

    from dask.distributed import Client, LocalCluster
    from aperturedb_pool.dask import PoolPlugin, get_pool, run_batches_on_dask

    client = Client(LocalCluster(n_workers=2, threads_per_worker=4))
    client.register_plugin(PoolPlugin(host="db.example.com", user="admin",
                                      password="...", max_connections=16))

    def count(cls):                       # runs in a worker
        response, _ = get_pool().query(
            [{"FindEntity": {"with_class": cls, "results": {"count": True}}}])
        return response[0]["FindEntity"]["count"]

    counts = client.gather(client.map(count, ["Person", "Image"]))
    result = run_batches_on_dask(client, load, people, batch_size=100)

:class:`PoolPlugin` is a ``distributed.WorkerPlugin``.  It carries
configuration only (connection settings, credentials, pool options), never a
connector or a socket: Dask pickles it to the scheduler, which hands it to
every worker, those running now and those that join later.  Its ``setup``
opens one :class:`~aperturedb_pool.ConnectionPool` in the worker process and
its ``teardown`` (the worker closing, or the plugin removed or registered
again) closes it.  :func:`get_pool` returns that pool to the worker's tasks.

Each worker builds its own SDK ``Connector`` from the credentials, so its pool
authenticates once (its connectors are clones sharing one session) and logs
in again by itself when its session and refresh tokens have expired.  The
password, token or key is held in a wrapper whose ``repr`` is ``'***'`` and is
never logged; it does travel inside the pickled plugin (over Dask's
connections, to the scheduler and the workers), as any credential a worker
uses must: on a network you do not trust, run Dask with TLS
(``distributed.security.Security``).

The connection budget (``max_connections``)
-------------------------------------------
Each worker's ``max_size`` is its share of ``max_connections``, computed at
its ``setup`` from the workers the scheduler knows then (and the worker
itself): connections are dealt one at a time to the workers in address order,
a worker never getting more than its thread count (a task holds at most one
connection, so more would never be used); what a worker cannot use goes to the
others.  Every worker computes the same split from the same list, so the
shares add up to at most the budget.  With fewer connections than workers,
the last workers in address order get none, and ``get_pool()`` there raises
:class:`WorkerHasNoPool` (raise the budget or use fewer workers).  Without
``max_connections`` each worker's ``max_size`` is its thread count.

What happens as workers come and go: a worker that joins later computes its
share at its own setup, from the workers known then; the workers already
running keep the share they computed (a pool does not shrink under its
tasks), so until they are set up again the cluster may hold more than the
budget: at most the shares computed before plus the newcomer's.  A worker
that leaves frees its connections, which the others do not take up.
Registering the plugin again (``client.register_plugin(plugin)``) sets every
worker up again: each closes its pool and opens one with its share of the
current list (batches in flight finish on the old pool's connectors; a retry
that needs a new lease after the old pool closed fails with ``PoolClosed``).
For a cluster whose size changes (adaptive scaling), re-register after it
settles, or size the budget for the largest cluster.

:func:`run_batches_on_dask` is :func:`aperturedb_pool.batch.run_batches` with
Dask's workers in place of threads: the same per-batch call (through the
worker's pool, under its retry policy) and the same bookkeeping, shared code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import pickle
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from aperturedb_pool import _validate
from aperturedb_pool.batch import (
    BatchProgress,
    BatchResult,
    _Call,
    _check_run_options,
    _drive_batches,
    _Failed,
    _run_one_batch,
)
from aperturedb_pool.config import CONNECTION_KEYS, POOL_OPTION_KEYS, check_config, read_config
from aperturedb_pool.errors import OutcomeUnknown, PoolError

if TYPE_CHECKING:
    from distributed import Client, Worker

    from aperturedb_pool.pool import ConnectionPool

__all__ = ["PLUGIN_NAME", "BatchTaskLost", "PoolPlugin", "WorkerHasNoPool", "get_pool",
           "run_batches_on_dask"]

logger = logging.getLogger(__name__)

#: The name a :class:`PoolPlugin` is registered under unless given ``plugin_name``.
PLUGIN_NAME = "aperturedb-pool"

_SECRET_KEYS = ("PASSWORD", "TOKEN", "KEY")
# Pool option keyword -> configuration key (config.POOL_OPTION_KEYS the other way).
_OPTION_KEY = {kw: key for key, kw in POOL_OPTION_KEYS.items()}
# Configuration key -> the PoolPlugin parameter that sets it, for error messages.
_PARAM = {**{k: k.lower() for k in CONNECTION_KEYS}, "KEY": "key",
          **{key: kw for key, kw in POOL_OPTION_KEYS.items()}}


class WorkerHasNoPool(PoolError):
    """This worker has no pool: its share of ``max_connections`` is zero, or the
    plugin is not set up on it (yet: being registered again; or any more)."""


class _Secret:
    """A credential that never shows: ``repr``/``str`` are ``'***'``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


def _split_budget(budget: int, nthreads: Mapping[str, int]) -> dict[str, int]:
    """Each worker's share of ``budget`` connections (see the module docstring).

    Dealt one at a time in address order, never more than a worker's threads;
    the result depends only on the arguments, so every worker computes the same.
    """
    shares = dict.fromkeys(nthreads, 0)
    order = sorted(nthreads)
    left = budget
    while left > 0:
        dealt = False
        for addr in order:
            if left == 0:
                break
            if shares[addr] < nthreads[addr]:
                shares[addr] += 1
                left -= 1
                dealt = True
        if not dealt:  # every worker has one connection per thread
            break
    return shares


class PoolPlugin(WorkerPlugin):
    """A ``distributed.WorkerPlugin`` giving each Dask worker one connection pool.

    Connection, as the SDK's ``Connector`` takes it: ``host``, ``port``,
    ``user`` and ``password`` (or ``token``), ``use_ssl``, ``ca_cert`` (a path
    on the workers), ``verify_hostname``; or ``key``, an ApertureDB key (what
    ``APERTUREDB_KEY`` holds), instead of all of them.  Credentials are
    required: every worker authenticates by itself.

    ``max_connections``: the cluster's budget of server connections, split
    among the workers (module docstring); None: each worker's ``max_size`` is
    its thread count.  ``min_size`` (default 1) is capped at the worker's
    share.  Other keywords are :class:`~aperturedb_pool.ConnectionPool` options
    (``timeout``, ``retry``, ``query_timeout``, ``max_lifetime``, ...);
    ``max_size`` is not one of them (it is the worker's share).  The pool is
    named ``name`` (default: the plugin's name) plus the worker's address.

    ``plugin_name``: the name the plugin is registered under (default
    ``"aperturedb-pool"``); give each plugin of a cluster its own, and pass
    the same to :func:`get_pool` and :func:`run_batches_on_dask`.

    Arguments are checked here, in the client, with errors naming the
    parameter; nothing connects until a worker sets the plugin up.
    """

    idempotent = False  # registering again replaces (and rebalances) every worker's pool

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 user: str | None = None, password: str | None = None,
                 token: str | None = None, key: str | None = None,
                 use_ssl: bool | None = None, ca_cert: str | None = None,
                 verify_hostname: bool | None = None,
                 max_connections: int | None = None, min_size: int = 1,
                 plugin_name: str = PLUGIN_NAME, **pool_options: Any) -> None:
        # max_connections: the cluster's budget of connections.
        _validate.integer("max_connections", max_connections, minimum=1, optional=True)
        _validate.integer("min_size", min_size, minimum=0)
        if not isinstance(plugin_name, str) or not plugin_name:
            raise ValueError(f"plugin_name must be a non-empty string, got {plugin_name!r}")
        if "max_size" in pool_options:
            raise TypeError("max_size: each worker's max_size is its share of "
                            "max_connections (or its thread count); pass max_connections")
        unknown = sorted(set(pool_options) - set(_OPTION_KEY))
        if unknown:
            raise TypeError(f"PoolPlugin got unknown option(s) {', '.join(unknown)}; "
                            f"pool options are {', '.join(sorted(_OPTION_KEY))}")
        if key is None and not user and not token:
            raise ValueError("PoolPlugin needs credentials, which travel to every worker: "
                             "user= and password=, token=, or key= (an APERTUREDB_KEY)")
        source: dict[str, Any] = {}
        connection = dict(host=host, port=port, user=user, password=password, token=token,
                          use_ssl=use_ssl, ca_cert=ca_cert, verify_hostname=verify_hostname)
        for param, value in connection.items():
            if value is not None:
                source[param.upper()] = value
        if key is not None:
            source["KEY"] = key
        for kw, value in pool_options.items():
            source[_OPTION_KEY[kw]] = value
        # The configuration rules of the Flask and Django integrations, checked
        # here once.  CA_CERT names a file on the workers, so its absence here
        # (E005) is not an error.
        errors = [p for p in check_config(source)
                  if p.level == "error" and p.id != "E005"]
        if errors:
            raise ValueError("PoolPlugin: " + "; ".join(
                f"{_PARAM.get(p.key, p.key)}: {p.message}" + (f" ({p.hint})" if p.hint else "")
                for p in errors))
        self.name = plugin_name
        self.max_connections = max_connections
        self.min_size = min_size
        self._source = {k: _Secret(v) if k in _SECRET_KEYS and isinstance(v, str) else v
                        for k, v in source.items()}
        # Set in the worker only (never pickled, see __getstate__): this
        # worker's pool, or why it has none.  Written by setup/teardown on the
        # worker's event loop; tasks read them (one attribute read each).
        self._pool: ConnectionPool | None = None
        self._no_pool: str = "the plugin is not set up on this worker"

    # -- what travels --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None  # configuration only, never a pool or a connector
        state["_no_pool"] = "the plugin is not set up on this worker"
        return state

    def __repr__(self) -> str:
        where = ("key=***" if "KEY" in self._source else
                 f"{self._source.get('HOST', 'localhost')}:{self._source.get('PORT', 55555)}")
        user = self._source.get("USER")
        return (f"PoolPlugin({self.name!r}, {where}" + (f", user={user!r}" if user else "") +
                f", max_connections={self.max_connections})")

    __str__ = __repr__

    def _revealed(self) -> dict[str, Any]:
        return {k: v.reveal() if isinstance(v, _Secret) else v for k, v in self._source.items()}

    # -- in the worker -------------------------------------------------------
    async def setup(self, worker: Worker) -> None:
        nthreads = worker.state.nthreads
        if self.max_connections is None:
            size = nthreads
            known = None
        else:
            known = dict(await worker.scheduler.ncores())
            known[worker.address] = nthreads
            size = _split_budget(self.max_connections, known)[worker.address]
        if size == 0:
            self._no_pool = (f"worker {worker.address} has no share of max_connections="
                             f"{self.max_connections} among {len(known or ())} workers "
                             f"(one connection at least per worker with a pool): raise "
                             f"max_connections or run fewer workers")
            logger.warning("aperturedb-pool %r: %s", self.name, self._no_pool)
            return
        # Building the template imports the SDK (slow: not on the event loop).
        self._pool = await asyncio.to_thread(self._open_pool, size, worker.address)
        logger.info("aperturedb-pool %r: pool of max_size %d opened on %s (%d threads%s)",
                    self.name, size, worker.address, nthreads,
                    "" if known is None else f", budget {self.max_connections} among "
                                             f"{len(known)} workers")

    def _open_pool(self, size: int, address: str) -> ConnectionPool:
        source = self._revealed()
        name = source.pop("POOL_NAME", None) or self.name
        pool: ConnectionPool = read_config(source).make_pool(
            max_size=size, min_size=min(self.min_size, size), name=f"{name}@{address}")
        return pool

    async def teardown(self, worker: Worker) -> None:
        pool, self._pool = self._pool, None
        self._no_pool = "the plugin was torn down on this worker"
        if pool is not None:
            # Idle connectors close now, leased ones when their task returns them.
            await asyncio.to_thread(pool.close)

    @property
    def pool(self) -> ConnectionPool:
        """This worker's pool (:class:`WorkerHasNoPool` when it has none)."""
        pool = self._pool
        if pool is None:
            raise WorkerHasNoPool(f"aperturedb-pool {self.name!r}: {self._no_pool}")
        return pool


def get_pool(name: str = PLUGIN_NAME) -> ConnectionPool:
    """The pool of the worker running the calling task (opened by :class:`PoolPlugin`).

    ``name``: the plugin's ``plugin_name``.  Raises ``RuntimeError`` outside a
    Dask worker, ``LookupError`` when no such plugin is registered there, and
    :class:`WorkerHasNoPool` when the worker got no share of the budget (or the
    plugin is being set up again there).
    """
    try:
        worker = get_worker()
    except ValueError:
        raise RuntimeError("get_pool() is called in a task running on a Dask worker; "
                           "this thread is not one") from None
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, PoolPlugin):
        raise LookupError(f"no PoolPlugin named {name!r} on worker {worker.address}: call "
                          f"client.register_plugin(PoolPlugin(...)) first (registered: "
                          f"{sorted(worker.plugins)})")
    return plugin.pool


class BatchTaskLost(OutcomeUnknown):
    """The Dask task of a batch failed outside the batch's own call (its worker
    died, its result could not be sent back): the batch may have run."""


class _BatchTask:
    """What each Dask task runs: one batch through the worker's pool.

    Picklable: the batch function, its idempotency, the retry policy and the
    plugin's name; the pool is found in the worker.
    """

    __slots__ = ("call", "retry", "plugin_name")

    def __init__(self, call: _Call, retry: Any, plugin_name: str) -> None:
        self.call = call
        self.retry = retry
        self.plugin_name = plugin_name

    def __call__(self, batch: Any) -> Any:
        try:
            pool = get_pool(self.plugin_name)
        except Exception as e:  # nothing was sent: a failed batch
            return _Failed(e)
        out = _run_one_batch(pool, self.call, batch, self.retry)
        # What a task returns must be pickled back to the client, and a value that
        # cannot be leaves the client waiting for ever (Dask does not fail the
        # task): check here, where the batch's outcome is still known.
        if isinstance(out, _Failed):
            if _cannot_travel(out.error) is not None:  # keep its class name and text
                err = out.error
                portable = (BatchTaskLost if getattr(err, "maybe_executed", False)
                            else RuntimeError)(f"{type(err).__module__}.{type(err).__name__}: "
                                               f"{err}")
                out = _Failed(portable)
        elif out is not None:
            why = _cannot_travel(out)
            if why is not None:
                out = _Failed(BatchTaskLost(
                    f"the batch ran, but what {self.call.__name__} returned cannot be pickled "
                    f"back to the client ({type(why).__name__}: {why}); return a picklable "
                    f"value (or None)"))
        return out


def _cannot_travel(value: Any) -> BaseException | None:
    """Why ``value`` cannot be sent back to the client (None: it can)."""
    try:
        pickle.dumps(value)
        return None
    except Exception:
        pass
    try:  # what Dask falls back to
        cloudpickle.dumps(value)
        return None
    except Exception as e:
        return e


def _lost(exc: BaseException) -> BaseException:
    lost = BatchTaskLost(f"the Dask task of this batch failed outside the batch function "
                         f"({type(exc).__name__}: {exc}); the batch may have run")
    lost.__cause__ = exc
    return lost


def run_batches_on_dask(client: Client, fn: Callable[[Any, Any], Any],
                        batches: Iterable[Any], *, batch_size: int | None = None,
                        in_flight: int | None = None,
                        progress: Callable[[BatchProgress], Any] | None = None,
                        retry: Any = None, idempotent: bool | None = None,
                        max_failures: int | None = None,
                        plugin_name: str = PLUGIN_NAME) -> BatchResult:
    """Run ``fn(conn, batch)`` for every batch on the cluster's workers.

    The contract of :func:`aperturedb_pool.batch.run_batches`: each batch is a
    Dask task that calls ``fn`` with a connector leased from its worker's
    pool (:class:`PoolPlugin`, registered under ``plugin_name``), under the
    pool's retry policy (or ``retry``); a batch whose outcome is unknown is
    re-sent only when ``fn`` is declared idempotent (``idempotent=True`` or
    ``@aperturedb_pool.retry.idempotent``).  Every batch ends in
    ``acknowledged``, ``failed`` or ``skipped`` of the returned
    :class:`~aperturedb_pool.batch.BatchResult`; ``unfinished_batches()``
    lists what to retry.  ``fn`` and the batches are pickled to the workers,
    and ``fn``'s return values (kept in ``result.results`` when not None)
    back: a value that cannot be pickled fails its batch with
    :class:`BatchTaskLost` (the batch ran), an exception that cannot be
    pickled arrives as a ``RuntimeError`` naming its class.

    ``in_flight``: batches submitted at once (default: twice the cluster's
    threads, so no worker waits for the scheduler); the input is read
    lazily.  ``progress`` is called in the calling thread after each
    finished batch.  When the run stops (``max_failures``, or ``progress``
    raised), the batches already submitted finish (a Dask task cannot be
    recalled once a worker may have started it) and the rest are skipped.

    A batch whose task failed outside ``fn`` (its worker died: Dask reports
    ``KilledWorker``) fails with :class:`BatchTaskLost`, an ``OutcomeUnknown``.
    Note that Dask itself re-runs the tasks of a worker that died (up to the
    scheduler's ``distributed.scheduler.allowed-failures``): a batch running
    on a dying worker can then run twice.  Writes that must never run twice
    should be idempotent (``if_not_found``) on a cluster whose workers can die,
    or that setting 0.
    """
    _check_run_options(threads=in_flight, max_failures=max_failures, batch_size=batch_size,
                       threads_name="in_flight")
    if not isinstance(plugin_name, str) or not plugin_name:
        raise ValueError(f"plugin_name must be a non-empty string, got {plugin_name!r}")
    dask_client: Any = client  # (Client's methods are not annotated)
    if in_flight is None:
        threads = sum(dask_client.nthreads().values())
        in_flight = max(1, 2 * threads)
    task = _BatchTask(_Call.of(fn, idempotent), retry, plugin_name)
    # Dask's own concurrent.futures face; pure=False: two equal batches are two tasks.
    executor: cf.Executor = dask_client.get_executor(pure=False)
    return _drive_batches(lambda batch: executor.submit(task, batch), batches,
                          batch_size=batch_size, window=in_flight, progress=progress,
                          max_failures=max_failures, cancel_queued=False, lost=_lost)
