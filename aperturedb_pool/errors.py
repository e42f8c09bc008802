"""The exceptions the pool raises.

Every error the pool raises on its own account derives from :class:`PoolError`,
so ``except PoolError`` catches all of them.  Errors that mean "waited too long"
also derive from the built-in :class:`TimeoutError`, so code written for the
SDK's own pool (which raises ``TimeoutError``) keeps working.
"""

from __future__ import annotations

from typing import Any, Sequence


class PoolError(Exception):
    """Base class of every error raised by aperturedb-pool."""


class PoolClosed(PoolError):
    """The pool was closed: no lease can be granted any more."""


class PoolTimeout(PoolError, TimeoutError):
    """No connector became available before the caller's deadline."""


class TooManyWaiters(PoolError):
    """More callers are already waiting than the pool's ``max_waiting`` allows."""


class LeaseError(PoolError, RuntimeError):
    """A lease was used wrongly: released twice, used after release, or from
    another thread while the pool's ownership check is on."""


class ConnectorError(PoolError):
    """A transport failure of one connector.

    ``query`` is the query that was being sent (None when the failure happened
    while opening the connector), ``attempts`` the list of earlier failures
    when a retry policy gave up (oldest first).
    """

    #: True when the request may have reached the server (its outcome is unknown).
    maybe_executed = False
    #: True when retrying cannot help (bad credentials, certificate, protocol):
    #: no retry policy retries such an error.
    permanent = False
    #: True when the failure shows the server closed the connection (EOF,
    #: reset): the pool then retires every connector opened before it.
    peer_closed = False

    def __init__(self, message: str, *, query: Any = None,
                 attempts: Sequence[BaseException] = (), permanent: bool | None = None) -> None:
        super().__init__(message)
        self.query = query
        self.attempts = list(attempts)
        if permanent is not None:
            self.permanent = permanent


class ConnectFailed(ConnectorError):
    """Opening the connection failed (refused, timed out, hello or TLS failed).

    Nothing reached the server, so retrying on a fresh connector is always safe.
    """


class OutcomeUnknown(ConnectorError):
    """The request was sent but no complete response was read.

    The server may or may not have executed the query.  The pool re-sends such
    a query only when it is idempotent (every command a read, or the caller
    said ``idempotent=True``).  ``query`` carries the query so the caller can
    check the database and decide.
    """

    maybe_executed = True


class QueryTimeout(OutcomeUnknown, TimeoutError):
    """No response arrived within the per-query timeout.  The outcome is unknown."""


class ConnectorUnusable(LeaseError):
    """A leased connector refused to send a query: an earlier query on it failed or
    was interrupted before its answer was read, and that answer could be read as
    the new query's.  The new query was not sent.  End the lease (the connector
    is discarded) and lease another connector.  ``query`` is the query refused."""

    def __init__(self, message: str, *, query: Any = None) -> None:
        super().__init__(message)
        self.query = query


class ServerUnreachable(PoolError, TimeoutError):
    """The pool could not reach the server before the caller's deadline."""

    def __init__(self, message: str, *, attempts: Sequence[BaseException] = ()) -> None:
        super().__init__(message)
        self.attempts = list(attempts)


__all__ = [
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "TooManyWaiters",
    "LeaseError",
    "ConnectorUnusable",
    "ConnectorError",
    "ConnectFailed",
    "OutcomeUnknown",
    "QueryTimeout",
    "ServerUnreachable",
]
