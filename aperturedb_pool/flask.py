"""Flask integration: ``ApertureDB(app)`` / ``ApertureDB().init_app(app)``.

::

    from flask import Flask
    from aperturedb_pool.flask import ApertureDB

    db = ApertureDB()

    def create_app():
        app = Flask(__name__)
        app.config.update(APERTUREDB_HOST="db.example.com", APERTUREDB_USER="admin",
                          APERTUREDB_PASSWORD="...", APERTUREDB_MAX_SIZE=8)
        db.init_app(app)
        return app

    @app.get("/count")
    def count():
        response, _ = db.connector.query([{"FindEntity": {"results": {"count": True}}}])
        return response

Configuration: the keys of :mod:`aperturedb_pool.config` with the prefix
``APERTUREDB_`` (``APERTUREDB_KEY``, or ``APERTUREDB_HOST``/``_PORT``/``_USER``/
``_PASSWORD``/``_USE_SSL``/``_CA_CERT``/...; pool options such as
``APERTUREDB_MAX_SIZE``).  ``init_app`` validates them and raises
:class:`~aperturedb_pool.config.ConfigError` naming every bad key; it never
connects.

Lifecycle:

* **One pool per app and per process, created on first use.**  ``init_app``
  opens nothing, so an app imported by gunicorn's master (``--preload``) opens
  no connection there.  The pool remembers the pid that created it; a worker
  that inherited a pool created in the master never uses it, but creates its
  own on first use.
* **One connector per application context, leased on first use.**
  ``db.connector`` leases a connector from the pool the first time it is read
  in an app context (every request has one) and keeps it in ``flask.g``;
  reading it again in the same context returns the same connector.  A request
  that never reads it leases nothing.
* **Returned at app-context teardown**, also when the view raised.  It is
  discarded (closed, not reused) when the context ended with an exception
  raised by a connector (:class:`~aperturedb_pool.ConnectorError`, also as the
  cause of another exception) or while one of its queries was in flight;
  an exception from the view's own code with a clean connection does not cost
  a reconnect.
* The connector belongs to the request's thread: threads started by a view
  must lease their own (``db.pool.lease()``).  A streamed response that uses
  it must keep the context alive (``flask.stream_with_context``).
* The pools are closed at interpreter exit (``atexit``); ``db.close()`` closes
  the current app's pool at once (the next use creates a new one).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, current_app, g

from aperturedb_pool.config import (
    ApertureDBConfig,
    ProcessPool,
    read_config,
    release_request_lease,
)
from aperturedb_pool.pool import ConnectionPool, Lease

__all__ = ["ApertureDB", "CONFIG_PREFIX"]

#: The prefix of every app.config key this extension reads.
CONFIG_PREFIX = "APERTUREDB_"

_EXTENSION_KEY = "aperturedb"
_G_KEY = "_aperturedb_pool_lease"


class _AppState:
    """What ``app.extensions["aperturedb"]`` holds: the app's validated
    configuration and its per-process pool."""

    def __init__(self, app: Flask, config: ApertureDBConfig) -> None:
        self.config = config
        name = app.name

        def make_pool() -> ConnectionPool:
            # The default name carries the pid of the process that created the pool.
            options: dict[str, Any] = {}
            if "name" not in config.pool_options:
                options["name"] = f"flask:{name}:{os.getpid()}"
            return config.make_pool(**options)  # type: ignore[no-any-return]

        self.holder = ProcessPool(make_pool)

    def pool(self) -> ConnectionPool:
        return self.holder.get()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.holder.close()


class ApertureDB:
    """The Flask extension: a lazily created pool per process, a connector per app context.

    ``ApertureDB(app)`` or ``ApertureDB()`` then ``init_app(app)`` (application
    factories; one extension object may serve several apps, each with its own
    configuration and pool).
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and validate ``app.config``; register the teardown.  Opens nothing."""
        config = read_config(app.config, prefix=CONFIG_PREFIX)
        for problem in config.warnings:
            app.logger.warning("aperturedb_pool: %s", problem)
        old = app.extensions.get(_EXTENSION_KEY)
        if isinstance(old, _AppState):
            old.close()
        else:
            app.teardown_appcontext(self._teardown)
        app.extensions[_EXTENSION_KEY] = _AppState(app, config)

    # -- access ----------------------------------------------------------------
    @staticmethod
    def _state(app: Flask | None = None) -> _AppState:
        if app is None:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            state = app.extensions[_EXTENSION_KEY]
        except KeyError:
            raise RuntimeError(f"the ApertureDB extension is not registered on app "
                               f"{app.name!r}: call ApertureDB(app) or init_app(app)") from None
        return state  # type: ignore[no-any-return]

    def get_pool(self, app: Flask | None = None) -> ConnectionPool:
        """The pool of ``app`` (default: the current app) in this process, created on first use."""
        return self._state(app).pool()

    @property
    def pool(self) -> ConnectionPool:
        """The current app's pool in this process (created on first use)."""
        return self._state().pool()

    @property
    def connector(self) -> Any:
        """The connector leased to the current app context (leased on first access).

        Yours alone until the context ends (the request's teardown); do not
        keep it beyond, nor hand it to another thread.
        """
        lease: Lease | None = g.get(_G_KEY)
        if lease is None or not lease.active:
            lease = self._state().pool().acquire()
            setattr(g, _G_KEY, lease)
        return lease.conn

    @property
    def has_connector(self) -> bool:
        """True when the current app context holds a leased connector."""
        lease: Lease | None = g.get(_G_KEY)
        return lease is not None and lease.active

    def release(self, error: BaseException | None = None) -> None:
        """Return the current context's connector now (before teardown).

        For long requests that are done with the database early.  Reading
        ``connector`` afterwards leases a new one.
        """
        lease: Lease | None = g.pop(_G_KEY, None)
        if lease is not None:
            release_request_lease(lease, error)

    def close(self, app: Flask | None = None) -> None:
        """Close the pool of ``app`` (default: the current app); the next use opens a new one."""
        self._state(app).close()

    # -- teardown --------------------------------------------------------------
    @staticmethod
    def _teardown(exc: BaseException | None) -> None:
        lease: Lease | None = g.pop(_G_KEY, None)
        if lease is not None:
            release_request_lease(lease, exc)
