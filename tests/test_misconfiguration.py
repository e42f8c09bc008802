"""A misconfiguration fails the first call in about a second, once, with its fix.

Each case connects the real SDK ``Connector`` to the embedded server over
loopback with one thing wrong (TLS on one side only, an unknown CA, a host name
the certificate does not name, a wrong password, a host name that does not
resolve) and measures what a user sees: how long the first ``lease()`` /
``wait_ready()`` / ``query()`` takes, the one error's message, and how many log
lines it cost.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import _support
import pytest

from aperturedb_pool import ConnectFailed, ConnectionPool, PoolTimeout, RetryPolicy

FIRST_CALL = 2.0   # the target for the first call to fail
MAX_LOG_LINES = 4  # "fewer than 5"


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every log record at DEBUG or above, from any logger, during the test."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    root = logging.getLogger()
    handler = Keep(logging.DEBUG)
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def _lines(records: list[logging.LogRecord], level: int = logging.INFO) -> int:
    # What a user with logging.basicConfig(level=INFO) reads: every line of each
    # record's message and traceback.
    n = 0
    for r in records:
        if r.levelno < level or r.name.startswith("urllib3"):
            continue
        text = r.getMessage()
        if r.exc_info:
            text += "\n" + logging.Formatter().formatException(r.exc_info)
        if r.stack_info:
            text += "\n" + r.stack_info
        n += text.count("\n") + 1
    return n


@pytest.fixture
def server_with_cert(tmp_path: Any) -> Iterator[tuple[Any, str]]:
    """A TLS server whose certificate names only db.example.org (and its CA file)."""
    with _support.tls_server_naming("db.example.org", tmp_path) as pair:
        yield pair


CALLS: dict[str, Callable[[ConnectionPool], Any]] = {
    "lease": lambda pool: pool.lease().__enter__(),
    "wait_ready": lambda pool: pool.wait_ready(),
    "query": lambda pool: pool.query([{"GetStatus": {}}]),
}


def _first_call_fails(template: Any, call: str, records: list[logging.LogRecord],
                      *needles: str) -> ConnectFailed:
    """Run ``call`` on a fresh pool (30 s timeout, as by default): it must fail
    with one permanent ConnectFailed within FIRST_CALL seconds, its message
    naming each of ``needles``, in at most MAX_LOG_LINES log lines."""
    with ConnectionPool(template, min_size=1, max_size=2, timeout=30.0,
                        retry=RetryPolicy(deadline=30.0)) as pool:
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            CALLS[call](pool)
        elapsed = time.monotonic() - t0
        refills = pool.stats().refill_failures
    err = info.value
    assert err.permanent
    assert elapsed < FIRST_CALL, f"{call} took {elapsed:.2f} s"
    for needle in needles:
        assert needle in str(err), str(err)
    assert _lines(records) <= MAX_LOG_LINES, [r.getMessage()[:120] for r in records]
    # One attempt, then nothing until a caller asks again.
    assert refills <= 2
    return err


@pytest.mark.parametrize("call", sorted(CALLS))
def test_tls_client_against_plain_server(adb_server: Any, records: list, call: str) -> None:
    template = adb_server.connector(use_ssl=True)
    err = _first_call_fails(template, call, records, "does not accept TLS", "use_ssl=False",
                            "APERTUREDB_USE_SSL=False", '"USE_SSL": False')
    assert "unreachable" not in str(err)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_plain_client_against_tls_server(adb_tls_server: Any, records: list, call: str) -> None:
    template = adb_tls_server.connector(use_ssl=False)
    _first_call_fails(template, call, records, "requires TLS", "use_ssl=True", "ca_cert=",
                      "--ca-cert")


@pytest.mark.parametrize("call", sorted(CALLS))
def test_unknown_ca_is_named_as_such(adb_tls_server: Any, records: list, call: str) -> None:
    # No ca_cert: the system's CAs do not include the server's generated CA.
    template = adb_tls_server.connector(ca_cert=None)
    err = _first_call_fails(template, call, records, "signed by a CA", "ca_cert=",
                            "--ca-cert", "the host name was not the problem")
    assert "must match" not in str(err)  # the SDK's own message blames the host name


def test_host_name_mismatch_is_named_as_such(server_with_cert: tuple, records: list) -> None:
    server, cafile = server_with_cert
    template = server.connector(ca_cert=cafile)  # trusted CA, but 127.0.0.1 is not named
    err = _first_call_fails(template, "lease", records, "not valid for the host name",
                            "'127.0.0.1'", "the CA is trusted", "verify_hostname=False")
    assert "signed by a CA" not in str(err)


def test_missing_ca_file(adb_tls_server: Any, records: list, tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.pem")
    _first_call_fails(adb_tls_server.connector(ca_cert=missing), "lease", records,
                      "does not exist", missing)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_wrong_password(adb_server: Any, records: list, call: str) -> None:
    secret = "s3cr3t-wrong"
    template = adb_server.connector(password=secret)
    err = _first_call_fails(template, call, records, "refused the login of user 'admin'",
                            "wrong username or password", "Check the user name and password",
                            "APERTUREDB_PASSWORD")
    assert secret not in str(err)
    assert all(secret not in r.getMessage() for r in records)


def test_unresolvable_host(records: list) -> None:
    from aperturedb.Connector import Connector

    template = Connector(host="no-such-host.invalid", port=55555, user="admin",
                         password="admin", use_ssl=False)
    _first_call_fails(template, "lease", records, "'no-such-host.invalid' does not resolve",
                      "APERTUREDB_HOST")


def test_no_retry_until_a_caller_asks_then_one_try(adb_server: Any, records: list) -> None:
    """After a permanent failure the refill loop waits; each later lease tries
    once more (the server may have been reconfigured) and fails as fast."""
    pool = ConnectionPool(adb_server.connector(use_ssl=True), min_size=2, max_size=2,
                          timeout=30.0, reconnect_initial=0.001, reconnect_max=0.002)
    try:
        with pytest.raises(ConnectFailed):
            pool.lease().__enter__()
        first = pool.stats().refill_failures
        # The background loop would have retried hundreds of times by now with
        # today's backoff (2 ms): a lease from another pool proves time passed.
        with ConnectionPool(adb_server.connector(), min_size=1, max_size=1) as other:
            for _ in range(50):
                with other.lease() as conn:
                    conn.query([{"GetStatus": {}}])
        assert pool.stats().refill_failures == first
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed):
            pool.lease().__enter__()
        assert time.monotonic() - t0 < FIRST_CALL
        assert pool.stats().refill_failures > first
    finally:
        pool.close()


def test_refused_port_keeps_backing_off(records: list) -> None:
    """Refused is transient (a server restarting): the pool keeps retrying,
    and the timeout says the server is unreachable and why."""
    import socket

    from aperturedb.Connector import Connector

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    template = Connector(host="127.0.0.1", port=port, user="admin", password="admin",
                         use_ssl=False)
    with ConnectionPool(template, min_size=1, max_size=1, timeout=0.5,
                        reconnect_initial=0.01, reconnect_max=0.02) as pool:
        with pytest.raises(PoolTimeout) as info:
            pool.lease().__enter__()
        assert pool.stats().refill_failures >= 2
    assert "unreachable" in str(info.value)
    assert "ConnectionRefusedError" in str(info.value)
