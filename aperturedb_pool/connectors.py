"""Making pooled connectors from a template, and the settings the pool owns.

The pool never queries through the user's template: it clones it (``clone()``,
or ``create_new_connection()`` on SDKs before 0.4.33), so every pooled connector
shares the template's authenticated session.  Each clone is then *instrumented*:
a few instance attributes shadow SDK methods so that the pool

* knows whether a query is in flight (an exception that interrupts one leaves
  the stream unusable: the connector must be discarded, not reused);
* makes exactly one attempt per query: transport failures are raised at once,
  classified (``ConnectFailed``: nothing was delivered, ``OutcomeUnknown``: the
  request was sent and no answer read), instead of the SDK's own loop that
  reconnects, sleeps and re-sends the same bytes;
* checks the socket with a zero-timeout poll just before sending, so a
  connection the server already closed fails as "not sent" rather than as an
  unknown outcome;
* applies its TCP keepalive and per-query timeout settings to the socket.

The template keeps its own configuration: each clone gets a private copy of the
SDK ``Configuration`` (single attempt, no retry sleep).  Objects without the
SDK's private methods (stand-ins in tests and benchmarks) only get the query
wrapper.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import select
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any, Callable, Protocol, cast

from aperturedb_pool.diagnose import authentication_failed, classify_connect_error
from aperturedb_pool.errors import (
    ConnectFailed,
    ConnectorError,
    ConnectorUnusable,
    LeaseError,
    OutcomeUnknown,
    QueryTimeout,
)
from aperturedb_pool.health import POLL_BAD, apply_tcp_keepalive, peek

__all__ = ["Connector", "Phase", "OwnershipCheck", "clone_factory", "default_template",
           "instrument", "bound_socket", "read_frame", "write_frame", "FrameDesync",
           "FrameTooLarge", "MAX_FRAME", "TIMEOUT_SLACK", "WATCHED_BEYOND"]


class Connector(Protocol):
    """What the pool needs of a connector: ``query`` and ``close``.

    A template (``ConnectionPool(template)``) needs ``clone()`` too (or, on
    SDKs before 0.4.33, ``create_new_connection()``), checked when the pool
    is built; ``aperturedb.Connector`` is one.  ``ConnectionPool`` is generic
    in its connector type: ``pool.lease()`` gives the template's type.
    """

    def query(self, q: Any, blobs: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


logger = logging.getLogger("aperturedb_pool")
_monotonic = time.monotonic
# Deadlines (set by the pool from time.monotonic) are read with this clock;
# tests shift _monotonic alone to make a connector look silent.
_deadline_clock = time.monotonic


# The SDK logs its own retry-loop warnings and a CRITICAL "Failed to query"
# with a stack for every failure; for pooled connectors the pool raises one
# classified error instead, so those records are dropped when they come from
# a query of a pooled connector: when the pool's query wrapper is on the
# logging thread's stack.  Looking costs nothing until the SDK logs (a flag
# set around every query would cost every query).
_SDK_NOISE = ("Failed to query", "OS error on process", "SSL error on process",
              "SSL connection error", "Connection broken", "Error connecting to server",
              "Attribute error on process", "Error receiving", "Error wrapping socket",
              "You can use the ca_cert parameter", "The certificate file does not exist")
_wrapper_codes: set[Any] = set()  # code objects of the query wrappers (one per module load)
_STACK_LOOKUP = 40  # frames: logging's own (about 6) plus the SDK's (about 4)


def _in_pooled_query() -> bool:
    f: Any = sys._getframe(1)
    for _ in range(_STACK_LOOKUP):
        if f is None:
            return False
        if f.f_code in _wrapper_codes:
            return True
        f = f.f_back
    return False


class _SDKNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (msg.startswith(_SDK_NOISE) and _in_pooled_query())


_filter_installed = False
_filter_lock = threading.Lock()


def _install_noise_filter() -> None:
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            logging.getLogger("aperturedb.Connector").addFilter(_SDKNoiseFilter())
            _filter_installed = True


def clone_factory(template: Any) -> Callable[[], Any]:
    """The template's clone method, or a TypeError naming what is missing."""
    if isinstance(template, type):
        # Its clone() is an unbound function: every open would fail with
        # "missing 1 required positional argument".
        raise TypeError(
            f"template: got the class {template.__name__!r}, not a connector; pass an instance, "
            f"e.g. ConnectionPool({template.__name__}(host=..., user=..., password=...))")
    fn = getattr(template, "clone", None)
    if not callable(fn):
        fn = getattr(template, "create_new_connection", None)
    if not callable(fn):
        raise TypeError(
            f"template: expected an aperturedb Connector (an object with clone() or, on SDKs "
            f"before 0.4.33, create_new_connection()), got {type(template).__name__!r}")
    for method in ("query", "close"):
        if not callable(getattr(template, method, None)):
            raise TypeError(f"template: {type(template).__name__!r} has no {method}() method; "
                            f"pass an aperturedb Connector")
    return cast("Callable[[], Any]", fn)


