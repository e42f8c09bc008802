"""An embedded ApertureDB-protocol server for tests and benchmarks.

The real ``aperturedb.Connector`` talks to it unmodified::

    from aperturedb_pool.testing import EmbeddedServer

    with EmbeddedServer() as server:
        client = server.connector()
        client.query([{"GetStatus": {}}])

``EmbeddedServer`` runs in a background thread of this process;
``ServerProcess`` runs the same server as a separate process (``python -m
aperturedb_pool serve``) and drives its faults over a control channel, which
``ServerControl`` can also attach to from any other process.

Importing this package is cheap: it imports neither the SDK nor ``trustme``
nor protobuf; each is imported when first needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmbeddedServer", "ServerProcess", "ServerControl"]

if TYPE_CHECKING:  # pragma: no cover
    from aperturedb_pool.testing.process import ServerControl, ServerProcess
    from aperturedb_pool.testing.server import EmbeddedServer


def __getattr__(name: str) -> Any:
    if name == "EmbeddedServer":
        from aperturedb_pool.testing.server import EmbeddedServer

        return EmbeddedServer
    if name in ("ServerProcess", "ServerControl"):
        from aperturedb_pool.testing import process

        return getattr(process, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
