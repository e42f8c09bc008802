"""The README's Python examples, run as written against the embedded server.

Each code block is taken from README.md itself, so an edit there is tested
here.  The only changes are the connection settings: the port (55555 in the
README, a free port here), and for the real-server block its host, password
and CA file.  Flask and Django run through their real test clients.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before the SDK is imported: no error.<time>.log files

import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from aperturedb_pool import ConnectFailed

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str = "python") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def _block(marker: str) -> str:
    (found,) = [b for b in _blocks() if marker in b]
    return found


# Which test runs which block: every Python block of the README must be here.
MARKERS = {
    "usage": "with ConnectionPool(template, min_size=2, max_size=8) as pool:",
    "real server": 'host="db.example.com"',
    "pytest plugin": "def test_adds_person(",
    "flask": "from aperturedb_pool.flask import ApertureDB",
    "django": "from aperturedb_pool.django import get_connector, get_pool",
    "batch": "run_batches(pool, load, people",
    "helpers": "db = pool.connector()",
    "metrics": "registry.register(PrometheusCollector(pool))",
    "fastapi": "async with AsyncConnectionPool(template, min_size=2, max_size=8) as pool:",
    "dask": "client.register_plugin(PoolPlugin(",
}


def test_every_python_block_is_tested() -> None:
    blocks = _blocks()
    claimed = [[name for name, m in MARKERS.items() if m in b] for b in blocks]
    assert all(len(c) == 1 for c in claimed), [(c, b[:60]) for c, b in zip(claimed, blocks, strict=True)]
    assert len(blocks) == len(MARKERS)


def _for_server(code: str, port: int) -> str:
    assert "55555" in code, "the example should name the port, so that a user sees it"
    return re.sub(r"\b55555\b", str(port), code)


def _run(code: str, **names: Any) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "readme_example", **names}
    exec(compile(code, str(README), "exec"), ns)
    return ns


def test_usage(adb_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for cls, n in (("Person", 3), ("Image", 1)):
        for i in range(n):
            adb_server.connector().query([{"AddEntity": {"class": cls,
                                                         "properties": {"i": i}}}])
    _run(_for_server(_block(MARKERS["usage"]), adb_server.port))
    assert capsys.readouterr().out == "[3, 1, 0]\n"


def test_real_server_connector(adb_tls_server: Any) -> None:
    code = _for_server(_block(MARKERS["real server"]), adb_tls_server.port)
    code = code.replace('"db.example.com"', '"127.0.0.1"').replace('password="..."',
                                                                   'password="admin"')
    code = code.replace('"ca.pem"', repr(adb_tls_server.ca_path))
    from aperturedb.Connector import Connector

    from aperturedb_pool import ConnectionPool
    ns = _run(code, Connector=Connector)
    with ConnectionPool(ns["template"], max_size=1) as pool:
        response, _ = pool.query([{"GetStatus": {}}])
    assert response[0]["GetStatus"]["status"] == 0


def test_pytest_plugin_example(adb_connector: Any, adb_server: Any) -> None:
    ns = _run(_block(MARKERS["pytest plugin"]))
    ns["test_adds_person"](adb_connector, adb_server)


def test_batch_loading(adb_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # 1,000 people instead of 20,000, to keep the suite fast.
    code = _block(MARKERS["batch"]).replace("range(20_000)", "range(1_000)")
    template = adb_server.connector()
    ns = _run(code, template=template)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("10 batches acknowledged (1000 items), 0 failed, 0 skipped")
    assert "10/10" in out
    assert ns["retry_later"] == []
    stored = template.query([{"FindEntity": {"with_class": "Person",
                                             "results": {"count": True}}}])[0]
    assert stored[0]["FindEntity"]["count"] == 1000
    # Idempotent as declared: running it again adds nothing.
    _run(code, template=template)
    stored = template.query([{"FindEntity": {"with_class": "Person",
                                             "results": {"count": True}}}])[0]
    assert stored[0]["FindEntity"]["count"] == 1000


def test_sdk_helpers_through_the_pool(adb_server: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = _block(MARKERS["helpers"]).replace("range(10_000)", "range(2_000)")
    _run(code, template=adb_server.connector())
    assert capsys.readouterr().out.splitlines()[-1] == "0 2000"
    assert adb_server.counters()["accepted"] <= 4


def test_dask(adb_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The cluster example as a script (its own LocalCluster of worker processes)."""
    code = _for_server(_block(MARKERS["dask"]), adb_server.port)
    code = code.replace("range(20_000)", "range(2_000)")
    code = code.replace("threads_per_worker=4)", "threads_per_worker=4, dashboard_address=None)")
    _run(code, __name__="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("20 batches acknowledged (2000 items), 0 failed, 0 skipped")
    assert out[-1] == "2000"
    counters = adb_server.counters()
    assert counters["peak_open"] <= 6 and counters["authenticate"] == 2, counters


# --- Flask -------------------------------------------------------------------

def _flask_app(code: str) -> Any:
    pytest.importorskip("flask")
    ns = _run(code)
    app = ns["create_app"]()
    app.config["TESTING"] = True
    return ns["db"], app


def test_flask(adb_server: Any) -> None:
    adb_server.connector().query([{"AddEntity": {"class": "Person", "properties": {}}}])
    db, app = _flask_app(_for_server(_block(MARKERS["flask"]), adb_server.port))
    try:
        response = app.test_client().get("/people")
        assert response.status_code == 200
        assert response.get_json()[0]["FindEntity"]["count"] == 1
        assert db.get_pool(app).stats().leased == 0
    finally:
        db.close(app)


def _without_use_ssl(code: str, line: str) -> str:
    assert line in code
    return "\n".join(ln for ln in code.splitlines() if line not in ln)


def test_flask_without_use_ssl_fails_fast_with_the_fix(adb_server: Any) -> None:
    code = _for_server(_block(MARKERS["flask"]), adb_server.port)
    db, app = _flask_app(_without_use_ssl(code, "APERTUREDB_USE_SSL=False"))
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed, match=r"APERTUREDB_USE_SSL=False in Flask"):
            app.test_client().get("/people")
        assert time.monotonic() - t0 < 2.0
    finally:
        db.close(app)


