"""PooledConnector: one connector object every thread may share.

The SDK's helpers (``ParallelLoader``, ``ParallelQuery``, ``Utils``,
``CommonLibrary.execute_query``) take a ``Connector`` and manage connections
themselves: each worker thread clones it, and with more threads than the
server accepts they freeze (the SDK's issue #212).  ``pool.connector()``
returns a ``PooledConnector`` instead: it looks like an SDK ``Connector`` to
those helpers, but owns no socket.  Each ``query()`` leases one of the pool's
connectors for exactly that query, so any number of helper threads share at
most ``max_size`` connections and wait their turn in the pool.

Retry policy (the decision, and why)
------------------------------------
``query()`` is ``pool.query()``: the pool's ``RetryPolicy``, not a plain
lease.  A plain lease would hand a transport failure straight to the helper,
and the helpers never retry (``ParallelQuery`` logs the batch and skips it),
so a read batch would be lost to a server restart that a retry would have
survived.  The policy is also the one place that decides what is safe: a read
(every command ``Find*``/``Get*``, or ``idempotent=True``) is retried after a
transport failure; a failed connect (nothing sent) is always retried; a write
whose request may have reached the server is never re-sent, and the caller
gets ``OutcomeUnknown`` (the helpers count it as a failed batch).  The pool's
connectors make a single attempt per query (the SDK's own loop, which re-sends
writes, is off for them), so nothing below this layer re-sends either.

Thread safety
-------------
A ``PooledConnector`` has no mutable shared state: its SDK attributes are set
once in the constructor and never written again, and everything a query
leaves behind (the last response, its blobs, its duration) lives in a
``threading.local``, so ``last_query_ok()``, ``get_last_response_str()``,
``print_last_response()``, ``get_last_query_time()``, ``get_response()`` and
``get_blobs()`` answer for the calling thread's last query through this
object.  A ``clone()`` has its own per-thread state, as an SDK clone has its
own last response.  Leasing, retrying and returning are the pool's (see the
"Locking" section of ``aperturedb_pool.pool``).

A query that raises leaves no stale answer: the thread's last response becomes
None, so ``last_query_ok()`` is False (the SDK would keep the previous,
possibly successful, response).

``close()`` closes nothing: the helpers close their clones when a worker ends,
and the connections belong to the pool, closed only by ``pool.close()``.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aperturedb_pool.pool import ConnectionPool

_monotonic = time.monotonic
_wall = time.time

# What the SDK's helpers (and users' code written for a Connector) read from a
# connector; copied from the pool's template, or from one of its connectors
# when the pool was built from a connector_factory.
_SDK_ATTRIBUTES = ("config", "host", "port", "use_ssl", "use_keepalive", "token",
                   "should_authenticate")

# The SDK's aperturedb.LoggingUtils.SENSITIVE_KEYS: values never printed.
_SENSITIVE_KEYS = frozenset({"refresh_token", "session_token", "token", "access_token"})

# Connector.check_status's answer when no status is found (an error, but not
# the server's).
_STATUS_NOT_FOUND = -2


class _LastQuery(threading.local):
    # One tuple per thread, replaced whole (one attribute write per query):
    # (response, blobs, last_response, started, ended, answered), the times
    # time.monotonic() values (the wall-clock time of the answer is derived
    # when asked for: one clock read less per query).  The class attribute is
    # each thread's default, what a fresh SDK Connector has.
    state: tuple[Any, Any, Any, float, float, bool] = (None, None, "", 0.0, 0.0, False)


class PooledConnector:
    """A connector every thread may share: each ``query()`` leases one of the pool's.

    Get one with ``pool.connector()`` and hand it to the SDK's helpers
    (``ParallelLoader(db)``, ``ParallelQuery(db)``, ``Utils(db)``,
    ``CommonLibrary.execute_query(db, ...)``) or to any number of threads.  See
    the module docstring for the retry policy and the per-thread state.
    """

    def __init__(self, pool: "ConnectionPool", _source: Any = None) -> None:
        self.pool = pool
        self._last = _LastQuery()
        if _source is None:
            _source = _attribute_source(pool)
        self._source = _source
        self.config = getattr(_source, "config", None)
        self.host = getattr(_source, "host", None)
        self.port = getattr(_source, "port", None)
        self.use_ssl = getattr(_source, "use_ssl", None)
        self.use_keepalive = getattr(_source, "use_keepalive", None)
        self.token = getattr(_source, "token", None)
        self.should_authenticate = getattr(_source, "should_authenticate", True)
        # The SDK's Connector keeps its socket here; a PooledConnector owns none.
        self.conn = None

    # -- what the SDK's Connector offers ----------------------------------------
    def query(self, q: Any, blobs: Any = None, *, idempotent: bool | None = None,
              timeout: float | None = None, retry: Any = None) -> Any:
        """Run ``q`` on a connector leased for this query alone: ``(response, blobs)``.

        Runs under the pool's retry policy (``pool.query``): reads are retried
        after a transport failure; a write whose outcome is unknown raises
        ``OutcomeUnknown`` and is never re-sent.  ``idempotent``, ``timeout`` and
        ``retry`` as on ``ConnectionPool.query``.  A failed transaction is an
        answer, returned as the SDK returns it (see ``last_query_ok()``).
        """
        started = _monotonic()
        # Everything else inside the try: an exception landing anywhere in it
        # (a signal handler's, between two statements, even after the answer
        # was recorded) records "no answer" before it propagates, so a query
        # that raised never leaves an earlier answer behind.
        try:
            pool = self.pool
            result: Any
            if timeout is None and retry is None:
                # pool.query's own path without its argument checks (none to
                # make): called positionally, one call less per query.
                result = pool._run_policy(pool.retry, None, q, [] if blobs is None else blobs,
                                          None, idempotent, None)
            else:
                result = pool.query(q, blobs, idempotent=idempotent, timeout=timeout,
                                    retry=retry)
            response, rblobs = result
            self._last.state = (response, rblobs, response, started, _monotonic(), True)
            return result
        except BaseException:
            self._last.state = (None, None, None, started, _monotonic(), False)
            raise

    def last_query_ok(self) -> bool:
        """Whether this thread's last query through this object succeeded (every status >= 0)."""
        return self.check_status(self._last.state[0]) >= 0

    def check_status(self, json_res: Any) -> int:
        """The first negative status in ``json_res``, or the first status if none is
        negative; -2 when there is none (the SDK's ``Connector.check_status``)."""
        if isinstance(json_res, dict):
            if "status" in json_res:
                status = json_res["status"]
                return status if isinstance(status, int) else _STATUS_NOT_FOUND
            values: Any = json_res.values()
        elif isinstance(json_res, (list, tuple)):
            values = json_res
        else:
            return _STATUS_NOT_FOUND
        status = _STATUS_NOT_FOUND
        for i, value in enumerate(values):
            st = self.check_status(value)
            if i == 0:
                status = st
            if st < 0:
                return st
        return status

    def get_response(self) -> Any:
        """This thread's last response through this object (None after a query raised)."""
        return self._last.state[0]

    def get_blobs(self) -> Any:
        """The blobs of this thread's last response through this object."""
        return self._last.state[1]

    @property
    def response(self) -> Any:
        return self._last.state[0]

    @property
    def blobs(self) -> Any:
        return self._last.state[1]

    @property
    def last_response(self) -> Any:
        return self._last.state[2]

    @property
    def last_query_time(self) -> float:
        state = self._last.state
        return state[4] - state[3]

    @property
    def last_query_timestamp(self) -> datetime | None:
        # A datetime only when asked for: datetime.now() per query costs more
        # than the rest of this object's bookkeeping.  The answer came
        # (now - ended) seconds ago, on the monotonic clock.
        state = self._last.state
        if not state[5]:
            return None
        return datetime.fromtimestamp(_wall() - (_monotonic() - state[4]))

    def get_last_response_str(self) -> str:
        """This thread's last response as indented JSON, tokens censored (as the SDK)."""
        return json.dumps(_censored(self._last.state[2]), indent=4, sort_keys=False)

    def print_last_response(self) -> None:
        print(self.get_last_response_str())

    def get_last_query_time(self) -> float:
        """Seconds this thread's last query through this object took, from the call
        to the answer: the wait for a connector and any retries included."""
        return self.last_query_time

    def clone(self) -> "PooledConnector":
        """Another PooledConnector of the same pool (no socket is opened)."""
        return PooledConnector(self.pool, self._source)

    def create_new_connection(self) -> "PooledConnector":
        """The name of ``clone()`` on SDKs before 0.4.33: the same."""
        return self.clone()

    def connect(self, details: str | None = None) -> None:
        """Wait until the pool has ``min_size`` connectors open (fails fast on a
        misconfiguration, as the SDK's ``connect()`` does)."""
        self.pool.wait_ready()

    def close(self) -> None:
        """Closes nothing: the connections are the pool's (``pool.close()``)."""

    @property
    def connected(self) -> bool:
        """True while the pool is open (its connectors connect as needed)."""
        return not self.pool.closed

    @property
    def authenticated(self) -> bool:
        return getattr(self.shared_data, "session", None) is not None

    @property
    def shared_data(self) -> Any:
        """The session the pool's connectors share (the template's, or after a fork
        the child's own)."""
        override = self.pool._shared_data_override
        if override is not None:
            return override
        return getattr(self._source, "shared_data", None)

    def __repr__(self) -> str:
        return (f"<PooledConnector of pool {self.pool.name!r} "
                f"({self.host}:{self.port})>")


def _attribute_source(pool: "ConnectionPool") -> Any:
    template = pool._template
    if template is not None:
        return template
    # Built from a connector_factory: read the attributes of one of its
    # connectors (leased for the copy, never queried).
    with pool.lease() as conn:
        snapshot = _Snapshot()
        for name in _SDK_ATTRIBUTES + ("shared_data",):
            if hasattr(conn, name):
                setattr(snapshot, name, getattr(conn, name))
        return snapshot


class _Snapshot:
    pass


def _censored(data: Any) -> Any:
    # A censored copy: the SDK's censor_tokens rewrites the response in place.
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(k, str) and k.lower() in _SENSITIVE_KEYS:
                out[k] = _censor_token(v)
            else:
                out[k] = _censored(v)
        return out
    if isinstance(data, (list, tuple)):
        return [_censored(v) for v in data]
    return data


def _censor_token(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    prefix, sep, token = v.partition("_")
    if not sep:
        prefix, token = "", v
    else:
        prefix += "_"
    if len(token) > 8:
        return prefix + token[:4] + "..." + token[-4:]
    return prefix + "..." if v else v


