"""The stand-in connector of the pool's own unit tests, state machine and
lease benchmarks (``tests/``, ``stress/``): one definition for all of them.

A stand-in is any object with ``clone()``, ``query()`` and ``close()`` and no
socket: the pool skips its socket probe for it and never sends a ping when it
opens one (no ``_connect``).  It answers every query at once with a success
(``GetStatus`` with status 0, any other command with ``status 0``).  No
``__slots__``: the pool instruments a connector by setting attributes on it,
as it does on the SDK's ``Connector``.
"""

from __future__ import annotations

import threading
from typing import Any

_TIMEOUT = 10.0  # bound of the waits on ``proceed``


class StandIn:
    """A stand-in ``Connector`` that also watches how the pool uses it.

    * ``clones``: the connectors cloned from this template, in order;
    * ``queries`` (when ``record``, inherited by clones): every query run;
    * ``inside``/``overlaps``: threads inside ``query`` at once (a pool bug
      would show as overlaps); ``late_use``: queries after ``close()``,
      which also raise ``AssertionError``;
    * ``fail_next``: raised by the next query; ``fail_ping``: pings fail;
    * ``entered``/``proceed``: events that pause a query inside the call.
    """

    def __init__(self, parent: StandIn | None = None, *, record: bool = True) -> None:
        self.parent = parent
        self.record = record
        self.clones: list[StandIn] = []
        self.closed = False
        self.close_calls = 0
        self.queries: list[Any] = []
        self.inside = 0
        self.overlaps = 0
        self.late_use = 0
        self.fail_next: BaseException | None = None
        self.fail_ping = False
        self.entered: threading.Event | None = None
        self.proceed: threading.Event | None = None
        self._lock = threading.Lock()

    # The template's API -----------------------------------------------------
    def clone(self) -> StandIn:
        c = StandIn(parent=self, record=self.record)
        with self._lock:
            self.clones.append(c)
        return c

    def query(self, q: Any, blobs: Any = None) -> Any:
        with self._lock:
            if self.closed:
                self.late_use += 1
                raise AssertionError("query on a closed connector")
            self.inside += 1
            if self.inside > 1:
                self.overlaps += 1
            if self.record:
                self.queries.append(q)
        try:
            if self.entered is not None:
                self.entered.set()
            if self.proceed is not None and not self.proceed.wait(_TIMEOUT):
                raise AssertionError("a paused query was never let proceed")
            if self.fail_next is not None:
                e, self.fail_next = self.fail_next, None
                raise e
            name = next(iter(q[0])) if isinstance(q, list) and q else "?"
            if name == "GetStatus":
                if self.fail_ping:
                    raise ConnectionResetError("ping failed")
                return [{"GetStatus": {"status": 0, "info": "OK"}}], []
            return [{name: {"status": 0, "returned": 0}}], []
        finally:
            with self._lock:
                self.inside -= 1

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.close_calls += 1
