"""``aperturedb-pool bench``: load-test a server through one ConnectionPool.

Run it first: it shows how the pool behaves under your workload and helps
choose ``max_size``::

    aperturedb-pool bench                       # an embedded server, 10 s, 16 threads, pool of 8
    aperturedb-pool bench --sizes 1,2,4,8,16 --plot pool.png
    APERTUREDB_KEY=... aperturedb-pool bench --threads 32 --duration 60

Target
    ``--host/--port/--user/--password/--tls/--ca-cert`` name a server; otherwise
    the SDK's configuration chain is used when ``APERTUREDB_KEY``,
    ``APERTUREDB_JSON`` or ``APERTUREDB_CONFIG`` is set (or ``--adb-config
    [NAME]`` asks for an ``adb config`` profile).  With none of these, an
    embedded ApertureDB-protocol server is started as a separate process on
    loopback for the run, and the output says so.  An ``adb config`` profile is
    never picked up on its own: the bench writes data, and a demo run must not
    write into a database nobody named.

Workload
    ``--threads`` threads run in one ThreadPoolExecutor, all through ONE
    ``ConnectionPool`` of ``--pool-size`` connectors (``min_size = max_size``,
    opened before the clock starts).  Each operation is, with probability
    ``--read-ratio``, a read (``FindEntity`` of one of 100 seeded entities by
    key; the answer must carry that key back) and otherwise a write batch
    (``--batch-size`` x ``AddEntity`` each with a connected ``AddBlob`` of
    ``--blob-size`` bytes).  Reads run as idempotent calls and may be retried by
    the pool's policy; writes never are.  ``--duration`` seconds or ``--count``
    operations per pool size.  ``--sizes`` repeats the run for each pool size.

Report
    queries/s, lease wait p50/p99/max (from asking the pool to holding a
    connector, first attempt of each call), query latency, connectors opened,
    retired and discarded, retries, unknown outcomes, errors, a write check (the
    entities stored equal the acknowledged ones plus at most the batches whose
    outcome is unknown) and the pool's final stats.  ``--json`` prints one JSON
    document on stdout (progress goes to stderr).  Ctrl-C stops the run and
    reports what was measured.

Exit status: 0 clean run; 1 the target could not be used, a query failed, or a
correctness check failed (a wrong answer, a write check mismatch); 2 bad
arguments; 130 interrupted.  Passwords and tokens are never printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence, TextIO

ITEM_CLASS = "AdbPoolBenchItem"
KEY_CLASS = "AdbPoolBenchKey"
RUN_PROP = "adb_pool_bench_run"
N_KEYS = 100
SECRET_MASK = "********"


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

class Histogram:
    """Log-bucketed durations: ~1% relative precision, fixed memory, mergeable.

    Percentiles are read from bucket bounds (never above the exact maximum),
    so a long run costs the same memory as a short one.
    """

    _MIN = 1e-6         # seconds: everything below lands in bucket 0
    _STEP = math.log(1.01)
    _N = 2200           # 1 us * 1.01**2200 > 3 hours

    __slots__ = ("counts", "n", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * self._N
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        if seconds <= self._MIN:
            i = 0
        else:
            i = min(self._N - 1, int(math.log(seconds / self._MIN) / self._STEP) + 1)
        self.counts[i] += 1
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: "Histogram") -> None:
        c = self.counts
        for i, v in enumerate(other.counts):
            if v:
                c[i] += v
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100) in seconds; NaN when empty."""
        if not self.n:
            return float("nan")
        rank = max(1, math.ceil(q / 100.0 * self.n))
        seen = 0
        for i, v in enumerate(self.counts):
            seen += v
            if seen >= rank:
                upper = self._MIN if i == 0 else self._MIN * math.exp(i * self._STEP)
                return min(upper, self.max)
        return self.max  # pragma: no cover

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def summary_ms(self) -> dict[str, float | None]:
        def ms(x: float) -> float | None:
            return None if math.isnan(x) else round(x * 1000.0, 4)
        return {"p50": ms(self.percentile(50)), "p99": ms(self.percentile(99)),
                "max": ms(self.max if self.n else float("nan")), "mean": ms(self.mean)}


class _WorkerStats:
    """One worker thread's figures; only that thread writes them."""

    __slots__ = ("ops", "reads", "writes", "items", "unknown", "wrong", "errors",
                 "error_samples", "lease_wait", "latency")

    def __init__(self) -> None:
        self.ops = 0           # completed operations (success or failure)
        self.reads = 0         # successful reads
        self.writes = 0        # acknowledged write batches
        self.items = 0         # acknowledged entities
        self.unknown = 0       # write batches with an unknown outcome
        self.wrong = 0         # answers that did not match their query
        self.errors: dict[str, int] = {}
        self.error_samples: dict[str, str] = {}
        self.lease_wait = Histogram()
        self.latency = Histogram()

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.error_samples.setdefault(kind, message)


# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------

