"""aperturedb-pool: a thread-safe connection pool for the ApertureDB Python SDK.

Importing this package is cheap and has no side effects: it never imports the
``aperturedb`` SDK (whose import makes a network call and may write a log file)
nor tenacity.  The SDK is imported only where a connector is built from
configuration; tenacity when a retry policy is first used.
"""

from typing import TYPE_CHECKING, Any

from aperturedb_pool._version import __version__
from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
    ConnectorUnusable,
    LeaseError,
    OutcomeUnknown,
    PoolClosed,
    PoolError,
    PoolTimeout,
    QueryTimeout,
    ServerUnreachable,
    TooManyWaiters,
)
from aperturedb_pool.pool import ConnectionPool, Lease
from aperturedb_pool.shared import PooledConnector
from aperturedb_pool.stats import PoolStats

if TYPE_CHECKING:
    from aperturedb_pool.retry import RetryPolicy


def __getattr__(name: str) -> Any:
    # RetryPolicy is built on tenacity, whose import pulls in asyncio (and
    # tornado when installed): ~40 ms, paid only when a policy is first used.
    if name == "RetryPolicy":
        from aperturedb_pool.retry import RetryPolicy

        return RetryPolicy
    raise AttributeError(f"module 'aperturedb_pool' has no attribute {name!r}")

__all__ = [
    "__version__",
    "ConnectionPool",
    "Lease",
    "PooledConnector",
    "PoolStats",
    "RetryPolicy",
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "TooManyWaiters",
    "LeaseError",
    "ConnectorError",
    "ConnectorUnusable",
    "ConnectFailed",
    "OutcomeUnknown",
    "QueryTimeout",
    "ServerUnreachable",
]
