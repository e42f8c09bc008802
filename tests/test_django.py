"""The Django integration with Django's test client against the embedded server."""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported: no error.<time>.log files

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "apps"))
os.environ["DJANGO_SETTINGS_MODULE"] = "adb_django_site.settings"

import django  # noqa: E402

django.setup()

from django.core import checks  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

import aperturedb_pool.django as adb  # noqa: E402
from aperturedb_pool import OutcomeUnknown  # noqa: E402


def _settings(server: Any, **extra: Any) -> dict[str, Any]:
    s = {"HOST": "127.0.0.1", "PORT": server.port, "USER": "admin", "PASSWORD": "admin",
         "USE_SSL": False, "MAX_SIZE": 2, "TIMEOUT": 10}
    s.update(extra)
    return s


@pytest.fixture
def site(adb_server: Any) -> Any:
    with override_settings(APERTUREDB=_settings(adb_server)):
        yield adb_server
    adb.close_pool()


def _stats() -> Any:
    return adb.get_pool().stats()


def test_a_request_leases_one_connector_and_returns_it(site: Any) -> None:
    client = Client()
    assert client.get("/nodb").json() == {"has": False}
    assert site.counters()["accepted"] == 0  # the pool is created on first use
    body = client.get("/twice").json()
    assert body == {"same": True, "leased": 1, "has": True}
    stats = _stats()
    assert stats.leases_granted == 1 and stats.leased == 0
    assert client.get("/nodb").json() == {"has": False}
    assert _stats().leases_granted == 1


def test_returned_when_the_view_raises(site: Any) -> None:
    client = Client()
    client.get("/whoami")
    opened = _stats().connectors_opened
    with pytest.raises(ValueError, match="the view failed"):
        client.get("/boom")
    assert _stats().leased == 0
    # Without re-raising: a 500 response, and the lease is back too.
    assert Client(raise_request_exception=False).get("/boom").status_code == 500
    stats = _stats()
    assert stats.leased == 0
    assert sum(stats.discarded.values()) == 0  # a clean connection is kept
    assert client.get("/whoami").status_code == 200
    assert _stats().connectors_opened == opened


def test_discarded_after_a_connector_error(site: Any) -> None:
    client = Client(raise_request_exception=False)
    client.get("/whoami")
    site.close_after_next_request(False, "AddEntity")
    assert client.get("/connector-fails").status_code == 500
    stats = _stats()
    assert stats.leased == 0 and sum(stats.discarded.values()) >= 1
    with pytest.raises(OutcomeUnknown):
        site.close_after_next_request(False, "AddEntity")
        Client().get("/connector-fails")
    assert _stats().leased == 0
    assert client.get("/whoami").status_code == 200


def test_streaming_response_keeps_its_connector_until_closed(site: Any) -> None:
    response = Client().get("/stream")
    lines = b"".join(response.streaming_content).decode().split()
    # Each chunk saw status 0 and exactly one lease (its own) while streaming.
    assert lines == ["0", "1", "0", "1", "0", "1"]
    stats = _stats()
    assert stats.leased == 0 and stats.leases_granted == 1


def test_release_early(site: Any) -> None:
    assert Client().get("/release-early").json() == {"has": False, "leased": 0}


def test_a_thousand_sequential_requests_leave_no_lease(site: Any) -> None:
    client = Client()
    for _ in range(1000):
        r = client.get("/whoami")
        assert r.status_code == 200 and r.json()["leased"] == 1
    stats = _stats()
    assert stats.leased == 0 and stats.waiting == 0 and stats.leases_granted == 1000
    assert site.counters()["accepted"] <= 2


def test_concurrent_requests(site: Any) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        client = Client()
        try:
            for _ in range(50):
                assert client.get("/whoami").status_code == 200
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert not errors, errors[0]
    stats = _stats()
    assert stats.leased == 0 and stats.size <= 2
    assert site.counters()["sharing_violations"] == 0


