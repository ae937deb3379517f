"""Offsets: a commit never passes a record whose samples are not all safe (accepted, dead-lettered or parked)."""

from __future__ import annotations

import bisect
import random
from collections import deque
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import offsets as offsets_module
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


# -- the packed layout against the dict it replaced ----------------------------------------------------


class DictOffsets:
    """The reference model: the dict-and-deque PartitionOffsets this module had before it was packed."""

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.remaining: dict[int, int] = {}
        self.seen: int | None = None
        self.closed = False

    def track(self, offset: int, parts: int) -> None:
        if self.seen is None or offset > self.seen:
            self.seen = offset
            if parts > 0:
                self.order.append(offset)
                self.remaining[offset] = parts
        elif parts > 0:
            if offset in self.remaining:
                self.remaining[offset] += parts
            else:
                self.remaining[offset] = parts
                self.order.insert(bisect.bisect_left(self.order, offset), offset)

    def ack(self, offset: int, parts: int = 1) -> None:
        if self.closed:
            return
        left = self.remaining.get(offset)
        if left is None:
            return
        if left > parts:
            self.remaining[offset] = left - parts
        else:
            del self.remaining[offset]

    def committable(self) -> int | None:
        while self.order and self.order[0] not in self.remaining:
            self.order.popleft()
        if self.order:
            return self.order[0]
        return None if self.seen is None else self.seen + 1

    @property
    def pending(self) -> int:
        return len(self.remaining)


PARTS = st.one_of(st.integers(0, 3), st.sampled_from([2**31 - 1, 2**31, 2**40]))  # huge: wider than int32
GAP = st.sampled_from([1, 1, 1, 2, 4])  # the distance to the next offset: mostly none, as in Kafka
ACK_PARTS = st.one_of(st.integers(1, 4), st.just(2**41))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("track"), GAP, PARTS),  # the next record: just after the highest, or past a gap
        st.tuples(st.just("track"), GAP, PARTS),
        st.tuples(st.just("track again"), st.integers(0, 40), PARTS),  # a rewind: this far below the highest
        st.tuples(st.just("track again tracked"), st.integers(0, 10**6), PARTS),  # a rewind to a record tracked
        st.tuples(st.just("ack"), st.integers(-3, 40), ACK_PARTS),  # this far below the highest (<0: unknown)
        st.tuples(st.just("ack tracked"), st.integers(0, 10**6), ACK_PARTS),  # any record tracked so far
        st.tuples(st.just("ack tracked"), st.integers(0, 10**6), ACK_PARTS),
        st.tuples(st.just("committable"), st.just(0), st.just(0)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, start=st.sampled_from([0, 5, 2**40]), compact_min=st.sampled_from([1, 3, 1024]),
       every_step=st.booleans(), close_at=st.none() | st.integers(0, 300))
def test_the_packed_offsets_behave_like_the_dict_they_replaced(ops, start, compact_min, every_step, close_at):
    # A small compaction threshold drops the done prefix often, so that acks, re-tracks and the head are
    # also checked across drops. Without `every_step`, committable() runs only where the ops say: acks then
    # meet a head left behind done entries, as between two commits of the pipeline.
    with patch.object(offsets_module, "_COMPACT_MIN", compact_min):
        state, model = PartitionOffsets(TP), DictOffsets()
        tracked: list[int] = []
        highest = start - 1
        for step, (op, number, parts) in enumerate(ops):
            if step == close_at:  # revoked: later acks move nothing
                state.closed = model.closed = True
            if op == "track":
                highest += number
                tracked.append(highest)
                state.track(highest, parts)
                model.track(highest, parts)
            elif op == "track again" and tracked:
                state.track(highest - number, parts)
                model.track(highest - number, parts)
            elif op == "track again tracked" and tracked:
                offset = tracked[number % len(tracked)]
                state.track(offset, parts)
                model.track(offset, parts)
            elif op == "ack":
                state.ack(highest - number, parts)
                model.ack(highest - number, parts)
            elif op == "ack tracked" and tracked:
                offset = tracked[number % len(tracked)]
                state.ack(offset, parts)
                model.ack(offset, parts)
            assert state.pending == model.pending
            if every_step or op == "committable":
                assert state.committable() == model.committable()
        assert state.committable() == model.committable()
        assert state.pending == model.pending


def test_done_records_release_their_memory():
    state = partition(*range(100_000))
    for offset in range(99_999):
        state.ack(offset)
    assert state.committable() == 99_999
    assert len(state._offsets) < 1_000 and len(state._left) < 1_000  # not 100,000 entries of done records

    state.ack(99_999)
    assert state.committable() == 100_000
    assert state.pending == 0


@pytest.mark.parametrize("first", [2**31 - 1, 2**33])
def test_a_record_with_more_parts_than_an_int32_counts_them_all(first):
    state = partition(0, 1)
    state.track(2, first)
    state.track(2, 2**33)  # a rewind adds more: past an int32 however many the first time brought
    state.track(1, 2**32)  # a rewind inserts one as large
    state.ack(0)
    state.ack(1, 2**32 + 1)
    state.ack(2, first + 2**33 - 1)
    assert (state.committable(), state.pending) == (2, 1)
    state.ack(2)
    assert (state.committable(), state.pending) == (3, 0)


def test_a_record_fetched_again_after_its_entry_was_dropped_holds_the_commit_again():
    state = partition(*range(5_000))
    for offset in range(5_000):
        state.ack(offset)
    assert state.committable() == 5_000  # the done entries are dropped here

    state.track(10, 2)  # a rewind far back: tracked anew, in order
    state.track(4_000, 1)
    assert (state.committable(), state.pending) == (10, 2)
    state.ack(10, 2)
    assert state.committable() == 4_000
    state.ack(4_000)
    assert state.committable() == 5_000


def test_acks_find_their_records_across_gaps_in_any_order():
    offsets = [*range(0, 3_000, 3), *range(10_000, 10_500), 50_000]
    state = partition(*offsets)
    for offset in sorted(offsets, key=lambda o: (o * 7919) % 1_009):  # scattered, as batches ack them
        state.ack(offset + 1)  # in a gap: never tracked
        state.ack(offset)
    assert state.pending == 0
    assert state.committable() == 50_001


def test_acks_find_their_records_after_a_rewind_inserted_one_before_them():
    state = partition(*range(10, 21))
    state.ack(15)  # the entry an ack found last, where the next one looks first
    state.track(3, 1)  # inserted in front: every entry moves up by one
    for offset in (13, 14, 16, 20, 3, 10):  # 13 first: just below where the hint now points
        state.ack(offset)
    assert state.pending == 5
    assert state.committable() == 11
