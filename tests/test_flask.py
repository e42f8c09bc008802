"""The Flask extension with Flask's test client against the embedded server."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported: no error.<time>.log files

import multiprocessing
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from aperturedb_pool import OutcomeUnknown
from aperturedb_pool.config import ConfigError
from aperturedb_pool.flask import ApertureDB

sys.path.insert(0, str(Path(__file__).parent / "apps"))

import adb_flask_app  # noqa: E402


@pytest.fixture
def app(adb_server: Any) -> Any:
    app = adb_flask_app.create_app(APERTUREDB_PORT=adb_server.port, APERTUREDB_MAX_SIZE=2,
                                   TESTING=True)
    yield app
    adb_flask_app.db.close(app)


def _stats(app: Flask) -> Any:
    return adb_flask_app.db.get_pool(app).stats()


def test_init_app_opens_nothing(adb_server: Any) -> None:
    app = adb_flask_app.create_app(APERTUREDB_PORT=adb_server.port)
    client = app.test_client()
    assert client.get("/nodb").json == {"has": False}
    assert adb_server.counters()["accepted"] == 0
    assert client.get("/whoami").status_code == 200
    assert adb_server.counters()["accepted"] >= 1
    adb_flask_app.db.close(app)


def test_a_request_leases_one_connector_and_returns_it(app: Flask) -> None:
    client = app.test_client()
    before = _stats(app).leases_granted
    body = client.get("/twice").json
    assert body == {"same": True, "leased": 1, "has": True}
    stats = _stats(app)
    assert stats.leases_granted == before + 1
    assert stats.leased == 0
    # A request that does not touch the connector leases nothing.
    assert client.get("/nodb").json == {"has": False}
    assert _stats(app).leases_granted == before + 1


def test_returned_at_teardown_when_the_view_raises(app: Flask) -> None:
    client = app.test_client()
    client.get("/whoami")
    opened = _stats(app).connectors_opened
    with pytest.raises(ValueError, match="the view failed"):
        client.get("/boom")  # TESTING: the exception propagates out of the client
    stats = _stats(app)
    assert stats.leased == 0
    # An error of the view's own code with a clean connection costs no reconnect.
    assert sum(stats.discarded.values()) == 0
    assert client.get("/whoami").status_code == 200
    assert _stats(app).connectors_opened == opened
    # Without TESTING, the same request becomes a 500 and the lease still comes back.
    app.testing = False
    assert client.get("/boom").status_code == 500
    assert _stats(app).leased == 0


def test_discarded_when_the_request_ended_with_a_connector_error(app: Flask,
                                                                adb_server: Any) -> None:
    client = app.test_client()
    client.get("/whoami")
    adb_server.close_after_next_request(False, "AddEntity")
    with pytest.raises(OutcomeUnknown):
        client.get("/connector-fails")
    stats = _stats(app)
    assert stats.leased == 0
    assert sum(stats.discarded.values()) >= 1
    # The pool heals: the next request works.
    assert client.get("/whoami").status_code == 200
    assert adb_server.counters()["sharing_violations"] == 0


def test_release_early(app: Flask) -> None:
    body = app.test_client().get("/release-early").json
    assert body == {"has": False, "leased": 0}
    assert _stats(app).leased == 0


def test_a_thousand_sequential_requests_leave_no_lease(app: Flask, adb_server: Any) -> None:
    client = app.test_client()
    before = _stats(app).leases_granted
    for _ in range(1000):
        r = client.get("/whoami")
        assert r.status_code == 200 and r.json["leased"] == 1
    stats = _stats(app)
    assert stats.leased == 0 and stats.waiting == 0
    assert stats.leases_granted == before + 1000
    assert stats.size <= 2
    assert adb_server.counters()["accepted"] <= 2


def test_concurrent_requests_share_the_pool_safely(app: Flask, adb_server: Any) -> None:
    errors: list[BaseException] = []
    pids: set[str] = set()

    def worker() -> None:
        client = app.test_client()
        try:
            for _ in range(50):
                r = client.get("/whoami")
                assert r.status_code == 200
                pids.add(r.json["pool"])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert not errors, errors[0]
    assert len(pids) == 1
    stats = _stats(app)
    assert stats.leased == 0 and stats.size <= 2
    assert adb_server.counters()["sharing_violations"] == 0


def test_connector_needs_an_app_context(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="application context"):
        _ = adb_flask_app.db.connector
    with app.app_context():
        conn = adb_flask_app.db.connector
        conn.query([{"GetStatus": {}}])
        assert _stats(app).leased == 1
    assert _stats(app).leased == 0  # released when the app context ends


def test_not_registered() -> None:
    ext = ApertureDB()
    app = Flask("other")
    with app.app_context(), pytest.raises(RuntimeError, match="init_app"):
        _ = ext.pool


def test_bad_config_fails_at_init_app() -> None:
    app = Flask("bad")
    app.config.update(APERTUREDB_MAX_SIZE=0, APERTUREDB_PORT="http", APERTUREDB_HOST="h")
    with pytest.raises(ConfigError) as ei:
        ApertureDB(app)
    msg = str(ei.value)
    assert "APERTUREDB_MAX_SIZE" in msg and "APERTUREDB_PORT" in msg
    app = Flask("conflict")
    app.config.update(APERTUREDB_KEY="x", APERTUREDB_HOST="h")
    with pytest.raises(ConfigError, match="APERTUREDB_KEY"):
        ApertureDB(app)


def test_unknown_key_warns(caplog: Any, adb_server: Any) -> None:
    app = Flask("typo")
    app.config.update(APERTUREDB_PORT=adb_server.port, APERTUREDB_USE_SSL=False,
                      APERTUREDB_MAXSIZE=3)
    with caplog.at_level("WARNING"):
        ApertureDB(app)
    assert "APERTUREDB_MAXSIZE" in caplog.text and "APERTUREDB_MAX_SIZE" in caplog.text


def test_configured_with_an_aperturedb_key(adb_server: Any) -> None:
    from aperturedb.Configuration import Configuration

    key = Configuration.create_aperturedb_key("127.0.0.1", adb_server.port, None, False,
                                              False, None, "admin", "admin")
    app = Flask("keyed")
    app.config.update(APERTUREDB_KEY=key, APERTUREDB_MAX_SIZE=1, APERTUREDB_POOL_NAME="keyed")
    ext = ApertureDB(app)
    with app.app_context():
        response, _ = ext.connector.query([{"GetStatus": {}}])
        assert response[0]["GetStatus"]["status"] == 0
        assert ext.pool.name == "keyed"
    ext.close(app)


def _child(app: Flask, conn: Any) -> None:
    pool = adb_flask_app.db.get_pool(app)
    with app.app_context():
        response, _ = adb_flask_app.db.connector.query([{"GetStatus": {}}])
    conn.send((os.getpid(), pool.name, id(pool), response[0]["GetStatus"]["status"]))
    conn.close()


def test_a_forked_child_creates_its_own_pool(app: Flask, adb_server: Any) -> None:
    parent = adb_flask_app.db.get_pool(app)
    with app.app_context():
        adb_flask_app.db.connector.query([{"GetStatus": {}}])
    ctx = multiprocessing.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(app, w))
    proc.start()
    w.close()
    assert r.poll(30), "the child did not answer"
    pid, name, _ident, status = r.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert status == 0
    assert pid != os.getpid()
    assert name == f"flask:{app.name}:{pid}" != parent.name
    # The parent's pool is untouched and still works.
    assert adb_flask_app.db.get_pool(app) is parent
    with app.app_context():
        adb_flask_app.db.connector.query([{"GetStatus": {}}])
    assert adb_server.counters()["sharing_violations"] == 0


def test_config_values_from_environment_strings(adb_server: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``app.config.from_prefixed_env()`` yields strings for what is not JSON."""
    monkeypatch.setenv("FLASK_APERTUREDB_PORT", str(adb_server.port))
    monkeypatch.setenv("FLASK_APERTUREDB_HOST", "127.0.0.1")
    monkeypatch.setenv("FLASK_APERTUREDB_USER", "admin")
    monkeypatch.setenv("FLASK_APERTUREDB_PASSWORD", "admin")
    monkeypatch.setenv("FLASK_APERTUREDB_USE_SSL", "off")
    monkeypatch.setenv("FLASK_APERTUREDB_TIMEOUT", "2.5")
    monkeypatch.setenv("FLASK_APERTUREDB_MAX_SIZE", "3")
    monkeypatch.setenv("FLASK_APERTUREDB_TCP_KEEPALIVE", "[20, 5, 2]")
    monkeypatch.setenv("FLASK_APERTUREDB_RETRY", '{"max_attempts": 2}')
    monkeypatch.setenv("FLASK_APERTUREDB_CPU_BOUND_FAIRNESS_THRESHOLD", "0.25")
    app = Flask("env")
    app.config.from_prefixed_env()
    ext = ApertureDB(app)
    pool = ext.get_pool(app)
    try:
        assert (pool.max_size, pool.timeout, pool.tcp_keepalive) == (3, 2.5, (20.0, 5.0, 2))
        assert pool.retry.max_attempts == 2
        assert pool.cpu_bound_fairness_threshold == 0.25
        with app.app_context():
            assert ext.connector.query([{"GetStatus": {}}])[0][0]["GetStatus"]["status"] == 0
    finally:
        ext.close(app)
