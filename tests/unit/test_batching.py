"""Batcher: when a (user_id, data_type) buffer leaves, and that no sample is ever lost or sent twice."""

from __future__ import annotations

import itertools
import random
import struct
import sys
from typing import NamedTuple

import pytest

from stream.batching import MIN_SAMPLES, Batcher, Entry, Small, Work, plan_take

KEY = ("user-1", "steps")
OTHER = ("user-2", "bpm")
WINDOW = 5.0
HOLD = 30.0
MAX_AGE = 3600.0

_offsets = itertools.count()


def entries(n: int, source: object = "p0", start: int = 0, born: float = 0.0) -> list[Entry]:
    """n samples from one partition, with increasing starts and offsets unique across the test module."""
    out = []
    for i in range(n):
        offset = next(_offsets)  # distinct bodies: no two of these are copies of one sample
        out.append(Entry(start + i, b'{"o":%d}' % offset, source, offset, 0.0, born))
    return out


def with_born(added: list[Entry], born: float) -> list[Entry]:
    for entry in added:
        entry.born = born
    return added


def batcher(max_samples: int = 10, window: float = WINDOW, hold: float = HOLD, max_age: float = MAX_AGE) -> Batcher:
    return Batcher(max_samples, window, hold, max_age)


def poll(b: Batcher, now: float, slots: int = 100, wall: float | None = None) -> Work:
    return b.poll(now, now if wall is None else wall, slots)


def nothing(work: Work) -> bool:
    return work == Work([], [], [])


# -- full and window -----------------------------------------------------------------------------------


def test_a_full_buffer_leaves_at_once_with_exactly_max_samples():
    b = batcher(max_samples=10)
    b.add(KEY, entries(13), now=0.0)

    work = poll(b, now=0.0)

    assert [(batch.key, len(batch.entries), batch.reason) for batch in work.batches] == [(KEY, 10, "full")]
    assert b.buffered_samples == 3


def test_a_buffer_filling_up_over_several_adds_leaves_when_full():
    b = batcher(max_samples=10)
    b.add(KEY, entries(6), now=0.0)
    assert nothing(poll(b, now=0.1))

    b.add(KEY, with_born(entries(4), 0.2), now=0.2)

    assert [len(batch.entries) for batch in poll(b, now=0.2).batches] == [10]


def test_a_buffer_leaves_when_its_oldest_sample_has_waited_the_window_not_before():
    b = batcher()
    b.add(KEY, entries(2), now=100.0)
    b.add(KEY, entries(2), now=103.0)

    assert nothing(poll(b, now=100.0 + WINDOW - 1e-6))
    work = poll(b, now=100.0 + WINDOW)

    assert [(len(batch.entries), batch.reason) for batch in work.batches] == [(4, "window")]
    assert b.buffered_samples == 0


def test_a_batch_is_chronological_by_start_date():
    b = batcher()
    shuffled = entries(5, start=0)
    random.Random(3).shuffle(shuffled)
    b.add(KEY, shuffled[:2], now=0.0)
    b.add(KEY, with_born(entries(2, start=-10) + shuffled[2:], 1.0), now=1.0)

    (batch,) = poll(b, now=WINDOW).batches

    starts = [e.start for e in batch.entries]
    assert starts == sorted(starts)
    assert starts[:2] == [-10.0, -9.0]


def test_keys_are_batched_separately():
    b = batcher()
    b.add(KEY, entries(3), now=0.0)
    b.add(OTHER, entries(4), now=0.0)

    work = poll(b, now=WINDOW)

    assert sorted((batch.key, len(batch.entries)) for batch in work.batches) == [(KEY, 3), (OTHER, 4)]


# -- one batch per key in flight, slots ----------------------------------------------------------------


def test_a_keys_second_batch_waits_until_the_first_is_done():
    b = batcher(max_samples=5)
    b.add(KEY, entries(5, start=0), now=0.0)
    (first,) = poll(b, now=0.0).batches
    b.add(KEY, with_born(entries(5, start=100), 1.0), now=1.0)

    assert nothing(poll(b, now=1.0))
    assert nothing(poll(b, now=1.0 + WINDOW + HOLD))
    assert b.in_flight == 1

    b.done(KEY, now=50.0)
    (second,) = poll(b, now=50.0).batches

    assert second.reason == "full"
    assert min(e.start for e in second.entries) > max(e.start for e in first.entries)


