"""A real gunicorn (--preload, 2 gthread workers x 8 threads) serving the Flask
and the Django fixture apps, hammered by a real HTTP client over loopback.

The embedded server runs in this test process; gunicorn is a subprocess.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported: no error.<time>.log files

import collections
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

requests = pytest.importorskip("requests")
gunicorn_config = pytest.importorskip("gunicorn.config")

from aperturedb_pool.testing import EmbeddedServer  # noqa: E402

APPS = Path(__file__).parent / "apps"
WORKERS, THREADS, REQUESTS = 2, 8, 400
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_BOOTED = re.compile(r"Booting worker with pid: (\d+)")


class Gunicorn:
    """A gunicorn subprocess whose log lines are watched by a reader thread."""

    def __init__(self, app: str, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "gunicorn", "--preload",
               "--workers", str(WORKERS), "--worker-class", "gthread",
               "--threads", str(THREADS), "--bind", "127.0.0.1:0",
               "--pythonpath", str(APPS), "--log-level", "info",
               "--graceful-timeout", "10", "--timeout", "60"]
        flags = {c for s in gunicorn_config.KNOWN_SETTINGS for c in (s.cli or [])}
        if "--no-control-socket" in flags:  # gunicorn >= 25 opens ~/.gunicorn/gunicorn.ctl
            cmd.append("--no-control-socket")
        cmd.append(app)
        self.lines: list[str] = []
        self.port: int | None = None
        self.workers: set[int] = set()
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **env})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip())
                m = _LISTENING.search(line)
                if m:
                    self.port = int(m.group(1))
                m = _BOOTED.search(line)
                if m:
                    self.workers.add(int(m.group(1)))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_booted(self, timeout: float = 30.0) -> None:
        """Until the master listens (the app is loaded: --preload) and both workers booted."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (self.port is not None and len(self.workers) == WORKERS)
                or self.proc.poll() is not None, timeout)
        assert ok and self.proc.poll() is None, "gunicorn did not start:\n" + self.log()

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("gunicorn did not stop on SIGTERM:\n" + self.log()) from None
        finally:
            self._reader.join(10)


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _get(url: str) -> Any:
    r = requests.get(url, timeout=30)  # a new TCP connection per request
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _hammer(server: EmbeddedServer, app: str, env: dict[str, str], pool_prefix: str) -> None:
    g = Gunicorn(app, {"ADB_TEST_PORT": str(server.port), "ADB_LOG_FILE": "", **env})
    try:
        g.wait_booted()
        # The master imported the app and forked both workers: no connection yet.
        assert server.counters()["accepted"] == 0, g.log()
        base = f"http://127.0.0.1:{g.port}"
        with ThreadPoolExecutor(max_workers=32) as ex:
            bodies = list(ex.map(lambda _: _get(base + "/whoami"), range(REQUESTS)))
            assert len(bodies) == REQUESTS
            # Both workers nearly always serve some of the burst; if one did not,
            # ask a little more (bounded) until it has.
            extra = 0
            while len({b["pid"] for b in bodies}) < WORKERS and extra < 2000:
                bodies += list(ex.map(lambda _: _get(base + "/whoami"), range(50)))
                extra += 50
        pools_by_pid = collections.defaultdict(set)
        for b in bodies:
            pools_by_pid[b["pid"]].add(b["pool"])
            assert 1 <= b["leased"] <= THREADS
        assert set(pools_by_pid) == g.workers, g.log()
        for pid, pools in pools_by_pid.items():
            # One pool per worker, created by that worker (its pid is in the name).
            assert pools == {f"{pool_prefix}{pid}"}
        assert len({p for ps in pools_by_pid.values() for p in ps}) == WORKERS
        counters = server.counters()
        assert counters["sharing_violations"] == 0
        assert 0 < counters["accepted"] <= WORKERS * THREADS
    finally:
        rc = g.stop()
    assert rc == 0, g.log()
    assert "Traceback" not in g.log(), g.log()


def test_flask_under_gunicorn_preload(server: EmbeddedServer) -> None:
    _hammer(server, "adb_flask_app:create_app()", {}, "flask:adb_flask_app:")


def test_django_under_gunicorn_preload(server: EmbeddedServer) -> None:
    _hammer(server, "adb_django_site.wsgi:application",
            {"DJANGO_SETTINGS_MODULE": "adb_django_site.settings"}, "django:")


def test_a_pool_used_in_the_master_is_never_used_by_workers(server: EmbeddedServer) -> None:
    """The app opens its pool at import time, in the master: each worker still
    creates its own pool on first use."""
    g = Gunicorn("adb_flask_app:create_app()",
                 {"ADB_TEST_PORT": str(server.port), "ADB_LOG_FILE": "", "ADB_TEST_EAGER": "1"})
    try:
        g.wait_booted()
        master_conns = server.counters()["accepted"]
        assert master_conns >= 1
        base = f"http://127.0.0.1:{g.port}"
        with ThreadPoolExecutor(max_workers=16) as ex:
            bodies = list(ex.map(lambda _: _get(base + "/whoami"), range(64)))
        for b in bodies:
            assert b["pool"] == f"flask:adb_flask_app:{b['pid']}"
            assert b["pid"] in g.workers
        assert g.proc.pid not in {b["pid"] for b in bodies}
        assert server.counters()["sharing_violations"] == 0
    finally:
        rc = g.stop()
    assert rc == 0, g.log()
    assert "Traceback" not in g.log(), g.log()