def default_template() -> Any:
    """A template built from the SDK's own configuration chain (APERTUREDB_KEY, adb config...)."""
    try:
        from aperturedb.CommonLibrary import create_connector
    except ImportError as e:  # pragma: no cover - the SDK is a dependency
        raise TypeError("template: none given and the aperturedb SDK is not installed; "
                        "pass a Connector") from e
    return create_connector()


# errno values of a send that failed because the peer is gone.
_NOT_DELIVERED = frozenset(e for e in (getattr(errno, n, None) for n in (
    "EPIPE", "ECONNRESET", "ECONNABORTED", "ENOTCONN", "EBADF", "ESHUTDOWN")) if e is not None)


def _peer_closed(sock: Any) -> bool:
    # A readable plain socket: peek one byte to tell EOF from unread data.
    if type(sock) is not socket.socket:
        return True  # TLS: cannot peek; a closed peer is the usual cause
    try:
        return peek(sock) == b""
    except OSError:
        return True


class Phase:
    """Where the current query of one connector stands.  Touched only by the
    thread holding the connector's lease (or the maintenance thread while it
    pings an idle connector it has taken out of the pool), so it needs no lock."""

    __slots__ = ("connecting", "sent", "outstanding", "last_io", "failed", "requests",
                 "reached", "deadline", "bound", "watched", "expired")

    def __init__(self) -> None:
        self.connecting = False
        # The current query started writing a request (reset per query).
        self.sent = False
        # Requests whose write started minus responses read in full, over the
        # connector's whole life.  Counted before the write and after the
        # read, so an interruption anywhere in between (a signal handler, a
        # timeout, KeyboardInterrupt), in the caller's request or in a
        # session step the SDK runs first, leaves it above zero: an answer
        # may still arrive, and the connector must never send again.  State
        # of the request, not of the last exchange: a refresh answered
        # before the caller's request does not make the caller's request
        # answered.
        self.outstanding = 0
        # time.monotonic() when the last query started (inf from a connect to
        # the end of the first query: see connect); the pre-send probe runs
        # when the connector was silent for longer than probe_after.
        self.last_io = 0.0
        # The classified error of the current query, when the SDK's own loop
        # may catch it (QueryTimeout is a TimeoutError, hence an OSError).
        self.failed: BaseException | None = None
        # Complete request frames handed to the kernel over this connector's
        # life: a unit of several queries compares it before and after, to
        # know whether any of its requests may have reached the server.
        self.requests = 0
        # Queries (as the caller sees them) that may have run on the server:
        # every query that did not fail with ConnectFailed.
        self.reached = 0
        # time.monotonic() by which the current query (write and whole
        # response) must be done, or None: set by the pool around the
        # attempts of a retry policy with a deadline.
        self.deadline: float | None = None
        # The deadline the socket's timeout was last set from (bound_socket),
        # or None (the socket has the pool's query_timeout): with one, every
        # read and write of the current query is bounded by the socket itself.
        self.bound: float | None = None
        # The pool's background thread watches this query's deadline (set
        # with it by the pool, for its queries): when the deadline is far, the
        # socket stays blocking (a socket with a timeout polls before every
        # read and write: one more system call, one more GIL release each)
        # and an overdue query's socket is shut down by the watcher, which
        # sets ``expired`` first so the failure reads as a QueryTimeout.
        self.watched = False
        self.expired = False


def _describe(conn: Any) -> str:
    host = getattr(conn, "host", None)
    port = getattr(conn, "port", None)
    return f"{host}:{port}" if host is not None else type(conn).__name__


