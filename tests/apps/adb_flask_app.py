"""A Flask app using aperturedb_pool.flask, for the test client and for gunicorn.

gunicorn: ``python -m gunicorn --pythonpath tests/apps 'adb_flask_app:create_app()'``
with ``ADB_TEST_PORT`` (and optionally ``ADB_TEST_HOST``) naming the server.
``ADB_TEST_EAGER=1`` makes the app use its pool at import time (in gunicorn's
master with --preload), to show that workers still create their own.
"""

from __future__ import annotations

import os

os.environ.setdefault("ADB_LOG_FILE", "")

from typing import Any

from flask import Flask, jsonify

from aperturedb_pool.flask import ApertureDB

db = ApertureDB()


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        APERTUREDB_HOST=os.environ.get("ADB_TEST_HOST", "127.0.0.1"),
        APERTUREDB_USER="admin",
        APERTUREDB_PASSWORD="admin",
        APERTUREDB_USE_SSL=False,
        APERTUREDB_MAX_SIZE=8,
        APERTUREDB_TIMEOUT=20,
    )
    if "ADB_TEST_PORT" in os.environ:
        app.config["APERTUREDB_PORT"] = int(os.environ["ADB_TEST_PORT"])
    app.config.update(config)
    db.init_app(app)

    @app.get("/whoami")
    def whoami() -> Any:
        conn = db.connector
        assert db.connector is conn  # one connector per request
        status, _ = conn.query([{"GetStatus": {}}])
        found, _ = conn.query([{"FindEntity": {"with_class": "Nothing",
                                               "results": {"count": True}}}])
        assert status[0]["GetStatus"]["status"] == 0
        assert found[0]["FindEntity"]["status"] == 0
        return jsonify(pid=os.getpid(), pool=db.pool.name, pool_id=id(db.pool),
                       leased=db.pool.stats().leased)

    @app.get("/twice")
    def twice() -> Any:
        a = db.connector
        b = db.connector
        a.query([{"GetStatus": {}}])
        return jsonify(same=a is b, leased=db.pool.stats().leased,
                       has=db.has_connector)

    @app.get("/nodb")
    def nodb() -> Any:
        return jsonify(has=db.has_connector)

    @app.get("/boom")
    def boom() -> Any:
        db.connector.query([{"GetStatus": {}}])
        raise ValueError("the view failed")

    @app.get("/connector-fails")
    def connector_fails() -> Any:
        db.connector.query([{"AddEntity": {"class": "X", "properties": {"k": 1}}}])
        return jsonify(ok=True)

    @app.get("/release-early")
    def release_early() -> Any:
        db.connector.query([{"GetStatus": {}}])
        db.release()
        return jsonify(has=db.has_connector, leased=db.pool.stats().leased)

    if os.environ.get("ADB_TEST_EAGER") == "1":
        with app.app_context():
            db.pool.wait_ready(10)  # opens connections in this (the master) process
    return app