class _Redactor:
    """Removes known secret values (and anything that looks like one) from text."""

    def __init__(self) -> None:
        self.secrets: list[str] = []

    def add(self, value: Any) -> None:
        if isinstance(value, str) and len(value) >= 3 and value not in self.secrets:
            self.secrets.append(value)

    def known(self, text: str) -> str:
        """``text`` with the known secrets masked, unshortened (for the pool's
        own diagnoses of a misconfiguration, which never quote a secret)."""
        for s in self.secrets:
            text = text.replace(s, SECRET_MASK)
        return text

    def error(self, e: BaseException) -> str:
        return self.known(str(e)) if getattr(e, "permanent", False) else self(str(e))

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, SECRET_MASK)
        try:
            from aperturedb_pool.retry import _scrub
            text = _scrub(text)
        except Exception:  # pragma: no cover - scrubbing is best effort on top
            pass
        return text


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
        return v
    parse.__name__ = name
    return parse


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in 0..1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1 (1 = reads only), got {text!r}")
    return v


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated pool sizes such as 1,2,4,8,16, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"pool sizes must be at least 1, got {v}")
        out.append(v)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"pool sizes must be distinct, got {text!r}")
    return out


def _metrics_port(text: str) -> int:
    # 0: any free port (the bench prints the one it got)
    return 0 if text.strip() == "0" else _port(text)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aperturedb-pool bench",
        description="Load-test an ApertureDB server through one aperturedb_pool.ConnectionPool: "
                    "batched AddEntity+blob writes beside concurrent FindEntity reads. Without "
                    "a target (options below, or APERTUREDB_KEY/APERTUREDB_JSON/"
                    "APERTUREDB_CONFIG), an embedded server is started on loopback.",
        epilog="Exit status: 0 clean run, 1 target unusable or failed queries or a failed "
               "correctness check, 2 bad arguments, 130 interrupted (partial report printed).")
    t = p.add_argument_group("target (default: APERTUREDB_KEY & co., else an embedded server)")
    t.add_argument("--host", help="server host (implies an explicit target)")
    t.add_argument("--port", type=_port, help="server port (default 55555)")
    t.add_argument("--user", help="username (default admin)")
    t.add_argument("--password", help="password (prompted for when --user is given on a terminal)")
    t.add_argument("--tls", action="store_true", help="use TLS (real servers usually require it)")
    t.add_argument("--ca-cert", metavar="FILE", help="CA certificate for TLS (implies --tls)")
    t.add_argument("--adb-config", nargs="?", const="", metavar="NAME", default=None,
                   help="use the SDK's configuration chain, or the adb config profile NAME")
    t.add_argument("--embedded", action="store_true",
                   help="always use an embedded server, even when APERTUREDB_KEY is set")
    w = p.add_argument_group("workload")
    w.add_argument("--threads", type=_positive_int("threads"), default=16,
                   help="worker threads (default 16)")
    w.add_argument("--pool-size", type=_positive_int("pool-size"), default=None,
                   help="connectors in the pool (default 8)")
    w.add_argument("--sizes", type=_sizes, metavar="N,N,...",
                   help="sweep these pool sizes (one run each) instead of --pool-size")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--duration", type=_seconds, metavar="S",
                   help="seconds per run (default 10)")
    g.add_argument("--count", type=_positive_int("count"), metavar="N",
                   help="operations (reads + write batches) per run, instead of --duration")
    w.add_argument("--read-ratio", type=_ratio, default=0.5, metavar="R",
                   help="fraction of operations that are reads, 0..1 (default 0.5)")
    w.add_argument("--blob-size", type=_non_negative_int, default=1024, metavar="BYTES",
                   help="bytes of the blob of each written entity (default 1024)")
    w.add_argument("--batch-size", type=_positive_int("batch-size"), default=10, metavar="N",
                   help="entities per write query (default 10)")
    w.add_argument("--lease-timeout", type=_seconds, default=30.0, metavar="S",
                   help="the pool's lease timeout (default 30)")
    w.add_argument("--query-timeout", type=_seconds, default=30.0, metavar="S",
                   help="per-query timeout (default 30)")
    w.add_argument("--seed", type=int, default=None, help="random seed of the workload")
    w.add_argument("--keep-data", action="store_true",
                   help="do not delete the entities the bench wrote (configured targets)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout (progress goes to stderr)")
    o.add_argument("--plot", metavar="FILE.png",
                   help="draw throughput and p99 lease wait against pool size (matplotlib)")
    o.add_argument("--metrics-port", type=_metrics_port, default=None, metavar="N",
                   help="serve the pools' Prometheus metrics on http://HOST:N/metrics during "
                        "the run (needs prometheus-client: the 'prometheus' extra)")
    o.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address --metrics-port listens on (default 127.0.0.1; 0.0.0.0: "
                        "every interface)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    o.add_argument("--verbose", action="store_true",
                   help="show the pool's log lines (retries, retirements) as they happen")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    explicit = any(v is not None for v in (a.host, a.port, a.user, a.password, a.ca_cert)) \
        or a.tls
    if a.embedded and (explicit or a.adb_config is not None):
        p.error("argument --embedded: not allowed with a target (--host, --port, --user, "
                "--password, --tls, --ca-cert, --adb-config)")
    if explicit and a.adb_config is not None:
        p.error("argument --adb-config: not allowed with --host/--port/--user/--password/--tls")
    if a.user is not None and a.password is None and not sys.stdin.isatty():
        p.error("argument --user: needs --password when not run on a terminal (there is no "
                "terminal to prompt on)")
    if a.ca_cert is not None and not os.path.isfile(a.ca_cert):
        p.error(f"argument --ca-cert: no such file: {a.ca_cert}")
    if a.plot is not None:
        parent = os.path.dirname(os.path.abspath(a.plot))
        if not os.path.isdir(parent):
            p.error(f"argument --plot: directory does not exist: {parent}")
        ext = os.path.splitext(a.plot)[1].lower()
        if ext not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
            p.error(f"argument --plot: expected a .png (or .svg/.pdf/.jpg) file name, "
                    f"got {a.plot!r}")
    if a.sizes is not None and a.pool_size is not None:
        p.error("argument --sizes: not allowed with argument --pool-size (give the sizes to "
                "sweep, or one pool size)")
    if a.pool_size is None:
        a.pool_size = 8
    if a.duration is None and a.count is None:
        a.duration = 10.0