def _is_permanent_connect_error(e: BaseException) -> bool:
    # Certificate problems (the SDK turns them into AssertionError), a protocol
    # the server refuses, a missing CA file: retrying cannot help.
    if isinstance(e, (AssertionError, ssl.SSLCertVerificationError, FileNotFoundError)):
        return True
    return "did not accept protocol" in str(e)


def instrument(conn: Any, slot: Any, *, tcp_keepalive: tuple[float, float, int] | None,
               query_timeout: float | None, probe_after: float = 0.5,
               connect_timeout: float | None = 10.0) -> bool:
    """Install the pool's wrappers on one freshly cloned connector.

    ``slot`` is the pool's record of the connector: the wrappers read and write
    ``slot.in_flight``, ``slot.phase``, ``slot.poller`` and call
    ``slot.check_owner()`` when the pool's ownership check is on.  Returns
    False when the object takes no instance attributes (a stand-in with
    ``__slots__``): the pool then cannot tell a query in flight and treats any
    exception inside a lease as one.
    """
    orig_query = conn.query
    try:
        conn.query = orig_query
    except AttributeError:
        return False
    phase = slot.phase
    sdk = all(hasattr(conn, a) for a in ("_send_msg", "_recv_msg", "_connect", "config"))
    if sdk and type(conn).__name__ == "ConnectorRest":
        raise TypeError("template: a ConnectorRest (the SDK's HTTP client) holds no socket "
                        "to pool; configure a TCP connector (use_rest=False)")
    where = _describe(conn)

    if sdk:
        _install_noise_filter()
        cfg = conn.config
        try:
            own = copy.copy(cfg)
            own.retry_max_attempts = 1
            own.retry_interval_seconds = 0
            conn.config = own
        except Exception:  # pragma: no cover - exotic configuration objects
            pass
        orig_send = conn._send_msg
        orig_recv = conn._recv_msg
        orig_connect_impl = conn._connect
        # The SDK's own framing (not a subclass's override): the wrappers
        # below then do the framing themselves (write_frame/read_frame), one
        # Python call per message instead of a wrapper around the SDK's.
        own = _is_sdk_framing(orig_send, orig_recv)
        scratch = memoryview(bytearray(_RECV_CHUNK)) if own else None

        def _send_msg(data: bytes) -> None:
            if phase.connecting:
                # The hello: bound the handshake (and the TLS handshake that
                # follows on the same socket) by connect_timeout.
                sock = conn.conn
                if connect_timeout is not None and sock is not None:
                    sock.settimeout(connect_timeout)
                orig_send(data)
                return
            if phase.bound is not None:
                # A session step may have run since the query started: the
                # write too ends by the deadline (a deadline already past
                # leaves it a moment: a small frame still goes out, and the
                # read that follows times out).
                _within(conn.conn, phase.bound, at_least=0.001)
            # Counted before the first byte is written (see Phase.outstanding).
            phase.outstanding += 1
            phase.sent = True
            try:
                if own:
                    write_frame(conn.conn, data)
                else:
                    orig_send(data)
            except OSError as e:
                if phase.expired:
                    late = QueryTimeout(f"sending to {where} did not finish within the retry "
                                        f"deadline; the request may have reached the server")
                    phase.failed = late
                    raise late from e
                if e.errno in _NOT_DELIVERED:
                    # The peer is gone: sendall could not complete the frame,
                    # and the server executes only complete frames.
                    err = ConnectFailed(f"sending to {where} failed ({e!r}); the request was "
                                        f"not delivered")
                    err.peer_closed = True
                    raise err from e
                if isinstance(e, socket.timeout) and phase.deadline is not None:
                    late = QueryTimeout(f"sending to {where} did not finish within the retry "
                                        f"deadline; the request may have reached the server")
                    phase.failed = late
                    raise late from e
                # Anything else (a send timeout, say): whether the frame was
                # complete is not known.
                raise OutcomeUnknown(f"sending to {where} failed ({e!r}); the request may "
                                     f"have reached the server") from e
            # Any other exception (an asynchronous timeout or signal handler
            # raising after the frame was written) propagates unchanged: the
            # request stays outstanding, so the connector is discarded and no
            # policy retries it.
            phase.requests += 1

        def _recv_msg() -> Any:
            try:
                response = read_frame(conn.conn, scratch, phase.bound) if own else orig_recv()
            except socket.timeout as e:
                if phase.connecting:
                    raise ConnectFailed(f"handshake with {where} timed out") from e
                err = QueryTimeout(
                    f"no response from {where} within the "
                    f"{'retry deadline' if phase.deadline is not None else 'query timeout'}; "
                    f"the query may or may not have run, check before re-sending a write")
                phase.failed = err
                raise err from e
            except (OSError, struct.error, ValueError, AttributeError) as e:
                # AttributeError: the socket was closed under the query
                # (conn.conn is None).
                if phase.connecting:
                    raise ConnectFailed(f"handshake with {where} failed: {e!r}") from e
                if phase.expired:  # shut down by the deadline's watcher (TLS: an error)
                    late = QueryTimeout(
                        f"no response from {where} within the retry deadline; the query may "
                        f"or may not have run, check before re-sending a write")
                    phase.failed = late
                    raise late from e
                unknown = OutcomeUnknown(
                    f"connection to {where} failed after the request was sent ({e!r}); the "
                    f"query may or may not have run")
                unknown.peer_closed = isinstance(e, (ConnectionResetError, BrokenPipeError))
                phase.failed = unknown
                raise unknown from e
            if response is None:
                if phase.connecting:
                    raise ConnectFailed(f"{where} closed the connection during the handshake")
                if phase.expired:  # shut down by the deadline's watcher
                    late = QueryTimeout(
                        f"no response from {where} within the retry deadline; the query may "
                        f"or may not have run, check before re-sending a write")
                    phase.failed = late
                    raise late
                eof = OutcomeUnknown(
                    f"{where} closed the connection before answering; the query may or may "
                    f"not have run")
                eof.peer_closed = True
                phase.failed = eof
                raise eof
            if phase.outstanding:
                # A whole response read: one request fewer is owed an answer.
                # (A hello's reply comes only on a connector that owes none:
                # connect() refuses to reconnect a connector in flight.)
                phase.outstanding -= 1
            return response

        def connect(details: Any = None) -> None:
            if phase.failed is not None:
                # The SDK's loop caught our QueryTimeout (an OSError) and wants
                # to reconnect and renew the session inside the failed query:
                # stop it there and raise the classified error instead.
                raise phase.failed
            if slot.in_flight:
                # Any other reconnect inside a query: the SDK's loop caught an
                # error that did not come from the wrappers (an OSError from a
                # signal handler, say), or the connection was already gone.
                # Re-sending is the retry policy's decision, never the SDK's.
                if phase.sent:
                    raise OutcomeUnknown(f"the connection to {where} failed during the query; "
                                         f"the query may or may not have run")
                raise ConnectFailed(f"the connection to {where} was lost before the query was "
                                    f"sent; the query was not sent")
            phase.connecting = True
            try:
                orig_connect_impl()
            except ConnectorError:
                raise
            except Exception as e:
                # A misconfiguration: one error naming the fix (see diagnose).
                permanent = classify_connect_error(e, conn, where)
                if permanent is not None:
                    raise permanent from None
                raise ConnectFailed(f"could not connect to {where}: {e!r}",
                                    permanent=_is_permanent_connect_error(e)) from e
            finally:
                phase.connecting = False
            sock = conn.conn
            if tcp_keepalive is not None:
                try:
                    apply_tcp_keepalive(sock, *tcp_keepalive)
                except OSError:  # pragma: no cover - platform without the options
                    pass
            if sock is None:
                return
            sock.settimeout(query_timeout)  # replaces the handshake's connect_timeout
            poller = select.poll()
            poller.register(sock.fileno(), POLL_BAD)
            slot.poller = poller
            # No pre-send probe until the first response is read: a TLS 1.3
            # server's post-handshake messages (session tickets) make a fresh
            # socket readable with no application data; that first read
            # consumes them.
            phase.last_io = math.inf

        conn._send_msg = _send_msg
        conn._recv_msg = _recv_msg
        conn.connect = connect
        _wrapper_codes.add(connect.__code__)  # the SDK's connect logs are noise too

        # The SDK refreshes the shared session (_refresh_token) or logs in
        # (_authenticate, reached through authenticate() only when the shared
        # session has none) inside query(), before it sends the caller's query
        # (or, after the server rejected the session, before it sends it
        # again: the rejected request did not run).  A transport failure there
        # means the caller's query did not run: ConnectFailed, which any policy
        # may retry.  (The SDK's other caller, its reconnect loop, never gets
        # that far: connect() below refuses to reconnect inside a query.)
        # The login itself is wrapped, not authenticate(), which the SDK calls
        # before every query: a wrapper there would cost every query a call.
        login = "_authenticate" if callable(getattr(conn, "_authenticate", None)) \
            else "authenticate"
        for name in ("_refresh_token", login):
            orig = getattr(conn, name, None)
            if callable(orig):
                setattr(conn, name, _before_the_query(orig, where, conn if name == login
                                                      else None))

    def query(q: Any, blobs: Any = None) -> Any:
        if slot.check_owner is not None:
            slot.check_owner()
        if slot.in_flight:
            # An earlier query of this lease failed or was interrupted (a
            # signal handler, KeyboardInterrupt, a timeout caught by the
            # caller) and its answer may still arrive: sending now would read
            # that answer as this query's.  Nothing is sent.
            raise ConnectorUnusable(
                f"this connector to {where} cannot send another query: an earlier query on it "
                f"was interrupted or failed before its answer was read, so that answer could be "
                f"taken for this one's. The query was not sent. End the lease (the connector is "
                f"discarded) and lease another one", query=q)
        slot.in_flight = True
        phase.sent = False
        phase.failed = None
        try:
            now = _monotonic()
            deadline = phase.deadline if sdk else None  # a stand-in has no socket to bound
            if deadline is not None and (query_timeout is not None or not phase.watched or
                                         deadline - _deadline_clock() < WATCHED_BEYOND):
                # A deadline bounds the whole exchange: the write and every
                # read (read_frame re-arms the timeout per read).
                bound_socket(conn.conn, deadline - _deadline_clock(), query_timeout)
                phase.bound = deadline
            elif phase.bound is not None:
                # No deadline, or a far one the pool's background thread
                # watches: the socket goes back to the pool's query_timeout
                # (None by default: blocking, one system call per read).
                phase.bound = None
                _restore_timeout(conn, query_timeout)
            if deadline is not None:
                try:
                    lock = conn.shared_data.lock  # the SDK's, shared by every clone
                except AttributeError:  # an SDK subclass without a shared session
                    lock = None
                if lock is not None and lock.locked():  # rare: a clone renews the session
                    _await_session_lock(lock, deadline, where)
            if now - phase.last_io > probe_after:
                # Idle longer than probe_after while leased: check the socket
                # before anything is sent (the same rule as the checkout
                # probe).  The probe is a syscall, and every syscall releases
                # the GIL: under contention that costs a thread switch, so a
                # connection used moments ago gets none.
                _probe_before_send(conn, slot, where)
            phase.last_io = now
            result = orig_query(q, [] if blobs is None else blobs)
        except ConnectorError as e:
            if e.query is None:
                e.query = q
            if not isinstance(e, ConnectFailed):
                phase.reached += 1
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            phase.reached += 1
            # Name the error only: its repr would quote response bytes.
            raise OutcomeUnknown(f"malformed response from {where} ({type(e).__name__}); the "
                                 f"query may or may not have run", query=q) from e
        except BaseException as e:
            phase.reached += 1
            if type(e).__name__ == "DecodeError":
                raise OutcomeUnknown(
                    f"malformed response from {where} (not a protobuf message); the query "
                    f"may or may not have run", query=q) from e
            if sdk and phase.outstanding == 0 and conn.conn is not None and conn.connected:
                # Every request written was answered in full: the stream is
                # intact (the SDK raised on a complete response, such as a
                # failed login, or an interruption came before the first
                # byte of a request or after the last byte of its answer).
                # Anything else (a request still owed an answer, a stand-in,
                # which gives no such evidence) stays in flight: discarded.
                slot.in_flight = False
            raise
        slot.in_flight = False
        phase.reached += 1
        return result

    _wrapper_codes.add(query.__code__)
    conn.query = query
    return True


