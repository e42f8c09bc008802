"""Fork handling: a forked child's pools start over without touching the parent's connectors.

Only the forking thread exists in the child.  Every lock of a pool may have
been held by a thread that no longer exists, and the inherited connectors
belong to the parent (writing to them, shutting them down or even closing
them there would break the parent's sessions).  So an at-fork hook resets
every live pool (``register``): new locks, an empty state, a new generation
(slots leased before the fork and returned in the child are "foreign" and
closed without being counted), the inherited sockets detached and forgotten.
The background thread starts on first use in the child (starting threads
inside an at-fork hook is not safe).
"""

from __future__ import annotations

import os
import threading
import weakref
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable

from aperturedb_pool._lease import _ThreadMarks
from aperturedb_pool._maintenance import _Wakeup
from aperturedb_pool.health import socket_of

if TYPE_CHECKING:
    from aperturedb_pool.pool import ConnectionPool

# Every live pool, so a forked child can reset them.
_all_pools: weakref.WeakSet[ConnectionPool[Any]] = weakref.WeakSet()
# Connectors whose socket could not be detached: kept alive forever rather
# than risk a close that would reach the parent's server connection.
_graveyard: list[Any] = []


def register(pool: ConnectionPool[Any]) -> None:
    """Reset ``pool`` in a forked child."""
    _all_pools.add(pool)


def reset_in_child(pool: ConnectionPool[Any]) -> None:
    """Start ``pool`` over in a forked child (see the module doc)."""
    old = list(pool._all)
    pool._lock = threading.Lock()
    pool._bg_wakeup = _Wakeup()
    pool._bg_thread = None
    pool._tls = _ThreadMarks()
    was_open, was_closed = pool._opened, pool._closed
    generation = pool._generation
    pool._init_state()
    # Slots leased before the fork and returned in the child are foreign.
    pool._generation = generation + 1
    _forget_without_closing(s.conn for s in old)
    shared = getattr(pool._template, "shared_data", None)
    if shared is not None:
        # The SDK's shared session lock may be held by a parent thread.
        pool._shared_data_override = SimpleNamespace(
            session=getattr(shared, "session", None), lock=threading.Lock())
    pool._closed = was_closed
    pool._fast = pool._plain and not was_closed
    if was_open and not was_closed:
        pool._opened = True
        pool._opening = pool._open_requests = pool.min_size
        # The background thread starts on first use.


def _forget_without_closing(conns: Iterable[Any]) -> None:
    # Detach the inherited sockets (the parent still uses them) so that
    # garbage collection can never close, shut down or write to them, then
    # drop our references.
    for conn in conns:
        sock = socket_of(conn)
        if sock is not None:
            try:
                # Closing the child's copy of the descriptor sends nothing to
                # the server (the parent still holds the socket); keeping it
                # would hold the server connection open after the parent
                # closed it.
                os.close(sock.detach())
            except Exception:
                _graveyard.append(conn)
                continue
            conn.conn = None
            conn.connected = False


def _after_fork_in_child() -> None:
    for pool in list(_all_pools):
        try:
            pool._after_fork_in_child()
        except Exception:  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