# ---------------------------------------------------------------------------
# Target
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    template: Any
    kind: str                 # "embedded" or "configured"
    source: str               # where the configuration came from
    address: str
    user: str | None
    tls: bool
    server: Any = None        # the ServerProcess we started, if any

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "address": self.address,
                "user": self.user, "tls": self.tls,
                "server_pid": getattr(self.server, "pid", None)}


def _quiet_sdk_import() -> None:
    # Importing the SDK may otherwise write error.<time>.log into the working directory.
    if "aperturedb" not in sys.modules:
        os.environ.setdefault("ADB_LOG_FILE", "")


def _resolve_target(a: argparse.Namespace, redact: _Redactor, say: Callable[[str], None]) -> Target:
    explicit = any(v is not None for v in (a.host, a.port, a.user, a.password, a.ca_cert)) \
        or a.tls
    env_source = next((k for k in ("APERTUREDB_KEY", "APERTUREDB_JSON", "APERTUREDB_CONFIG")
                       if os.environ.get(k)), None)
    if explicit:
        _quiet_sdk_import()
        from aperturedb.Connector import Connector

        password = a.password
        if a.user is not None and password is None:
            if sys.stdin.isatty():
                import getpass
                password = getpass.getpass(f"password for {a.user}: ")
            else:  # pragma: no cover - _check_args refuses this
                raise _SetupError("--user needs --password (or run on a terminal to be prompted)")
        redact.add(password)
        host = a.host or "localhost"
        port = a.port or 55555
        tls = bool(a.tls or a.ca_cert)
        template = Connector(host=host, port=port, user=a.user or "admin",
                             password=password if password is not None else "admin",
                             use_ssl=tls, ca_cert=a.ca_cert)
        return Target(template, "configured", "command-line options", f"{host}:{port}",
                      a.user or "admin", tls)
    if a.adb_config is not None or (env_source is not None and not a.embedded):
        _quiet_sdk_import()
        from aperturedb.CommonLibrary import create_connector

        try:
            template = create_connector(name=a.adb_config or None)
        except (AssertionError, ValueError, KeyError) as e:
            raise _SetupError(f"the SDK configuration could not be used: {redact(str(e))}") from e
        cfg = getattr(template, "config", None)
        for secret in ("password", "token"):
            redact.add(getattr(cfg, secret, None))
        source = (f"adb config profile {a.adb_config!r}" if a.adb_config else
                  "the SDK configuration chain" if a.adb_config == "" else env_source)
        host = getattr(template, "host", "?")
        port = getattr(template, "port", "?")
        return Target(template, "configured", str(source), f"{host}:{port}",
                      getattr(cfg, "username", None), bool(getattr(template, "use_ssl", False)))
    # No target: an embedded server in its own process.
    from aperturedb_pool.testing import ServerProcess

    say("no server configured (--host, APERTUREDB_KEY, APERTUREDB_JSON, APERTUREDB_CONFIG): "
        "starting an embedded ApertureDB-protocol server for this run")
    server = ServerProcess("127.0.0.1", 0).start()
    try:
        _quiet_sdk_import()
        template = server.connector()
    except BaseException:
        server.stop()
        raise
    return Target(template, "embedded", "embedded server (in-memory, a separate process)",
                  f"127.0.0.1:{server.port}", server.username, False, server)


class _SetupError(Exception):
    """The target or the pool could not be set up: reported, exit status 1."""


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    pool_size: int
    threads: int
    elapsed: float
    interrupted: bool
    ops: int
    reads: int
    writes: int
    items: int
    unknown_batches: int
    wrong_answers: int
    errors: dict[str, int]
    error_samples: dict[str, str]
    lease_wait: Histogram
    latency: Histogram
    stats: Any                      # PoolStats
    write_check: dict[str, Any]
    run_id: str
    worker_crashes: list[str]
    #: aperturedb_pool.metrics.snapshot() at the end (--json, --metrics-port)
    metrics: dict[str, Any] | None = None

    @property
    def qps(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values()) + self.unknown_batches

    def as_dict(self) -> dict[str, Any]:
        st = self.stats
        discarded = dict(st.discarded) if st is not None else {}
        return {
            "pool_size": self.pool_size, "threads": self.threads,
            "elapsed_s": round(self.elapsed, 3), "interrupted": self.interrupted,
            "queries": self.ops, "reads": self.reads, "write_batches": self.writes,
            "entities_written": self.items,
            "queries_per_s": round(self.qps, 1),
            "lease_wait_ms": self.lease_wait.summary_ms(),
            "latency_ms": self.latency.summary_ms(),
            "connectors": {
                "opened": st.connectors_opened if st else 0,
                "retired": discarded.get("retired", 0),
                "discarded": sum(v for k, v in discarded.items() if k != "retired"),
                "discarded_by_reason": discarded,
            },
            "retries": st.retries if st else 0,
            "unknown_outcomes": self.unknown_batches,
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "error_samples": dict(self.error_samples),
            "wrong_answers": self.wrong_answers,
            "write_check": self.write_check,
            "pool_stats": st.as_dict() if st is not None else None,
            "worker_crashes": list(self.worker_crashes),
            "run_id": self.run_id,
            "metrics": self.metrics,
        }