def test_after_done_a_small_remainder_still_waits_for_its_window():
    b = batcher(max_samples=5)
    b.add(KEY, entries(5), now=0.0)
    poll(b, now=0.0)
    b.add(KEY, with_born(entries(3), 1.0), now=1.0)

    b.done(KEY, now=2.0)

    assert nothing(poll(b, now=1.0 + WINDOW - 0.01))
    assert [len(batch.entries) for batch in poll(b, now=1.0 + WINDOW).batches] == [3]


def test_other_keys_are_not_blocked_by_a_key_in_flight():
    b = batcher(max_samples=3)
    b.add(KEY, entries(3), now=0.0)
    poll(b, now=0.0)

    b.add(OTHER, with_born(entries(3), 0.5), now=0.5)

    assert [batch.key for batch in poll(b, now=0.5).batches] == [OTHER]


def test_slots_limit_how_many_batches_leave_and_the_rest_leave_later():
    b = batcher(max_samples=3)
    keys = [(f"user-{i}", "steps") for i in range(5)]
    for key in keys:
        b.add(key, entries(3), now=0.0)

    assert nothing(poll(b, now=0.0, slots=0))
    waves = [[batch.key for batch in poll(b, now=0.0, slots=2).batches] for _ in range(4)]

    assert waves == [keys[0:2], keys[2:4], keys[4:5], []]
    assert b.buffered_samples == 0


# -- plan_take: never leave a remainder below 3 ----------------------------------------------------------


def chunks(n: int, max_samples: int) -> list[int]:
    out = []
    while n > 0:
        take = plan_take(n, max_samples)
        assert take > 0, (n, max_samples)
        out.append(take)
        n -= take
    return out


def test_1001_samples_with_a_maximum_of_1000_become_998_then_3():
    assert chunks(1001, 1000) == [998, 3]


@pytest.mark.parametrize("max_samples", [5, 6, 7, 10, 100, 999, 1000])
def test_every_chunk_of_any_number_of_samples_is_within_3_and_max(max_samples):
    for n in range(MIN_SAMPLES, 3001):
        sizes = chunks(n, max_samples)

        assert sum(sizes) == n
        assert all(MIN_SAMPLES <= size <= max_samples for size in sizes), (n, sizes)


@pytest.mark.parametrize("n", [1, 2])
def test_plan_take_of_fewer_than_3_is_everything_and_the_batcher_never_sends_it(n):
    assert plan_take(n, 1000) == n
    b = batcher()
    b.add(KEY, entries(n), now=0.0)
    b.flush_all("shutdown")

    assert poll(b, now=HOLD - 1).batches == []


@pytest.mark.parametrize("max_samples", [3, 4])
def test_plan_take_never_takes_fewer_than_3_even_with_a_tiny_maximum(max_samples):
    # 4 with a maximum of 3 cannot be split into batches of 3..3: the batch is full, 1 waits for more.
    for n in range(MIN_SAMPLES, 50):
        assert MIN_SAMPLES <= plan_take(n, max_samples) <= max_samples, n


def test_a_batcher_with_max_3_sends_3_and_keeps_the_4th_for_later():
    b = batcher(max_samples=3)
    b.add(KEY, entries(4), now=0.0)

    (batch,) = poll(b, now=0.0).batches
    assert len(batch.entries) == 3
    assert b.buffered_samples == 1

    b.done(KEY, now=1.0)
    assert [len(s.entries) for s in poll(b, now=HOLD).park] == [1]


# -- buffers of 1-2 samples: hold, park, expire --------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_a_buffer_of_1_or_2_is_never_batched_and_is_parked_after_hold(n):
    b = batcher()
    added = entries(n)
    b.add(KEY, with_born(added, 500.0), now=10.0)

    assert nothing(poll(b, now=10.0 + WINDOW, wall=500.0 + WINDOW))
    assert nothing(poll(b, now=10.0 + HOLD - 1e-6, wall=500.0 + HOLD))
    work = poll(b, now=10.0 + HOLD, wall=500.0 + HOLD)

    assert work.batches == [] and work.expire == []
    assert work.park == [Small(KEY, added)]
    assert work.park[0].born == 500.0
    assert b.buffered_samples == 0 and b.buffers == 0


