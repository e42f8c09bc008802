"""PoolStats: an immutable snapshot of a pool's state and counters."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["PoolStats"]


def _frozen(d: Mapping[str, int] | None = None) -> Mapping[str, int]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot, taken under the pool's lock.

    Gauges (``size``, ``idle``, ``leased``, ``waiting``, ``opening``,
    ``generation``, ``cpu_bound``, ``handoff_after``) describe the moment of the
    snapshot; every other field is a counter since the pool was created (or
    since the last ``stats(reset=True)``).
    """

    name: str
    min_size: int
    max_size: int
    #: connectors open and owned by the pool (idle + leased + being checked)
    size: int
    idle: int
    leased: int
    #: callers blocked in ``lease()`` right now
    waiting: int
    #: connectors being opened in the background
    opening: int
    leases_granted: int = 0
    #: leases that had to wait (the rest were served at once)
    leases_waited: int = 0
    #: seconds spent waiting, summed over every lease
    wait_time_total: float = 0.0
    wait_time_max: float = 0.0
    timeouts: int = 0
    rejected_waiters: int = 0
    connectors_opened: int = 0
    connectors_closed: int = 0
    #: closed connectors by reason: "broken", "interrupted", "probe", "expired",
    #: "idle", "retired", "closed", "reclaimed", "failed_ping", ...
    discarded: Mapping[str, int] = field(default_factory=_frozen)
    keepalive_pings: int = 0
    probes: int = 0
    refill_failures: int = 0
    retries: int = 0
    give_ups: int = 0
    unknown_outcomes: int = 0
    leaks_reported: int = 0
    generation: int = 0
    #: seconds of contention (hand-offs) during which the longer
    #: ``cpu_bound_fairness_threshold`` applied (the process was CPU-bound)
    cpu_bound_seconds: float = 0.0
    #: gauge: the process was found CPU-bound at the last sample, so the
    #: longer ``cpu_bound_fairness_threshold`` applies now
    cpu_bound: bool = False
    #: gauge: seconds the oldest waiter may be passed over by threads
    #: re-taking connectors (60% of the fairness threshold that applies)
    handoff_after: float = 0.0

    def __post_init__(self) -> None:
        # A snapshot never changes, its mapping included.
        if not isinstance(self.discarded, MappingProxyType):
            object.__setattr__(self, "discarded", _frozen(self.discarded))

    @property
    def wait_time_mean(self) -> float:
        return self.wait_time_total / self.leases_granted if self.leases_granted else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A plain (JSON-ready) dict of every field."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["discarded"] = dict(self.discarded)
        return d

    def __str__(self) -> str:
        return (f"pool {self.name!r}: size {self.size}/{self.max_size} (min {self.min_size}), "
                f"leased {self.leased}, idle {self.idle}, waiting {self.waiting}, "
                f"opening {self.opening}")
