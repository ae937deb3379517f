"""Offsets: a commit never passes a record whose samples are not all safe (accepted, dead-lettered or parked)."""

from __future__ import annotations

import random

import pytest

from stream.offsets import OffsetTracker, PartitionOffsets, TopicPartition

TP = TopicPartition("samples", 0)
TP1 = TopicPartition("samples", 1)


def partition(*offsets: int, parts: int = 1) -> PartitionOffsets:
    state = PartitionOffsets(TP)
    for offset in offsets:
        state.track(offset, parts)
    return state


def test_nothing_is_committable_before_a_record_was_seen():
    assert PartitionOffsets(TP).committable() is None


def test_the_watermark_stops_at_the_lowest_offset_not_done_across_gaps():
    state = partition(0, 1, 5, 9)  # gaps: compaction or transaction markers
    assert state.committable() == 0

    state.ack(0)
    assert state.committable() == 1

    state.ack(5)  # done, but 1 is not: a commit may not pass 1
    assert state.committable() == 1

    state.ack(1)
    assert state.committable() == 9  # 5 is done; never 2, 3 or 6 that do not exist

    state.ack(9)
    assert state.committable() == 10
    assert state.pending == 0


def test_acks_in_reverse_order_release_everything_only_with_the_first():
    state = partition(0, 1, 5, 9)
    for offset in (9, 5, 1):
        state.ack(offset)
        assert state.committable() == 0

    state.ack(0)
    assert state.committable() == 10


def test_a_bundle_is_done_only_when_every_part_is_acked():
    state = partition(3, parts=3)
    state.track(4, 1)

    state.ack(3)
    state.ack(4)
    state.ack(3)
    assert state.committable() == 3

    state.ack(3)
    assert state.committable() == 5


def test_an_ack_for_several_parts_at_once_counts_them_all():
    state = partition(7, parts=4)

    state.ack(7, parts=3)
    assert state.committable() == 7

    state.ack(7, parts=1)
    assert state.committable() == 8


def test_a_record_with_zero_parts_is_done_already():
    state = partition(0)
    state.track(1, 0)
    assert state.committable() == 0

    state.ack(0)
    assert state.committable() == 2


def test_only_zero_part_records_commit_past_the_last_one():
    assert partition(4, 6, parts=0).committable() == 7


def test_extra_or_unknown_acks_move_nothing():
    state = partition(0, 1)
    state.ack(0)
    state.ack(0)  # a duplicate ack for a finished record
    state.ack(3)  # never tracked
    state.ack(-1)

    assert state.committable() == 1
    assert state.pending == 1


def test_a_record_fetched_again_after_a_rewind_holds_the_commit_until_its_copy_is_done():
    # Offsets 0..2 seen; 0 is done, 1 and 2 pending. The client rewinds to 0 and delivers 0 and 1 again:
    # the copies sit in memory too, so nothing may be committed past 0 until they are done.
    state = partition(0, 1, 2, parts=1)
    state.ack(0)
    assert state.committable() == 1
    state.track(0, 1)
    state.track(1, 1)
    assert state.committable() == 0
    state.ack(0)
    state.ack(1)
    assert state.committable() == 1  # the first copy of 1 is still pending
    state.ack(1)
    state.ack(2)
    assert state.committable() == 3


def test_records_seen_only_after_a_rewind_are_tracked_in_order():
    state = PartitionOffsets(TopicPartition("t", 0))
    state.track(880, 1)  # a stale record from before the rewind
    for offset in range(860, 880):
        state.track(offset, 1)
    assert state.committable() == 860
    state.ack(880)
    assert state.committable() == 860
    for offset in range(860, 880):
        state.ack(offset)
    assert state.committable() == 881


def test_an_ack_after_revoke_moves_nothing_and_a_reassigned_partition_starts_fresh():
    tracker = OffsetTracker()
    old = tracker.assign(TP)
    old.track(10, 1)
    old.track(11, 1)

    assert tracker.revoke(TP) is old
    old.ack(10)  # a late acknowledgement for the old assignment
    assert old.committable() == 10

    new = tracker.assign(TP)
    assert new is not old
    assert new.committable() is None
    assert tracker.to_commit() == {}

    new.track(11, 1)
    new.ack(11)
    assert tracker.to_commit() == {TP: 12}


def test_assign_of_a_live_partition_keeps_its_state():
    tracker = OffsetTracker()
    state = tracker.assign(TP)
    state.track(0, 1)

    assert tracker.assign(TP) is state
    assert tracker.get(TP) is state
    assert tracker.partitions() == [TP]


def test_revoke_of_an_unknown_partition_is_harmless():
    assert OffsetTracker().revoke(TP) is None


def test_to_commit_returns_only_offsets_that_moved_since_the_last_commit():
    tracker = OffsetTracker()
    first, second = tracker.assign(TP), tracker.assign(TP1)
    first.track(0, 1)
    second.track(0, 1)
    first.ack(0)
    assert tracker.to_commit() == {TP: 1, TP1: 0}

    tracker.mark_committed({TP: 1, TP1: 0})
    assert tracker.to_commit() == {}

    second.ack(0)
    assert tracker.to_commit() == {TP1: 1}


def test_to_commit_can_be_limited_to_some_partitions():
    tracker = OffsetTracker()
    for tp in (TP, TP1):
        tracker.assign(tp).track(0, 0)

    assert tracker.to_commit({TP1}) == {TP1: 1}
    assert tracker.to_commit(set()) == {}


def test_a_revoked_partition_is_never_offered_for_commit():
    tracker = OffsetTracker()
    tracker.assign(TP).track(0, 0)
    tracker.revoke(TP)

    assert tracker.to_commit() == {}
    tracker.mark_committed({TP: 1})  # a commit that raced the revoke
    assert tracker.get(TP) is None


def test_pending_counts_records_not_done_across_partitions():
    tracker = OffsetTracker()
    tracker.assign(TP).track(0, 2)
    tracker.assign(TP1).track(5, 1)
    tracker.get(TP1).ack(5)

    assert tracker.pending == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_acks_never_let_the_watermark_pass_a_record_not_done(seed):
    rng = random.Random(seed)
    state = PartitionOffsets(TP)
    offsets = sorted(rng.sample(range(500), 120))
    parts = {o: rng.randint(0, 3) for o in offsets}
    for offset in offsets:
        state.track(offset, parts[offset])
    acks = [o for o in offsets for _ in range(parts[o])]
    rng.shuffle(acks)

    left = dict(parts)
    for offset in acks:
        state.ack(offset)
        left[offset] -= 1
        not_done = [o for o in offsets if left[o] > 0]
        assert state.committable() == (not_done[0] if not_done else offsets[-1] + 1)
