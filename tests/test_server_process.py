"""``aperturedb-pool serve`` (the CLI), ``ServerProcess`` and its control channel."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import

import re
import selectors
import signal
import subprocess
import sys
import time

import pytest

from aperturedb_pool.testing import EmbeddedServer, ServerControl, ServerProcess


def _read_lines_until(proc, pattern, timeout=30.0):
    """Lines of ``proc.stdout`` up to one matching ``pattern`` (bounded wait)."""
    lines = []
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} line; got {lines!r}"
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"process ended; got {lines!r}"
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode())
                if re.fullmatch(pattern, lines[-1]):
                    return lines


@pytest.mark.parametrize("extra", [[], ["--tls"]])
def test_cli_prints_its_line_and_exits_0_on_sigterm(extra):
    proc = subprocess.Popen([sys.executable, "-m", "aperturedb_pool", "serve", "--port", "0",
                             "--latency-ms", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _read_lines_until(proc, r"listening on 127\.0\.0\.1:\d+")
        port = int(lines[-1].rsplit(":", 1)[1])
        if extra:
            assert len(lines) == 2 and lines[0].startswith("ca certificate: ")
            ca = lines[0].split(": ", 1)[1]
            assert os.path.isfile(ca)
        else:
            assert len(lines) == 1
        with ServerControl("127.0.0.1", port) as ctl:
            assert ctl.ping() == "pong"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == b""  # nothing but the startup lines
        if extra:
            assert not os.path.exists(ca)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("args, option", [
    (["--port", "70000"], "--port"),
    (["--cert", "x.pem"], "--cert"),
    (["--no-auth", "--user", "u"], "--no-auth"),
    (["--session-ttl", "0"], "--session-ttl"),
    (["--latency-ms", "fast"], "--latency-ms"),
    (["--max-clients", "0"], "--max-clients"),
])
def test_cli_bad_arguments_name_the_option(args, option):
    from aperturedb_pool.testing import cli

    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2


def test_cli_bad_argument_message(capsys):
    from aperturedb_pool.testing import cli

    with pytest.raises(SystemExit):
        cli.main(["--refresh-ttl", "-1"])
    assert "--refresh-ttl" in capsys.readouterr().err


def test_server_process_and_control_channel():
    with ServerProcess(session_ttl=600) as sp:
        assert sp.pid and sp.port
        c = sp.connector(retry_interval_seconds=0.01)
        r, _ = c.query([{"AddEntity": {"class": "P", "properties": {"k": 1}}}])
        assert r[0]["AddEntity"]["status"] == 0
        k = sp.counters()
        assert k["authenticate"] == 1 and k["requests_by_command"]["AddEntity"] == 1
        # Another process (here: another object) attaches to the same control channel.
        with ServerControl(*sp.address) as other:
            assert other.drop_connections() == 1
            assert other.counters()["dropped"] == 1
            other.set_latency((0.0, 0.001))
            other.set_latency(0)
            other.close_after_next_request(False, "AddEntity")
        c2 = sp.connector(retry_max_attempts=1, retry_interval_seconds=0.01)
        with pytest.raises(Exception, match="Could not query"):
            c2.query([{"AddEntity": {"class": "P"}}])
        assert len(sp.dump()) == 1
        sp.restart()
        assert c.query([{"GetStatus": {}}])[0][0]["GetStatus"]["status"] == 0
        assert sp.counters()["authenticate"] == 3  # c re-authenticated after the restart
        sp.reset_counters()
        assert sp.counters()["requests"] == 0
        with pytest.raises(RuntimeError, match="unknown control method"):
            sp.call("stop")
    assert sp.returncode == 0


def test_server_process_tls():
    with ServerProcess(tls=True) as sp:
        assert sp.ca_path and os.path.isfile(sp.ca_path)
        c = sp.connector(host="localhost")
        assert c.query([{"GetStatus": {}}])[0][0]["GetStatus"]["status"] == 0
        assert sp.counters()["accepted"] == 1


def test_control_channel_can_be_disabled():
    with EmbeddedServer(control=False) as s:
        with pytest.raises(ConnectionError, match="no control channel"):
            ServerControl(*s.address).ping()


def test_serve_freezes_what_survives_a_full_collection() -> None:
    # The serve process keeps its store out of later full collections, so a
    # large store does not stall every client for each one.  Run in a child:
    # the hook changes the collector of the process it is installed in.
    code = (
        "import gc\n"
        "from aperturedb_pool.testing.cli import _freeze_after_full_collections\n"
        "_freeze_after_full_collections()\n"
        "store = [{'k': i} for i in range(10000)]\n"
        "assert gc.get_freeze_count() == 0\n"
        "gc.collect(1)\n"
        "assert gc.get_freeze_count() == 0, 'froze after a young collection'\n"
        "gc.collect()\n"
        "assert gc.get_freeze_count() >= 10000, gc.get_freeze_count()\n"
        "for _ in range(14):\n"
        "    gc.collect()\n"
        "assert gc.get_freeze_count() >= 10000\n"
        "gc.collect()  # the 16th: everything thawed for the next one to scan\n"
        "assert gc.get_freeze_count() == 0, gc.get_freeze_count()\n"
        "# A store too large to rescan quickly stays frozen at the 16th.\n"
        "from aperturedb_pool.testing.cli import _THAW_LIMIT\n"
        "big = [[i] for i in range(_THAW_LIMIT + 1000)]\n"
        "gc.collect()\n"
        "for _ in range(20):  # a 16th among them\n"
        "    gc.collect()\n"
        "    assert gc.get_freeze_count() > _THAW_LIMIT, gc.get_freeze_count()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_server_stops_when_the_process_that_started_it_is_killed() -> None:
    # A parent killed without a chance to call stop() (SIGKILL, a CI timeout)
    # used to leave its server running forever, in a session of its own.
    psutil = pytest.importorskip("psutil")
    code = ("import sys, time\n"
            "from aperturedb_pool.testing import ServerProcess\n"
            "sp = ServerProcess().start()\n"
            "print(sp.pid, flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              env={**os.environ, "ADB_LOG_FILE": ""})
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        server = psutil.Process(server_pid)
        assert server.is_running()
    finally:
        parent.kill()
        parent.wait(10)
    try:
        server.wait(timeout=15)  # psutil: returns once the process is gone
    except psutil.TimeoutExpired:
        server.kill()
        pytest.fail("the server outlived the killed process that started it")
