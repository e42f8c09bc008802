"""What collecting a pool's metrics costs (aperturedb_pool.metrics), stand-in connectors.

Run:  python stress/bench_metrics.py [--leases N]

A pool of one stand-in connector, instrumented for OpenTelemetry (the SDK, an
InMemoryMetricReader) and registered in a prometheus_client registry.  After N
leases it times one Prometheus scrape (independent of N: the histograms are
bucket counts), one OpenTelemetry collection (which replays the N leases into
the SDK's histograms: two observations each, wait and use) and one more with
nothing new.  The per-lease cost of an instrumented lease is measured by
``stress/bench_lease.py`` (``ours-metrics`` beside ``ours``).
"""

from __future__ import annotations

import argparse
import time

from _benchkit import StandInConnector


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leases", type=int, default=50_000, help="leases before the collection")
    a = p.parse_args()
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from aperturedb_pool import ConnectionPool, metrics

    with ConnectionPool(StandInConnector(), min_size=1, max_size=1, name="bench") as pool:
        pool.wait_ready(10)
        reader = InMemoryMetricReader()
        metrics.instrument(pool, MeterProvider(metric_readers=[reader]))
        registry = CollectorRegistry()
        registry.register(metrics.PrometheusCollector(pool))
        reader.get_metrics_data()
        generate_latest(registry)
        for _ in range(a.leases):
            with pool.lease():
                pass
        t = time.perf_counter()
        generate_latest(registry)
        prom = time.perf_counter() - t
        t = time.perf_counter()
        reader.get_metrics_data()
        otel = time.perf_counter() - t
        t = time.perf_counter()
        reader.get_metrics_data()
        idle = time.perf_counter() - t
    print(f"prometheus scrape: {prom * 1e3:.2f} ms")
    print(f"opentelemetry collection after {a.leases} leases: {otel * 1e3:.0f} ms, "
          f"{otel / a.leases * 1e6:.1f} us per lease (two replayed observations)")
    print(f"opentelemetry collection, nothing new: {idle * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
