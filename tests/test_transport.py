"""The pooled connectors' transport: the framing they do themselves, the
fallback to a Connector subclass's own, and the SDK log noise they drop.

Framing runs over a real ``socket.socketpair``; the rest uses the real SDK
``Connector`` against the embedded server (the ``adb_server`` fixture)."""

from __future__ import annotations

import copy
import logging
import socket
import struct
import threading
from typing import Any

import pytest
from aperturedb.Connector import Connector

from aperturedb_pool import ConnectionPool, OutcomeUnknown
from aperturedb_pool.connectors import (
    _RECV_CHUNK,
    FrameDesync,
    _is_sdk_framing,
    read_frame,
    write_frame,
)

JOIN = 20.0
FIND = [{"FindEntity": {"with_class": "T", "results": {"count": True}}}]


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair()
    a.settimeout(JOIN)
    b.settimeout(JOIN)
    yield a, b
    a.close()
    b.close()


def test_a_frame_round_trips(pair: Any) -> None:
    a, b = pair
    write_frame(a, b"hello")
    assert read_frame(b) == b"hello"
    write_frame(a, b"")
    assert read_frame(b) == b""


def test_a_frame_larger_than_one_read_is_assembled(pair: Any) -> None:
    a, b = pair
    body = bytes(range(256)) * (3 * _RECV_CHUNK // 256 + 7)
    t = threading.Thread(target=write_frame, args=(a, body), daemon=True)
    t.start()
    assert bytes(read_frame(b) or b"") == body
    t.join(JOIN)


def test_bytes_beyond_the_frame_are_a_desync(pair: Any) -> None:
    # One request, one response: anything after the response frame is data
    # nobody asked for, and the connection cannot be trusted any more.
    a, b = pair
    a.sendall(struct.pack("@I", 3) + b"abc" + struct.pack("@I", 1) + b"x")
    with pytest.raises(FrameDesync, match="beyond a 3-byte"):
        read_frame(b)


def test_a_length_prefix_split_across_reads_is_completed(pair: Any) -> None:
    # The SDK reads the prefix with one recv(4); a prefix arriving in pieces
    # must not be misread as a shorter length.
    a, b = pair
    body = bytes(range(256)) * 40
    frame = struct.pack("@I", len(body)) + body
    sent = threading.Event()

    def dribble() -> None:
        for i in range(4):
            a.sendall(frame[i:i + 1])  # the prefix one byte at a time
            sent.wait(0.01)  # spread the writes over several reads
        for i in range(4, len(frame), 1000):
            a.sendall(frame[i:i + 1000])

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    got = read_frame(b)
    t.join(JOIN)
    assert bytes(got or b"") == body


def test_eof_before_or_inside_a_frame_is_none(pair: Any) -> None:
    a, b = pair
    a.sendall(struct.pack("@I", 10) + b"12345")
    a.shutdown(socket.SHUT_WR)
    assert read_frame(b) is None  # closed mid-body
    c, d = socket.socketpair()
    try:
        c.sendall(b"\x01\x00")
        c.shutdown(socket.SHUT_WR)
        assert read_frame(d) is None  # closed mid-prefix
    finally:
        c.close()
        d.close()


class _TracedConnector(Connector):
    """A user's Connector subclass that overrides the SDK's framing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames_sent = 0

    def _send_msg(self, data: bytes) -> None:
        self.frames_sent += 1
        super()._send_msg(data)


def test_a_subclass_that_overrides_the_framing_keeps_its_override(adb_server: Any) -> None:
    base = adb_server.connector()
    assert _is_sdk_framing(base._send_msg, base._recv_msg)
    template = _TracedConnector(shared_data=base.shared_data, config=base.config)
    assert not _is_sdk_framing(template._send_msg, template._recv_msg)
    with ConnectionPool(template, min_size=1, max_size=1, timeout=JOIN) as pool:
        with pool.lease() as conn:
            before = conn.frames_sent
            conn.query(FIND)
            assert conn.frames_sent == before + 1


def test_an_override_set_on_the_instance_is_kept(adb_server: Any) -> None:
    # A connector factory that wraps the framing of each connector it makes
    # (for tracing, say): the pool must go through the wrapper.
    template = adb_server.connector()
    sent: list[int] = []

    def factory() -> Any:
        conn = template.clone()
        orig = conn._send_msg

        def traced(data: bytes) -> None:
            sent.append(len(data))
            orig(data)

        conn._send_msg = traced
        return conn

    with ConnectionPool(connector_factory=factory, min_size=1, max_size=1,
                        timeout=JOIN) as pool:
        pool.wait_ready(JOIN)
        before = len(sent)
        with pool.lease() as conn:
            conn.query(FIND)
        assert len(sent) == before + 1


def test_the_per_query_path_runs_no_wrapper_of_the_sdks_session_steps(adb_server: Any) -> None:
    # The SDK calls authenticate() before every query; the pool's check of the
    # login (a failure there means the query was not sent) wraps the login
    # itself, which runs only when the shared session has none, so a query
    # on a logged-in session makes no call the dedicated clone does not.
    with ConnectionPool(adb_server.connector(), min_size=1, max_size=1, timeout=JOIN) as pool:
        with pool.lease() as conn:
            conn.query(FIND)
            assert getattr(conn.authenticate, "__func__", None) is Connector.authenticate
            assert getattr(conn._authenticate, "__func__", None) is not Connector._authenticate
            assert getattr(conn._refresh_token, "__func__", None) is not Connector._refresh_token


def _sdk_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aperturedb.Connector"]


def test_sdk_failure_logs_are_dropped_for_pooled_connectors_only(
        adb_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    template = adb_server.connector()
    with ConnectionPool(template, min_size=1, max_size=1, timeout=JOIN) as pool:
        pool.wait_ready(JOIN)
        adb_server.close_after_next_request(execute=False)
        with pytest.raises(OutcomeUnknown):
            with pool.lease() as conn:
                conn.query(FIND)
    assert not any(m.startswith("Failed to query") for m in _sdk_records(caplog)), \
        _sdk_records(caplog)
    # The same failure on a connector of the user's own still logs: the
    # filter drops only what comes from a pooled query.
    plain = template.clone()
    plain.config = copy.copy(plain.config)
    plain.config.retry_max_attempts = 1
    plain.config.retry_interval_seconds = 0
    plain.query(FIND)
    adb_server.close_after_next_request(execute=False)
    with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises
        plain.query(FIND)
    assert any(m.startswith("Failed to query") for m in _sdk_records(caplog))
    plain.close()
