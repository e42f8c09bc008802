"""``aperturedb-pool bench`` (the CLI) and a stress-scenario smoke test.

Each bench run here is a real run: an embedded server started as a separate
process, the real SDK Connector, a pool, a 1-2 s workload.  Kept short: the
whole file takes well under 30 s.
"""

from __future__ import annotations

import os

os.environ["ADB_LOG_FILE"] = ""  # before any aperturedb import

import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aperturedb_pool import bench

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("APERTUREDB_KEY", "APERTUREDB_JSON", "APERTUREDB_CONFIG")}
    env["ADB_LOG_FILE"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bench(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aperturedb_pool", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL)


def test_bench_json_against_an_embedded_server() -> None:
    p = _bench("--duration", "2", "--json", "--threads", "4", "--pool-size", "2")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is the JSON document and nothing else
    assert doc["target"]["kind"] == "embedded"
    assert "starting an embedded ApertureDB-protocol server" in p.stderr
    assert doc["interrupted"] is False and doc["setup_error"] is None
    (run,) = doc["runs"]
    assert run["pool_size"] == 2 and run["threads"] == 4
    assert run["queries"] > 50
    assert run["reads"] + run["write_batches"] == run["queries"]
    assert run["entities_written"] == 10 * run["write_batches"]
    assert run["errors"] == 0 and run["unknown_outcomes"] == 0 and run["wrong_answers"] == 0
    assert run["write_check"] == {"acknowledged": run["entities_written"],
                                  "unknown_batches": 0, "stored": run["entities_written"],
                                  "ok": True}
    assert 1.9 <= run["elapsed_s"] <= 5
    assert run["queries_per_s"] == pytest.approx(run["queries"] / run["elapsed_s"], rel=0.01)
    w = run["lease_wait_ms"]
    assert 0 <= w["p50"] <= w["p99"] <= w["max"]
    assert run["connectors"]["opened"] == 2
    stats = run["pool_stats"]
    assert stats["leased"] == 0 and stats["waiting"] == 0 and stats["size"] == 2
    assert stats["leases_granted"] >= run["queries"]
    # the run's numbers under the OpenTelemetry names (aperturedb_pool.metrics)
    m = run["metrics"]
    assert m["db.client.connection.pool.name"] == "bench-2"
    assert m["db.client.connection.count"] == {"idle": 2, "used": 0}
    assert m["db.client.connection.max"] == 2 and m["db.client.connection.timeouts"] == 0
    assert m["aperturedb_pool.leases"] == stats["leases_granted"]
    assert m["db.client.connection.wait_time"]["count"] == stats["leases_granted"]
    assert m["db.client.connection.use_time"]["count"] == stats["leases_granted"]
    assert m["db.client.connection.wait_time"]["buckets"]["+Inf"] == stats["leases_granted"]
    # Not a terminal: progress is plain lines (on stderr, beside the JSON), no bar.
    progress = [ln for ln in p.stderr.splitlines() if ln.startswith("bench: ")]
    assert progress and all(" queries, " in ln for ln in progress)
    assert "\r" not in p.stderr and "\x1b" not in p.stderr


def test_bench_sizes_sweep_plain_output_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    p = _bench("--sizes", "1,2", "--duration", "1.3", "--threads", "4", "--plot", str(png))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "results by pool size" in out
    table = out.split("results by pool size", 1)[1]
    rows = [ln.split() for ln in table.splitlines()[2:4]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(float(r[1]) > 0 for r in rows)  # queries/s
    assert "pool size 1:" in out and "pool size 2:" in out
    assert "lease wait p50/p99/max" in out and "connectors" in out and "retries" in out
    assert "unknown outcomes" in out and "errors" in out and "pool stats" in out
    # Plain progress lines on stdout (not a terminal), one label per size.
    assert any(ln.startswith("pool 1: 1/1 s") for ln in out.splitlines()), out
    assert "\r" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in out


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--read-ratio", "1.5"], "argument --read-ratio: must be in 0..1"),
    (["--sizes", "1,x"], "argument --sizes: expected comma-separated pool sizes"),
    (["--sizes", "2,2"], "argument --sizes: pool sizes must be distinct"),
    (["--sizes", "1,2", "--pool-size", "4"], "argument --sizes: not allowed with argument "
                                             "--pool-size"),
    (["--duration", "1", "--count", "5"], "argument --count: not allowed with argument --duration"),
    (["--duration", "-1"], "argument --duration: must be a positive number of seconds"),
    (["--duration", "nan"], "argument --duration: must be a positive number of seconds"),
    (["--port", "70000"], "argument --port: must be in 1..65535"),
    (["--embedded", "--host", "db"], "argument --embedded: not allowed with a target"),
    (["--plot", "/nonexistent-dir/x.png"], "argument --plot: directory does not exist"),
    (["--plot", "out.txt"], "argument --plot: expected a .png"),
    (["--ca-cert", "/nonexistent.pem"], "argument --ca-cert: no such file"),
    (["--threads"], "argument --threads: expected one argument"),
    (["--sizes", "-1,2"], "argument --sizes: pool sizes must be at least 1, got -1"),
    (["--threads", "-3"], "argument --threads: must be at least 1, got -3"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_give_a_clear_error(args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: aperturedb-pool bench")


def test_user_without_password_off_a_terminal_is_a_bad_argument() -> None:
    p = _bench("--host", "127.0.0.1", "--port", "1", "--user", "someone", timeout=30)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("usage: aperturedb-pool bench")
    assert "argument --user: needs --password when not run on a terminal" in p.stderr


def test_plot_has_a_legend_and_marks_the_recommended_size() -> None:
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    def run(size: int, qps: float, p99_ms: float) -> SimpleNamespace:
        wait = bench.Histogram()
        for _ in range(100):
            wait.add(p99_ms / 1000.0)
        return SimpleNamespace(pool_size=size, qps=qps, lease_wait=wait, ops=1000,
                               interrupted=False)

    # 4 is the smallest size within 5% of the best (8).
    fig = bench._plot_figure([run(1, 1000, 9), run(2, 1800, 5), run(4, 2900, 2),
                              run(8, 3000, 1)], "sweep")
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    texts = [t.get_text() for t in legends[0].get_texts()]
    assert texts[0] == "queries/s" and texts[1].startswith("recommended size: 4")
    assert texts[2] == "p99 lease wait (ms)"
    marks = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("recommended")]
    assert [list(m.get_xdata()) for m in marks] == [[4, 4]]
    import matplotlib.pyplot as plt
    plt.close(fig)


def _first_progress(proc: subprocess.Popen) -> bytes:
    """Read the bench's stderr until its first progress line; return what was read."""
    err = b""
    deadline = time.monotonic() + 30
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while b"bench: 1/60 s" not in err:
            assert time.monotonic() < deadline, err.decode()
            if sel.select(1):
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, err.decode()
                err += chunk
    return err


def test_ctrl_c_stops_cleanly_with_a_partial_report() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "aperturedb_pool", "bench", "--duration",
                             "60", "--json", "--threads", "4", "--pool-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL)
    try:
        err = _first_progress(proc)  # the run is under way
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (err + rest).decode()
    doc = json.loads(out)
    assert doc["interrupted"] is True
    (run,) = doc["runs"]
    assert run["interrupted"] is True and run["queries"] > 0 and run["elapsed_s"] < 30
    assert run["pool_stats"]["leased"] == 0
    assert "interrupted: waiting for queries in flight" in (err + rest).decode()


def test_ctrl_c_at_the_terminal_spares_the_embedded_server() -> None:
    """A Ctrl-C at a terminal goes to the whole foreground process group: the
    embedded server must not be in it, or the bench loses its server
    mid-report (wrong figures, a minute of retries)."""
    proc = subprocess.Popen([sys.executable, "-m", "aperturedb_pool", "bench", "--duration",
                             "60", "--json", "--threads", "4", "--pool-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        err = _first_progress(proc)
        server_pid = int(err.split(b"embedded server, pid ", 1)[1].split(b",", 1)[0])
        assert os.getpgid(server_pid) != os.getpgid(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, rest = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, (err + rest).decode()
    assert stopped_in < 2.0, f"stopped in {stopped_in:.2f} s"
    doc = json.loads(out)
    (run,) = doc["runs"]
    assert run["interrupted"] is True and run["queries"] > 0
    assert run["errors"] == 0, run
    assert run["write_check"]["ok"] is True, run["write_check"]
    assert run["write_check"]["stored"] == run["entities_written"]
    # The server was stopped by the bench, not left behind.
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)


@pytest.mark.parametrize("server_tls, args, needles", [
    (False, ["--tls"], ["does not accept TLS", "no --tls on the aperturedb-pool command line"]),
    (True, [], ["requires TLS", "--tls", "--ca-cert FILE"]),
    (None, [], ["connection refused", "no server listens there", "aperturedb-pool serve"]),
])
def test_misconfigured_target_fails_fast_naming_the_fix(server_tls: bool | None,
                                                        args: list[str],
                                                        needles: list[str]) -> None:
    import socket

    from aperturedb_pool.testing import EmbeddedServer

    if server_tls is None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = None
    else:
        server = EmbeddedServer(tls=server_tls).start()
        port = server.port
    try:
        t0 = time.monotonic()
        p = _bench("--host", "127.0.0.1", "--port", str(port), "--user", "admin",
                   "--password", "admin", "--duration", "1", *args)
        took = time.monotonic() - t0
    finally:
        if server is not None:
            server.stop()
    assert p.returncode == 1, p.stdout + p.stderr
    # A second for the refused port's grace, the interpreter start and imports.
    assert took < (4.5 if server_tls is None else 3.0), took
    error = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(error) == 1, p.stderr  # one line, no log noise
    for needle in needles:
        assert needle in error[0]


def test_configured_target_and_no_password_in_the_output() -> None:
    from aperturedb_pool.testing import EmbeddedServer

    secret = "pw-Zq8-never-printed"
    with EmbeddedServer(username="bench-user", password=secret) as server:
        ok = _bench("--host", "127.0.0.1", "--port", str(server.port), "--user", "bench-user",
                    "--password", secret, "--duration", "1", "--threads", "2",
                    "--pool-size", "2", "--json")
        t0 = time.monotonic()
        bad = _bench("--host", "127.0.0.1", "--port", str(server.port), "--user", "bench-user",
                     "--password", secret + "-wrong", "--duration", "1")
        bad_time = time.monotonic() - t0
        remaining = server.dump()
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["target"] == {"kind": "configured", "source": "command-line options",
                             "address": "127.0.0.1:" + str(server.port), "user": "bench-user",
                             "tls": False, "server_pid": None}
    assert doc["runs"][0]["queries"] > 0 and doc["cleanup_error"] is None
    # The bench deletes what it wrote on a configured server.
    assert remaining == []
    assert bad.returncode == 1
    assert bad_time < 15  # a refused login fails fast, with no cleanup wait
    assert "cannot" in bad.stderr and "127.0.0.1" in bad.stderr
    for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        assert secret not in text


def test_stress_exhaustion_scenario_passes() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "stress" / "scenario_exhaustion.py")],
                       capture_output=True, text=True, timeout=90, env=_env(),
                       cwd=str(ROOT / "stress"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("PASS exhaustion")


def test_stress_asyncexc_scenario_passes_a_short_run() -> None:
    # A bounded sample of stress/scenario_asyncexc.py (run 10 x 20 s for the
    # figures): 5 s of about 5,000 asynchronous exceptions a second.
    p = subprocess.run([sys.executable, str(ROOT / "stress" / "scenario_asyncexc.py"),
                        "--duration", "5"],
                       capture_output=True, text=True, timeout=120, env=_env(),
                       cwd=str(ROOT / "stress"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("PASS asyncexc")


def test_bench_serves_prometheus_metrics_during_the_run() -> None:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "aperturedb_pool", "bench", "--duration",
                             "3", "--json", "--threads", "4", "--pool-size", "2",
                             "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        url = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "metrics: http://" in line:
                url = line.split("metrics: ", 1)[1].split()[0]
            if url and line.startswith("bench: "):  # the run has started
                break
        assert url, "".join(lines)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'db_client_connection_count{pool_name="bench-2",state="idle"}' in text
        assert 'db_client_connection_wait_time_seconds_bucket{le="0.0001",pool_name="bench-2"}' \
            in text
        assert 'db_client_connection_timeouts_total{pool_name="bench-2"} 0.0' in text
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert json.loads(out)["runs"][0]["metrics"]["db.client.connection.max"] == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_aio_short_run_reports_throughput_and_lag() -> None:
    # A bounded sample of stress/bench_aio.py (the figures come from full runs):
    # its JSON report, with no errors and no sharing.
    env = _env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(ROOT / "stress" / "bench_aio.py"), "--duration",
                        "0.3", "--rounds", "1", "--no-pin", "--only",
                        "aio-query-64,aio-lease-64,handoff-64", "--json"],
                       capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(ROOT / "stress"))
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["sharing_violations"] == 0 and doc["aio_pool_discarded"] == {}
    assert set(doc["configs"]) == {"dedicated", "aio-query-64", "aio-lease-64", "handoff-64"}
    for name in ("aio-query-64", "aio-lease-64", "handoff-64"):
        c = doc["configs"][name]
        assert c["threads"] == 64 and c["errors"] == [] and c["qps_median"] > 100
        assert 0 < c["ratio_vs_dedicated_median"] and 0 <= c["lag_max_ms"] < 10_000


def test_bench_query_cpu_short_run_reports_each_way() -> None:
    # A bounded sample of stress/bench_query_cpu.py: every way measured, each
    # a positive CPU per query.  One round: the within-round differences are
    # the differences of the figures reported.  Then the network taken out.
    env = _env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def run(*args: str) -> dict[str, Any]:
        p = subprocess.run([sys.executable, str(ROOT / "stress" / "bench_query_cpu.py"),
                            "--count", "50", "--json", *args],
                           capture_output=True, text=True, timeout=120, env=env,
                           cwd=str(ROOT / "stress"))
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    report = run("--rounds", "1")
    assert report["no_network"] is False
    ways = report["ways"]
    assert set(ways) == {"dedicated", "lease", "pool.query", "shared"}
    base = ways["dedicated"]["cpu_us"]
    assert ways["dedicated"]["over_dedicated_us"] == 0 and base > 0
    assert ways["dedicated"]["vs_dedicated"] == 1.0
    for r in ways.values():
        assert r["cpu_us"] > 0
        assert abs(r["over_dedicated_us"] - (r["cpu_us"] - base)) < 0.02
        assert abs(r["over_lease_us"] - (r["cpu_us"] - ways["lease"]["cpu_us"])) < 0.02

    quiet = run("--rounds", "3", "--no-network")
    assert quiet["no_network"] is True and set(quiet["ways"]) == set(ways)
    assert all(r["cpu_us"] > 0 for r in quiet["ways"].values())
    assert quiet["ways"]["lease"]["over_lease_us"] == 0
    # No system call left: every way costs less than with the network.
    for name, r in quiet["ways"].items():
        assert r["cpu_us"] < ways[name]["cpu_us"], (name, r, ways[name])


def test_paired_rounds_ratio_queries_and_cpu_within_each_pair(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # stress/bench_e2e.py's pairing, the logic alone: the machine's speed
    # drifts from round to round; each ratio is taken within its pair, so the
    # drift cancels and every round gives the same ratios.
    monkeypatch.syspath_prepend(str(ROOT / "stress"))
    import bench_e2e

    calls: list[str] = []

    def measure_one(name: str) -> dict[str, Any]:
        calls.append(name)
        speed = 1.0 + 0.5 * ((len(calls) - 1) // 2)  # a drift every pair
        qps, cpu = {"dedicated": (1000.0, 30.0), "x": (900.0, 32.0)}[name]
        return {"qps": qps * speed, "cpu_us": cpu / speed, "threads": 8, "errors": []}

    runs = bench_e2e.run_paired(["dedicated", "x"], 4, measure_one)
    # Before dedicated in one round, after it in the next.
    assert calls == ["dedicated", "x", "x", "dedicated"] * 2
    s = bench_e2e.summary("x", runs["x"])
    assert s["ratio_runs"] == [0.9] * 4 and s["ratio_vs_dedicated_median"] == pytest.approx(0.9)
    assert s["cpu_ratio_vs_dedicated_median"] == pytest.approx(30.0 / 32.0)
    assert bench_e2e.summary("dedicated", runs["dedicated"])["cpu_ratio_vs_dedicated_median"] == 1