def test_a_small_buffer_is_expired_once_born_plus_max_age_is_reached():
    b = batcher()
    b.add(KEY, with_born(entries(2), 1000.0), now=0.0)
    b.add(OTHER, with_born(entries(2), 1000.0 + 1e-3), now=0.0)

    work = poll(b, now=HOLD, wall=1000.0 + MAX_AGE)

    assert [s.key for s in work.expire] == [KEY]
    assert [s.key for s in work.park] == [OTHER]


def test_each_sample_is_aged_by_its_own_birth():
    # A fresh sample that joins a parked tail about to expire is parked again, not expired with the tail.
    b = batcher()
    fresh = with_born(entries(1), 2000.0)
    old = with_born(entries(1), 100.0)  # a parked one, first seen long ago
    b.add(KEY, list(fresh), now=0.0)  # the batcher takes the list over
    b.add(KEY, list(old), now=1.0)

    work = poll(b, now=HOLD, wall=100.0 + MAX_AGE)

    assert [s.entries for s in work.expire] == [old]
    assert [s.entries for s in work.park] == [fresh]
    assert b.buffered_samples == 0


def test_a_small_buffer_reaching_3_within_the_window_leaves_as_a_batch():
    b = batcher()
    b.add(KEY, entries(1), now=0.0)
    b.add(KEY, entries(2), now=WINDOW - 1)

    work = poll(b, now=WINDOW)

    assert [len(batch.entries) for batch in work.batches] == [3]
    assert work.park == [] and work.expire == []


def test_a_small_buffer_reaching_3_before_hold_is_not_parked():
    b = batcher()
    b.add(KEY, entries(1), now=0.0)
    poll(b, now=WINDOW)  # the window passes with a single sample
    b.add(KEY, entries(2), now=WINDOW + 1)

    work = poll(b, now=HOLD)

    assert [len(batch.entries) for batch in work.batches] == [3]
    assert work.park == []


def test_a_buffer_reaching_3_after_its_window_leaves_at_the_next_poll():
    b = batcher()
    b.add(KEY, entries(1), now=0.0)
    poll(b, now=WINDOW)
    b.add(KEY, entries(2), now=WINDOW + 1)

    assert [len(batch.entries) for batch in poll(b, now=WINDOW + 2).batches] == [3]


# -- flush, take_small, drop_sources -------------------------------------------------------------------


def test_flush_all_sends_every_buffer_of_3_or_more_now_and_keeps_small_ones():
    b = batcher()
    b.add(KEY, entries(3), now=0.0)
    b.add(OTHER, entries(2), now=0.0)

    b.flush_all("shutdown")
    work = poll(b, now=0.1)

    assert [(batch.key, batch.reason) for batch in work.batches] == [(KEY, "shutdown")]
    assert [(s.key, len(s.entries)) for s in b.take_small()] == [(OTHER, 2)]
    assert b.buffered_samples == 0 and b.buffers == 0


def test_flush_all_sends_a_key_in_flight_once_its_batch_is_done():
    b = batcher(max_samples=5)
    b.add(KEY, entries(5), now=0.0)
    poll(b, now=0.0)
    b.add(KEY, with_born(entries(3), 0.1), now=0.1)
    b.add(OTHER, with_born(entries(4), 0.1), now=0.1)

    b.flush_all("shutdown")
    assert [batch.key for batch in poll(b, now=0.2).batches] == [OTHER]
    b.done(KEY, now=0.3)

    assert [(batch.key, batch.reason) for batch in poll(b, now=0.3).batches] == [(KEY, "shutdown")]


def test_take_small_leaves_a_key_in_flight_alone():
    b = batcher(max_samples=3)
    b.add(KEY, entries(3), now=0.0)
    poll(b, now=0.0)
    b.add(KEY, with_born(entries(1), 0.1), now=0.1)

    assert b.take_small() == []
    b.done(KEY, now=0.2)
    assert [len(s.entries) for s in b.take_small()] == [1]


