"""Tails that came back from the pending topic rest in memory instead of going round it once per hold (2,880
pending records a day for a lonely tail): joined by the user's next samples, expired at their max age, the ones
resting longest parked first beyond the bound, taken at a revoke or a shutdown. Pure: `now` passed in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.batching import Batcher, Entry

from .test_batching import entries, poll

KEY = ("user-1", "steps")
OTHER = ("user-2", "steps")
PENDING, INPUT = "pending-0", "samples-0"  # sources (opaque to the batcher): only the pending one may rest
WINDOW, HOLD, MAX_AGE = 5.0, 30.0, 86400.0


def resting_batcher(max_resting: int = 1000) -> Batcher:
    return Batcher(10, WINDOW, HOLD, MAX_AGE, rests=lambda source: source.startswith("pending"),
                   max_resting=max_resting)


def back_from_pending(b: Batcher, key=KEY, n: int = 1, now: float = 0.0, born: float = 0.0) -> list[Entry]:
    added = entries(n, PENDING, born=born)
    b.add(key, added, now)
    return added


def test_a_tail_read_back_from_the_pending_topic_rests_instead_of_being_parked_again():
    b = resting_batcher()
    back_from_pending(b, n=2)
    for now in (WINDOW, HOLD, HOLD + 3600, HOLD + 2 * 3600):  # hours pass: nothing is written, nothing leaves
        work = poll(b, now)
        assert (work.park, work.expire, work.batches) == ([], [], [])
    assert (b.resting_tails, b.resting_samples, b.buffered_samples) == (1, 2, 2)


def test_a_tail_from_the_input_is_parked_at_its_hold_as_before():
    # Its input offsets must be released within the hold: commits of the input are never held by a tail.
    b = resting_batcher()
    b.add(KEY, entries(2, INPUT), 0.0)
    assert [len(s.entries) for s in poll(b, HOLD).park] == [2]
    assert b.resting_tails == 0


def test_a_resting_tail_leaves_with_the_users_next_samples_at_once():
    b = resting_batcher()
    tail = back_from_pending(b, n=2)
    poll(b, HOLD)
    joined = entries(1, INPUT, start=100)
    b.add(KEY, joined, HOLD + 7200)  # the user syncs again two hours later
    batch, = poll(b, HOLD + 7200).batches
    assert batch.entries == tail + joined
    assert (b.resting_tails, b.resting_samples, b.buffered_samples) == (0, 0, 0)


def test_a_resting_tail_joined_by_too_few_samples_waits_a_hold_for_the_newcomers_then_is_parked():
    # The newcomer came from the input: its offset must be released within the hold, so the two go to the
    # pending topic together (one record), and come back to rest as one tail.
    b = resting_batcher()
    back_from_pending(b, n=1)
    poll(b, HOLD)
    b.add(KEY, entries(1, INPUT, start=100), 1000.0)
    assert poll(b, 1000.0 + HOLD - 0.1).park == []
    parked, = poll(b, 1000.0 + HOLD).park
    assert len(parked.entries) == 2 and b.resting_tails == 0


def test_a_tail_joined_by_another_read_back_tail_rests_again():
    b = resting_batcher()
    back_from_pending(b, n=1)
    poll(b, HOLD)
    back_from_pending(b, n=1, now=500.0)  # a second parked record of the same user read back
    work = poll(b, 500.0 + HOLD)
    assert work.park == [] and (b.resting_tails, b.resting_samples) == (1, 2)


def test_a_resting_tail_expires_at_the_max_age_of_its_oldest_sample():
    b = resting_batcher()
    back_from_pending(b, n=2, born=100.0)
    assert poll(b, HOLD, wall=100.0 + MAX_AGE - 1).expire == []
    expired, = poll(b, HOLD + 1, wall=100.0 + MAX_AGE).expire
    assert len(expired.entries) == 2
    assert (b.resting_tails, b.buffered_samples) == (0, 0)


def test_beyond_the_bound_the_tails_resting_longest_are_parked_first():
    b = resting_batcher(max_resting=4)
    keys = [(f"user-{i}", "steps") for i in range(3)]
    for i, key in enumerate(keys):
        back_from_pending(b, key, n=2, now=float(i))
    work = poll(b, 2.0 + HOLD)
    assert [s.key for s in work.park] == [keys[0]]  # the first to rest makes room for the third
    assert b.resting_samples == 4 and b.resting_tails == 2


def test_a_revoke_or_a_shutdown_takes_the_resting_tails():
    b = resting_batcher()
    back_from_pending(b, n=2)
    b.add(OTHER, entries(1, INPUT), HOLD - 1)  # in its hold, not resting
    poll(b, HOLD)
    taken = b.take_small({KEY, OTHER}, resting_only=True)
    assert [s.key for s in taken] == [KEY]
    assert b.resting_tails == 0 and b.buffered_samples == 1


def test_a_revoked_pending_partition_takes_its_resting_samples_along():
    b = resting_batcher()
    back_from_pending(b, n=2)
    poll(b, HOLD)
    assert b.drop_sources({PENDING}, HOLD + 1) == 2
    assert (b.resting_tails, b.resting_samples, b.buffered_samples) == (0, 0, 0)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([PENDING, INPUT]), st.integers(1, 2),
                          st.floats(0, 4 * HOLD)), max_size=40),
       st.integers(1, 6))
def test_every_sample_is_buffered_resting_or_handed_out_exactly_once(adds, max_resting):
    # Whatever the joins, bounds and expiries, nothing is lost or handed out twice, and the counts hold.
    b = Batcher(10, WINDOW, HOLD, 600.0, rests=lambda s: s.startswith("pending"), max_resting=max_resting)
    now, out, put = 0.0, [], []
    for user, source, n, step in adds:
        now += step
        added = entries(n, source, born=now)
        put += added
        b.add((f"user-{user}", "steps"), added, now)
        work = poll(b, now)
        out += [e for batch in work.batches for e in batch.entries] + [
            e for small in work.park + work.expire for e in small.entries]
        for batch in work.batches:
            b.done(batch.key, now)
        assert b.resting_samples <= max_resting
        assert b.resting_samples <= b.buffered_samples
    for later in (now + HOLD, now + 700.0, now + 1400.0):
        work = poll(b, later)
        out += [e for batch in work.batches for e in batch.entries] + [
            e for small in work.park + work.expire for e in small.entries]
        for batch in work.batches:
            b.done(batch.key, later)
    out += [e for small in b.take_small() for e in small.entries]
    assert {(e.source, e.offset) for e in out} == {(e.source, e.offset) for e in put} and len(out) == len(put)
    assert (b.buffered_samples, b.resting_samples, b.resting_tails) == (0, 0, 0)


def test_a_tail_with_a_copy_from_the_input_is_parked_not_rested():
    # A crash after a tail was parked but before the input was committed: the replay brings the parked record
    # and the input record again. The input copy's offset must not wait for the tail (up to its max age).
    b = resting_batcher()
    tail = back_from_pending(b, n=2)
    copies = [Entry(e.start, e.body, INPUT, e.offset + 1_000_000, e.timestamp, e.born) for e in tail]
    b.add(KEY, copies, 0.0)
    parked, = poll(b, HOLD).park + poll(b, HOLD + 1).park  # the copies are set aside at the window first
    assert len(parked.entries) == 2 and len(parked.twins) == 2  # the copies go along: acknowledged with it
    assert b.resting_tails == 0


def test_a_tail_rests_at_most_a_few_hours_then_is_parked_anew():
    # The pending partition's commit (and what a crash replays of it) moves on at least every MAX_REST_SECONDS.
    from stream.batching import MAX_REST_SECONDS

    b = resting_batcher()
    back_from_pending(b, n=2, born=0.0)
    assert poll(b, HOLD, wall=HOLD).park == []
    assert poll(b, HOLD + 1, wall=HOLD + MAX_REST_SECONDS - 1).park == []
    parked, = poll(b, HOLD + 2, wall=HOLD + MAX_REST_SECONDS).park
    assert len(parked.entries) == 2 and b.resting_tails == 0
    assert MAX_REST_SECONDS <= 86400 / 8  # at most 8 pending records a tail a day


def test_the_expiry_heap_does_not_grow_with_tails_that_come_and_go():
    b = resting_batcher()
    now = 0.0
    for _ in range(20):  # 500 tails rest, are joined and leave, again and again
        for user in range(500):
            back_from_pending(b, (f"user-{user}", "steps"), n=1, now=now)
        now += HOLD
        poll(b, now)
        assert b.resting_tails == 500
        for user in range(500):
            b.add((f"user-{user}", "steps"), entries(2, INPUT), now)
        for batch in poll(b, now + WINDOW, slots=1000).batches:
            b.done(batch.key, now + WINDOW)
        now += WINDOW
    assert b.resting_tails == 0
    assert len(b._expiry) <= 2 * 500 + 1024
