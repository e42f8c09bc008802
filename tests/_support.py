"""Helpers shared by the test modules (imported as ``_support``: pytest puts
this directory on ``sys.path``)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from aperturedb_pool.errors import ConnectFailed
from aperturedb_pool.testing._standin import StandIn

if TYPE_CHECKING:
    from aperturedb_pool import ConnectionPool

JOIN = 10.0  # seconds: upper bound of every join / wait of the pool's unit tests


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


# -- the pool's unit tests (stand-in connectors; fixtures in conftest.py) -----


class ShiftedClock:
    """time.monotonic() plus an offset that tests advance to make time pass."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FrozenClock(ShiftedClock):
    """A clock that moves only when a test advances it (real time does not
    count): for margins that a loaded machine's stalls must not eat."""

    def __init__(self) -> None:
        super().__init__()
        self.base = time.monotonic()

    def __call__(self) -> float:
        return self.base + self.offset


class Flaky(StandIn):
    """clone() fails while ``down`` is set (as a refused connection would)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.attempts = 0

    def clone(self) -> StandIn:
        self.attempts += 1
        if self.down.is_set():
            raise ConnectFailed("could not connect to db:55555: ConnectionRefusedError()")
        return super().clone()


def kick(pool: ConnectionPool) -> None:
    """Run a maintenance round now instead of at its scheduled time."""
    pool._bg_wakeup.set()


def discarded(pool: ConnectionPool, reason: str) -> int:
    return pool.stats().discarded.get(reason, 0)


def start(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def join(t: threading.Thread) -> None:
    t.join(JOIN)
    assert not t.is_alive(), "thread did not finish in time"


def looping_lease(pool: ConnectionPool, timeout: float | None = None) -> tuple[Any, Any]:
    """Enter a lease as a thread in a loop does: asked right after returning
    the previous one (a return through release() records when this thread
    returned; the no-waiter fast return skips that, as nobody waits)."""
    first = pool.acquire()
    conn = first.conn
    first.release()
    lease = pool.lease(timeout)
    assert lease.__enter__() is conn
    return lease, conn


def without_fast_paths(pool: ConnectionPool) -> ConnectionPool:
    """Make every lease of ``pool`` take the locked paths (as with
    ``check_ownership`` or ``leak_threshold``, without their extras): both
    copies of each lease rule can then be held to the same cases."""
    with pool._lock:
        pool._plain = False
        pool._fast = False
    return pool
