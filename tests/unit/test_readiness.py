"""/readyz of a member the group gave nothing: more replicas than partitions make idle standbys, which are
healthy members (they take partitions at the next rebalance). Unready, they would stall every rollout that waits
for readiness and page as pods not ready; ready, they must still be told apart: the reason and a gauge say it."""

from __future__ import annotations

from stream.offsets import TopicPartition

from .test_refusal_hold import pipeline


def assigned_gauge(p) -> float:
    return p.metrics.registry.get_sample_value("stream_assigned_partitions")


async def test_a_member_without_partitions_is_a_ready_standby_and_says_so():
    p, _ = pipeline()
    p._assigned = False
    assert p.ready() == (False, "waiting for the consumer group to assign partitions")

    await p._on_assigned([])  # the group has more members than partitions

    assert p.ready() == (True, "ready (standby: the group assigned no partition to this member)")
    assert assigned_gauge(p) == 0


async def test_a_member_holding_partitions_is_ready_and_counts_them():
    p, _ = pipeline()
    await p._on_assigned([TopicPartition("samples", 0), TopicPartition("samples-pending", 0)])

    assert p.ready() == (True, "ready")
    assert assigned_gauge(p) == 2

    for tp in (TopicPartition("samples", 0), TopicPartition("samples-pending", 0)):
        p.tracker.revoke(tp)  # as _on_revoked ends (its commit and drain need Kafka)
    await p._on_assigned([])  # scaled out past the partition count: this member lost them all
    assert p.ready() == (True, "ready (standby: the group assigned no partition to this member)")
    assert assigned_gauge(p) == 0


async def test_during_a_rebalance_a_member_says_so_rather_than_standby():
    # aiokafka rebalances eagerly: every member holds nothing between its revoke and the new assignment.
    p, _ = pipeline()
    p._rebalancing = True  # as _on_revoked leaves it (its commit and drain need Kafka)
    assert p.ready() == (True, "ready (rebalancing: partitions revoked, waiting for the new assignment)")
    await p._on_assigned([TopicPartition("samples", 1)])
    assert p.ready() == (True, "ready")


def test_a_stopped_pipeline_is_not_ready():
    # Between two pipelines (new Kafka clients after a rotation) the old one must not answer for the pod.
    p, _ = pipeline()
    p.tracker.assign(TopicPartition("samples", 0))
    p._closed = True
    assert p.ready() == (False, "stopped")
