"""A loopback TCP proxy that breaks ApertureDB connections on purpose.

``FlakyProxy(upstream)`` listens on 127.0.0.1 (a free port) and relays every
accepted connection to ``upstream``.  It understands the framing (a 4-byte
native-order length, then the body; the first frame each way is the 8-byte
hello), so it can fault a connection at a precise point of one request:

========================  ===========================================================
``reset_before``          the request is dropped, both sides reset: it never ran
``reset_mid_request``     half of the request reaches the server, then both resets:
                          the server never gets a whole frame, so it never ran
``reset_after``           the request reaches the server (it runs), the answer is
                          dropped and both sides reset
``truncate``              the request runs; half of the answer is relayed, then reset
``delay``                 the answer is held for a random delay (``delay`` range),
                          then relayed (longer than the pool's query timeout: the
                          caller times out and the late answer must reach nobody)
``reset_hello``           the connection is reset during the hello (connect failure)
========================  ===========================================================

Each request is faulted with probability ``p_fault`` (one mode at random, by
``weights``); each new connection with ``p_hello``.  ``set_faults(False)``
stops injecting (for the final check).  Plaintext only (no TLS).

One thread multiplexes every socket with ``selectors``; ``counters()`` is a
snapshot.  Bounded: every buffer is drained by the loop, and ``stop()`` closes
every socket and joins the thread.
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import struct
import threading
import time
from typing import Any

_LEN = struct.Struct("@I")
MODES = ("reset_before", "reset_mid_request", "reset_after", "truncate", "delay")


class _Side:
    __slots__ = ("sock", "rbuf", "out", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.out = bytearray()
        self.closed = False


class _Pair:
    __slots__ = ("client", "server", "c_hello", "s_hello", "pending", "held", "last_due",
                 "dead")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = _Side(client)
        self.server = _Side(server)
        self.c_hello = False     # the client's hello was relayed
        self.s_hello = False     # the server's hello answer was relayed
        self.pending: str | None = None   # the fault waiting for the next answer
        self.held = 0            # answers held back by a delay
        self.last_due = 0.0      # when the last held answer goes out (keeps the order)
        self.dead = False


class FlakyProxy:
    def __init__(self, upstream: tuple[str, int], *, p_fault: float = 0.03,
                 p_hello: float = 0.01, weights: dict[str, float] | None = None,
                 delay: tuple[float, float] = (0.05, 0.5), seed: int | None = None) -> None:
        self.upstream = upstream
        self.p_fault = p_fault
        self.p_hello = p_hello
        self.weights = weights or {m: 1.0 for m in MODES}
        self.delay = delay
        self.rng = random.Random(seed)
        self.port = 0
        self._faults_on = True
        self._lock = threading.Lock()   # guards _counters (read by other threads)
        self._counters: dict[str, int] = {k: 0 for k in
                                          ("connections", "requests", "answers", "reset_hello",
                                           *MODES)}
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, _Pair, bytes]] = []
        self._seq = 0
        self._stop = False
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._pairs: set[_Pair] = set()

    # -- control (any thread) --
    def start(self) -> FlakyProxy:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen(512)
        lst.setblocking(False)
        self._listener = lst
        self.port = lst.getsockname()[1]
        self._wake_r.setblocking(False)
        self._sel.register(lst, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="flaky-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(10)

    def set_faults(self, on: bool) -> None:
        self._faults_on = on

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- loop (proxy thread only) --
    def _count(self, key: str) -> None:
        with self._lock:
            self._counters[key] += 1

    def _run(self) -> None:
        try:
            while not self._stop:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, ev in self._sel.select(timeout):
                    tag = key.data
                    if tag == "listen":
                        self._accept()
                    elif tag == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        pair, side_name = tag
                        if pair.dead:
                            continue
                        side = pair.client if side_name == "c" else pair.server
                        if ev & selectors.EVENT_WRITE:
                            self._flush(pair, side)
                        if ev & selectors.EVENT_READ and not pair.dead:
                            self._read(pair, side_name)
                self._fire_timers()
        finally:
            for pair in list(self._pairs):
                self._kill(pair, reset=False)
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._sel.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                c, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                s = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(c)
                continue
            for sock in (c, s):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(c, s)
            self._pairs.add(pair)
            self._sel.register(c, selectors.EVENT_READ, (pair, "c"))
            self._sel.register(s, selectors.EVENT_READ, (pair, "s"))
            self._count("connections")

    def _read(self, pair: _Pair, side_name: str) -> None:
        side = pair.client if side_name == "c" else pair.server
        try:
            data = side.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # One side closed: close the other one too (a normal close, not a fault).
            self._kill(pair, reset=False)
            return
        side.rbuf += data
        while not pair.dead:
            frame = _take_frame(side.rbuf)
            if frame is None:
                return
            if side_name == "c":
                self._on_request(pair, frame)
            else:
                self._on_answer(pair, frame)

    def _pick(self) -> str:
        total = sum(self.weights.values())
        x = self.rng.uniform(0, total)
        for mode, w in self.weights.items():
            x -= w
            if x <= 0:
                return mode
        return MODES[-1]

    def _on_request(self, pair: _Pair, frame: bytes) -> None:
        if not pair.c_hello:
            pair.c_hello = True
            if self._faults_on and self.rng.random() < self.p_hello:
                self._count("reset_hello")
                self._kill(pair, reset=True)
                return
            self._send(pair, pair.server, frame)
            return
        self._count("requests")
        mode = None
        if self._faults_on and self.rng.random() < self.p_fault:
            mode = self._pick()
        if mode == "reset_before":
            self._count(mode)
            self._kill(pair, reset=True)
            return
        if mode == "reset_mid_request":
            self._count(mode)
            self._send(pair, pair.server, frame[:max(1, len(frame) // 2)])
            self._flush(pair, pair.server)
            self._kill(pair, reset=True)
            return
        pair.pending = mode
        self._send(pair, pair.server, frame)

    def _on_answer(self, pair: _Pair, frame: bytes) -> None:
        if not pair.s_hello:
            pair.s_hello = True
            self._send(pair, pair.client, frame)
            return
        self._count("answers")
        mode, pair.pending = pair.pending, None
        if mode == "reset_after":
            self._count(mode)
            self._kill(pair, reset=True)
        elif mode == "truncate":
            self._count(mode)
            self._send(pair, pair.client, frame[:max(1, len(frame) // 2)])
            self._flush(pair, pair.client)
            self._kill(pair, reset=True)
        elif mode == "delay" or pair.held:
            if mode == "delay":
                self._count(mode)
            due = time.monotonic() + (self.rng.uniform(*self.delay) if mode == "delay" else 0)
            due = max(due, pair.last_due)
            pair.last_due = due
            self._seq += 1
            pair.held += 1
            heapq.heappush(self._timers, (due, self._seq, pair, frame))
        else:
            self._send(pair, pair.client, frame)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, pair, frame = heapq.heappop(self._timers)
            pair.held -= 1
            if not pair.dead:
                self._send(pair, pair.client, frame)

    def _send(self, pair: _Pair, side: _Side, data: bytes) -> None:
        if pair.dead:
            return
        side.out += data
        self._flush(pair, side)

    def _flush(self, pair: _Pair, side: _Side) -> None:
        if pair.dead:
            return
        while side.out:
            try:
                n = side.sock.send(side.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._kill(pair, reset=False)
                return
            del side.out[:n]
        name = "c" if side is pair.client else "s"
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if side.out else 0)
        try:
            self._sel.modify(side.sock, events, (pair, name))
        except (KeyError, ValueError, OSError):
            pass

    def _kill(self, pair: _Pair, reset: bool) -> None:
        if pair.dead:
            return
        pair.dead = True
        self._pairs.discard(pair)
        for side in (pair.client, pair.server):
            try:
                self._sel.unregister(side.sock)
            except (KeyError, ValueError, OSError):
                pass
            if reset:
                _reset(side.sock)
            else:
                try:
                    side.sock.close()
                except OSError:
                    pass


def _take_frame(buf: bytearray) -> bytes | None:
    if len(buf) < 4:
        return None
    (n,) = _LEN.unpack_from(buf)
    if len(buf) < 4 + n:
        return None
    frame = bytes(buf[:4 + n])
    del buf[:4 + n]
    return frame


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


__all__ = ["FlakyProxy", "MODES"]


def _selftest() -> Any:  # pragma: no cover - a manual check: python stress/_proxy.py
    import os
    os.environ.setdefault("ADB_LOG_FILE", "")
    from aperturedb_pool.testing import ServerProcess

    with ServerProcess(port=0) as srv, FlakyProxy(("127.0.0.1", srv.port), p_fault=0) as px:
        c = srv.connector(port=px.port)
        print(c.query([{"GetStatus": {}}]))
        print(px.counters())


if __name__ == "__main__":  # pragma: no cover
    _selftest()
