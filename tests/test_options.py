"""PoolOptions: the one validated record of the pool's options, shared with config."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aperturedb_pool import ConnectionPool, RetryPolicy, config
from aperturedb_pool._options import PoolOptions


def test_defaults_are_the_pools_and_normalized() -> None:
    o = PoolOptions(timeout=3, tcp_keepalive=[5, 2, 4])  # type: ignore[arg-type]
    assert o.timeout == 3.0 and isinstance(o.timeout, float)
    assert o.tcp_keepalive == (5.0, 2.0, 4)
    assert isinstance(o.retry, RetryPolicy) and o.retry_policy is o.retry
    pool = ConnectionPool(connector_factory=object, open=False)
    try:
        for name in PoolOptions.names() - {"retry"}:
            assert getattr(pool, name) == getattr(PoolOptions(), name), name
    finally:
        pool.close()


def test_options_are_frozen() -> None:
    o = PoolOptions()
    with pytest.raises(AttributeError):
        o.max_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("kw, error, words", [
    ({"max_size": 0}, ValueError, "max_size must be an int >= 1"),
    ({"max_size": True}, TypeError, "max_size"),
    ({"min_size": -1}, ValueError, "min_size must be an int >= 0"),
    ({"min_size": 3, "max_size": 2}, ValueError, "must not exceed max_size"),
    ({"max_waiting": 1.5}, ValueError, "max_waiting must be None or an int >= 0"),
    ({"timeout": "3"}, TypeError, "timeout must be a number of seconds"),
    ({"timeout": None}, ValueError, "timeout must be a number of seconds, got None"),
    ({"max_idle": 0}, ValueError, "max_idle must be a positive number"),
    ({"probe_after": math.nan}, ValueError, "probe_after must be a non-negative number"),
    ({"fairness_threshold": math.inf}, ValueError, "finite"),
    ({"cpu_bound_fairness_threshold": math.inf}, ValueError, "finite"),
    ({"tcp_keepalive": (1, 1)}, ValueError, "tcp_keepalive must be None or"),
    ({"tcp_keepalive": (1, 1, 0)}, ValueError, r"tcp_keepalive\[2\] \(probe count\)"),
    ({"retry": {"max_attempts": 2}}, TypeError, "retry must be a RetryPolicy"),
])
def test_bad_options_name_the_option(kw: dict[str, Any], error: type[Exception],
                                     words: str) -> None:
    with pytest.raises(error, match=words):
        PoolOptions(**kw)
    # The pool raises the same (it validates through PoolOptions).
    with pytest.raises(error, match=words):
        ConnectionPool(connector_factory=object, open=False, **kw)


def test_config_checks_options_without_building_a_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("config built a pool to validate")

    monkeypatch.setattr(ConnectionPool, "__init__", refuse)
    problems = config.check_config({"TIMEOUT": -1, "MAX_SIZE": 2, "MIN_SIZE": 5,
                                    "FAIRNESS_THRESHOLD": "inf", "POOL_NAME": "x"})
    assert sorted((p.key, p.id) for p in problems) == [
        ("FAIRNESS_THRESHOLD", "E006"), ("MIN_SIZE", "E006"), ("TIMEOUT", "E006")]
