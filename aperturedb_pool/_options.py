"""The pool's options: one frozen, validated record shared by ``ConnectionPool``
and ``config`` (which checks framework settings without building a pool).

``PoolOptions(**kwargs)`` raises ``TypeError``/``ValueError`` naming the
option and what it takes; an instance holds normalized values (durations as
floats, ``tcp_keepalive`` as ``(float, float, int)``, ``retry`` a
``RetryPolicy``).  The meaning of each option is documented on
``ConnectionPool``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from aperturedb_pool import _validate

if TYPE_CHECKING:
    from aperturedb_pool.retry import RetryPolicy

# The rest of a fairness threshold of inf would let looping threads keep
# connectors for ever: waiters would be served only at their deadline.
_FAIRNESS_HINT = "a large threshold such as 1.0 already lets loops keep their connectors for long"


@dataclass(frozen=True)
class PoolOptions:
    min_size: int = 1
    max_size: int = 8
    timeout: float = 30.0
    max_waiting: int | None = None
    max_lifetime: float | None = 3600.0
    max_idle: float | None = 600.0
    keepalive_interval: float | None = 60.0
    tcp_keepalive: tuple[float, float, int] | None = (30.0, 10.0, 3)
    query_timeout: float | None = None
    connect_timeout: float = 10.0
    probe_after: float = 0.5
    fairness_threshold: float = 0.01
    cpu_bound_fairness_threshold: float | None = 0.1
    leak_threshold: float | None = None
    check_ownership: bool = False
    retry: RetryPolicy | None = None  # None: RetryPolicy()
    reconnect_initial: float = 0.05
    reconnect_max: float = 2.0

    def __post_init__(self) -> None:
        v = _validate
        min_size = v.integer("min_size", self.min_size, minimum=0, wrong_type=TypeError)
        max_size = v.integer("max_size", self.max_size, minimum=1, wrong_type=TypeError)
        if min_size > max_size:
            raise ValueError(f"min_size ({self.min_size!r}) must not exceed max_size "
                             f"({self.max_size!r})")
        fix: dict[str, object] = {
            "max_waiting": v.integer("max_waiting", self.max_waiting, minimum=0, optional=True),
            "timeout": v.duration("timeout", self.timeout, optional=False),
            "max_lifetime": v.duration("max_lifetime", self.max_lifetime, allow_zero=False),
            "max_idle": v.duration("max_idle", self.max_idle, allow_zero=False),
            "keepalive_interval": v.duration("keepalive_interval", self.keepalive_interval,
                                             allow_zero=False),
            "query_timeout": v.duration("query_timeout", self.query_timeout, allow_zero=False),
            "connect_timeout": v.duration("connect_timeout", self.connect_timeout,
                                          optional=False, allow_zero=False),
            "probe_after": v.duration("probe_after", self.probe_after, optional=False),
            "fairness_threshold": v.duration("fairness_threshold", self.fairness_threshold,
                                             optional=False, finite=True, hint=_FAIRNESS_HINT),
            "cpu_bound_fairness_threshold": v.duration(
                "cpu_bound_fairness_threshold", self.cpu_bound_fairness_threshold,
                finite=True, hint=_FAIRNESS_HINT),
            "leak_threshold": v.duration("leak_threshold", self.leak_threshold,
                                         allow_zero=False),
            "check_ownership": bool(self.check_ownership),
            "reconnect_initial": v.duration("reconnect_initial", self.reconnect_initial,
                                            optional=False, allow_zero=False),
            "reconnect_max": v.duration("reconnect_max", self.reconnect_max, optional=False,
                                        allow_zero=False),
            "tcp_keepalive": _tcp_keepalive(self.tcp_keepalive),
            "retry": _retry_policy(self.retry),
        }
        for name, value in fix.items():
            object.__setattr__(self, name, value)

    @property
    def retry_policy(self) -> RetryPolicy:
        """``retry``, never None once validated."""
        assert self.retry is not None
        return self.retry

    @classmethod
    def names(cls) -> frozenset[str]:
        """The keyword arguments ``PoolOptions`` takes."""
        return frozenset(f.name for f in fields(cls))


def _tcp_keepalive(value: Any) -> tuple[float, float, int] | None:
    if value is None:
        return None
    if len(value) != 3:
        raise ValueError("tcp_keepalive must be None or (idle seconds, interval seconds, "
                         f"probe count), got {value!r}")
    return (_validate.duration("tcp_keepalive[0] (idle)", value[0], optional=False,
                               allow_zero=False),
            _validate.duration("tcp_keepalive[1] (interval)", value[1], optional=False,
                               allow_zero=False),
            _validate.integer("tcp_keepalive[2] (probe count)", value[2], minimum=1))


def _retry_policy(value: Any) -> RetryPolicy:
    from aperturedb_pool.retry import RetryPolicy, check_policy  # (on first use)

    return RetryPolicy() if value is None else check_policy(value)
