"""A revoked partition's per-partition series (lag, committed offset) leave with it: left frozen, they would count
twice in the group's lag and page as stalled commits while the partition's new owner commits."""

from __future__ import annotations

from stream.offsets import TopicPartition
from tests.unit.test_redrive_count_carried import pipeline

KEPT, GONE = TopicPartition("samples", 0), TopicPartition("samples", 1)


def partitions_of(p, name: str) -> set[str]:
    return {s.labels["partition"] for family in p.metrics.registry.collect() for s in family.samples
            if s.name == name}


async def test_the_revoked_partitions_lag_and_committed_offset_are_no_longer_exported():
    p, _writer = pipeline()
    for tp in (KEPT, GONE):
        p.tracker.assign(tp)
        p.metrics.lag.labels(tp.topic, str(tp.partition)).set(7)
        p.metrics.committed_offset.labels(tp.topic, str(tp.partition)).set(3)
    await p._on_revoked([GONE])
    assert partitions_of(p, "stream_consumer_lag") == {"0"}
    assert partitions_of(p, "stream_committed_offset") == {"0"}
    await p._on_revoked([GONE])  # a partition revoked again (or never exported): nothing to remove, no error
