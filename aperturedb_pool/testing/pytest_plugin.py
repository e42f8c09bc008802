"""pytest fixtures for testing ApertureDB applications without a server.

Registered through the ``pytest11`` entry point, so installing aperturedb-pool
makes these fixtures available in any test suite:

- ``adb_server``: a fresh, started ``EmbeddedServer`` (plain TCP) per test,
  stopped after it.
- ``adb_connector``: a real ``aperturedb.Connector`` pointed at ``adb_server``
  (clone it for other threads).
- ``adb_tls_server`` / ``adb_tls_connector``: the same with TLS, a generated CA
  and hostname verification.

This module imports nothing heavy when pytest loads it: the server, the SDK
and ``trustme`` are imported inside the fixtures.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

__all__ = ["adb_server", "adb_connector", "adb_tls_server", "adb_tls_connector"]


@pytest.fixture
def adb_server() -> Iterator[Any]:
    """A fresh embedded ApertureDB-protocol server (TCP, user/password admin/admin)."""
    from aperturedb_pool.testing.server import EmbeddedServer

    server = EmbeddedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def adb_connector(adb_server: Any) -> Iterator[Any]:
    """A real ``aperturedb.Connector`` for ``adb_server``; closed after the test."""
    conn = adb_server.connector(retry_interval_seconds=0.05)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def adb_tls_server() -> Iterator[Any]:
    """A fresh embedded server requiring TLS; ``.ca_path`` is its generated CA."""
    from aperturedb_pool.testing.server import EmbeddedServer

    server = EmbeddedServer(tls=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def adb_tls_connector(adb_tls_server: Any) -> Iterator[Any]:
    """A real ``aperturedb.Connector`` for ``adb_tls_server`` (verifies the hostname)."""
    conn = adb_tls_server.connector(retry_interval_seconds=0.05)
    try:
        yield conn
    finally:
        conn.close()