def test_flush_keys_sends_only_the_given_keys_with_their_reason():
    b = batcher()
    b.add(KEY, entries(3, source="p0"), now=0.0)
    b.add(OTHER, entries(3, source="p1"), now=0.0)

    b.flush_keys(b.keys_with_sources({"p0"}), "revoke")

    assert [(batch.key, batch.reason) for batch in poll(b, now=0.1).batches] == [(KEY, "revoke")]


def test_drop_sources_forgets_exactly_the_revoked_partitions_samples():
    b = batcher()
    kept = entries(3, source="p1")
    b.add(KEY, entries(2, source="p0") + kept[:2], now=0.0)
    b.add(KEY, with_born(kept[2:], 0.5), now=0.5)
    b.add(OTHER, entries(2, source="p0"), now=0.0)

    assert b.drop_sources({"p0"}, 0.0) == 4

    assert b.buffered_samples == 3
    assert b.buffers == 1
    (batch,) = poll(b, now=WINDOW).batches
    assert batch.entries == kept


def test_drop_sources_of_unknown_partitions_changes_nothing():
    b = batcher()
    b.add(KEY, entries(3), now=0.0)

    assert b.drop_sources({"p9"}, 0.0) == 0
    assert b.buffered_samples == 3


def test_a_ready_buffer_cut_below_3_by_drop_sources_is_still_parked_later():
    b = batcher()
    b.add(KEY, entries(2, source="p0") + entries(2, source="p1"), now=0.0)
    assert nothing(poll(b, now=WINDOW, slots=0))  # ready, but every slot is taken
    b.drop_sources({"p0"}, 0.0)
    poll(b, now=WINDOW + 1)

    work = poll(b, now=HOLD + 1)

    assert [len(s.entries) for s in work.park] == [2]


def test_a_buffer_emptied_by_drop_sources_is_never_handed_out_empty():
    b = batcher(max_samples=3)
    b.add(KEY, entries(3, source="p0"), now=0.0)
    poll(b, now=0.0)
    b.add(KEY, with_born(entries(1, source="p0"), 0.1), now=0.1)
    b.drop_sources({"p0"}, 0.0)
    b.done(KEY, now=0.2)

    work = poll(b, now=HOLD + 1)

    assert all(s.entries for s in work.park + work.expire + b.take_small())


def test_done_for_a_key_without_buffer_is_harmless():
    b = batcher()
    b.done(KEY, now=0.0)

    assert nothing(poll(b, now=100.0))
    assert b.buffered_samples == 0


# -- property: no sample lost or duplicated, counter exact ----------------------------------------------