def _restore_timeout(conn: Any, query_timeout: float | None) -> None:
    # A query without a deadline after one with: the socket gets the pool's
    # per-query timeout back (the socket may be gone: a failed query).
    sock = conn.conn
    if sock is not None:
        try:
            sock.settimeout(query_timeout)
        except OSError:
            pass


#: A deadline further than this when a pool query starts is enforced by the
#: pool's background thread (``Phase.watched``), closer ones by the socket's
#: timeout.
WATCHED_BEYOND = 3.0

#: How far a socket timeout may differ from the time left before a deadline
#: and still be kept: setting a timeout is a system call (which releases the
#: GIL: a thread switch under contention), so consecutive queries with about
#: the same time left reuse the setting.  A read may end this much after the
#: deadline.
TIMEOUT_SLACK = 0.05


def bound_socket(sock: Any, left: float, query_timeout: float | None = None) -> None:
    """Make the next read or write of ``sock`` end within about ``left`` seconds
    (or ``query_timeout``, if shorter), give or take ``TIMEOUT_SLACK``."""
    if sock is None:
        return
    if query_timeout is not None and query_timeout < left:
        left = query_timeout
    left = max(left, 0.001)  # 0 would make the socket non-blocking
    current = sock.gettimeout()
    if current is None or abs(current - left) > TIMEOUT_SLACK:
        sock.settimeout(left)


