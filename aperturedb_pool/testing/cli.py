"""``aperturedb-pool serve``: run the embedded ApertureDB-protocol server.

Prints ``ca certificate: FILE`` (only with ``--tls`` and no ``--cert``) and then
exactly one line ``listening on HOST:PORT`` once it accepts connections; runs
until SIGINT or SIGTERM and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from typing import Any, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aperturedb-pool serve",
        description="Run the embedded ApertureDB-protocol server (an in-memory test server "
                    "the real aperturedb.Connector talks to) until SIGINT/SIGTERM.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=55555,
                   help="port to bind; 0 picks a free one (default 55555)")
    p.add_argument("--tls", action="store_true",
                   help="require TLS after the hello (as the real server's force_ssl)")
    p.add_argument("--cert", metavar="FILE",
                   help="PEM certificate chain (with --tls; default: generate one and a CA)")
    p.add_argument("--key", metavar="FILE", help="PEM private key for --cert")
    p.add_argument("--user", help="username clients authenticate with (default admin)")
    p.add_argument("--password", help="password clients authenticate with (default admin)")
    p.add_argument("--no-auth", action="store_true",
                   help="accept any credentials and run queries without a session")
    p.add_argument("--token", action="append", default=[], metavar="TOKEN",
                   help="a personal token accepted by Authenticate (repeatable)")
    p.add_argument("--session-ttl", type=float, default=3600.0, metavar="S",
                   help="session token lifetime in seconds (default 3600)")
    p.add_argument("--refresh-ttl", type=float, default=36000.0, metavar="S",
                   help="refresh token lifetime in seconds (default 36000)")
    p.add_argument("--latency-ms", default="0", metavar="X",
                   help="added latency per request in ms: X, or LO,HI for uniform random")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="close connections idle longer than S seconds (the real server: 600)")
    p.add_argument("--max-clients", type=int, default=None, metavar="N",
                   help="serve at most N clients at once; others wait (the real server: 500)")
    p.add_argument("--no-control", action="store_true",
                   help="disable the control channel (fault injection from other processes)")
    p.add_argument("--stop-at-stdin-eof", action="store_true",
                   help="stop when standard input ends: ServerProcess keeps a pipe to it "
                        "open, so the server stops when the process that started it is gone "
                        "(even when it was killed)")
    return p


def _latency(p: argparse.ArgumentParser, text: str) -> float | tuple[float, float]:
    try:
        parts = [float(x) / 1000.0 for x in text.split(",")]
    except ValueError:
        p.error(f"argument --latency-ms: expected X or LO,HI in milliseconds, got {text!r}")
    if len(parts) == 1 and parts[0] >= 0:
        return parts[0]
    if len(parts) == 2 and 0 <= parts[0] <= parts[1]:
        return (parts[0], parts[1])
    p.error(f"argument --latency-ms: expected X >= 0 or LO,HI with 0 <= LO <= HI, got {text!r}")
    raise AssertionError  # unreachable: p.error exits


#: Frozen objects above which the serve process no longer thaws them for a
#: full rescan (about 80 ms of collection at this size).
_THAW_LIMIT = 200_000


def _freeze_after_full_collections() -> None:
    """Keep garbage collection pauses out of the served latencies.

    The store keeps every entity as Python objects.  A full collection rescans
    them all (about 0.2 s with a few hundred thousand entities) and stalls
    every client, which no real server does.  After each full collection what
    survived is frozen (``gc.freeze``), so later ones scan only what is new.
    Frozen objects that later become cyclic garbage (a closed connection's
    objects, say) are not collected while frozen, so every 16th time
    everything is unfrozen instead, and the next full collection scans it all
    once, unless more than ``_THAW_LIMIT`` objects are frozen: that scan
    would itself be the stall (0.4 s at 900,000 objects, measured under
    ``aperturedb-pool bench``), so a large store stays frozen and the little
    cyclic garbage frozen with it stays too.  Only in this process
    (``serve``): an EmbeddedServer inside a user's process leaves that
    process's collector alone.
    """
    full = [0]

    def after(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            full[0] += 1
            if full[0] % 16 == 0 and gc.get_freeze_count() <= _THAW_LIMIT:
                gc.unfreeze()
            else:
                gc.freeze()

    gc.callbacks.append(after)


def main(argv: Sequence[str]) -> int:
    p = _parser()
    a = p.parse_args(list(argv))
    if not 0 <= a.port <= 65535:
        p.error(f"argument --port: must be in 0..65535, got {a.port}")
    if (a.cert is None) != (a.key is None):
        p.error("argument --cert/--key: give both --cert FILE and --key FILE")
    if a.cert is not None and not a.tls:
        p.error("argument --cert: a certificate needs --tls")
    for opt, path in (("--cert", a.cert), ("--key", a.key)):
        if path is not None and not os.path.isfile(path):
            p.error(f"argument {opt}: no such file: {path}")
    if a.no_auth and (a.user is not None or a.password is not None):
        p.error("argument --no-auth: not allowed with --user/--password")
    for opt, value in (("--session-ttl", a.session_ttl), ("--refresh-ttl", a.refresh_ttl)):
        if not value > 0:
            p.error(f"argument {opt}: must be a positive number of seconds, got {value}")
    if a.idle_timeout is not None and not a.idle_timeout > 0:
        p.error(f"argument --idle-timeout: must be a positive number of seconds, got "
                f"{a.idle_timeout}")
    if a.max_clients is not None and a.max_clients < 1:
        p.error(f"argument --max-clients: must be at least 1, got {a.max_clients}")
    latency = _latency(p, a.latency_ms)

    from aperturedb_pool.testing.server import EmbeddedServer

    _freeze_after_full_collections()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if a.stop_at_stdin_eof:
        def parent_gone() -> None:
            # Blocks until the write end (held by the parent only) is closed:
            # by the parent, or by the kernel when the parent dies.  os.read,
            # not sys.stdin: a daemon thread blocked inside a buffered reader
            # holds its lock, and the interpreter aborts at exit.
            while os.read(0, 4096):
                pass
            stop.set()

        threading.Thread(target=parent_gone, name="stdin-eof", daemon=True).start()

    server = EmbeddedServer(
        a.host, a.port, tls=a.tls, certfile=a.cert, keyfile=a.key,
        username=a.user if a.user is not None else "admin",
        password=a.password if a.password is not None else "admin",
        auth=not a.no_auth, session_ttl=a.session_ttl, refresh_ttl=a.refresh_ttl,
        latency=latency, tokens=a.token, idle_timeout=a.idle_timeout,
        max_clients=a.max_clients, control=not a.no_control)
    try:
        server.start()
    except OSError as e:
        print(f"aperturedb-pool serve: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1
    try:
        if server.ca_path is not None:
            print(f"ca certificate: {server.ca_path}", flush=True)
        host = f"[{server.host}]" if ":" in server.host else server.host
        print(f"listening on {host}:{server.port}", flush=True)
        server.serve_until(stop)
    finally:
        server.stop()
    return 0
