"""Django integration: a process-wide pool and a connector per request.

Setup::

    # settings.py
    INSTALLED_APPS = [..., "aperturedb_pool.django"]
    APERTUREDB = {
        "HOST": "db.example.com", "USER": "admin", "PASSWORD": env("ADB_PASSWORD"),
        "MAX_SIZE": 8,
    }

    # views.py
    from aperturedb_pool.django import get_connector

    def count(request):
        response, _ = get_connector().query([{"FindEntity": {"results": {"count": True}}}])
        return JsonResponse(response, safe=False)

``settings.APERTUREDB`` takes the keys of :mod:`aperturedb_pool.config`
(``KEY``, or ``HOST``/``PORT``/``USER``/``PASSWORD``/``USE_SSL``/``CA_CERT``/...;
pool options such as ``MAX_SIZE``).  Without it, the SDK's own configuration
(the ``APERTUREDB_KEY`` environment variable, ``adb config``) is used.

Design choices:

* **The pool** is created on first use, once per process (a gunicorn worker
  forked from a ``--preload`` master creates its own; the master's is never
  used by a worker), and closed at interpreter exit (``atexit``) or by
  :func:`close_pool`.  Changing ``settings.APERTUREDB`` (``override_settings``)
  closes it; the next use builds one from the new settings.
* **The per-request connector** is leased on the first :func:`get_connector`
  call of a request and released by the ``request_finished`` signal - not by a
  middleware - because ``request_finished`` fires when the server closes the
  response, *after* a ``StreamingHttpResponse`` has been consumed, so a
  streaming view may use the connector while it streams.  Nothing to add to
  ``MIDDLEWARE``.  The request scope is a ``contextvars.ContextVar`` opened by
  ``request_started``; if a server never closed a response, the next request
  in the same thread returns the forgotten connector (with a warning).
* A request that ended with an exception raised by a connector (seen through
  ``got_request_exception``), or with a query in flight, has its connector
  discarded (closed, not reused); an exception from the view's own code with a
  clean connection does not cost a reconnect.
* The connector belongs to the request's thread; other threads, management
  commands and background jobs use ``get_pool().lease()`` (or
  ``get_pool().query(...)``).  :func:`get_connector` outside a request raises.
* ``manage.py check`` (and ``runserver``, ``migrate``...) validates
  ``settings.APERTUREDB`` with the system check ``aperturedb_pool.E0xx`` /
  ``W0xx`` messages, registered by the app config (hence ``INSTALLED_APPS``).
  It never connects.

Importing this module does not touch ``settings``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import got_request_exception, request_finished, request_started

from aperturedb_pool.config import ConfigError, ProcessPool, check_config, read_config
from aperturedb_pool.config import release_request_lease as _release
from aperturedb_pool.pool import ConnectionPool, Lease

__all__ = [
    "SETTING",
    "get_pool",
    "get_connector",
    "has_connector",
    "release_connector",
    "close_pool",
    "check_settings",
]

logger = logging.getLogger("aperturedb_pool.django")

#: The name of the Django setting read by this module.
SETTING = "APERTUREDB"


def _read_settings() -> Any:
    from django.conf import settings

    raw = getattr(settings, SETTING, None)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict, got "
                                   f"{type(raw).__name__}")
    try:
        config = read_config(raw)
    except ConfigError as e:
        raise ImproperlyConfigured(f"settings.{SETTING}: {e}") from e
    for problem in config.warnings:
        logger.warning("settings.%s: %s", SETTING, problem)
    return config


def _make_pool() -> ConnectionPool:
    _connect_setting_changed()
    config = _read_settings()
    options: dict[str, Any] = {}
    if "name" not in config.pool_options:
        options["name"] = f"django:{os.getpid()}"
    return config.make_pool(**options)  # type: ignore[no-any-return]


_pool = ProcessPool(_make_pool)


def get_pool() -> ConnectionPool:
    """This process's pool, created from ``settings.APERTUREDB`` on first use.

    Raises ``ImproperlyConfigured`` when the settings are wrong.
    """
    return _pool.get()  # type: ignore[no-any-return]


def close_pool() -> None:
    """Close this process's pool now; the next use creates a new one."""
    _pool.close()