def _within(sock: Any, deadline: float, at_least: float = 0.0) -> None:
    # Before a read of a response (or a write): shorten the socket's timeout
    # if it would let the read end later than the deadline (never lengthen
    # it: it may be the shorter query_timeout).
    left = max(deadline - _deadline_clock(), at_least)
    if left <= 0:
        raise socket.timeout("the deadline passed while reading a response")
    current = sock.gettimeout()
    if current is None or current > left + TIMEOUT_SLACK:
        sock.settimeout(left)


# The wire framing (see the SDK's Connector and ../shared/docs/APERTUREDB.md):
# a native-order unsigned int length prefix, then the protobuf message.
_FRAME_LEN = struct.Struct("@I")
_LARGE_MESSAGE = 2048 * 2**20  # the server's default limit on one message
#: The largest response frame accepted: the protocol's message limit (newer
#: servers: 2 GiB).  A larger length prefix is not an ApertureDB answer.
MAX_FRAME = _LARGE_MESSAGE


def write_frame(sock: Any, data: bytes) -> None:
    """Send one framed message (the SDK's ``_send_msg``, for pooled connectors)."""
    if len(data) > _LARGE_MESSAGE:
        logger.warning("sending a %d-byte message: larger than the server's default limit "
                       "(2 GiB); the server may close the connection", len(data))
    sock.sendall(_FRAME_LEN.pack(len(data)) + data)