@pytest.mark.parametrize("max_samples", [3, 7])
def test_random_operations_never_lose_or_duplicate_a_sample_and_keep_the_counter_exact(max_samples):
    rng = random.Random(20231101 + max_samples)
    window, hold, max_age = 2.0, 6.0, 20.0
    b = Batcher(max_samples, window, hold, max_age)
    keys = [("u1", "steps"), ("u1", "bpm"), ("u2", "steps"), ("u3", "bpm")]
    sources = ["p0", "p1", "p2"]

    added: dict[int, Entry] = {}
    buffered: set[int] = set()  # the model: offsets that must still be in the batcher
    fate: dict[int, str] = {}  # offset -> batch | park | expire | drop
    in_flight: set[tuple[str, str]] = set()
    now = 0.0

    def hand_out(offsets: list[int], where: str) -> None:
        for offset in offsets:
            assert offset in buffered, f"{offset} handed out twice or never added"
            assert offset not in fate
            buffered.discard(offset)
            fate[offset] = where

    def take_small() -> None:  # shutdown parks every small buffer, whatever its age
        for small in b.take_small():
            assert 0 < len(small.entries) < MIN_SAMPLES
            hand_out([e.offset for e in small.entries], "park")
            twins(small, "park")

    def twins(taken, handed) -> None:
        ids = {id(e) for e in taken.entries}
        for original, copy in taken.twins:
            assert id(original) in ids, "a copy handed out without its original"
            assert (copy.start, copy.body) == (original.start, original.body)
        assert len({(e.start, e.body) for e in taken.entries}) == len(taken.entries), "two copies in one batch"
        hand_out([copy.offset for _, copy in taken.twins], handed)

    def take(work: Work) -> None:
        for batch in work.batches:
            assert batch.key not in in_flight, "two batches of one key in flight"
            assert MIN_SAMPLES <= len(batch.entries) <= max_samples
            assert [e.start for e in batch.entries] == sorted(e.start for e in batch.entries)
            in_flight.add(batch.key)
            hand_out([e.offset for e in batch.entries], "batch")
            twins(batch, "batch")
        for small in work.park + work.expire:
            assert 0 < len(small.entries) < MIN_SAMPLES
        for small in work.park:
            assert all(now < e.born + max_age for e in small.entries)
            hand_out([e.offset for e in small.entries], "park")
            twins(small, "park")
        for small in work.expire:
            assert all(now >= e.born + max_age for e in small.entries)
            hand_out([e.offset for e in small.entries], "expire")
            twins(small, "expire")

    def start() -> int:
        # Now and then a start beyond int64 nanoseconds (year 1, year 9999: valid RFC 3339 dates).
        return rng.choice([rng.randrange(10**6)] * 3 + [2**70 + rng.randrange(5), -(2**70) - rng.randrange(5)])

    for _ in range(20000):
        now += rng.choice([0.0, 0.0, 0.1, 0.5, 1.0, 3.0])
        op = rng.random()
        if op < 0.40:
            source = rng.choice(sources)
            new = [Entry(start(), b"{}", source, len(added) + i, 0.0) for i in range(rng.randint(1, 9))]
            if buffered and rng.random() < 0.3:  # a copy of a buffered sample (a re-send, a parked copy)
                copied = added[rng.choice(sorted(buffered))]
                new.append(Entry(copied.start, copied.body, source, len(added) + len(new), 0.0))
            for e in new:
                added[e.offset] = e
                buffered.add(e.offset)
            key = rng.choice(keys)
            with_born(new, now - rng.choice([0.0, 0.0, 15.0]))
            if rng.random() < 0.5:  # handed back as entries
                b.add(key, new, now)
            else:  # as the pipeline buffers a fetched record's samples
                for e in new:
                    b.add_samples(key, [e], e.source, e.offset, e.timestamp, e.born, now)
        elif op < 0.75:
            take(b.poll(now, now, rng.randint(0, 3)))
        elif op < 0.92:
            if in_flight:
                key = rng.choice(sorted(in_flight))
                in_flight.discard(key)
                b.done(key, now)
        elif op < 0.96:
            revoked = {rng.choice(sources)}
            gone = [o for o in buffered if added[o].source in revoked]
            assert b.drop_sources(revoked, now) == len(gone)
            hand_out(gone, "drop")
        elif op < 0.98:
            b.flush_keys({rng.choice(keys)}, "revoke")
        else:
            take_small()
        assert b.buffered_samples == len(buffered)

    # Shut down: everything still buffered comes out exactly once.
    b.flush_all("shutdown")
    while in_flight or b.has_ready:
        for key in sorted(in_flight):
            in_flight.discard(key)
            b.done(key, now)
        take(b.poll(now, now, 100))
    take_small()

    assert buffered == set()
    assert b.buffered_samples == 0
    assert set(fate) == set(added)
    assert {"batch", "park", "expire", "drop"} <= set(fate.values())  # the run exercised every fate


# -- copies and memory ---------------------------------------------------------------------------------


def test_two_copies_of_one_sample_never_go_out_in_one_batch():
    b = batcher()
    original = entries(3)
    copies = [Entry(e.start, e.body, "p1", 10_000 + i, 0.0) for i, e in enumerate(original[:2])]
    b.add(KEY, original + copies, now=0.0)  # 5 entries, 3 samples

    (batch,) = poll(b, now=WINDOW).batches

    assert batch.entries == original
    pairs = [(o.offset, c.offset) for o, c in batch.twins]
    assert pairs == [(original[0].offset, 10_000), (original[1].offset, 10_001)]
    assert b.buffered_samples == 0


