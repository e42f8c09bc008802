"""A drop-in for the SDK's ``aperturedb.ConnectionPool.ConnectionPool``.

Switching is an import change::

    # from aperturedb.ConnectionPool import ConnectionPool
    from aperturedb_pool.compat import ConnectionPool

    pool = ConnectionPool(pool_size=10, connection_factory=create_connector)
    with pool.get_connection(timeout=5) as conn:
        conn.query(q)

Same constructor and methods as the SDK's pool (``get_connection(timeout)``,
``query(q, blobs)``, ``available()``, ``total()``, ``close()``), without its
flaws: connectors are clones sharing one session (one authentication, not
``pool_size``), a connector whose query was interrupted is discarded instead of
going back into the queue, waiters are served fairly, ``close()`` really
closes (a later ``get_connection`` raises ``PoolClosed``), and ``query()`` runs
under the retry policy (reads retried safely, writes never re-sent).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from aperturedb_pool import _validate
from aperturedb_pool.connectors import default_template
from aperturedb_pool.pool import ConnectionPool as _Pool

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """The SDK's pool interface on top of :class:`aperturedb_pool.ConnectionPool`.

    Like the SDK's, it opens ``pool_size`` connectors at construction and raises
    ``ConnectionError`` if it cannot.  ``connection_factory`` is called once,
    for the template that the pool clones; a factory whose connectors cannot be
    cloned is called for each connector instead.  Extra keyword arguments go to
    :class:`aperturedb_pool.ConnectionPool` (``timeout``, ``max_lifetime``, ...).
    """

    def __init__(self, pool_size: int = 10,
                 connection_factory: Callable[[], Any] | None = None,
                 **options: Any) -> None:
        _validate.integer("pool_size", pool_size, minimum=1)
        factory = connection_factory or default_template
        first = factory()
        if not first:
            raise ConnectionError("connection_factory returned no connection")
        options.setdefault("name", "compat")
        if callable(getattr(first, "clone", None)) or callable(
                getattr(first, "create_new_connection", None)):
            self._pool = _Pool(first, min_size=pool_size, max_size=pool_size, **options)
        else:
            self._pool = _Pool(connector_factory=factory, min_size=pool_size,
                               max_size=pool_size, **options)
            try:
                first.close()
            except Exception:  # noqa: S110 - an extra connector we do not need
                pass
        self._pool_size = pool_size
        try:
            self._pool.wait_ready()
        except Exception as e:
            self._pool.close()
            raise ConnectionError(
                f"Failed to initialize pool: expected {pool_size} connections, "
                f"got {self._pool.stats().size}: {e}") from e

    @property
    def pool(self) -> _Pool:
        """The underlying :class:`aperturedb_pool.ConnectionPool`."""
        return self._pool

    def available(self) -> int:
        """Connectors idle in the pool right now."""
        return self._pool.stats().idle

    def total(self) -> int:
        """The pool's size (``pool_size``)."""
        return self._pool_size

    @contextmanager
    def get_connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Lease a connector for the ``with`` block.

        Raises ``PoolTimeout`` (a ``TimeoutError``, as the SDK's pool raises)
        when none is free within ``timeout`` seconds (default: wait as long as
        the pool's ``timeout``).
        """
        with self._pool.lease(timeout=timeout) as conn:
            yield conn

    def query(self, query: Any, blobs: list[Any] | None = None) -> Any:
        """Run one query through the pool (under its retry policy)."""
        return self._pool.query(query, blobs)

    def close(self) -> None:
        """Close every connector; later ``get_connection`` calls raise ``PoolClosed``."""
        self._pool.close()

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