class FrameDesync(ValueError):
    """More bytes arrived than the frame being read: the stream is out of step."""


class FrameTooLarge(ValueError):
    """A length prefix above the protocol's limit: the peer is not speaking the
    protocol, or the stream is out of step."""


_RECV_CHUNK = 16384  # one read covers a typical response, header and body
# Reads of a large body go through a buffer of at most this size, so memory
# grows with what has arrived, never with what a length prefix announces.
_BODY_CHUNK = 1 << 20


def read_frame(sock: Any, scratch: memoryview | None = None,
               deadline: float | None = None) -> bytes | bytearray | None:
    """Read one framed message; None if the peer closed the connection first.

    One ``recv_into`` usually brings the length prefix and the whole body
    (the SDK's ``_recv_msg`` makes two reads, and every read releases and
    retakes the GIL).  ``scratch`` is the caller's reusable buffer of
    ``_RECV_CHUNK`` bytes; it never holds data between calls.  Bytes beyond the
    frame mean the server sent something nobody asked for: ``FrameDesync``.
    A length prefix split across reads is completed instead of misread; one
    above ``MAX_FRAME`` raises ``FrameTooLarge`` before anything is allocated,
    and a large body is collected as it arrives (never allocated up front).
    With ``deadline`` (a ``time.monotonic()`` value) every read is bounded by
    the time left (see ``bound_socket``), so the whole frame is:
    ``socket.timeout`` when it passes.
    """
    if scratch is None:
        scratch = memoryview(bytearray(_RECV_CHUNK))
    if deadline is not None:
        _within(sock, deadline)
    got = sock.recv_into(scratch)
    while got < 4:
        if got == 0:
            return None  # EOF
        if deadline is not None:
            _within(sock, deadline)
        k = sock.recv_into(scratch[got:4])
        if k == 0:
            return None  # EOF inside the length prefix
        got += k
    (n,) = _FRAME_LEN.unpack_from(scratch)
    if n > MAX_FRAME:
        raise FrameTooLarge(f"a response frame announced {n} bytes, more than the protocol's "
                            f"limit of {MAX_FRAME}: the peer is not an ApertureDB server, or "
                            f"the stream is out of step")
    end = 4 + n
    if got >= end:
        if got > end:
            raise FrameDesync(f"{got - end} byte(s) arrived beyond a {n}-byte response frame")
        return scratch[4:end].tobytes()
    # Larger than what arrived so far (or than the scratch buffer): grow the
    # body with what arrives, through a bounded buffer.
    body = bytearray(scratch[4:got])
    chunk = memoryview(bytearray(min(n - len(body), _BODY_CHUNK)))
    while len(body) < n:
        if deadline is not None:
            _within(sock, deadline)
        k = sock.recv_into(chunk, min(n - len(body), len(chunk)))
        if not k:
            return None  # EOF inside the body
        body += chunk[:k]
    return body


