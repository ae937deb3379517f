"""Metrics helpers: observing many values at once gives what observing them one by one gives."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from stream.metrics import Metrics, observe_many


def histogram_samples(h: Histogram, registry: CollectorRegistry) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_observe_one_by_one():
    rng = random.Random(3)
    values = [rng.expovariate(1.0) for _ in range(5000)] + [0.0, 0.05, 0.1, 60.0, 1e9]
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
    h_one = Histogram("latency_seconds", "x", buckets=buckets, registry=one)
    h_many = Histogram("latency_seconds", "x", buckets=buckets, registry=many)
    for v in values:
        h_one.observe(v)
    observe_many(h_many, values[:1000])
    observe_many(h_many, values[1000:])
    expected = histogram_samples(h_one, one)
    got = histogram_samples(h_many, many)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-6 * max(1.0, value), key


def test_no_metric_has_a_user_label():
    metrics = Metrics()
    for family in metrics.registry.collect():
        for sample in family.samples:
            assert "user_id" not in sample.labels


def test_the_process_series_memory_and_cpu_are_exported():
    # Memory per buffered sample is the documented sizing limit and CPU what a replica is sized by: without the
    # process collectors, the service's own registry has neither (the alerts and the dashboard read them).
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
                 "process_open_fds", "python_info", "python_gc_collections_total"):
        assert f"\n{name}" in text, name