def test_copies_that_only_looked_like_three_samples_wait_as_a_tail():
    b = batcher()
    (one,) = entries(1)
    b.add(KEY, [one, Entry(one.start, one.body, "p0", 20_000, 0.0), Entry(one.start, one.body, "p0", 20_001, 0.0)], 0.0)

    assert poll(b, now=WINDOW).batches == []
    (small,) = poll(b, now=HOLD).park
    assert small.entries == [one]
    assert sorted(c.offset for _, c in small.twins) == [20_000, 20_001]


def test_a_copy_whose_original_is_dropped_at_a_revoke_stays_as_a_sample_of_its_own():
    b = batcher()
    original = entries(2, source="p0")
    copy = Entry(original[0].start, original[0].body, "p1", 30_000, 0.0)
    b.add(KEY, [*original, copy], now=0.0)
    assert poll(b, now=WINDOW).batches == []  # two samples and a copy: the copy is set aside
    assert b.drop_sources({"p0"}, now=WINDOW + 1) == 2
    assert b.buffered_samples == 1
    (small,) = poll(b, now=WINDOW + 1 + HOLD).park
    assert small.entries == [copy] and small.twins == []


def test_a_taken_batch_is_not_kept_alive_by_its_buffer():
    # A buffer taken whole stays in the deadline queue until its window; it must not hold the batch's samples.
    b = batcher(max_samples=1000)
    body = bytes(bytearray(b"unique body that only this test holds"))
    before = sys.getrefcount(body)
    b.add(KEY, [Entry(0, body, "p0", 1, 0.0), *entries(999, start=1)], now=0.0)
    (batch,) = poll(b, now=0.0).batches
    assert len(batch.entries) == 1000
    del batch
    assert sys.getrefcount(body) == before


# -- memory pressure -----------------------------------------------------------------------


def test_at_pressure_the_fullest_buffers_leave_first_and_only_as_many_as_needed():
    b = batcher(max_samples=100)
    sizes = {(f"u{i}", "steps"): n for i, n in enumerate([4, 30, 2, 12, 25, 3])}
    for key, n in sizes.items():
        b.add(key, entries(n), now=0.0)

    assert b.flush_largest(50, "pressure") == 55  # 30 + 25: enough

    work = poll(b, now=0.1)  # long before any window
    assert sorted(len(batch.entries) for batch in work.batches) == [25, 30]
    assert {batch.reason for batch in work.batches} == {"pressure"}
    assert b.buffered_samples == 4 + 2 + 12 + 3


def test_at_pressure_what_is_ready_already_counts_and_small_buffers_never_go():
    b = batcher(max_samples=10)
    b.add(KEY, entries(13), now=0.0)  # full: ready
    b.add(OTHER, entries(2), now=0.0)

    assert b.flush_largest(5, "pressure") == 13  # the full buffer is ready already: enough
    assert b.flush_largest(100, "pressure") == 13  # nothing else can make a request

    work = poll(b, now=0.1)
    assert [(batch.key, len(batch.entries)) for batch in work.batches] == [(KEY, 10)]


# -- the packed layout ----------------------------------------------------------------------------------


class _Sample(NamedTuple):
    start: int
    body: bytes


def test_samples_come_out_of_the_packed_buffers_exactly_as_they_went_in():
    b = batcher()
    # Starts of year 1 and year 9999 (beyond int64 nanoseconds), a body with every byte value, one of no bytes.
    starts = [-(2**65) - 7, 0, 2**63 - 1, 2**64 + 3, -(2**63)]
    bodies = [bytes(range(256)), b"", b'{"a":1}', b"\xff" * 70_000, b"x"]
    b.add_samples(KEY, [_Sample(s, body) for s, body in zip(starts, bodies, strict=True)], "p0", 2**62, 1.7e9 + 0.001,
                  [1.5, 2.5, 3.5, 4.5, 5.5], now=0.0)
    (batch,) = poll(b, now=WINDOW).batches
    by_start = sorted(zip(starts, bodies, [1.5, 2.5, 3.5, 4.5, 5.5], strict=True))
    assert [(e.start, e.body, e.born) for e in batch.entries] == by_start
    assert {(e.source, e.offset, e.timestamp) for e in batch.entries} == {("p0", 2**62, 1.7e9 + 0.001)}