def _is_sdk_framing(send: Any, recv: Any) -> bool:
    """True when ``send``/``recv`` (a connector's ``_send_msg``/``_recv_msg``) are
    the SDK's own methods: not set on the instance, not overridden by a
    subclass, not patched on the class (by name and source file of the code)."""
    for method, name in ((send, "_send_msg"), (recv, "_recv_msg")):
        code = getattr(getattr(method, "__func__", None), "__code__", None)
        if code is None or code.co_name != name or not code.co_filename.replace(
                "\\", "/").endswith("aperturedb/Connector.py"):
            return False
    return True


def _before_the_query(fn: Callable[..., Any], where: str,
                      login_of: Any = None) -> Callable[..., Any]:
    """Wrap a session step the SDK runs before sending the caller's query
    (``login_of``: the connector, when the step is its login)."""
    def step(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConnectorError as e:
            if isinstance(e, ConnectFailed):
                raise
            err = ConnectFailed(f"the session step before the query failed on {where} ({e}); "
                                f"the query was not sent")
            err.peer_closed = e.peer_closed
            raise err from e
        except Exception as e:
            if login_of is not None and _raised_in(e, "_authenticate"):
                # The server answered the login and refused it.
                raise authentication_failed(e, login_of, where) from None
            raise
    return step


def _raised_in(e: BaseException, function: str) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == function


def _await_session_lock(lock: Any, deadline: float, where: str) -> None:
    """Before a query under a deadline: the SDK starts every query by taking the
    session lock shared by every clone, which another connector may hold for a
    whole refresh against a slow server.  Wait until it is free, no longer than
    the deadline (nothing is sent yet).  It is watched, not taken: between
    taking a lock with a timeout and the statement that would release it, an
    interruption could leave it held for every clone.  (A renewal the SDK runs
    again later in the same query, after the server rejected the session, is
    not covered: it waits for the lock as the SDK does.)"""
    while lock.locked():
        if _deadline_clock() >= deadline:
            raise ConnectFailed(f"another connector was renewing the session with {where} "
                                f"until the retry deadline passed; the query was not sent")
        time.sleep(_SESSION_LOCK_POLL)


_SESSION_LOCK_POLL = 0.005


def _probe_before_send(conn: Any, slot: Any, where: str) -> None:
    poller = slot.poller
    if poller is None:
        return  # a stand-in, or not connected yet (the SDK connects inside query)
    sock = conn.conn
    pending = getattr(sock, "pending", None)
    events = poller.poll(0)
    if events or (pending is not None and pending()):
        err = ConnectFailed(
            f"connection to {where} was closed or desynchronised before the request was "
            f"sent; the request was not sent")
        err.peer_closed = bool(events and events[0][1] & select.POLLHUP) or _peer_closed(sock)
        raise err


class OwnershipCheck:
    """The debug ownership check: a callable installed as ``slot.check_owner``."""

    __slots__ = ("slot",)

    def __init__(self, slot: Any) -> None:
        self.slot = slot

    def __call__(self) -> None:
        owner = self.slot.owner
        if owner is None:
            raise LeaseError("this connector is not leased: it was used after its lease ended "
                             "(keep using it only inside the 'with pool.lease()' block)")
        me = threading.get_ident()
        if owner != me:
            raise LeaseError(f"this connector is leased to thread {owner}, not to the calling "
                             f"thread {me}: a Connector must never be shared between threads")
