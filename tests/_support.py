"""Helpers shared by the test modules (imported as ``_support``: pytest puts
this directory on ``sys.path``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def wait_until(pred: Callable[[], Any], what: str = "condition", *, timeout: float,
               poll: float = 0.002) -> Any:
    """Poll ``pred`` until it returns something true, and return that.

    Only for effects of the pool's background threads (opening, closing,
    pinging connectors), which have no event to wait on.  Each module binds
    its own ``timeout`` with ``functools.partial``.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


@contextmanager
def tls_server_naming(hostname: str, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A started TLS ``EmbeddedServer`` whose certificate names only ``hostname``
    (issued by a fresh CA), and the CA file's path.  Skips without trustme."""
    import pytest

    trustme = pytest.importorskip("trustme")
    from aperturedb_pool.testing import EmbeddedServer

    ca = trustme.CA()
    cert = ca.issue_cert(hostname)
    certfile, keyfile, cafile = (str(tmp_path / n) for n in ("c.pem", "k.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    ca.cert_pem.write_to_path(cafile)
    with EmbeddedServer(tls=True, certfile=certfile, keyfile=keyfile) as server:
        yield server, cafile


# The modules of the pool that read the clock as a module global ``_monotonic``
# (the lease hot path reads a global: no indirection to replace it by).
POOL_CLOCK_MODULES = ("aperturedb_pool.pool", "aperturedb_pool._lease",
                      "aperturedb_pool._maintenance")


def swap_pool_clock(clock: Callable[[], float]) -> Callable[[], None]:
    """Make the pool read ``clock`` for ``time.monotonic``; returns the undo."""
    import importlib

    mods = [importlib.import_module(m) for m in POOL_CLOCK_MODULES]
    saved = [m._monotonic for m in mods]  # type: ignore[attr-defined]
    for m in mods:
        m._monotonic = clock  # type: ignore[attr-defined]

    def undo() -> None:
        for m, old in zip(mods, saved, strict=True):
            m._monotonic = old  # type: ignore[attr-defined]

    return undo


def set_pool_clock(monkeypatch: Any, clock: Callable[[], float]) -> None:
    """``swap_pool_clock`` undone by pytest's ``monkeypatch`` at the test's end."""
    for name in POOL_CLOCK_MODULES:
        monkeypatch.setattr(f"{name}._monotonic", clock)
