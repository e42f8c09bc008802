"""Building a connector template and a pool from framework configuration.

Flask reads ``app.config`` keys with the ``APERTUREDB_`` prefix, Django reads
the ``settings.APERTUREDB`` dict with the same keys unprefixed.  Both go
through :func:`read_config`, so both accept exactly the same keys and report
the same problems:

Connection (at most one way):

``KEY``
    An ApertureDB key (what ``adb config`` and the ``APERTUREDB_KEY``
    environment variable hold).
``HOST`` (``"localhost"``), ``PORT`` (55555), ``USER``, ``PASSWORD``, ``TOKEN``,
``USE_SSL`` (True), ``CA_CERT`` (path of a PEM file), ``VERIFY_HOSTNAME`` (True)
    The SDK ``Connector`` arguments of the same names.
``TEMPLATE``
    A ready ``Connector`` (or a zero-argument callable returning one).
none of them
    The SDK's own configuration chain: the ``APERTUREDB_KEY`` environment
    variable, then ``adb config``'s active configuration.

Pool options (see :class:`~aperturedb_pool.ConnectionPool`): ``MIN_SIZE``,
``MAX_SIZE``, ``TIMEOUT``, ``MAX_WAITING``, ``MAX_LIFETIME``, ``MAX_IDLE``,
``KEEPALIVE_INTERVAL``, ``TCP_KEEPALIVE``, ``QUERY_TIMEOUT``, ``PROBE_AFTER``,
``FAIRNESS_THRESHOLD``, ``CPU_BOUND_FAIRNESS_THRESHOLD``, ``LEAK_THRESHOLD``,
``CHECK_OWNERSHIP``, ``POOL_NAME``
and ``RETRY`` (a :class:`~aperturedb_pool.RetryPolicy` or a dict of its fields).

Nothing here imports the ``aperturedb`` SDK until a template is built.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from aperturedb_pool._options import PoolOptions
from aperturedb_pool.errors import ConnectorError, PoolError

__all__ = [
    "CONNECTION_KEYS",
    "POOL_OPTION_KEYS",
    "KNOWN_KEYS",
    "ConfigError",
    "ConfigProblem",
    "ApertureDBConfig",
    "check_config",
    "read_config",
    "caused_by_connector",
    "release_request_lease",
    "ProcessPool",
]

#: Keys that describe the connection field by field (mutually exclusive with KEY/TEMPLATE).
CONNECTION_KEYS: tuple[str, ...] = ("HOST", "PORT", "USER", "PASSWORD", "TOKEN", "USE_SSL",
                                    "CA_CERT", "VERIFY_HOSTNAME")

#: Configuration key -> ``ConnectionPool`` keyword.
POOL_OPTION_KEYS: Mapping[str, str] = MappingProxyType({
    "MIN_SIZE": "min_size",
    "MAX_SIZE": "max_size",
    "TIMEOUT": "timeout",
    "MAX_WAITING": "max_waiting",
    "MAX_LIFETIME": "max_lifetime",
    "MAX_IDLE": "max_idle",
    "KEEPALIVE_INTERVAL": "keepalive_interval",
    "TCP_KEEPALIVE": "tcp_keepalive",
    "QUERY_TIMEOUT": "query_timeout",
    "PROBE_AFTER": "probe_after",
    "FAIRNESS_THRESHOLD": "fairness_threshold",
    "CPU_BOUND_FAIRNESS_THRESHOLD": "cpu_bound_fairness_threshold",
    "LEAK_THRESHOLD": "leak_threshold",
    "CHECK_OWNERSHIP": "check_ownership",
    "POOL_NAME": "name",
    "RETRY": "retry",
})

KNOWN_KEYS: frozenset[str] = frozenset({"KEY", "TEMPLATE", *CONNECTION_KEYS, *POOL_OPTION_KEYS})

_DURATION_KEYS = {"TIMEOUT", "MAX_LIFETIME", "MAX_IDLE", "KEEPALIVE_INTERVAL", "QUERY_TIMEOUT",
                  "PROBE_AFTER", "FAIRNESS_THRESHOLD", "CPU_BOUND_FAIRNESS_THRESHOLD",
                  "LEAK_THRESHOLD"}
_INT_KEYS = {"MIN_SIZE", "MAX_SIZE", "MAX_WAITING"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(PoolError, ValueError):
    """The ApertureDB configuration of an application is wrong.

    ``problems`` lists every :class:`ConfigProblem` found (errors and warnings).
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = list(problems)
        errors = [p for p in problems if p.level == "error"]
        super().__init__("invalid ApertureDB configuration: " +
                         "; ".join(str(p) for p in errors or problems))


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a configuration.

    ``level`` is ``"error"`` (the pool cannot be built) or ``"warning"``;
    ``key`` is the key as the user wrote it (prefix included); ``id`` a stable
    short code (Django system checks use it as ``aperturedb_pool.<id>``).
    """

    level: str
    key: str
    message: str
    id: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" + (f" ({self.hint})" if self.hint else "")


@dataclass(frozen=True)
class ApertureDBConfig:
    """A validated configuration: how to build the template, and the pool options."""

    key: str | None = None
    connection: Mapping[str, Any] = field(default_factory=dict)
    template: Any = None
    pool_options: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[ConfigProblem, ...] = ()

    @property
    def uses_sdk_chain(self) -> bool:
        """True when no connection is configured: the SDK's own chain is used."""
        return self.key is None and not self.connection and self.template is None

    def describe(self) -> str:
        """Where the pool connects, for logs (never a secret)."""
        if self.template is not None:
            return "a configured template connector"
        if self.key is not None:
            return "the configured KEY"
        if self.connection:
            return f"{self.connection.get('host', 'localhost')}:{self.connection.get('port', 55555)}"
        return "the SDK's configuration (APERTUREDB_KEY / adb config)"

    def make_template(self) -> Any:
        """The connector template (the SDK is imported here), or None for the SDK's chain."""
        if self.template is not None:
            t = self.template
            if not (hasattr(t, "clone") or hasattr(t, "create_new_connection")) and callable(t):
                t = t()
            return t
        if self.key is None and not self.connection:
            return None
        from aperturedb.Connector import Connector

        if self.key is not None:
            return Connector(key=self.key)
        return Connector(**self.connection)

    def make_pool(self, **overrides: Any) -> Any:
        """A new :class:`~aperturedb_pool.ConnectionPool`; ``overrides`` win over the options."""
        from aperturedb_pool.pool import ConnectionPool

        options = dict(self.pool_options)
        options.update(overrides)
        return ConnectionPool(self.make_template(), **options)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"expected True or False, got {value!r}")


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def _check_key(value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected an ApertureDB key (a non-empty string), got {type(value).__name__}")
    try:
        decoded = json.loads(base64.b64decode(value.encode("ascii"), validate=True))
    except (ValueError, binascii.Error, UnicodeError):
        raise ValueError("not a valid ApertureDB key (base64 of a JSON list); copy it "
                         "from 'adb config get --key' or the ApertureDB Cloud console") from None
    if not isinstance(decoded, list) or len(decoded) < 4:
        raise ValueError("not a valid ApertureDB key (it decodes to no configuration list)")


def _analyze(source: Mapping[str, Any], prefix: str
             ) -> tuple[ApertureDBConfig | None, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def err(k: str, msg: str, id_: str, hint: str | None = None) -> None:
        problems.append(ConfigProblem("error", prefix + k, msg, id_, hint))

    def warn(k: str, msg: str, id_: str, hint: str | None = None) -> None:
        problems.append(ConfigProblem("warning", prefix + k, msg, id_, hint))

    values: dict[str, Any] = {}
    for full, value in source.items():
        if not isinstance(full, str) or not full.startswith(prefix):
            continue
        k = full[len(prefix):]
        if k in KNOWN_KEYS:
            values[k] = value
        else:
            import difflib

            close = difflib.get_close_matches(k, sorted(KNOWN_KEYS), n=1)
            warn(k, "unknown key, ignored", "W001",
                 f"did you mean {prefix + close[0]}?" if close else
                 "known keys: " + ", ".join(prefix + x for x in sorted(KNOWN_KEYS)))

    # Connection: unset (None) connection keys count as absent.
    conn_given = [k for k in CONNECTION_KEYS if values.get(k) is not None]
    key = values.get("KEY")
    template = values.get("TEMPLATE")
    if key is not None and conn_given:
        err("KEY", f"KEY and {', '.join(prefix + k for k in conn_given)} are both set",
            "E002", "give either KEY or the HOST/PORT/USER/... keys, not both")
    if template is not None and (key is not None or conn_given):
        err("TEMPLATE", "TEMPLATE and other connection keys are both set", "E002",
            "a template connector carries its own connection settings")
    if key is not None:
        try:
            _check_key(key)
        except ValueError as e:
            err("KEY", str(e), "E003")
    if template is not None:
        has_clone = hasattr(template, "clone") or hasattr(template, "create_new_connection")
        if not has_clone and not callable(template):
            err("TEMPLATE", f"expected an aperturedb Connector or a callable returning one, "
                            f"got {type(template).__name__}", "E003")

    connection: dict[str, Any] = {}
    for k in conn_given:
        v = values[k]
        try:
            if k in ("HOST", "USER", "PASSWORD", "TOKEN", "CA_CERT"):
                if not isinstance(v, str):  # (never echo a password or token)
                    raise ValueError(f"expected a string, got {type(v).__name__}")
                if k in ("HOST", "USER", "CA_CERT") and not v.strip():
                    raise ValueError("expected a non-empty string")
                connection[k.lower()] = v
            elif k == "PORT":
                port = _number(v, int)
                if not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ValueError(f"expected a port number 1..65535, got {v!r}")
                connection["port"] = port
            else:  # USE_SSL, VERIFY_HOSTNAME
                connection[k.lower()] = _bool(v)
        except ValueError as e:
            err(k, str(e), "E003")
    if "password" in connection and "user" not in connection:
        err("PASSWORD", "PASSWORD is set but USER is not", "E004", "set USER too")
    if "user" in connection and "password" not in connection and "token" not in connection:
        err("USER", "USER is set but PASSWORD is not", "E004", "set PASSWORD (or TOKEN)")
    if "token" in connection and ("user" in connection or "password" in connection):
        err("TOKEN", "TOKEN and USER/PASSWORD are both set", "E004",
            "authenticate with a token or with a user and password, not both")
    ca = connection.get("ca_cert")
    if isinstance(ca, str) and ca.strip():
        if not os.path.isfile(ca):
            err("CA_CERT", f"no such file: {ca!r}", "E005",
                "CA_CERT is the path of a PEM file holding the server's CA certificate")
        if connection.get("use_ssl") is False:
            warn("CA_CERT", "CA_CERT is ignored because USE_SSL is False", "W002")

    # Pool options: coerce strings (from environment variables), then let
    # PoolOptions (what the pool's constructor checks with) validate, so the
    # rules live in one place.
    options: dict[str, Any] = {}
    bad_options = False
    for k, kw in POOL_OPTION_KEYS.items():
        if k not in values:
            continue
        v = values[k]
        try:
            if v is not None and k in _DURATION_KEYS:
                v = _number(v, float)
            elif v is not None and k in _INT_KEYS:
                v = _number(v, int)
            elif k == "CHECK_OWNERSHIP":
                v = _bool(v)
            elif k == "TCP_KEEPALIVE" and isinstance(v, list):
                v = tuple(v)
            elif k == "RETRY" and isinstance(v, Mapping):
                from aperturedb_pool.retry import RetryPolicy

                v = RetryPolicy(**v)
            elif k == "POOL_NAME" and v is not None and not isinstance(v, str):
                raise ValueError(f"expected a string, got {v!r}")
        except (TypeError, ValueError) as e:
            err(k, str(e), "E006")
            bad_options = True
            continue
        options[kw] = v
    if not bad_options:
        # One option at a time, so each problem is reported under its own key
        # (the sizes together).  The name is checked above.
        sizes: dict[str, Any] = {kw: options[kw] for kw in ("min_size", "max_size")
                                 if kw in options}
        trials = [{kw: v} for kw, v in options.items()
                  if kw not in sizes and kw in PoolOptions.names()]
        if sizes:
            trials.append(sizes)
        for trial in trials:
            try:
                PoolOptions(**trial)
            except (TypeError, ValueError) as e:
                msg = str(e)
                if len(trial) == 1:
                    kw = next(iter(trial))
                else:
                    kw = "min_size" if msg.startswith("min_size") else "max_size"
                k = next(k for k, w in POOL_OPTION_KEYS.items() if w == kw)
                err(k, msg, "E006")

    if any(p.level == "error" for p in problems):
        return None, problems
    return ApertureDBConfig(key=key, connection=MappingProxyType(connection),
                            template=template, pool_options=MappingProxyType(options),
                            warnings=tuple(problems)), problems


def check_config(source: Mapping[str, Any], prefix: str = "") -> list[ConfigProblem]:
    """Every problem of the configuration in ``source`` (errors and warnings).

    ``source`` is a mapping (``app.config``, ``settings.APERTUREDB``); only keys
    starting with ``prefix`` are read, the prefix stripped.  Never connects.
    """
    return _analyze(source, prefix)[1]


def read_config(source: Mapping[str, Any], prefix: str = "") -> ApertureDBConfig:
    """A validated :class:`ApertureDBConfig`, or :class:`ConfigError` listing every error.

    Warnings (unknown keys, ignored values) do not raise; they are in
    ``.warnings``.
    """
    cfg, problems = _analyze(source, prefix)
    if cfg is None:
        raise ConfigError(problems)
    return cfg


# -- helpers shared by the framework integrations ------------------------------

def caused_by_connector(exc: BaseException | None) -> bool:
    """True when ``exc`` is, or was caused by, a connector's transport failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConnectorError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def release_request_lease(lease: Any, exc: BaseException | None) -> None:
    """Return a framework's per-request ``lease`` (a :class:`~aperturedb_pool.Lease`).

    Discarded (closed, not reused) when the request ended with an exception
    raised by a connector, or caused by one; otherwise released with ``exc``
    (the pool still discards it if a query was interrupted or the socket is
    dirty).
    """
    if not lease.active:
        return
    if caused_by_connector(exc):
        lease.discard()
    else:
        lease.release(exc)


class ProcessPool:
    """Holds one pool per process, created by ``factory`` on first use.

    A pool is tied to the pid that created it: after a fork (gunicorn
    ``--preload``, multiprocessing) the child never uses its parent's pool but
    creates its own on first use, even though the pool itself is fork-safe.
    Every live holder's pool is closed at interpreter exit.

    ``_current`` is a ``(pid, pool)`` tuple replaced as a whole, so a reader
    never pairs one process's pid with another's pool.  ``_lock`` serializes
    creation and is replaced in a forked child (a thread of the parent that
    does not exist there may have held it).
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._current: tuple[int, Any] | None = None
        _holders.add(self)

    def get(self) -> Any:
        """This process's pool, created now if it has none yet."""
        pid = os.getpid()
        cur = self._current
        if cur is not None and cur[0] == pid:
            return cur[1]
        with self._lock:
            cur = self._current
            if cur is not None and cur[0] == pid:
                return cur[1]
            pool = self._factory()
            self._current = (pid, pool)
            return pool

    def peek(self) -> Any:
        """This process's pool if it has one (None otherwise); never creates one."""
        cur = self._current
        return cur[1] if cur is not None and cur[0] == os.getpid() else None

    def close(self) -> None:
        """Close this process's pool (a parent's pool is left alone); the next get() opens
        a new one."""
        with self._lock:
            cur, self._current = self._current, None
        if cur is not None and cur[0] == os.getpid():
            cur[1].close()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


_holders: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_holders):
        holder._after_fork_in_child()


def _close_all_at_exit() -> None:
    for holder in list(_holders):
        try:
            holder.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