# --- Django ------------------------------------------------------------------

def _django(code: str) -> tuple[dict[str, Any], Any]:
    pytest.importorskip("django")
    sys.path.insert(0, str(Path(__file__).parent / "apps"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adb_django_site.settings")
    import django

    django.setup()
    settings_code, views_code = code.split("# views.py", 1)
    settings = _run(settings_code)
    assert "aperturedb_pool.django" in settings["INSTALLED_APPS"]
    views = _run(views_code)
    from django.urls import path

    urls = types.ModuleType("readme_urls")
    urls.urlpatterns = [path("people", views["people"])]  # type: ignore[attr-defined]
    return settings, urls


def _django_get(settings: dict[str, Any], urls: Any) -> Any:
    from django.test import Client, override_settings

    import aperturedb_pool.django as adb

    with override_settings(APERTUREDB=settings["APERTUREDB"], ROOT_URLCONF=urls):
        try:
            return Client(raise_request_exception=True).get("/people")
        finally:
            adb.close_pool()


def test_django(adb_server: Any) -> None:
    adb_server.connector().query([{"AddEntity": {"class": "Person", "properties": {}}}])
    settings, urls = _django(_for_server(_block(MARKERS["django"]), adb_server.port))
    response = _django_get(settings, urls)
    assert response.status_code == 200
    assert response.json()[0]["FindEntity"]["count"] == 1


def test_django_without_use_ssl_fails_fast_with_the_fix(adb_server: Any) -> None:
    code = _for_server(_block(MARKERS["django"]), adb_server.port)
    settings, urls = _django(_without_use_ssl(code, '"USE_SSL": False'))
    t0 = time.monotonic()
    with pytest.raises(ConnectFailed, match=r'"USE_SSL": False in Django'):
        _django_get(settings, urls)
    assert time.monotonic() - t0 < 2.0


# --- the sample bench report ---------------------------------------------------

def _sample_report() -> str:
    text = README.read_text()
    start = text.index("```\nresults:\n") + 4
    return text[start:text.index("```", start)]


def test_sample_bench_report_is_consistent_and_has_the_bench_layout() -> None:
    import subprocess

    report = _sample_report()

    def row(label: str) -> str:
        (line,) = [ln for ln in report.splitlines() if ln.startswith(f"  {label} ")]
        return line[len(label) + 2:].strip()

    nums = lambda text: [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]  # noqa: E731
    queries, reads, batches, entities = nums(row("queries"))
    assert reads + batches == queries and entities == 10 * batches
    (elapsed,) = nums(row("elapsed"))
    assert nums(row("queries/s"))[0] == pytest.approx(queries / elapsed, rel=0.005)
    stored, acknowledged, unknown = nums(row("write check"))
    assert stored == acknowledged == entities and unknown == 0
    assert f"leases {int(queries)} " in row("pool stats")
    # The layout is the bench's own: the same rows, in the same order.
    env = {k: v for k, v in os.environ.items() if not k.startswith("APERTUREDB_")}
    env["ADB_LOG_FILE"] = ""
    p = subprocess.run([sys.executable, "-m", "aperturedb_pool", "bench", "--duration", "1",
                        "--threads", "2", "--pool-size", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    real = p.stdout[p.stdout.index("results:"):].splitlines()
    sample = report.splitlines()
    assert [ln[:29] for ln in real] == [ln[:29] for ln in sample]


def test_metrics_example_and_its_scrape(adb_server: Any) -> None:
    import socket
    import urllib.request

    pytest.importorskip("prometheus_client")
    pytest.importorskip("opentelemetry.sdk.metrics")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    code = _for_server(_block(MARKERS["metrics"]), adb_server.port)
    assert "9464" in code
    code = re.sub(r"\b9464\b", str(free), code)
    ns = _run(code)
    try:
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{free}/metrics",
                                        timeout=10).read().decode().splitlines()
        (sample,) = [b for b in _blocks("text") if "db_client_connection_count" in b]
        for line in sample.splitlines():
            assert line in scrape, line
        data = ns["reader"].get_metrics_data()
        names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
                 for m in sm.metrics}
        assert {"db.client.connection.count", "db.client.connection.wait_time"} <= names
    finally:
        ns["server"].shutdown()
        ns["server"].server_close()
        ns["pool"].close()


# --- FastAPI + AsyncConnectionPool, served by real uvicorn --------------------

def test_fastapi_served_by_uvicorn_200_concurrent_requests_some_abandoned(
        adb_server: Any) -> None:
    """The README's app on a real uvicorn (its own thread and event loop: uvloop
    when installed), driven over loopback by httpx: 200 concurrent requests,
    one in five abandoned by the client after a few milliseconds.  Every
    answered request gets its own person; nothing else fails."""
    import asyncio
    import random
    import threading

    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import _support

    adb_server.connector().query([{"AddEntity": {"class": "Person", "properties": {
        "name": f"p{i}"}}} for i in range(40)])
    app = _run(_for_server(_block(MARKERS["fastapi"]), adb_server.port))["app"]
    adb_server.set_latency((0.001, 0.005))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        _support.wait_until(lambda: server.started, "uvicorn started", timeout=20)
        port = server.servers[0].sockets[0].getsockname()[1]
        rng = random.Random(17)
        wrong: list[Any] = []
        errors: list[BaseException] = []
        abandoned = answered = 0

        async def drive() -> None:
            nonlocal abandoned, answered
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20,
                                         limits=limits) as client:
                async def one(i: int) -> None:
                    nonlocal abandoned, answered
                    name = f"p{i % 40}"
                    try:
                        if i % 5 == 0:  # the client gives up after a few milliseconds
                            async with asyncio.timeout(rng.uniform(0.001, 0.008)):
                                r = await client.get(f"/people/{name}")
                        else:
                            r = await client.get(f"/people/{name}")
                    except TimeoutError:
                        abandoned += 1
                        return
                    except Exception as e:
                        errors.append(e)
                        return
                    answered += 1
                    got = r.json() if r.status_code == 200 else r.text
                    if r.status_code != 200 or [e["name"] for e in got["entities"]] != [name]:
                        wrong.append((name, r.status_code, got))

                await asyncio.gather(*[one(i) for i in range(200)])

        asyncio.run(drive())
        assert wrong == [] and errors == []
        assert answered + abandoned == 200 and answered >= 160 and abandoned > 0
        pool = app.state.pool
        s = _support.wait_until(lambda: (lambda s: s if s.leased == 0 else None)(pool.stats()),
                                "every lease back", timeout=20)
        assert s.waiting == 0 and s.leases_granted >= answered
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()
    assert pool.closed  # the lifespan closed it
    assert adb_server.counters()["sharing_violations"] == 0
