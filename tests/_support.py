"""Helpers shared by the test modules (imported as ``_support``: pytest puts
this directory on ``sys.path``)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(pred: Callable[[], Any], what: str = "condition", *, timeout: float,
               poll: float = 0.002) -> Any:
    """Poll ``pred`` until it returns something true, and return that.

    Only for effects of the pool's background threads (opening, closing,
    pinging connectors), which have no event to wait on.  Each module binds
    its own ``timeout`` with ``functools.partial``.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