def test_a_copy_set_aside_leaves_with_its_original_after_the_original_waited_for_a_later_batch():
    # The original stays buffered (the first batch is full without it) and is packed again: the copy must still
    # find it, paired with the very entry that leaves, or the copy's offset would never be acknowledged.
    b = batcher(max_samples=3)
    first = entries(5)
    copy = Entry(first[4].start, first[4].body, "p1", 40_000, 0.0)
    b.add(KEY, [*first, copy], now=0.0)
    (batch,) = poll(b, now=WINDOW).batches
    assert batch.entries == first[:3] and batch.twins == []
    b.done(KEY, now=WINDOW)
    b.add(KEY, entries(1, start=10), now=WINDOW)
    (batch,) = poll(b, now=WINDOW).batches
    assert batch.entries[:2] == first[3:]
    assert batch.twins == [(batch.entries[1], copy)] and batch.twins[0][0] is batch.entries[1]
    assert b.buffered_samples == 0


def test_a_revoke_drops_a_partitions_samples_from_mixed_buffers_and_keeps_no_trace_of_its_source():
    b = batcher()
    b.add(KEY, entries(2, source="p0") + entries(2, source="p1"), now=0.0)
    b.add(OTHER, entries(2, source="p0"), now=0.0)
    assert b.keys_with_sources({"p1"}) == {KEY}
    assert b.drop_sources({"p0"}, now=1.0) == 4
    assert b.keys() == {KEY} and b.buffered_samples == 2
    assert b._sources == {1: "p1"}  # a revoked assignment's offsets object is not kept alive by the batcher
    (small,) = poll(b, now=1.0 + HOLD).park
    assert {e.source for e in small.entries} == {"p1"}


def test_a_record_that_cannot_be_packed_whole_leaves_nothing_behind():
    b = batcher()
    b.add_samples(KEY, [_Sample(1, b"a")], "p0", 1, 0.0, 0.0, now=0.0)
    with pytest.raises(struct.error):  # a start that is not an int: a caller's bug, not a half-buffered record
        b.add_samples(KEY, [_Sample(2, b"b"), _Sample(2.5, b"c")], "p0", 2, 0.0, 0.0, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(struct.error):
        b.add_samples(OTHER, [_Sample(3, b"d"), _Sample(3.5, b"e")], "p0", 3, 0.0, 0.0, now=0.0)  # type: ignore[arg-type]
    assert b.buffered_samples == 1 and b.keys() == {KEY}
    (small,) = poll(b, now=HOLD).park
    assert [e.body for e in small.entries] == [b"a"]


def test_a_partial_take_of_a_buffer_in_order_leaves_the_rest_exactly():
    # The rest of a buffer whose samples came in order is cut from the packed bytes, not packed again.
    b = batcher(max_samples=3)
    # Starts beyond int64 (one in the first batch, one left), and another source.
    samples = [Entry(-(2**64), b"early", "p0", 98_999, 0.0), *entries(6), Entry(2**64, b"far", "p1", 99_000, 0.0, 7.0)]
    b.add(KEY, list(samples), now=0.0)
    taken = []
    for _ in range(2):
        (batch,) = poll(b, now=WINDOW).batches
        taken += batch.entries
        b.done(KEY, now=WINDOW)
    assert taken == samples[:6] and b.buffered_samples == 2
    later = Entry(2**64 + 1, b"later", "p0", 99_001, 0.0)
    b.add(KEY, [later], now=WINDOW)
    (batch,) = poll(b, now=WINDOW).batches
    assert batch.entries == [*samples[6:], later]
    assert b.drop_sources({"p1"}, now=WINDOW) == 0  # nothing of p1 is left buffered


def test_at_shutdown_a_buffer_that_only_copies_made_look_sendable_is_parked_not_left_behind():
    b = batcher()
    (one, two) = entries(2)
    b.add(KEY, [one, two, Entry(one.start, one.body, "p0", 50_000, 0.0)], now=0.0)
    b.flush_all("shutdown")
    assert b.take_small() == []  # three entries: it looks sendable
    work = poll(b, now=0.0)
    assert work.batches == []
    (small,) = work.park
    assert small.entries == [one, two] and [c.offset for _, c in small.twins] == [50_000]
    assert b.buffered_samples == 0
