"""``EmbeddedServer``: an ApertureDB-protocol server on a background thread.

Design: one event-loop thread owns everything - the listening socket, every
connection, the sessions, the store, the fault switches and the counters. It
multiplexes non-blocking sockets with epoll (``select.poll`` elsewhere), and
speaks TLS through ``ssl.SSLObject`` over memory BIOs so a TLS connection is
just another non-blocking byte stream. One thread and no locks on the request
path keeps the CPU cost per request low (see ``stress/bench_server.py``).

Other threads never touch that state directly: the public fault and counter
methods post a closure to the loop (``_call``) and wait for its result. The
only lock, ``_calls_lock``, guards the call queue and the ``_running`` flag.
The control channel (``ServerControl`` in ``process.py``) reaches the same
methods from another process: a connection whose hello carries
``CONTROL_VERSION`` then exchanges framed JSON.
"""

from __future__ import annotations

import collections
import copy
import heapq
import json
import logging
import os
import random
import secrets
import select
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from enum import IntEnum
from typing import Any, Callable, Iterable, cast

from aperturedb_pool.testing._store import SUPPORTED_COMMANDS, Store
from aperturedb_pool.testing._users import USER_COMMANDS, UserError, Users
from aperturedb_pool.testing._wire import (
    CONTROL_PROTOCOL,
    CONTROL_VERSION,
    HELLO,
    LENGTH,
    MAX_FRAME,
    PROTOCOL_TCP,
    PROTOCOL_TLS,
    PROTOCOL_VERSION,
    frame,
    query_message_class,
)

__all__ = ["EmbeddedServer"]

logger = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024

try:  # bytes waiting in a socket's receive queue, without reading them
    import fcntl
    import termios

    _FIONREAD: int | None = termios.FIONREAD
except (ImportError, AttributeError):  # pragma: no cover - not a POSIX system
    _FIONREAD = None

class ConnState(IntEnum):
    """A server connection's state."""

    HELLO = 0  # waiting for the 8-byte hello
    WAITING = 1  # hello read, waiting for a client slot (max_clients)
    HANDSHAKE = 2  # TLS handshake in progress
    READY = 3  # serving requests
    CONTROL = 4  # control channel (framed JSON)


_HELLO = ConnState.HELLO
_WAITING = ConnState.WAITING
_HANDSHAKE = ConnState.HANDSHAKE
_READY = ConnState.READY
_CONTROL = ConnState.CONTROL

# The session-rejected answer: a single object, not a list; the query did not run.
_REJECTED_JSON = json.dumps({"status": -1, "info": "Not Authenticated!", "code": "unauthenticated"})
# A frame whose body is not a queryMessage: the field-1 string claims more
# bytes than follow, so every protobuf parser rejects it.
_GARBAGE_FRAME = frame(b"\x0a\xff\xff\xff\xff\x0f\x00garbage")

_EV_READ = select.EPOLLIN if hasattr(select, "epoll") else select.POLLIN
_EV_WRITE = select.EPOLLOUT if hasattr(select, "epoll") else select.POLLOUT
_EV_ERR = (select.EPOLLERR | select.EPOLLHUP) if hasattr(select, "epoll") else (
    select.POLLERR | select.POLLHUP | select.POLLNVAL)


class _Poller:
    """epoll where available, else ``select.poll``; timeouts in seconds."""

    def __init__(self) -> None:
        if hasattr(select, "epoll"):
            self._ep: Any = select.epoll()
            self._ms = False
        else:  # pragma: no cover - macOS and other BSDs
            self._ep = select.poll()
            self._ms = True
        self.register = self._ep.register
        self.modify = self._ep.modify
        self.unregister = self._ep.unregister

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        if self._ms:  # pragma: no cover
            return cast("list[tuple[int, int]]", self._ep.poll(
                None if timeout is None else max(0, int(timeout * 1000 + 0.999))))
        return cast("list[tuple[int, int]]", self._ep.poll(-1 if timeout is None else timeout))

    def close(self) -> None:
        if not self._ms:
            self._ep.close()