class _Run:
    """State shared by the workers of one run."""

    def __init__(self, pool: Any, a: argparse.Namespace, run_id: str, key_run: str,
                 stop: threading.Event) -> None:
        self.pool = pool
        self.a = a
        self.run_id = run_id
        self.key_run = key_run
        self.stop = stop
        self.tickets = itertools.count()
        self.seq = itertools.count()
        self.blob = os.urandom(a.blob_size)
        self.deadline = math.inf
        self.started = 0.0
        self.stats: list[_WorkerStats] = []


def _op_read(run: _Run, ws: _WorkerStats, rng: random.Random) -> None:
    key = rng.randrange(N_KEYS)
    q = [{"FindEntity": {"with_class": KEY_CLASS,
                         "constraints": {RUN_PROP: ["==", run.key_run], "key": ["==", key]},
                         "results": {"list": ["key"]}}}]
    got = [0.0]

    def read(conn: Any) -> Any:
        if not got[0]:
            got[0] = time.perf_counter()
        return conn.query(q)
    read.idempotent = True  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    response, _ = run.pool.run(read)
    t1 = time.perf_counter()
    ws.lease_wait.add(got[0] - t0)
    ws.latency.add(t1 - t0)
    try:
        body = response[0]["FindEntity"]
        ok = body["status"] == 0 and [e.get("key") for e in body["entities"]] == [key]
    except (LookupError, TypeError, AttributeError):
        ok = False
    if ok:
        ws.reads += 1
    elif isinstance(response, dict):
        ws.error("failed transaction", str(response.get("info", response))[:300])
    else:
        ws.wrong += 1
        ws.error("wrong answer", f"asked for key {key}, got {str(response)[:300]}")


def _op_write(run: _Run, ws: _WorkerStats, rng: random.Random) -> None:
    n = run.a.batch_size
    q: list[dict[str, Any]] = []
    for i in range(n):
        seq = next(run.seq)
        props = {RUN_PROP: run.run_id, "seq": seq}
        q.append({"AddEntity": {"class": ITEM_CLASS, "_ref": i + 1, "properties": props}})
        q.append({"AddBlob": {"properties": props,
                              "connect": {"ref": i + 1, "class": "AdbPoolBenchHasBlob"}}})
    blobs = [run.blob] * n
    got = [0.0]

    def write(conn: Any) -> Any:
        if not got[0]:
            got[0] = time.perf_counter()
        return conn.query(q, blobs)
    t0 = time.perf_counter()
    response, _ = run.pool.run(write)
    t1 = time.perf_counter()
    ws.lease_wait.add(got[0] - t0)
    ws.latency.add(t1 - t0)
    if isinstance(response, list) and len(response) == 2 * n and all(
            _status(r) == 0 for r in response):
        ws.writes += 1
        ws.items += n
    elif isinstance(response, dict):
        ws.error("failed transaction", str(response.get("info", response))[:300])
    else:
        ws.error("unexpected response", str(response)[:300])


def _status(command_response: Any) -> Any:
    """The status of one command's response, ``{"AddEntity": {"status": 0}}`` -> 0."""
    if isinstance(command_response, dict) and len(command_response) == 1:
        body = next(iter(command_response.values()))
        if isinstance(body, dict):
            return body.get("status")
    return None


def _worker(run: _Run, ws: _WorkerStats, seed: int, redact: _Redactor) -> None:
    from aperturedb_pool.errors import OutcomeUnknown

    rng = random.Random(seed)
    ratio = run.a.read_ratio
    count = run.a.count
    stop = run.stop
    while not stop.is_set():
        if count is not None:
            if next(run.tickets) >= count:
                return
        elif time.monotonic() >= run.deadline:
            return
        is_read = rng.random() < ratio
        try:
            if is_read:
                _op_read(run, ws, rng)
            else:
                _op_write(run, ws, rng)
        except OutcomeUnknown as e:
            # Reads are retried by the policy; an unknown outcome that still
            # escapes is a failed read.  For a write it is the honest answer.
            if is_read:
                ws.error("OutcomeUnknown (read)", redact(str(e))[:300])
            else:
                ws.unknown += 1
        except Exception as e:
            ws.error(type(e).__name__, redact(str(e))[:300])
        ws.ops += 1


def _seed_keys(pool: Any, key_run: str) -> None:
    q = [{"AddEntity": {"class": KEY_CLASS, "properties": {RUN_PROP: key_run, "key": k}}}
         for k in range(N_KEYS)]
    response, _ = pool.query(q, idempotent=False)
    if not isinstance(response, list):
        raise _SetupError(f"seeding the read keys failed: {str(response)[:300]}")


