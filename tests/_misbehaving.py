"""A loopback server that speaks the protocol until it is asked a query, then misbehaves.

It answers the hello, ``Authenticate``, ``RefreshToken`` and ``GetStatus`` as the
real server does (so the SDK connects and the pool opens and pings connectors);
every other request gets ``mode``'s treatment:

``silent``     read, never answered (the connection stays open)
``huge``       answered with a length prefix of ``prefix`` and ``body`` bytes, then silence
``answer``     answered ``[{"Cmd": {"status": 0, "echo": <request json>}}]`` (a sane server)
``mute``       nothing is answered any more, not even ``GetStatus`` (set on a running server)

One thread per connection, bounded by ``stop()`` (which closes every socket).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from aperturedb_pool.testing._wire import HELLO, LENGTH, frame, query_message_class, recv_frame


class MisbehavingServer:
    def __init__(self, mode: str = "silent", *, prefix: int = 0xFFFFFFF0,
                 body: bytes = b"") -> None:
        self.mode = mode
        self.prefix = prefix
        self.body = body
        self.queries = 0
        self._qm = query_message_class()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def connector(self) -> Any:
        from aperturedb.Connector import Connector

        return Connector(host="127.0.0.1", port=self.port, user="admin", password="admin",
                         use_ssl=False, retry_interval_seconds=0)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            socks, self._socks = self._socks, []
        for s in [self._listener, *socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _answer(self, sock: socket.socket, payload: Any) -> None:
        msg = self._qm()
        msg.json = json.dumps(payload)
        sock.sendall(frame(msg.SerializeToString()))

    def _serve(self, sock: socket.socket) -> None:
        try:
            version, protocol = HELLO.unpack(recv_frame(sock))
            sock.sendall(frame(HELLO.pack(1, protocol & 1)))
            while True:
                msg = self._qm()
                msg.ParseFromString(recv_frame(sock))
                query = json.loads(msg.json)
                cmd = next(iter(query[0])) if isinstance(query, list) and query else ""
                if self.mode == "mute":
                    continue
                if cmd in ("Authenticate", "RefreshToken"):
                    self._answer(sock, [{cmd: {
                        "status": 0, "session_token": "s", "refresh_token": "r",
                        "session_token_expires_in": 3600, "refresh_token_expires_in": 36000}}])
                elif cmd == "GetStatus":
                    self._answer(sock, [{"GetStatus": {"status": 0, "info": "OK"}}])
                else:
                    with self._lock:
                        self.queries += 1
                    if self.mode == "answer":
                        self._answer(sock, [{cmd: {"status": 0, "echo": msg.json}}])
                    elif self.mode == "huge":
                        sock.sendall(LENGTH.pack(self.prefix) + self.body)
                    # "silent" (and "huge" after its bytes): never answer.
        except (OSError, ValueError, ConnectionError):
            pass