def test_get_connector_outside_a_request(site: Any) -> None:
    with pytest.raises(RuntimeError, match="lease"):
        adb.get_connector()
    with adb.get_pool().lease() as conn:
        conn.query([{"GetStatus": {}}])


def test_changing_the_setting_replaces_the_pool(adb_server: Any) -> None:
    with override_settings(APERTUREDB=_settings(adb_server, POOL_NAME="first")):
        first = adb.get_pool()
        assert first.name == "first"
        with override_settings(APERTUREDB=_settings(adb_server, POOL_NAME="second")):
            assert first.closed
            assert adb.get_pool().name == "second"
        assert adb.get_pool().name == "first" and adb.get_pool() is not first
    adb.close_pool()


def test_default_pool_name_carries_the_pid(site: Any) -> None:
    assert adb.get_pool().name == f"django:{os.getpid()}"


def test_bad_settings_raise_improperly_configured(adb_server: Any) -> None:
    with override_settings(APERTUREDB=_settings(adb_server, MAX_SIZE=0)):
        with pytest.raises(ImproperlyConfigured, match="MAX_SIZE"):
            adb.get_pool()
    with override_settings(APERTUREDB="localhost:55555"):
        with pytest.raises(ImproperlyConfigured, match="must be a dict"):
            adb.get_pool()


def _ids(**setting: Any) -> list[str]:
    with override_settings(**setting):
        return [m.id for m in checks.run_checks(tags=["aperturedb"])]


def test_system_check(tmp_path: Path) -> None:
    good = {"HOST": "db", "PORT": 55555, "USER": "u", "PASSWORD": "p", "MAX_SIZE": 4}
    assert _ids(APERTUREDB=good) == []
    # Registered without tags filtering too (runs with a plain `manage.py check`).
    with override_settings(APERTUREDB={**good, "MAX_SIZE": 0}):
        assert "aperturedb_pool.E006" in [m.id for m in checks.run_checks()]
    assert _ids(APERTUREDB=["not", "a", "dict"]) == ["aperturedb_pool.E001"]
    assert _ids(APERTUREDB={**good, "KEY": "abc"}) == ["aperturedb_pool.E002",
                                                       "aperturedb_pool.E003"]
    assert _ids(APERTUREDB={**good, "PORT": 0}) == ["aperturedb_pool.E003"]
    assert _ids(APERTUREDB={"HOST": "db", "USER": "u"}) == ["aperturedb_pool.E004"]
    assert _ids(APERTUREDB={**good, "CA_CERT": str(tmp_path / "missing.pem")}) == [
        "aperturedb_pool.E005"]
    assert _ids(APERTUREDB={**good, "MIN_SIZE": 5}) == ["aperturedb_pool.E006"]
    assert _ids(APERTUREDB={**good, "TIMEOUT": -1}) == ["aperturedb_pool.E006"]
    assert _ids(APERTUREDB={**good, "RETRY": {"max_attempts": 0}}) == ["aperturedb_pool.E006"]
    assert _ids(APERTUREDB={**good, "MAXSIZE": 3}) == ["aperturedb_pool.W001"]
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    assert _ids(APERTUREDB={**good, "CA_CERT": str(pem), "USE_SSL": False}) == [
        "aperturedb_pool.W002"]
    with override_settings(APERTUREDB={**good, "MAXSIZE": 3}):
        (msg,) = checks.run_checks(tags=["aperturedb"])
    assert msg.level == checks.WARNING and "did you mean MAX_SIZE" in msg.hint
    assert 'APERTUREDB["MAXSIZE"]' in msg.msg


def test_close_pool_at_exit(site: Any) -> None:
    """The atexit hook closes this process's pools (clean shutdown)."""
    from aperturedb_pool import config

    pool = adb.get_pool()
    config._close_all_at_exit()
    assert pool.closed
    assert adb.get_pool() is not pool  # a new one on next use
