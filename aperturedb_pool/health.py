"""Liveness checks that cost no round trip.

A pooled connector sits idle between leases.  If the server closed the
connection meanwhile (restart, idle timeout, a proxy reset), the socket becomes
readable: a read would return EOF or an error.  If the server wrote something
nobody asked for (a late response to an interrupted query, garbage), the socket
holds unread bytes.  Either way the connector must not be handed out: one
zero-timeout ``poll`` on the file descriptor tells, without a round trip, and
works the same for TLS sockets (whose decrypted-but-unread bytes ``pending()``
reports).
"""

from __future__ import annotations

import select
import socket
from typing import Any

__all__ = ["PEER_CLOSED", "TLS_READABLE", "POLL_BAD", "socket_of", "probe_socket", "peek",
           "apply_tcp_keepalive"]

#: probe reasons that mean the server closed the connection
PEER_CLOSED = "peer closed the connection"
TLS_READABLE = "socket readable while idle (TLS: peer closed or unread bytes)"

#: poll events that make an idle connection unusable (readable, error, hung up)
POLL_BAD = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


def socket_of(connector: Any) -> Any:
    """The connector's socket (``Connector.conn``), or None for objects without one."""
    return getattr(connector, "conn", None)


def probe_socket(sock: Any) -> str | None:
    """Return None if ``sock`` looks healthy and idle, else a short reason.

    Healthy means: open, nothing to read, no error pending.  The check never
    blocks and never consumes data.
    """
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return "socket closed"
    if fd < 0:
        return "socket closed"
    pending = getattr(sock, "pending", None)
    if pending is not None:
        try:
            if pending():
                return "unread bytes in the TLS buffer"
        except (OSError, ValueError):
            return "socket closed"
    poller = select.poll()
    poller.register(fd, POLL_BAD)
    try:
        events = poller.poll(0)
    except OSError as e:
        return f"poll failed: {e}"
    if not events:
        return None
    ev = events[0][1]
    if ev & (select.POLLERR | select.POLLNVAL):
        return "socket error"
    if ev & select.POLLHUP:
        return PEER_CLOSED
    # Readable: EOF or unread bytes.  Peek to say which (plain sockets only;
    # TLS sockets refuse flags, and either way the connector is unusable).
    if type(sock) is socket.socket:
        try:
            data = peek(sock)
        except OSError as e:
            return f"socket error: {e}"
        if data is None:
            return None
        return "unread bytes on the socket" if data else PEER_CLOSED
    return TLS_READABLE


def peek(sock: socket.socket) -> bytes | None:
    """One byte of a plain socket, left unread: b"" at EOF, None when nothing
    has arrived.  Never blocks; raises OSError for a socket in error."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def apply_tcp_keepalive(sock: Any, idle: float, interval: float, count: int) -> None:
    """Turn TCP keepalive on with the given settings, where the platform has them."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt_name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                            ("TCP_KEEPCNT", count)):
        opt = getattr(socket, opt_name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, max(1, int(round(value))))
