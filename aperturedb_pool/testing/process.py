"""The embedded server as a separate process, and its control channel.

``ServerProcess`` runs ``python -m aperturedb_pool serve ...`` (so a benchmark's
clients do not share a GIL with the server) and drives its faults and
counters through ``ServerControl``.

Control channel protocol (plaintext, on the server's own port, even when the
server uses TLS): the client sends the usual framed 8-byte hello with
``version = CONTROL_VERSION`` (0x41444243, "ADBC") and ``protocol = 1``; the
server answers ``(CONTROL_VERSION, 1)``. Then each request is a frame holding
JSON ``{"method": name, "args": [...], "kwargs": {...}}`` and each answer a
frame holding ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
Frames use the same native-order uint32 length prefix as the data protocol.
Control connections are not clients: they are not counted, limited, dropped
or timed out. A server started with ``control=False`` (``--no-control``)
answers the control hello like any wrong version: ``(0, 0)``, then closes.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, cast

from aperturedb_pool.testing._wire import (
    CONTROL_PROTOCOL,
    CONTROL_VERSION,
    HELLO,
    frame,
    recv_frame,
)

__all__ = ["ServerControl", "ServerProcess", "make_connector"]


def make_connector(host: str, port: int, tls: bool, ca_path: str | None, username: str,
                   password: str, overrides: dict[str, Any]) -> Any:
    """A real ``aperturedb.Connector`` for a server at ``host:port``; ``overrides`` are
    ``Connector`` keyword arguments that replace the defaults given here."""
    if "aperturedb" not in sys.modules:
        # Otherwise importing the SDK may write an error.<time>.log into the working directory.
        os.environ.setdefault("ADB_LOG_FILE", "")
    from aperturedb.Connector import Connector

    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    kwargs: dict[str, Any] = dict(host=host, port=port, user=username, password=password,
                                  use_ssl=tls, ca_cert=ca_path, verify_hostname=True)
    kwargs.update(overrides)
    return Connector(**kwargs)


class ServerControl:
    """Drive a running embedded server's faults and counters from any process.

    Thread-safe: ``_lock`` serializes use of the one control socket.
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._lock = threading.Lock()  # guards _sock and the request/answer exchange
        self._sock: socket.socket | None = None

    def __enter__(self) -> ServerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self) -> socket.socket:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        sock = socket.create_connection((host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(frame(HELLO.pack(CONTROL_VERSION, CONTROL_PROTOCOL)))
            version, _ = HELLO.unpack(recv_frame(sock))
            if version != CONTROL_VERSION:
                raise ConnectionError(
                    f"{self.host}:{self.port} has no control channel (started with --no-control?)")
        except BaseException:
            sock.close()
            raise
        return sock

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the server; raise ``RuntimeError`` if it failed there."""
        body = json.dumps({"method": method, "args": list(args), "kwargs": kwargs}).encode()
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    self._sock.sendall(frame(body))
                    reply = json.loads(recv_frame(self._sock))
                    break
                except (OSError, ValueError):
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 2:
                        raise
        if not reply.get("ok"):
            raise RuntimeError(f"control call {method} failed: {reply.get('error')}")
        return reply.get("result")

    # The same fault and counter methods as EmbeddedServer.
    def drop_connections(self) -> int:
        return cast(int, self.call("drop_connections"))

    def restart(self) -> int:
        return cast(int, self.call("restart"))

    def refuse_connections(self, seconds: float) -> None:
        self.call("refuse_connections", seconds)

    def set_latency(self, latency: float | tuple[float, float],
                    command: str | None = None) -> None:
        self.call("set_latency", list(latency) if isinstance(latency, tuple) else latency,
                  command)

    def close_after_next_request(self, execute: bool, command: str | None = None) -> None:
        self.call("close_after_next_request", execute, command)

    def send_garbage_next(self, command: str | None = None) -> None:
        self.call("send_garbage_next", command)

    def set_idle_timeout(self, seconds: float | None) -> None:
        self.call("set_idle_timeout", seconds)

    def set_max_clients(self, n: int | None) -> None:
        self.call("set_max_clients", n)

    def counters(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("counters"))

    def reset_counters(self) -> None:
        self.call("reset_counters")

    def dump(self) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", self.call("dump"))

    def clear_store(self) -> None:
        self.call("clear_store")

    def ping(self) -> str:
        return cast(str, self.call("ping"))


def _cli_args(host: str, port: int, tls: bool, certfile: str | None, keyfile: str | None,
              username: str, password: str, auth: bool, session_ttl: float,
              refresh_ttl: float, latency: float | tuple[float, float],
              tokens: tuple[str, ...] | list[str], idle_timeout: float | None,
              max_clients: int | None) -> list[str]:
    args = ["--host", host, "--port", str(port),
            "--session-ttl", repr(session_ttl), "--refresh-ttl", repr(refresh_ttl)]
    if tls:
        args.append("--tls")
    if certfile is not None:
        args += ["--cert", certfile, "--key", str(keyfile)]
    if auth:
        args += ["--user", username, "--password", password]
    else:
        args.append("--no-auth")
    if isinstance(latency, (tuple, list)):
        args += ["--latency-ms", f"{latency[0] * 1000!r},{latency[1] * 1000!r}"]
    elif latency:
        args += ["--latency-ms", repr(latency * 1000)]
    for t in tokens:
        args += ["--token", t]
    if idle_timeout is not None:
        args += ["--idle-timeout", repr(idle_timeout)]
    if max_clients is not None:
        args += ["--max-clients", str(max_clients)]
    return args


class ServerProcess(ServerControl):
    """The embedded server run by ``python -m aperturedb_pool serve`` in a child process.

    Takes the same arguments as ``EmbeddedServer``; the fault and counter
    methods go over the control channel.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: bool = False,
                 certfile: str | None = None, keyfile: str | None = None,
                 username: str = "admin", password: str = "admin", auth: bool = True,
                 session_ttl: float = 3600, refresh_ttl: float = 36000,
                 latency: float | tuple[float, float] = 0.0, tokens: tuple[str, ...] = (),
                 idle_timeout: float | None = None, max_clients: int | None = None,
                 control: bool = True, startup_timeout: float = 60.0,
                 python: str | None = None) -> None:
        if not control:
            raise ValueError("ServerProcess drives its server through the control channel: "
                             "control=False is not possible (run the CLI with --no-control)")
        super().__init__(host, port)
        self.host = host
        self.tls = tls
        self.username = username
        self.password = password
        self.ca_path: str | None = None
        self.pid: int | None = None
        self.startup_timeout = startup_timeout
        self._argv = [python or sys.executable, "-m", "aperturedb_pool", "serve",
                      "--stop-at-stdin-eof"] + _cli_args(
            host, port, tls, certfile, keyfile, username, password, auth, session_ttl,
            refresh_ttl, latency, tokens, idle_timeout, max_clients)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ServerProcess:
        """Start the child and wait until it prints ``listening on HOST:PORT``."""
        if self._proc is not None:
            raise RuntimeError("ServerProcess.start() called twice")
        errfile = tempfile.TemporaryFile()
        # A session (and process group) of its own: a Ctrl-C at the terminal
        # goes to the parent's group only, and the parent stops the server
        # when it is done with it (stop()), after its last queries.  Its
        # stdin is a pipe only this process writes to: when this process is
        # gone, even killed without a chance to call stop(), the server reads
        # end of file and stops (--stop-at-stdin-eof) instead of living on.
        self._proc = proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=errfile,
                                             stdin=subprocess.PIPE, start_new_session=True)
        self.pid = proc.pid
        assert proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buf = b""
        listening = None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while listening is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").strip()
                    if text.startswith("listening on "):
                        listening = text[len("listening on "):]
                    elif text.startswith("ca certificate: "):
                        self.ca_path = text[len("ca certificate: "):]
        if listening is None:
            self._kill()
            errfile.seek(0)
            err = errfile.read().decode(errors="replace").strip()
            errfile.close()
            raise RuntimeError(f"the server process did not start: {err or 'no output'}")
        errfile.close()
        host, _, port = listening.rpartition(":")
        self.port = int(port)
        return self

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the child and wait for it (SIGKILL after ``timeout``); idempotent."""
        self.close()
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stdin):
            if pipe is not None:
                pipe.close()
        return proc.returncode

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def connector(self, **overrides: Any) -> Any:
        """A real ``aperturedb.Connector`` configured for this server."""
        return make_connector(self.host, self.port, self.tls, self.ca_path, self.username,
                              self.password, overrides)