# -- the per-request connector -------------------------------------------------

class _RequestScope:
    __slots__ = ("lease", "error", "__weakref__")

    def __init__(self) -> None:
        self.lease: Lease | None = None
        self.error: BaseException | None = None


_scope: contextvars.ContextVar[_RequestScope | None] = contextvars.ContextVar(
    "aperturedb_pool_request", default=None)


def get_connector() -> Any:
    """The connector leased to the current request (leased on first call).

    Every call within one request returns the same connector; it is yours
    alone until the request finishes.  Raises ``RuntimeError`` outside a
    request (use ``get_pool().lease()`` there).
    """
    scope = _scope.get()
    if scope is None:
        raise RuntimeError("aperturedb_pool.django.get_connector() is only available while "
                           "Django handles a request; elsewhere use "
                           "'with get_pool().lease() as conn:'")
    lease = scope.lease
    if lease is None or not lease.active:
        lease = scope.lease = get_pool().acquire()
    return lease.conn


def has_connector() -> bool:
    """True when the current request holds a leased connector."""
    scope = _scope.get()
    return scope is not None and scope.lease is not None and scope.lease.active


def release_connector(error: BaseException | None = None) -> None:
    """Return the current request's connector now, before the request finishes.

    A later :func:`get_connector` in the same request leases a new one.
    """
    scope = _scope.get()
    if scope is not None and scope.lease is not None:
        lease, scope.lease = scope.lease, None
        _release(lease, error)


def _on_request_started(sender: Any, **kwargs: Any) -> None:
    old = _scope.get()
    if old is not None and old.lease is not None and old.lease.active:
        logger.warning("a connector leased by an earlier request in this thread was never "
                       "returned (the server did not close that response); returning it now")
        _release(old.lease, old.error)
    _scope.set(_RequestScope())


def _on_request_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
    scope = _scope.get()
    if scope is not None:
        scope.error = sys.exc_info()[1]


def _on_request_finished(sender: Any, **kwargs: Any) -> None:
    scope = _scope.get()
    if scope is None:
        return
    _scope.set(None)
    lease, scope.lease = scope.lease, None
    if lease is not None:
        _release(lease, scope.error)


def _on_setting_changed(sender: Any, setting: str = "", **kwargs: Any) -> None:
    if setting == SETTING:
        close_pool()


request_started.connect(_on_request_started, weak=False,
                        dispatch_uid="aperturedb_pool.django.request_started")
got_request_exception.connect(_on_request_exception, weak=False,
                              dispatch_uid="aperturedb_pool.django.got_request_exception")
request_finished.connect(_on_request_finished, weak=False,
                         dispatch_uid="aperturedb_pool.django.request_finished")


def _connect_setting_changed() -> None:
    from django.test.signals import setting_changed

    setting_changed.connect(_on_setting_changed, weak=False,
                            dispatch_uid="aperturedb_pool.django.setting_changed")


# -- system check ----------------------------------------------------------------

def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The system check of ``settings.APERTUREDB`` (registered with the tag ``aperturedb``).

    Errors: ``aperturedb_pool.E001`` (not a dict), ``E002`` (conflicting
    connection keys), ``E003`` (bad connection value), ``E004`` (incomplete
    credentials), ``E005`` (CA_CERT file missing), ``E006`` (bad pool option).
    Warnings: ``W001`` (unknown key), ``W002`` (ignored value).
    """
    from django.conf import settings

    raw = getattr(settings, SETTING, None)
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        return [checks.Error(f"settings.{SETTING} must be a dict, got {type(raw).__name__}",
                             hint='e.g. APERTUREDB = {"HOST": "localhost", "USER": "admin", '
                                  '"PASSWORD": "..."}',
                             obj=f"settings.{SETTING}", id="aperturedb_pool.E001")]
    messages: list[checks.CheckMessage] = []
    for p in check_config(raw):
        cls = checks.Error if p.level == "error" else checks.Warning
        messages.append(cls(f'{SETTING}["{p.key}"]: {p.message}', hint=p.hint,
                            obj=f"settings.{SETTING}", id=f"aperturedb_pool.{p.id}"))
    return messages