def _count_items(pool: Any, run_id: str) -> int | None:
    q = [{"FindEntity": {"with_class": ITEM_CLASS, "constraints": {RUN_PROP: ["==", run_id]},
                         "results": {"count": True}}}]
    try:
        response, _ = pool.query(q)
        return int(response[0]["FindEntity"]["count"])
    except Exception:
        return None


def _delete_run_data(pool: Any, run_ids: Sequence[str], key_run: str) -> str | None:
    """Delete what the bench wrote; returns an error text or None."""
    try:
        for rid in run_ids:
            pool.query([
                {"DeleteEntity": {"with_class": ITEM_CLASS,
                                  "constraints": {RUN_PROP: ["==", rid]}}},
                {"DeleteBlob": {"constraints": {RUN_PROP: ["==", rid]}}},
            ], idempotent=True)
        pool.query([{"DeleteEntity": {"with_class": KEY_CLASS,
                                      "constraints": {RUN_PROP: ["==", key_run]}}}],
                   idempotent=True)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


class _Progress:
    """tqdm on a terminal; plain lines (one per interval) otherwise."""

    def __init__(self, stream: TextIO, label: str, total: float, unit: str,
                 enabled: bool) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.bar: Any = None
        self.interval = 1.0 if unit != "s" or total <= 60 else 5.0
        self.started = time.monotonic()
        self.last_line = self.started
        if not enabled:
            return
        isatty = getattr(stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit=unit, file=stream, leave=True,
                            dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f}"
                                       " {unit} [{elapsed}<{remaining}{postfix}]")

    def update(self, done: float, ops: int, failed: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        qps = ops / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.n = min(done, self.total)
            self.bar.set_postfix_str(f"{ops} queries, {qps:.0f}/s, {failed} failed",
                                     refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            of = f"{done:.0f}/{self.total:.0f} {self.unit}"
            print(f"{self.label}: {of}, {ops} queries, {qps:.0f}/s, {failed} failed",
                  file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
        if note and self.enabled:
            print(f"{self.label}: {note}", file=self.stream, flush=True)


def _run_once(target: Target, a: argparse.Namespace, size: int, key_run: str,
              stop: threading.Event, redact: _Redactor, progress_stream: TextIO,
              label: str) -> RunResult:
    from aperturedb_pool import ConnectionPool, RetryPolicy

    run_id = uuid.uuid4().hex[:12]
    pool = ConnectionPool(target.template, min_size=size, max_size=size,
                          timeout=a.lease_timeout, query_timeout=a.query_timeout,
                          retry=RetryPolicy(deadline=max(a.lease_timeout, a.query_timeout)),
                          name=f"bench-{size}")
    metrics_snapshot = None
    if a.json or a.metrics_port is not None:
        from aperturedb_pool import metrics as _metrics

        metrics_snapshot = _metrics.snapshot  # instruments the pool: histograms from now
        metrics_snapshot(pool)
        collector = getattr(a, "metrics_collector", None)
        if collector is not None:
            collector.add(pool)
    try:
        try:
            pool.wait_ready(timeout=min(60.0, a.lease_timeout))
        except Exception as e:
            raise _SetupError(f"cannot open {size} connector(s) to {target.address}: "
                              f"{redact.error(e)}{_tls_hint(target, e)}") from e
        run = _Run(pool, a, run_id, key_run, stop)
        seed = a.seed if a.seed is not None else random.randrange(2 ** 32)
        workers = [_WorkerStats() for _ in range(a.threads)]
        run.stats = workers
        total, unit = (a.count, "queries") if a.count is not None else (a.duration, "s")
        prog = _Progress(progress_stream, label, float(total), unit, not a.no_progress)
        interrupted = False
        crashes: list[str] = []
        run.started = time.monotonic()
        if a.duration is not None:
            run.deadline = run.started + a.duration
        ex = concurrent.futures.ThreadPoolExecutor(max_workers=a.threads,
                                                   thread_name_prefix="bench")
        futures = [ex.submit(_worker, run, ws, seed + i, redact)
                   for i, ws in enumerate(workers)]
        try:
            pending = set(futures)
            while pending:
                _, pending = concurrent.futures.wait(pending, timeout=0.2)
                ops = sum(w.ops for w in workers)
                failed = sum(sum(w.errors.values()) + w.unknown for w in workers)
                done = ops if a.count is not None else time.monotonic() - run.started
                prog.update(done, ops, failed)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            prog.close("interrupted: waiting for queries in flight, then reporting")
            prog.enabled = False
            try:
                concurrent.futures.wait(futures, timeout=a.query_timeout + 5)
            except KeyboardInterrupt:
                print("aperturedb-pool bench: interrupted twice; exiting at once",
                      file=sys.stderr, flush=True)
                os._exit(130)
        ex.shutdown(wait=False)
        elapsed = time.monotonic() - run.started
        prog.close()
        for f in futures:
            if f.done() and f.exception() is not None:
                exc = f.exception()
                crashes.append(redact(f"{type(exc).__name__}: {exc}"))
        stats = pool.stats()
        metrics_doc = metrics_snapshot(pool) if metrics_snapshot is not None else None
        lease_wait, latency = Histogram(), Histogram()
        errors: dict[str, int] = {}
        samples: dict[str, str] = {}
        for w in workers:
            lease_wait.merge(w.lease_wait)
            latency.merge(w.latency)
            for kind, n in w.errors.items():
                errors[kind] = errors.get(kind, 0) + n
            for kind, text in w.error_samples.items():
                samples.setdefault(kind, text)
        items = sum(w.items for w in workers)
        unknown = sum(w.unknown for w in workers)
        stored = _count_items(pool, run_id)
        check: dict[str, Any] = {"acknowledged": items, "unknown_batches": unknown,
                                 "stored": stored}
        if stored is None:
            check["ok"] = None
        else:
            check["ok"] = items <= stored <= items + unknown * a.batch_size
        return RunResult(size, a.threads, elapsed, interrupted, sum(w.ops for w in workers),
                         sum(w.reads for w in workers), sum(w.writes for w in workers), items,
                         unknown, sum(w.wrong for w in workers), errors, samples, lease_wait,
                         latency, stats, check, run_id, crashes, metrics_doc)
    finally:
        pool.close(timeout=1.0)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _best_size(results: Sequence[RunResult]) -> int | None:
    """The smallest pool size within 5% of the best throughput."""
    done = [r for r in results if r.ops and not r.interrupted]
    if not done:
        return None
    best = max(r.qps for r in done)
    return min(r.pool_size for r in done if r.qps >= 0.95 * best)


def _print_run(r: RunResult, out: TextIO) -> None:
    d = r.as_dict()
    lw, lat, c = d["lease_wait_ms"], d["latency_ms"], d["connectors"]
    st = r.stats
    rows = [
        ("pool size / threads", f"{r.pool_size} / {r.threads}"),
        ("elapsed", f"{r.elapsed:.2f} s" + ("  (interrupted: partial figures)"
                                           if r.interrupted else "")),
        ("queries", f"{r.ops}  (reads {r.reads}, write batches {r.writes} = "
                    f"{r.items} entities)"),
        ("queries/s", f"{r.qps:.1f}"),
        ("lease wait p50/p99/max", f"{_ms(lw['p50'])} / {_ms(lw['p99'])} / {_ms(lw['max'])} ms"),
        ("query latency p50/p99/max",
         f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} ms"),
        ("connectors", f"opened {c['opened']}, retired {c['retired']}, discarded "
                       f"{c['discarded']}" + (f" {c['discarded_by_reason']}"
                                              if c["discarded_by_reason"] else "")),
        ("retries", str(d["retries"])),
        ("unknown outcomes", f"{r.unknown_batches} write batches"),
        ("errors", str(d["errors"]) + (f"  {d['errors_by_kind']}" if d["errors"] else "")),
        ("wrong answers", str(r.wrong_answers)),
    ]
    wc = r.write_check
    if wc["ok"] is None:
        rows.append(("write check", "could not count the stored entities"))
    else:
        rows.append(("write check",
                     f"{'ok' if wc['ok'] else 'MISMATCH'}: {wc['stored']} stored, "
                     f"{wc['acknowledged']} acknowledged, {wc['unknown_batches']} batches "
                     f"unknown"))
    if st is not None:
        rows.append(("pool stats", f"size {st.size}/{st.max_size}, leased {st.leased}, idle "
                                   f"{st.idle}, waiting {st.waiting}; leases {st.leases_granted} "
                                   f"({st.leases_waited} waited, mean wait "
                                   f"{st.wait_time_mean * 1000:.3f} ms, longest "
                                   f"{st.wait_time_max * 1000:.1f} ms)"))
        rows.append(("", f"timeouts {st.timeouts}, rejected {st.rejected_waiters}, "
                         f"keepalive pings {st.keepalive_pings}, probes {st.probes}, "
                         f"refill failures {st.refill_failures}, give-ups {st.give_ups}, "
                         f"generation {st.generation}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
    for kind, sample in r.error_samples.items():
        print(f"  first {kind}: {sample}", file=out)
    for crash in r.worker_crashes:
        print(f"  worker crashed: {crash}", file=out)


def _print_sweep(results: Sequence[RunResult], out: TextIO) -> None:
    hdr = ("pool size", "queries/s", "wait p50 ms", "wait p99 ms", "wait max ms",
           "lat p99 ms", "failed")
    rows = []
    for r in results:
        lw = r.lease_wait.summary_ms()
        rows.append((str(r.pool_size) + ("*" if r.interrupted else ""), f"{r.qps:.1f}",
                     _ms(lw["p50"]), _ms(lw["p99"]), _ms(lw["max"]),
                     _ms(r.latency.summary_ms()["p99"]), str(r.failed)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(hdr)]
    print("  " + "  ".join(h.rjust(w) for h, w in zip(hdr, widths, strict=True)), file=out)
    for row in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=out)
    if any(r.interrupted for r in results):
        print("  * interrupted: partial figures", file=out)


def _plot(results: Sequence[RunResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _plot_figure(results, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_figure(results: Sequence[RunResult], title: str) -> Any:
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: r.pool_size)
    xs = [r.pool_size for r in rs]
    qps = [r.qps for r in rs]
    p99 = [r.lease_wait.percentile(99) * 1000.0 for r in rs]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(xs, qps, "o-", color="tab:blue", label="queries/s")
    ax.set_xlabel("pool size (connectors)")
    ax.set_ylabel("queries per second", color="tab:blue")
    ax.set_ylim(bottom=0)
    if len(xs) > 1 and all(x > 0 and (x & (x - 1)) == 0 for x in xs):
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax2 = ax.twinx()
    ax2.plot(xs, p99, "s--", color="tab:red", label="p99 lease wait (ms)")
    ax2.set_ylabel("p99 lease wait (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    best = _best_size(results)
    if best is not None:
        ax.axvline(best, color="tab:green", linestyle=":", linewidth=2,
                   label=f"recommended size: {best} (smallest within 5% of the best)")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # On the right-hand axes, so that the p99 line does not draw over it.
    ax2.legend(handles + h2, labels + l2, loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


class _LogTap(logging.Handler):
    """Counts the pool's log records; shows them live with --verbose."""

    def __init__(self, redact: _Redactor, live: Callable[[str], None] | None) -> None:
        super().__init__(logging.INFO)
        self.redact = redact
        self.live = live
        self.counts: dict[str, int] = {}
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.redact(record.getMessage())
        except Exception:  # pragma: no cover
            return
        level = record.levelname
        self.counts[level] = self.counts.get(level, 0) + 1
        if record.levelno >= logging.WARNING and len(self.first) < 3:
            self.first.append(msg.splitlines()[0][:300])
        if self.live is not None:
            self.live(f"[{level.lower()}] {msg}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    # argparse takes "-1,2" (after --sizes, say) for an option and reports
    # "expected one argument"; attached as "--sizes=-1,2" it reaches the
    # option's own check, which says what is wrong with it.
    out: list[str] = []
    for arg in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and
                re.fullmatch(r"-[0-9][0-9.,eE+-]*", arg)):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _serve_metrics(a: argparse.Namespace) -> Any:
    # One collector for every run's pool (each named bench-SIZE), on a registry of
    # its own: the endpoint shows the pools and nothing of the process.
    from prometheus_client import CollectorRegistry, start_http_server

    from aperturedb_pool.metrics import PrometheusCollector

    a.metrics_collector = PrometheusCollector()
    registry = CollectorRegistry()
    registry.register(a.metrics_collector)
    server, _thread = start_http_server(a.metrics_port, addr=a.metrics_host, registry=registry)
    return server


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    a = parser.parse_args(_attach_negative_values(argv))
    _check_args(parser, a)
    out = sys.stdout
    # Progress and notes go to stderr when stdout carries the JSON document.
    info = sys.stderr if a.json else sys.stdout

    def say(text: str) -> None:
        print(f"aperturedb-pool bench: {text}", file=info, flush=True)

    redact = _Redactor()
    sizes = a.sizes if a.sizes is not None else [a.pool_size]
    stop = threading.Event()
    tap = _LogTap(redact, (lambda s: print(s, file=info, flush=True)) if a.verbose else None)
    pool_logger = logging.getLogger("aperturedb_pool")
    pool_logger.addHandler(tap)
    if pool_logger.level == logging.NOTSET or pool_logger.level > logging.INFO:
        pool_logger.setLevel(logging.INFO)
    target: Target | None = None
    results: list[RunResult] = []
    interrupted = False
    setup_error: str | None = None
    cleanup_error: str | None = None
    started = time.time()
    metrics_server = None
    if a.metrics_port is not None:
        try:
            metrics_server = _serve_metrics(a)
        except ImportError:
            parser.error("argument --metrics-port: needs prometheus-client (pip install "
                         "'aperturedb-pool[prometheus]')")
        except OSError as e:
            parser.error(f"argument --metrics-port: cannot listen on "
                         f"{a.metrics_host}:{a.metrics_port}: {e}")
        say(f"metrics: http://{a.metrics_host}:{metrics_server.server_port}/metrics "
            f"(Prometheus text format, during the run)")
    try:
        try:
            target = _resolve_target(a, redact, say)
        except _SetupError as e:
            setup_error = str(e)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:
            setup_error = f"cannot set up the target: {type(e).__name__}: {redact(str(e))}"
        if target is not None and not interrupted:
            if target.kind == "embedded":
                say(f"target: embedded server, pid {target.server.pid}, on {target.address} "
                    f"(in-memory; stopped at the end)")
            else:
                say(f"target: {target.address} as {target.user or '(token)'}"
                    f"{' with TLS' if target.tls else ''} (from {target.source})")
            per = (f"{a.duration:g} s" if a.duration is not None else f"{a.count} operations")
            say(f"workload: {a.threads} threads, pool size{'s' if len(sizes) > 1 else ''} "
                f"{','.join(map(str, sizes))}, {per} per run, read ratio {a.read_ratio:g}, "
                f"write batches of {a.batch_size} entities with {a.blob_size}-byte blobs")
            key_run = uuid.uuid4().hex[:12]
            seeded = False
            try:
                for i, size in enumerate(sizes):
                    if stop.is_set():
                        break
                    if i and target.server is not None:
                        # A fresh store for each size: the embedded server scans it
                        # on every read, so a grown store would slow later sizes.
                        target.server.clear_store()
                    if i == 0 or target.server is not None:
                        _seed_with_pool(target, key_run, redact)
                        seeded = True  # one transaction: all keys or none
                    label = f"pool {size}" if len(sizes) > 1 else "bench"
                    r = _run_once(target, a, size, key_run, stop, redact, info, label)
                    results.append(r)
                    if r.interrupted:
                        interrupted = True
                        break
            except _SetupError as e:
                setup_error = str(e)
            except KeyboardInterrupt:
                interrupted = True
            if target.kind != "embedded" and not a.keep_data and seeded:
                try:
                    cleanup_error = _cleanup(target, [r.run_id for r in results], key_run)
                except KeyboardInterrupt:
                    interrupted = True
                    cleanup_error = ("interrupted: entities with the property "
                                     f"{RUN_PROP!r} may remain")
    finally:
        pool_logger.removeHandler(tap)
        if target is not None and target.server is not None:
            target.server.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()

    plot_error = None
    if a.plot and results:
        try:
            title = (f"aperturedb-pool bench: {a.threads} threads, read ratio {a.read_ratio:g}, "
                     f"{target.kind if target else ''} server")
            _plot(results, a.plot, title)
        except Exception as e:  # a plot must not lose the figures
            plot_error = f"{type(e).__name__}: {e}"

    problems = bool(setup_error) or any(
        r.failed or r.wrong_answers or r.worker_crashes or r.write_check.get("ok") is False
        for r in results)
    if a.json:
        doc = {
            "command": "aperturedb-pool bench",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "target": target.describe() if target else None,
            "workload": {"threads": a.threads, "pool_sizes": sizes, "duration_s": a.duration,
                         "count": a.count, "read_ratio": a.read_ratio,
                         "blob_size": a.blob_size, "batch_size": a.batch_size,
                         "lease_timeout_s": a.lease_timeout,
                         "query_timeout_s": a.query_timeout},
            "interrupted": interrupted,
            "runs": [r.as_dict() for r in results],
            "best_pool_size": _best_size(results) if len(results) > 1 else None,
            "log_records": dict(tap.counts),
            "setup_error": setup_error,
            "cleanup_error": cleanup_error,
            "plot": a.plot if a.plot and results and not plot_error else None,
            "plot_error": plot_error,
        }
        print(json.dumps(doc, indent=2), file=out, flush=True)
    else:
        if setup_error:
            print(f"aperturedb-pool bench: error: {setup_error}", file=sys.stderr)
        if results:
            print("", file=out)
            if len(results) > 1 or a.sizes is not None:
                print("results by pool size (lease wait: asking the pool -> holding a "
                      "connector):", file=out)
                _print_sweep(results, out)
                best = _best_size(results)
                if best is not None and len(results) > 1:
                    print(f"  smallest pool within 5% of the best throughput: {best}", file=out)
                for r in results:
                    print(f"\npool size {r.pool_size}:", file=out)
                    _print_run(r, out)
            else:
                print("results:", file=out)
                _print_run(results[0], out)
            if tap.counts.get("WARNING"):
                print(f"  pool log: {tap.counts['WARNING']} warning(s), first: {tap.first[0]}"
                      + ("" if a.verbose else " (--verbose shows them all)"), file=out)
        if cleanup_error:
            print(f"aperturedb-pool bench: could not delete the bench's entities: "
                  f"{redact(cleanup_error)}", file=sys.stderr)
        if plot_error:
            print(f"aperturedb-pool bench: could not draw {a.plot}: {plot_error}",
                  file=sys.stderr)
        elif a.plot and results:
            print(f"plot written to {a.plot}", file=out)
        if interrupted:
            print("aperturedb-pool bench: interrupted (Ctrl-C): the figures above are partial",
                  file=out)
        out.flush()
    if interrupted:
        return 130
    return 1 if problems else 0


def _seed_with_pool(target: Target, key_run: str, redact: _Redactor) -> None:
    from aperturedb_pool import ConnectionPool, PoolTimeout

    with ConnectionPool(target.template, min_size=1, max_size=1, name="bench-setup") as pool:
        try:
            try:
                pool.wait_ready(timeout=_REFUSED_GRACE)
            except PoolTimeout as e:
                if not _refused(e):
                    pool.wait_ready(timeout=10.0 - _REFUSED_GRACE)
                else:  # nothing listens there: a user expects to hear it at once
                    raise _SetupError(
                        f"cannot connect to {target.address}: connection refused (for "
                        f"{_REFUSED_GRACE:g} s): no server listens there. Start one (e.g. "
                        f"`aperturedb-pool serve --port PORT`) or fix --host/--port") from e
            _seed_keys(pool, key_run)
        except _SetupError:
            raise
        except Exception as e:
            if getattr(e, "permanent", False):  # it names the cause and the fix
                raise _SetupError(redact.error(e)) from e
            raise _SetupError(f"cannot use {target.address}: {redact(str(e))}"
                              f"{_tls_hint(target, e)}") from e


_REFUSED_GRACE = 2.0  # seconds of refused connections before the bench gives up


def _refused(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ConnectionRefusedError):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _tls_hint(target: Target, e: BaseException) -> str:
    if "protocol" not in str(e).lower():
        return ""
    if target.tls:
        return " (the server may not use TLS: try without --tls)"
    return " (does the server require TLS? try --tls)"


def _cleanup(target: Target, run_ids: Sequence[str], key_run: str) -> str | None:
    from aperturedb_pool import ConnectionPool, RetryPolicy

    try:
        with ConnectionPool(target.template, min_size=1, max_size=1, timeout=15.0,
                            retry=RetryPolicy(deadline=15.0), name="bench-cleanup") as pool:
            pool.wait_ready(timeout=10.0)
            return _delete_run_data(pool, run_ids, key_run)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


__all__ = ["main", "Histogram"]
