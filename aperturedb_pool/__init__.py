"""aperturedb-pool: a thread-safe connection pool for the ApertureDB Python SDK.

Importing this package is cheap and has no side effects: it never imports the
``aperturedb`` SDK (whose import makes a network call and may write a log file).
The SDK is imported only where a connector is built from configuration.
"""

from aperturedb_pool._version import __version__
from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
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
from aperturedb_pool.retry import RetryPolicy
from aperturedb_pool.stats import PoolStats

__all__ = [
    "__version__",
    "ConnectionPool",
    "Lease",
    "PoolStats",
    "RetryPolicy",
    "PoolError",
    "PoolClosed",
    "PoolTimeout",
    "TooManyWaiters",
    "LeaseError",
    "ConnectorError",
    "ConnectFailed",
    "OutcomeUnknown",
    "QueryTimeout",
    "ServerUnreachable",
]