class _Conn:
    """One accepted socket and its protocol state (loop thread only)."""

    __slots__ = ("sock", "fd", "state", "kind", "rbuf", "out", "tls", "inbio", "outbio",
                 "pending", "flagged", "last_active", "close_after_flush", "closed",
                 "served", "protocol", "peer")

    def __init__(self, sock: socket.socket, now: float, peer: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state: ConnState = _HELLO
        self.kind = "unknown"          # "client" or "control" once the hello is read
        self.rbuf = bytearray()        # received bytes (plaintext) not yet consumed
        self.out: collections.deque[Any] = collections.deque()  # raw bytes not yet sent
        self.tls: ssl.SSLObject | None = None
        self.inbio: ssl.MemoryBIO | None = None
        self.outbio: ssl.MemoryBIO | None = None
        self.pending = False           # a request was read and is not answered yet
        self.flagged = False           # a sharing violation was counted for it
        self.last_active = now
        self.close_after_flush = False
        self.closed = False
        self.served = False            # holds one of the max_clients slots
        self.protocol = PROTOCOL_TCP
        self.peer = peer


class _Fault:
    __slots__ = ("execute", "command")

    def __init__(self, execute: bool, command: str | None) -> None:
        self.execute = execute
        self.command = command


def _new_counters() -> dict[str, Any]:
    return {
        "accepted": 0, "requests": 0, "requests_by_command": collections.Counter(),
        "authenticate": 0, "authenticate_failed": 0, "refresh": 0, "refresh_failed": 0,
        "session_rejections": 0, "sharing_violations": 0, "hello_rejected": 0,
        "refused": 0, "dropped": 0, "idle_closed": 0, "fault_closed": 0,
        "garbage_sent": 0, "failed_transactions": 0, "control_requests": 0,
        "peak_open": 0,
    }


# Methods the control channel may call, with their (loop-thread) effect.
CONTROL_METHODS = frozenset([
    "drop_connections", "restart", "refuse_connections", "set_latency",
    "close_after_next_request", "send_garbage_next", "set_idle_timeout", "set_max_clients",
    "counters", "reset_counters", "dump", "clear_store", "ping",
])


class EmbeddedServer:
    """An in-process server speaking ApertureDB's wire protocol.

    The real ``aperturedb.Connector`` connects to it unmodified. Start it with
    ``start()`` or a ``with`` block; ``port=0`` lets the OS pick a free port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tls: bool = False,
                 certfile: str | None = None, keyfile: str | None = None,
                 username: str = "admin", password: str = "admin", auth: bool = True,
                 session_ttl: float = 3600, refresh_ttl: float = 36000,
                 latency: float | tuple[float, float] = 0.0,
                 tokens: Iterable[str] = (), idle_timeout: float | None = None,
                 max_clients: int | None = None, control: bool = True) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile must be given together")
        if certfile is not None and not tls:
            raise ValueError("certfile/keyfile need tls=True")
        for name, ttl in (("session_ttl", session_ttl), ("refresh_ttl", refresh_ttl)):
            if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {ttl!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        self.host = host
        self.port = port
        self.tls = bool(tls)
        self.certfile = certfile
        self.keyfile = keyfile
        self.username = username
        self.password = password
        self.auth = auth
        self.session_ttl = session_ttl
        self.refresh_ttl = refresh_ttl
        self.ca_path: str | None = None
        self.control_enabled = control
        self._tokens = set(tokens)

        # --- loop-thread state (only the loop thread touches it once running) ---
        self._store = Store()
        self._sessions: dict[str, float] = {}                  # session token -> expiry
        self._refresh: dict[str, tuple[float, str]] = {}       # refresh token -> (expiry, session)
        self._users = Users()                                  # users other than the configured one
        self._session_user: dict[str, str] = {}                # session token -> such a user
        self._conns: dict[int, _Conn] = {}                     # fd -> connection
        self._waiting: collections.deque[_Conn] = collections.deque()
        self._n_served = 0
        self._n_clients = 0
        self._timers: list[tuple[float, int, _Conn, Any]] = []  # heap: latency-delayed requests
        self._timer_seq = 0
        self._counters = _new_counters()
        self._latency: Callable[[], float] | None = None
        self._latency_for: str | None = None  # '"Command"': only requests naming it
        self._refuse_until = 0.0
        self._close_after: _Fault | None = None
        self._garbage: _Fault | None = None
        self._idle_timeout: float | None = None
        self._next_idle_check = 0.0
        self._max_clients: int | None = None
        self._qm: Any = None
        self._recv_buf = bytearray(_RECV_SIZE)   # loop thread only
        self._recv_view = memoryview(self._recv_buf)
        self._ioctl_buf = bytearray(4)           # loop thread only
        self._ssl_ctx: ssl.SSLContext | None = None

        # --- threading ---
        self._calls_lock = threading.Lock()   # guards _calls and _running
        self._calls: collections.deque[Any] = collections.deque()
        self._running = False
        self._stopping = False
        self._started = False
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._poller: _Poller | None = None
        self._tmpdir: str | None = None

        self._apply_latency(latency)
        self._apply_idle_timeout(idle_timeout)
        self._apply_max_clients(max_clients)

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"EmbeddedServer({self.host}:{self.port}, tls={self.tls}, "
                f"running={self._running})")

    def start(self) -> EmbeddedServer:
        """Bind, listen and start the loop thread; returns once accepting."""
        if self._started:
            raise RuntimeError("EmbeddedServer.start() called twice")
        self._started = True
        try:
            self._qm = query_message_class()
            if self.tls:
                self._ssl_ctx = self._make_ssl_context()
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
            lst = socket.socket(family, socket.SOCK_STREAM)
            try:
                lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lst.bind(sockaddr)
                lst.listen(1024)
                lst.setblocking(False)
            except BaseException:
                lst.close()
                raise
            self._listener = lst
            self.port = lst.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._poller = _Poller()
            self._poller.register(lst.fileno(), _EV_READ)
            self._poller.register(self._wake_r.fileno(), _EV_READ)
        except BaseException:
            self._cleanup_sockets()
            self._remove_tmpdir()
            raise
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"adb-embedded-server:{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and socket and join the loop thread (idempotent)."""
        if not self._started:
            return
        thread = self._thread
        self._stopping = True
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._remove_tmpdir()

    def serve_until(self, event: threading.Event) -> None:
        """Block until ``event`` is set (for the CLI)."""
        while not event.wait(1.0):
            if self._thread is None or not self._thread.is_alive():
                break

    def _make_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.certfile is not None:
            ctx.load_cert_chain(self.certfile, self.keyfile)
            return ctx
        import trustme  # lazy: only TLS servers with generated certificates need it

        ca = trustme.CA(organization_name="aperturedb-pool embedded server")
        names = ["localhost", "127.0.0.1", "::1"]
        if self.host not in names and self.host not in ("", "0.0.0.0", "::"):
            names.append(self.host)
        ca.issue_cert(*names).configure_cert(ctx)
        self._tmpdir = tempfile.mkdtemp(prefix="adb-embedded-server-")
        self.ca_path = os.path.join(self._tmpdir, "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        return ctx

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def connector(self, **overrides: Any) -> Any:
        """A real ``aperturedb.Connector`` configured for this server (SDK imported here)."""
        from aperturedb_pool.testing.process import make_connector

        return make_connector(self.host, self.port, self.tls, self.ca_path, self.username,
                              self.password, overrides)

    # ------------------------------------------------------------------ cross-thread calls
    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:
                pass  # buffer full (a wake-up is already pending) or closed

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the loop thread and return its result."""
        if threading.get_ident() != self._loop_ident:
            with self._calls_lock:
                if self._running:
                    box: list[Any] = [None, None]
                    done = threading.Event()
                    self._calls.append((fn, args, box, done))
                    queued = True
                else:
                    queued = False
            if queued:
                self._wake()
                if not done.wait(30):
                    raise TimeoutError("the embedded server's loop did not answer in 30 s")
                if box[1] is not None:
                    raise box[1]
                return box[0]
        return fn(*args)

    def _run_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                fn, args, box, done = self._calls.popleft()
            try:
                box[0] = fn(*args)
            except BaseException as e:  # handed to the caller's thread
                box[1] = e
            done.set()

    # ------------------------------------------------------------------ public faults
    def drop_connections(self) -> int:
        """Close every open client connection now; returns how many."""
        return cast(int, self._call(self._do_drop))

    def restart(self) -> int:
        """Drop every connection and forget every session (the store is kept)."""
        return cast(int, self._call(self._do_restart))

    def refuse_connections(self, seconds: float) -> None:
        """For ``seconds``, new connections are reset right after their hello."""
        self._call(self._do_refuse, float(seconds))

    def set_latency(self, latency: float | tuple[float, float] | list[float],
                    command: str | None = None) -> None:
        """Delay every answer by ``latency`` s, or uniformly in ``(lo, hi)``; with
        ``command``, only the answers to requests containing that command (the
        pool's ``GetStatus`` pings of new connectors, say, then go undelayed)."""
        self._call(self._apply_latency, latency, command)

    def close_after_next_request(self, execute: bool, command: str | None = None) -> None:
        """Close the connection of the next request (containing ``command``) without an
        answer; if ``execute``, the request is executed and committed first."""
        self._call(self._set_fault, "_close_after", _Fault(bool(execute), command))

    def send_garbage_next(self, command: str | None = None) -> None:
        """Answer the next request (containing ``command``) with a frame that is not a
        protobuf message. The request itself is executed."""
        self._call(self._set_fault, "_garbage", _Fault(True, command))

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Close connections idle for longer than ``seconds`` (None: never)."""
        self._call(self._apply_idle_timeout, seconds)

    def set_max_clients(self, n: int | None) -> None:
        """Serve at most ``n`` clients at once; more wait after TCP accept (None: no limit)."""
        self._call(self._apply_max_clients, n)

    def counters(self) -> dict[str, Any]:
        """A snapshot of the counters as a plain dict.

        ``accepted``: client connections whose hello was accepted (not control
        connections, not refused or rejected ones); ``open``/``waiting``: client
        connections open now / waiting for a ``max_clients`` slot; ``pending``:
        connections with a request read and not answered yet; ``requests``: queries
        received (``requests_by_command``: each command of them, rejected ones
        included); ``authenticate``/``authenticate_failed``, ``refresh``/
        ``refresh_failed``; ``session_rejections``: queries answered "Not
        Authenticated!" and not run; ``sharing_violations``: a request that
        arrived on a connection before the previous one was answered;
        ``hello_rejected``, ``refused``, ``dropped``, ``idle_closed``,
        ``fault_closed``, ``garbage_sent``, ``failed_transactions``,
        ``control_requests``, ``sessions`` (live sessions); ``peak_open``: the most
        client connections open at once (waiting ones included) since the start or
        the last ``reset_counters()``, which sets it to ``open``.
        """
        return cast("dict[str, Any]", self._call(self._snapshot_counters))

    def reset_counters(self) -> None:
        """Zero every counter (``open`` and ``waiting`` are live values, not reset;
        ``peak_open`` restarts at ``open``)."""
        self._call(self._do_reset_counters)

    def dump(self) -> list[dict[str, Any]]:
        """Every stored object: ``_uniqueid``, ``class``, ``properties``, ``blob_size``."""
        return cast("list[dict[str, Any]]", self._call(self._store.dump))

    def clear_store(self) -> None:
        """Delete every stored object."""
        self._call(self._store.clear)

    def ping(self) -> str:
        return "pong"

    # --- loop-thread implementations ---
    def _set_fault(self, attr: str, fault: _Fault) -> None:
        setattr(self, attr, fault)

    def _do_drop(self) -> int:
        victims = [c for c in self._conns.values() if c.kind != "control"]
        for c in victims:
            self._close(c)
        self._counters["dropped"] += len(victims)
        return len(victims)

    def _do_restart(self) -> int:
        n = self._do_drop()
        self._sessions.clear()
        self._refresh.clear()
        self._session_user.clear()
        self._timers.clear()
        return n

    def _do_refuse(self, seconds: float) -> None:
        self._refuse_until = time.monotonic() + max(0.0, seconds)

    def _apply_latency(self, latency: Any, command: str | None = None) -> None:
        if command is not None and not (isinstance(command, str) and command):
            raise ValueError(f"command must be a command name such as 'FindEntity', "
                             f"got {command!r}")
        draw: Callable[[], float] | None
        if isinstance(latency, (tuple, list)):
            if len(latency) != 2:
                raise ValueError(f"latency range must be (lo, hi), got {latency!r}")
            lo, hi = float(latency[0]), float(latency[1])
            if lo < 0 or hi < lo:
                raise ValueError(f"latency range must have 0 <= lo <= hi, got {latency!r}")
            draw = (lambda: random.uniform(lo, hi)) if hi > 0 else None
        else:
            x = float(latency or 0.0)
            if x < 0:
                raise ValueError(f"latency must be >= 0, got {latency!r}")
            draw = (lambda: x) if x > 0 else None
        # Both or neither: a refused argument changes nothing.  The command is
        # matched on the request's JSON text, before it is parsed: a quoted name.
        self._latency = draw
        self._latency_for = None if command is None else f'"{command}"'

    def _apply_idle_timeout(self, seconds: float | None) -> None:
        if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
            raise ValueError(f"idle timeout must be a positive number or None, got {seconds!r}")
        self._idle_timeout = None if seconds is None else float(seconds)
        self._next_idle_check = 0.0

    def _apply_max_clients(self, n: int | None) -> None:
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"max_clients must be a positive integer or None, got {n!r}")
        self._max_clients = n
        if self._running:
            self._promote_waiting()

    def _snapshot_counters(self) -> dict[str, Any]:
        snap = dict(self._counters)
        snap["requests_by_command"] = dict(self._counters["requests_by_command"])
        snap["open"] = self._n_clients
        snap["waiting"] = sum(1 for c in self._waiting if not c.closed)
        snap["sessions"] = len(self._sessions)
        snap["pending"] = sum(1 for c in self._conns.values() if c.pending)
        return snap

    def _do_reset_counters(self) -> None:
        self._counters = _new_counters()
        self._counters["peak_open"] = self._n_clients

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        poller = self._poller
        assert poller is not None and self._listener is not None and self._wake_r is not None
        lfd = self._listener.fileno()
        wfd = self._wake_r.fileno()
        conns = self._conns
        try:
            while not self._stopping:
                timeout: float | None = None
                if self._timers or self._idle_timeout is not None:
                    now = time.monotonic()
                    due = self._timers[0][0] if self._timers else now + 3600
                    if self._idle_timeout is not None:
                        due = min(due, self._next_idle_check)
                    timeout = max(0.0, due - now)
                try:
                    events = poller.poll(timeout)
                except InterruptedError:  # pragma: no cover
                    continue
                for fd, ev in events:
                    conn = conns.get(fd)
                    if conn is not None:
                        if ev & _EV_WRITE and conn.out:
                            self._on_writable(conn)
                        if ev & (_EV_READ | _EV_ERR) and not conn.closed:
                            self._on_readable(conn)
                    elif fd == lfd:
                        self._accept()
                    elif fd == wfd:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        self._run_calls()
                if self._timers:
                    self._fire_timers()
                if self._idle_timeout is not None:
                    now = time.monotonic()
                    if now >= self._next_idle_check:
                        self._check_idle(now)
        except BaseException:  # pragma: no cover - a bug: keep the traceback visible
            logger.exception("embedded ApertureDB server loop crashed")
            raise
        finally:
            with self._calls_lock:
                self._running = False
            for c in list(conns.values()):
                self._close(c)
            self._cleanup_sockets()
            self._loop_ident = None
            self._run_calls()  # calls queued before _running went down run here

    def _cleanup_sockets(self) -> None:
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    def _accept(self) -> None:
        assert self._listener is not None and self._poller is not None
        now = time.monotonic()
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: try again on the next readiness
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = _Conn(sock, now, peer)
            self._conns[conn.fd] = conn
            self._poller.register(conn.fd, _EV_READ)

    def _close(self, conn: _Conn, reset: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.fd, None)
        if self._poller is not None:
            try:
                self._poller.unregister(conn.fd)
            except (OSError, ValueError, KeyError):
                pass
        if reset:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        conn.sock.close()
        conn.out.clear()
        if conn.kind == "client":
            self._n_clients -= 1
        if conn.served:
            conn.served = False
            self._n_served -= 1
            if self._waiting and not self._stopping:
                self._promote_waiting()

    # --- reading ---
    def _on_readable(self, conn: _Conn) -> None:
        # recv_into a reusable buffer: a fresh 256 KiB bytes per recv() costs an
        # mmap/mremap/munmap triple per request.
        try:
            n = conn.sock.recv_into(self._recv_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not n:
            self._close(conn)
            return
        data = self._recv_view[:n].tobytes()
        conn.last_active = time.monotonic()
        if conn.tls is not None:
            data = self._tls_feed(conn, data)
            if not data:
                return
        if conn.pending:
            # A new request while the previous one is still unanswered: two threads
            # are sharing one connector.
            if not conn.flagged:
                conn.flagged = True
                self._counters["sharing_violations"] += 1
            conn.rbuf += data
            return
        rbuf = conn.rbuf
        if not rbuf and len(data) >= 4 and conn.state == _READY:
            # Fast path: exactly one whole frame in one read.
            (n,) = LENGTH.unpack_from(data)
            if n == len(data) - 4:
                self._on_request(conn, data[4:])
                return
        rbuf += data
        self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        rbuf = conn.rbuf
        while not conn.pending and not conn.closed and conn.state != _WAITING:
            if len(rbuf) < 4:
                return
            (n,) = LENGTH.unpack_from(rbuf)
            if n > MAX_FRAME:
                self._close(conn)  # as the real server does with an oversized message
                return
            end = 4 + n
            if len(rbuf) < end:
                return
            payload = bytes(rbuf[4:end])
            del rbuf[:end]
            state = conn.state
            if state == _READY:
                if rbuf and not conn.flagged:
                    conn.flagged = True
                    self._counters["sharing_violations"] += 1
                self._on_request(conn, payload)
            elif state == _HELLO:
                self._on_hello(conn, payload)
            elif state == _CONTROL:
                self._on_control(conn, payload)
            else:  # pragma: no cover - _HANDSHAKE data never reaches rbuf
                return

    def _tls_feed(self, conn: _Conn, data: bytes) -> bytes:
        """Feed raw bytes to the TLS layer; return the plaintext now available."""
        tls = conn.tls
        assert tls is not None and conn.inbio is not None
        conn.inbio.write(data)
        try:
            if conn.state == _HANDSHAKE:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush_tls(conn)
                    return b""
                conn.state = _READY
                self._flush_tls(conn)
            chunks = []
            while True:
                try:
                    chunk = tls.read(_RECV_SIZE)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        except (ssl.SSLError, OSError):
            self._flush_tls(conn)
            self._close(conn)
            return b""
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _flush_tls(self, conn: _Conn) -> None:
        assert conn.outbio is not None
        pending = conn.outbio.read()
        if pending:
            self._send_raw(conn, pending)

    # --- writing ---
    def _send_frame(self, conn: _Conn, data: bytes) -> None:
        """Send one whole frame (prefix and body already in ``data``) in one go."""
        if conn.tls is not None:
            assert conn.outbio is not None
            try:
                conn.tls.write(data)
            except (ssl.SSLError, OSError):
                self._close(conn)
                return
            data = conn.outbio.read()
        self._send_raw(conn, data)

    def _send_raw(self, conn: _Conn, data: bytes) -> None:
        if conn.closed:
            return
        if conn.out:
            conn.out.append(memoryview(data))
            return
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(conn)
            return
        if n < len(data):
            conn.out.append(memoryview(data)[n:])
            assert self._poller is not None
            self._poller.modify(conn.fd, _EV_READ | _EV_WRITE)
        elif conn.close_after_flush:
            self._close(conn)

    def _on_writable(self, conn: _Conn) -> None:
        out = conn.out
        while out:
            head = out[0]
            try:
                n = conn.sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if n < len(head):
                out[0] = head[n:]
                return
            out.popleft()
        if self._poller is not None:
            self._poller.modify(conn.fd, _EV_READ)
        conn.last_active = time.monotonic()
        if conn.close_after_flush:
            self._close(conn)

    # --- the hello ---
    def _on_hello(self, conn: _Conn, payload: bytes) -> None:
        if len(payload) != HELLO.size:
            self._counters["hello_rejected"] += 1
            self._close(conn)
            return
        version, protocol = HELLO.unpack(payload)
        if version == CONTROL_VERSION and self.control_enabled:
            conn.kind = "control"
            conn.state = _CONTROL
            self._send_raw(conn, frame(HELLO.pack(CONTROL_VERSION, CONTROL_PROTOCOL)))
            return
        if version != PROTOCOL_VERSION:
            self._counters["hello_rejected"] += 1
            conn.close_after_flush = True
            self._send_raw(conn, frame(HELLO.pack(0, 0)))
            return
        allowed = PROTOCOL_TLS if self.tls else PROTOCOL_TCP
        if protocol != allowed:
            # The client compares the answer with what it asked for and gives up.
            self._counters["hello_rejected"] += 1
            conn.close_after_flush = True
            self._send_raw(conn, frame(HELLO.pack(PROTOCOL_VERSION, protocol & allowed)))
            return
        if self._refuse_until and time.monotonic() < self._refuse_until:
            self._counters["refused"] += 1
            self._close(conn, reset=True)
            return
        conn.kind = "client"
        conn.protocol = protocol
        self._n_clients += 1
        self._counters["accepted"] += 1
        if self._n_clients > self._counters["peak_open"]:
            self._counters["peak_open"] = self._n_clients
        if self._max_clients is not None and self._n_served >= self._max_clients:
            conn.state = _WAITING
            self._waiting.append(conn)
            return
        self._admit(conn)

    def _admit(self, conn: _Conn) -> None:
        conn.served = True
        self._n_served += 1
        self._send_raw(conn, frame(HELLO.pack(PROTOCOL_VERSION, conn.protocol)))
        if conn.closed:
            return
        conn.last_active = time.monotonic()
        if conn.protocol == PROTOCOL_TLS:
            assert self._ssl_ctx is not None
            conn.inbio = ssl.MemoryBIO()
            conn.outbio = ssl.MemoryBIO()
            conn.tls = self._ssl_ctx.wrap_bio(conn.inbio, conn.outbio, server_side=True)
            conn.state = _HANDSHAKE
            if conn.rbuf:
                early = bytes(conn.rbuf)
                conn.rbuf.clear()
                data = self._tls_feed(conn, early)
                if data:
                    conn.rbuf += data
                    self._drain(conn)
        else:
            conn.state = _READY
            if conn.rbuf:
                self._drain(conn)

    def _promote_waiting(self) -> None:
        while self._waiting and (self._max_clients is None
                                 or self._n_served < self._max_clients):
            conn = self._waiting.popleft()
            if not conn.closed:
                self._admit(conn)

    # --- requests ---
    def _on_request(self, conn: _Conn, payload: bytes) -> None:
        msg = self._qm()
        try:
            msg.ParseFromString(payload)
        except Exception:
            self._counters["requests"] += 1
            self._counters["failed_transactions"] += 1
            self._answer(conn, {"status": -1, "info": "the request is not a valid queryMessage "
                                "protobuf"}, [])
            return
        if self._latency is not None and (self._latency_for is None
                                          or self._latency_for in msg.json):
            delay = self._latency()
            if delay > 0:
                conn.pending = True
                self._timer_seq += 1
                heapq.heappush(self._timers,
                               (time.monotonic() + delay, self._timer_seq, conn, msg))
                return
        self._execute(conn, msg)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, conn, msg = heapq.heappop(timers)
            if conn.closed:
                continue
            self._execute(conn, msg)
            if not conn.closed and conn.rbuf:
                self._drain(conn)

    def _execute(self, conn: _Conn, msg: Any) -> None:
        counters = self._counters
        counters["requests"] += 1
        try:
            query = json.loads(msg.json)
        except ValueError as e:
            counters["failed_transactions"] += 1
            self._answer(conn, {"status": -1, "info": f"malformed JSON in the query: {e}"}, [])
            return
        names = []
        if isinstance(query, list):
            by_command = counters["requests_by_command"]
            for cmd in query:
                if isinstance(cmd, dict) and len(cmd) == 1:
                    name = next(iter(cmd))
                    names.append(name)
                    by_command[name] += 1

        close_after = self._close_after
        garbage = None
        if close_after is not None:
            if close_after.command is None or close_after.command in names:
                self._close_after = None
                if not close_after.execute:
                    counters["fault_closed"] += 1
                    self._close(conn)
                    return
            else:
                close_after = None
        if self._garbage is not None and (self._garbage.command is None
                                          or self._garbage.command in names):
            garbage, self._garbage = self._garbage, None

        blobs: list[bytes] = []
        if "Authenticate" in names or "RefreshToken" in names:
            response: Any = self._session_command(query, names)
        elif self.auth and not self._session_ok(msg.token):
            counters["session_rejections"] += 1
            response = None
        else:
            why = None
            if self._session_user:  # only once a user other than the configured one logged in
                who = self._session_user.get(msg.token)
                if who is not None:
                    why = self._users.denied(who, names)
            if why is not None:
                response = {"status": -1, "info": why}
            else:
                response, blobs = self._store.execute(query, list(msg.blobs) if msg.blobs else [])
                # The store refuses user commands as unknown (and changes nothing):
                # looking for them only then keeps them off the path of other queries.
                if type(response) is dict and not USER_COMMANDS.isdisjoint(names):
                    response = self._user_commands(query, names)
                    blobs = []
            if type(response) is dict:
                counters["failed_transactions"] += 1

        if close_after is not None:
            counters["fault_closed"] += 1
            self._close(conn)
            return
        if garbage is not None:
            counters["garbage_sent"] += 1
            self._finish(conn, _GARBAGE_FRAME)
            return
        self._answer(conn, response, blobs)

    def _answer(self, conn: _Conn, response: Any, blobs: list[bytes]) -> None:
        out = self._qm()
        out.json = _REJECTED_JSON if response is None else json.dumps(response)
        if blobs:
            out.blobs.extend(blobs)
        self._finish(conn, frame(out.SerializeToString()))

    def _finish(self, conn: _Conn, data: bytes) -> None:
        if not conn.flagged and _FIONREAD is not None:
            # Bytes that arrived while this request was being executed are a second
            # request sent before the answer (one ioctl, ~0.5 us, no exception).
            try:
                fcntl.ioctl(conn.fd, _FIONREAD, self._ioctl_buf, True)
                if self._ioctl_buf != b"\0\0\0\0":
                    self._counters["sharing_violations"] += 1
            except OSError:
                pass
        conn.pending = False
        conn.flagged = False
        self._send_frame(conn, data)
        conn.last_active = time.monotonic()

    # --- sessions ---
    def _session_ok(self, token: str) -> bool:
        expiry = self._sessions.get(token)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._sessions[token]
            return False
        return True

    def _issue(self, user: str | None = None) -> dict[str, Any]:
        """A new session (of ``user``, None: the configured user) and its refresh token."""
        now = time.monotonic()
        if len(self._sessions) > 1000 or len(self._refresh) > 1000:
            self._sessions = {t: e for t, e in self._sessions.items() if e >= now}
            self._refresh = {t: v for t, v in self._refresh.items() if v[0] >= now}
            self._session_user = {t: u for t, u in self._session_user.items()
                                  if t in self._sessions}
        session = secrets.token_hex(16)
        refresh = secrets.token_hex(16)
        self._sessions[session] = now + self.session_ttl
        if user is not None:
            self._session_user[session] = user
        self._refresh[refresh] = (now + self.refresh_ttl, session)
        return {"status": 0, "session_token": session, "refresh_token": refresh,
                "session_token_expires_in": self.session_ttl,
                "refresh_token_expires_in": self.refresh_ttl}

    def _session_command(self, query: Any, names: list[str]) -> Any:
        if len(names) != 1 or len(query) != 1:
            return {"status": -1, "info": "Authenticate and RefreshToken must be the only "
                                          "command of their query"}
        name = names[0]
        params = query[0][name]
        if not isinstance(params, dict):
            return {"status": -1, "info": f"{name} (command 0): parameters must be an object"}
        if name == "Authenticate":
            return [{"Authenticate": self._authenticate(params)}]
        self._counters["refresh"] += 1
        rt = params.get("refresh_token")
        entry = self._refresh.pop(rt, None) if isinstance(rt, str) else None
        if entry is None or entry[0] < time.monotonic():
            self._counters["refresh_failed"] += 1
            return [{"RefreshToken": {"status": -1, "info": "RefreshToken: the refresh token is "
                                      "invalid, expired or already used"}}]
        self._sessions.pop(entry[1], None)  # the old session token is rotated away
        return [{"RefreshToken": self._issue(self._session_user.pop(entry[1], None))}]

    def _authenticate(self, params: dict[str, Any]) -> dict[str, Any]:
        self._counters["authenticate"] += 1
        user = params.get("username")
        password = params.get("password")
        token = params.get("token")
        who: str | None = None
        if self.auth:
            if password:
                ok = user == self.username and password == self.password
                if not ok and self._users.password_ok(user, password):
                    ok, who = True, user
                why = "wrong username or password"
            elif token:
                ok = token in self._tokens
                if not ok:
                    who = self._users.owner_of(token)
                    ok = who is not None
                why = "unknown or revoked token"
            else:
                ok = False
                why = "a password or a token is required"
            if not ok:
                self._counters["authenticate_failed"] += 1
                return {"status": -1, "info": f"Authenticate: authentication failed: {why}"}
        return self._issue(who)

    # --- users, roles, tokens ---
    def _user_commands(self, query: list[Any], names: list[str]) -> Any:
        """A query of user-management commands, all or nothing."""
        if len(names) != len(query) or not USER_COMMANDS.issuperset(names):
            return {"status": -1, "info": "user, role and token commands ("
                    + ", ".join(sorted(USER_COMMANDS)) + ") must not share a query with "
                    "other commands"}
        saved = copy.deepcopy((self._users.users, self._users.roles, self._users.token_owner))
        answers, changed = [], []
        try:
            for cmd, name in zip(query, names, strict=True):
                answer, user = self._users.run(name, cmd[name])
                answers.append({name: answer})
                if user is not None:
                    changed.append(user)
        except UserError as e:
            self._users.users, self._users.roles, self._users.token_owner = saved
            return {"status": -1, "info": str(e)}
        for user in changed:
            self._end_sessions(user)
        return answers

    def _end_sessions(self, user: str) -> None:
        """Forget the sessions and refresh tokens of ``user`` (it changed)."""
        ended = {t for t, u in self._session_user.items() if u == user}
        for t in ended:
            self._sessions.pop(t, None)
            del self._session_user[t]
        self._refresh = {r: v for r, v in self._refresh.items() if v[1] not in ended}

    # --- control channel ---
    def _on_control(self, conn: _Conn, payload: bytes) -> None:
        self._counters["control_requests"] += 1
        try:
            req = json.loads(payload)
            method = req["method"]
            args = req.get("args", [])
            kwargs = req.get("kwargs", {})
            if method not in CONTROL_METHODS:
                raise ValueError(f"unknown control method {method!r}")
            result = getattr(self, method)(*args, **kwargs)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self._send_raw(conn, frame(json.dumps(reply).encode()))

    # --- idle timeout ---
    def _check_idle(self, now: float) -> None:
        limit = self._idle_timeout
        if limit is None:
            return
        self._next_idle_check = now + min(limit / 4, 1.0)
        for conn in list(self._conns.values()):
            if (conn.kind != "control" and conn.state != _WAITING and not conn.pending
                    and not conn.out and now - conn.last_active > limit):
                self._counters["idle_closed"] += 1
                self._close(conn)


# Exported for documentation and the CLI.
SUPPORTED = sorted(SUPPORTED_COMMANDS | USER_COMMANDS)
