"""The sync ledger's decisions (stream.ledger): a sample the API accepted is not sent again, and nothing the
API has not accepted is ever taken for a duplicate: forgetting may cost a duplicate, never a loss."""

from __future__ import annotations

import time
import tracemalloc

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.ledger import (
    BEYOND,
    CORRECTION,
    DEVICE_BYTES,
    DUPLICATE,
    FUTURE_TOLERANCE_NS,
    LATE,
    NEW,
    Ledger,
    device_of,
)
from stream.ledger_format import DeviceSamples, LedgerRecord, decode_record, encode_record, fingerprint, pack
from stream.schema import Decoded
from stream.schema import decode_record as decode_input

HOUR = 3600 * 10**9
HORIZON = 72 * HOUR
NOW = 2**62  # far after every start used here


def body(start: int, value: int = 14, device: str = '"iPhone"') -> bytes:
    return (b'{"device_name":' + device.encode() + b',"start_date":"%d","unit":"count","value":%d}' % (start, value))


def ledger(**overrides: int) -> Ledger:
    options = {"horizon_ns": HORIZON, "max_bytes": 1 << 30, "max_per_device": 1_000_000, **overrides}
    return Ledger(**options)


KEY = ("u1", "steps", b'"iPhone"')


def accept(book: Ledger, starts: list[int], partition: int = 0, value: int = 14, user: str = "u1") -> None:
    book.record_of(partition, user, "steps", [(s, body(s, value)) for s in starts], NOW)


def test_a_device_never_seen_sends_everything():
    assert ledger().decide(0, KEY, 5 * HOUR, body(5 * HOUR)) == (NEW, 0)


def test_an_accepted_sample_comes_back_as_a_duplicate():
    book = ledger()
    accept(book, [HOUR, 2 * HOUR, 3 * HOUR])

    assert book.decide(0, KEY, 2 * HOUR, body(2 * HOUR)) == (DUPLICATE, HOUR)
    assert book.decide(0, KEY, 3 * HOUR, body(3 * HOUR)) == (DUPLICATE, 0)


def test_newer_than_the_watermark_is_new_older_unknown_is_late_other_content_is_a_correction():
    book = ledger()
    accept(book, [HOUR, 3 * HOUR])

    assert book.decide(0, KEY, 4 * HOUR, body(4 * HOUR))[0] == NEW
    assert book.decide(0, KEY, 2 * HOUR, body(2 * HOUR)) == (LATE, HOUR)
    assert book.decide(0, KEY, HOUR, body(HOUR, value=15)) == (CORRECTION, 2 * HOUR)


def test_older_than_the_horizon_and_unknown_is_beyond_it():
    book = ledger()
    accept(book, [HORIZON + 10 * HOUR])

    assert book.decide(0, KEY, 5 * HOUR, body(5 * HOUR)) == (BEYOND, HORIZON + 5 * HOUR)
    assert book.decide(0, KEY, 10 * HOUR, body(10 * HOUR))[0] == LATE  # exactly at the horizon: remembered time


def test_fingerprints_behind_the_horizon_are_forgotten():
    book = ledger()
    accept(book, [HOUR])
    accept(book, [HOUR + HORIZON + 1])

    assert book.entries == 1
    assert book.decide(0, KEY, HOUR, body(HOUR))[0] == BEYOND


def test_each_device_user_data_type_and_partition_is_apart():
    book = ledger()
    accept(book, [HOUR], partition=0)

    assert book.decide(1, KEY, HOUR, body(HOUR))[0] == NEW
    assert book.decide(0, ("u2", "steps", b'"iPhone"'), HOUR, body(HOUR))[0] == NEW
    assert book.decide(0, ("u1", "bpm", b'"iPhone"'), HOUR, body(HOUR))[0] == NEW
    assert book.decide(0, ("u1", "steps", b'"Watch"'), HOUR, body(HOUR, device='"Watch"'))[0] == NEW


def test_a_dropped_partition_is_forgotten_and_others_kept():
    book = ledger()
    accept(book, [HOUR, 2 * HOUR], partition=0)
    accept(book, [HOUR], partition=1)

    book.drop(0)

    assert book.decide(0, KEY, HOUR, body(HOUR))[0] == NEW
    assert book.decide(1, KEY, HOUR, body(HOUR))[0] == DUPLICATE
    assert (book.entries, book.devices, book.partitions()) == (1, 1, [1])


def test_late_samples_recorded_in_any_order_are_all_remembered():
    book = ledger()
    accept(book, [10 * HOUR])
    accept(book, [3 * HOUR, 1 * HOUR, 2 * HOUR])  # a few: inserted one by one
    accept(book, [HOUR + i for i in range(1000, 0, -1)])  # many: merged at once
    accept(book, [3 * HOUR])  # again: no second copy

    for start in [10 * HOUR, 3 * HOUR, 2 * HOUR, HOUR, *(HOUR + i for i in range(1, 1001))]:
        assert book.decide(0, KEY, start, body(start))[0] == DUPLICATE
    assert book.entries == 4 + 1000


def test_the_memory_budget_forgets_the_least_recently_active_devices_first():
    book = ledger(max_bytes=3 * (DEVICE_BYTES + 101 * 16))
    for user in ("old", "middle", "recent"):
        accept(book, list(range(1, 101)), user=user)
    accept(book, [1000], user="old")  # "old" active again: "middle" is now the least recent

    accept(book, list(range(1, 101)), user="new")

    assert book.resident_bytes <= book.max_bytes
    assert book.decide(0, ("middle", "steps", b'"iPhone"'), 5, body(5))[0] == NEW  # forgotten whole
    for user in ("old", "recent", "new"):
        assert book.decide(0, (user, "steps", b'"iPhone"'), 5, body(5))[0] == DUPLICATE
    assert book.evicted == 100


def test_the_per_device_cap_forgets_its_oldest():
    book = ledger(max_per_device=10)
    accept(book, list(range(1, 21)))

    assert book.entries == 10 and book.evicted == 10
    assert book.decide(0, KEY, 5, body(5))[0] == LATE
    assert book.decide(0, KEY, 15, body(15))[0] == DUPLICATE


def test_a_remembered_sample_costs_at_most_16_bytes_and_a_device_its_estimate():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        book = ledger()
        for device in range(100):
            book.record(0, (f"user-{device}", "steps", b'"iPhone"'), list(range(10_000)), list(range(10_000)))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    per_sample = (used - 100 * DEVICE_BYTES) / book.entries
    assert book.entries == 1_000_000
    assert per_sample <= 16.5, per_sample  # two int64 arrays; arrays over-allocate a little when they grow
    assert abs(book.resident_bytes - used) / used < 0.05


def test_a_restore_from_the_ledger_records_decides_as_the_ledger_that_wrote_them():
    book = ledger()
    written = [book.record_of(0, "u1", "steps", [(s, body(s, v)) for s in starts], NOW)
               for starts, v in (([HOUR, 2 * HOUR], 14), ([5 * HOUR], 3), ([3 * HOUR, 4 * HOUR], 7))]
    values = [encode_record(record)[1] for record in written]

    restored = ledger()
    read = restored.restore(0, [decode_record(value) for value in reversed(values)])

    assert read == 5
    for start, value in ((HOUR, 14), (2 * HOUR, 14), (5 * HOUR, 3), (3 * HOUR, 7), (4 * HOUR, 7)):
        assert restored.decide(0, KEY, start, body(start, value)) == book.decide(0, KEY, start, body(start, value))
        assert restored.decide(0, KEY, start, body(start, value))[0] == DUPLICATE
    assert restored.decide(0, KEY, HOUR, body(HOUR, 15))[0] == CORRECTION


def test_the_same_batch_recorded_twice_is_one_ledger_key():
    book = ledger()
    first = encode_record(book.record_of(0, "u1", "steps", [(HOUR, body(HOUR))], NOW))
    again = encode_record(book.record_of(0, "u1", "steps", [(HOUR, body(HOUR))], NOW))

    assert first == again


def test_the_device_is_read_from_the_samples_api_bytes_escapes_included():
    for value in (
        b'{"user_id":"u","data_type":"steps","device_name":"iPhone","start_date":"2023-11-01T08:04:51Z",'
        b'"unit":"count","value":14}',
        b'{"user_id":"u","data_type":"steps","device_name":"a \\"b\\", c","start_date":"2023-11-01T08:04:51Z",'
        b'"unit":"count","value":14}',
        b'{"user_id":"u","data_type":"steps","device_name":"J\\u00fcrgen\\\\","start_date":"2023-11-01T08:04:51Z",'
        b'"unit":"count","value":14}',
    ):
        decoded = decode_input(value)
        assert isinstance(decoded, Decoded)
        written = value.split(b'"device_name":', 1)[1].split(b',"start_date"', 1)[0]
        assert device_of(decoded.samples[0].body) == written


_NAMES = st.text(alphabet='ab"\\ \u00fc', min_size=1, max_size=6)


def _bodies_named(names: list[str]) -> list[bytes]:
    """A sample's API bytes for each device name, as the decoder writes them."""
    bodies = []
    for name in names:
        value = msgspec.json.encode({"user_id": "u", "data_type": "steps", "device_name": name,
                                     "start_date": "2023-11-01T08:04:51Z", "unit": "count", "value": 14})
        decoded = decode_input(value)
        assert isinstance(decoded, Decoded)
        bodies.append(decoded.samples[0].body)
    return bodies


def test_fingerprints_are_stable_across_processes():
    # Stored in Kafka and compared by the next process: never Python's salted hash().
    # A fixed value: the same in every process and on every machine (blake2b, 8 bytes, little-endian, signed).
    assert fingerprint(b'{"device_name":"iPhone"}') == -3296265699721438147


operations = st.lists(
    st.tuples(
        st.sampled_from(["accept", "accept", "decide", "decide", "drop"]),
        st.integers(0, 1),  # partition
        st.sampled_from(["u1", "u2"]),
        st.lists(st.tuples(st.integers(0, 40), st.integers(1, 3)), min_size=1, max_size=6),  # (start, value)
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(operations, st.sampled_from([10, 25, 1000]), st.sampled_from([3, 8, 1000]),
       st.sampled_from([3 * (DEVICE_BYTES + 16 * 4), 1 << 30]))
def test_nothing_unaccepted_is_ever_a_duplicate_and_nothing_remembered_is_sent_again(
    ops, horizon, per_device, budget
):
    book = Ledger(horizon_ns=horizon, max_bytes=budget, max_per_device=per_device)
    accepted: dict[int, set[tuple[str, int, int]]] = {0: set(), 1: set()}  # what the API has, per partition
    for kind, partition, user, samples in ops:
        if kind == "accept":
            book.record_of(partition, user, "steps", [(s, body(s, v)) for s, v in samples], NOW)
            accepted[partition] |= {(user, s, v) for s, v in samples}
        elif kind == "drop":
            book.drop(partition)
            accepted[partition] = set()  # the model forgets too: a restore would bring it back (tested apart)
        else:
            for start, value in samples:
                verdict, _ = book.decide(partition, (user, "steps", b'"iPhone"'), start, body(start, value))
                if verdict == DUPLICATE:
                    assert (user, start, value) in accepted[partition], "a sample never accepted taken for a copy"
                fits = budget > 1 << 20 and per_device == 1000
                newest = max((s for u, s, _ in accepted[partition] if u == user), default=None)
                if fits and (user, start, value) in accepted[partition] and newest - start <= horizon:
                    assert verdict == DUPLICATE, "an accepted sample within the horizon would be sent again"
    assert book.entries == sum(len(d.starts) for d in book._devices.values())
    if budget < 1 << 20:
        assert book.resident_bytes <= budget or book.devices == 1


def test_a_start_far_in_the_future_moves_no_watermark_and_later_genuine_samples_are_remembered():
    book = ledger()
    now = 10 * HOUR
    book.record_of(0, "u1", "steps", [(HOUR, body(HOUR)), (10**18 * 3, body(10**18 * 3))], now)  # a clock in 2065
    book.record_of(0, "u1", "steps", [(2 * HOUR, body(2 * HOUR))], now)

    assert book.decide(0, KEY, HOUR, body(HOUR))[0] == DUPLICATE
    assert book.decide(0, KEY, 2 * HOUR, body(2 * HOUR))[0] == DUPLICATE
    assert book.decide(0, KEY, 10**18 * 3, body(10**18 * 3))[0] == NEW  # not remembered: sent again if re-sent


def test_starts_outside_what_int64_holds_are_sent_and_never_break_the_state():
    book = ledger()
    year_9999, year_1 = 253_402_300_799 * 10**9, -62_135_596_800 * 10**9
    record = book.record_of(0, "u1", "steps", [(HOUR, body(HOUR)), (year_9999, body(year_9999)),
                                               (year_1, body(year_1))], 2**63 - 1)

    assert [len(d.starts) // 8 for d in record.devices] == [1]
    assert book.entries == 1
    assert book.decide(0, KEY, year_1, body(year_1))[0] == NEW
    assert book.decide(0, KEY, year_9999, body(year_9999))[0] == NEW
    assert book.decide(0, KEY, HOUR, body(HOUR))[0] == DUPLICATE


def test_a_restore_skips_device_entries_that_are_not_two_int64_arrays_of_one_length():
    good = DeviceSamples('"iPhone"', pack([HOUR]), pack([fingerprint(body(HOUR))]))
    bad = [DeviceSamples('"a"', b"1234567", b"1234567"), DeviceSamples('"b"', pack([1, 2]), pack([1]))]
    book = ledger()

    assert book.restore(0, [LedgerRecord("u1", "steps", [*bad, good])]) == 1
    assert book.unreadable == 2
    assert book.decide(0, KEY, HOUR, body(HOUR))[0] == DUPLICATE


def test_evicting_many_devices_costs_linear_time():
    book = ledger(max_bytes=20_000 * (DEVICE_BYTES + 16))
    started = time.perf_counter()
    for device in range(100_000):
        book.record(0, (f"user-{device}", "steps", b'"iPhone"'), [HOUR], [device])
    took = time.perf_counter() - started

    assert book.devices <= 20_000 and book.evicted == 80_000
    assert took < 5.0, took  # the least recently active found in O(1): about 1 s here; quadratic took minutes


# -- the per-sample paths of a batch (record_run, verdicts_of): the same bytes and decisions as one by one ---------

DEVICES = ('"iPhone"', '"Apple Watch"', '"J\\u00fcrgen \\"B\\""')  # the last one with escapes
NOW_2023 = 1_700_000_000 * 10**9


def mixed_batch() -> list[tuple[int, bytes]]:
    """Three devices taking turns, sharing each start; the same start twice with other content; one sample out
    of order; one too far ahead and one before 1677 (both left out of the record)."""
    base = NOW_2023 - 10 * HOUR
    samples = []
    for i in range(12):
        start = base + (i // 3) * HOUR
        samples.append((start, body(start, i, DEVICES[i % 3])))
    samples.append((base + 3 * HOUR, body(base + 3 * HOUR, 99, DEVICES[0])))
    samples.append((base + HOUR // 2, body(base + HOUR // 2, 7, DEVICES[2])))
    samples.append((NOW_2023 + 2 * 86400 * 10**9, body(NOW_2023 + 2 * 86400 * 10**9, 1, DEVICES[1])))
    samples.append((-(2**63) - 1, body(0, 1, DEVICES[1])))
    return samples


# Computed by the implementation before record_run (a sample at a time: fingerprint, pack): ledger records written
# by either are read by the other, and the same batch recorded by either is one key (compaction keeps it once).
GOLDEN_KEY = b"\x93\xa2u1\xa5steps\xb07e5349ec2eed49d5"  # its digest is the value's blake2b: the value's bytes
GOLDEN_AGAIN_KEY = b"\x93\xa2u1\xa5steps\xb012870bc4dbe3b5f7"
GOLDEN_DEVICES = [  # device, starts in half hours from NOW_2023, fingerprints
    ('"iPhone"', [-20, -18, -16, -14, -14], [8708784676425067755, 4333110460185153659, -1481395224118526975,
                                             -7146297680261962674, 7757231934482962797]),
    ('"Apple Watch"', [-20, -18, -16, -14], [-8022028679918092102, -8900831725535372470, 2291378721679412202,
                                             4456965181272844531]),
    ('"J\\u00fcrgen \\"B\\""', [-20, -18, -16, -14, -19], [-6199132230732352756, 5738820717453112638,
                                                           3134143032463915017, -6627150801894542546,
                                                           -4260581671260104358]),
]
GOLDEN_STATE = {  # device: (watermark, remembered starts, fingerprints) after the mixed batch and GOLDEN_AGAIN's
    b'"iPhone"': (1699974800000000000, [1699964000000000000, 1699967600000000000, 1699971200000000000,
                                        1699974800000000000, 1699974800000000000],
                  [8708784676425067755, 4333110460185153659, -1481395224118526975, -7146297680261962674,
                   7757231934482962797]),
    b'"Apple Watch"': (1699974800000000000, [1699964000000000000, 1699967600000000000, 1699971200000000000,
                                             1699974800000000000],
                       [-8022028679918092102, -8900831725535372470, 2291378721679412202, 4456965181272844531]),
    b'"J\\u00fcrgen \\"B\\""': (1699996400000000000, [1699928000000000000, 1699964000000000000, 1699965800000000000,
                                                     1699967600000000000, 1699971200000000000, 1699974800000000000,
                                                     1699996400000000000],
                               [-1610144489986106490, -6199132230732352756, -4260581671260104358,
                                5738820717453112638, 3134143032463915017, -6627150801894542546,
                                -2294586616872863533]),
}


def golden_again() -> list[tuple[int, bytes]]:
    return [(NOW_2023 - HOUR, body(NOW_2023 - HOUR, 5, DEVICES[2])),
            (NOW_2023 - 20 * HOUR, body(NOW_2023 - 20 * HOUR, 6, DEVICES[2]))]


def test_a_mixed_batch_is_recorded_in_the_same_bytes_as_before():
    from stream.ledger_format import unpack

    book = ledger()
    record = book.record_of(3, "u1", "steps", mixed_batch(), NOW_2023)
    key, _ = encode_record(record)

    assert [(d.device, [(s - NOW_2023) // (HOUR // 2) for s in unpack(d.starts)], list(unpack(d.prints)))
            for d in record.devices] == GOLDEN_DEVICES
    assert key == GOLDEN_KEY
    assert encode_record(book.record_of(3, "u1", "steps", golden_again(), NOW_2023))[0] == GOLDEN_AGAIN_KEY
    assert {key[2]: (d.watermark, list(d.starts), list(d.prints)) for (_, key), d in book._devices.items()} \
        == GOLDEN_STATE
    assert (book.entries, book.devices) == (16, 3)


async def test_the_ledger_record_written_for_accepted_entries_has_the_same_bytes_as_before():
    from stream import config
    from stream.batching import Entry
    from stream.ledger_sync import LedgerSync
    from stream.metrics import Metrics
    from stream.offsets import TopicPartition

    class Source:
        tp = TopicPartition("samples", 3)

    class Written:
        def add_done_callback(self, callback):
            pass

    class Writer:
        def __init__(self) -> None:
            self.writes: list[tuple[bytes, bytes, int | None]] = []

        def write(self, topic, key, value, headers, partition=None):
            self.writes.append((key, value, partition))
            return Written()

    settings = msgspec.convert({"api_token": "t", "metrics_port": 0}, config.Settings)
    sync = LedgerSync(settings, Metrics(), None, None, clock=lambda: 0.0, wall=lambda: NOW_2023 / 1e9)
    sync._new_state(3, 0)
    sync.ready.add(3)
    fields = Entry.__struct_fields__
    entries = [Entry(**{name: {"start": s, "body": b, "source": Source()}.get(name, 0) for name in fields})
               for s, b in mixed_batch()]
    writer = Writer()

    sync.record(writer, "u1", "steps", entries)

    [(key, _, partition)] = writer.writes
    assert (key, partition) == (GOLDEN_KEY, 3)
    assert sync.ledger.entries == 14


def test_packed_fingerprints_are_the_fingerprints_packed():
    from stream.ledger_format import fingerprints, unpack

    bodies = [body(start, device=device) for start in range(50) for device in DEVICES]
    assert fingerprints(bodies) == pack([fingerprint(b) for b in bodies])
    assert list(unpack(fingerprints(bodies))) == [fingerprint(b) for b in bodies]
    assert fingerprints([]) == b""


@given(st.lists(_NAMES, min_size=1, max_size=12))
def test_a_runs_devices_are_each_bodys_device_of(names):
    from stream.ledger import by_device, shared_device

    bodies = _bodies_named(names)
    each = [device_of(b) for b in bodies]
    groups: dict[bytes, list[int]] = {}
    for at, device in enumerate(each):
        groups.setdefault(device, []).append(at)

    assert by_device(bodies) == groups and list(by_device(bodies)) == list(groups)
    assert shared_device(bodies) == (each[0] if len(groups) == 1 else None)


def record_one_by_one(book: Ledger, partition: int, samples: list[tuple[int, bytes]]) -> LedgerRecord:
    """Ledger.record_of as it was: a sample at a time (device, fingerprint), then each device's packed."""
    by_device: dict[bytes, tuple[list[int], list[int]]] = {}
    for start, value in samples:
        if -(2**63) <= start <= min(2**63 - 1, NOW + FUTURE_TOLERANCE_NS):
            starts, prints = by_device.setdefault(device_of(value), ([], []))
            starts.append(start)
            prints.append(fingerprint(value))
    for device, (starts, prints) in by_device.items():
        book.record(partition, ("u1", "steps", device), starts, prints)
    return LedgerRecord("u1", "steps", [DeviceSamples(d.decode(), pack(s), pack(p)) for d, (s, p) in by_device.items()])


runs = st.lists(
    st.tuples(
        st.sampled_from(["accept", "screen", "screen"]),
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 30), st.integers(1, 2)),
                 min_size=1, max_size=12),  # (partition, device, start, value)
        st.booleans(),  # in order of start
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(runs, st.sampled_from([5, 1000]), st.sampled_from([4, 1000]))
def test_a_run_is_recorded_and_screened_as_its_samples_one_by_one(ops, horizon, per_device):
    """A batch recorded at once (record_run) is the record and the state that recording its samples one by one
    gives; what it is screened with (verdicts_of: a lookup per device, a re-sync's run at once) says of each
    sample what `decide` says of it alone."""
    book = Ledger(horizon_ns=horizon, max_bytes=1 << 30, max_per_device=per_device)
    alone = Ledger(horizon_ns=horizon, max_bytes=1 << 30, max_per_device=per_device)
    for kind, samples, ordered in ops:
        if ordered:
            samples = sorted(samples, key=lambda s: s[2])
        numbers = [p for p, _, _, _ in samples]
        starts = [s for _, _, s, _ in samples]
        bodies = [body(s, v, DEVICES[d]) for _, d, s, v in samples]
        if kind == "accept":
            for number in sorted(set(numbers)):
                chosen = [at for at, n in enumerate(numbers) if n == number]
                record = book.record_run(number, "u1", "steps", [starts[at] for at in chosen],
                                         [bodies[at] for at in chosen], NOW)
                assert record == record_one_by_one(alone, number, [(starts[at], bodies[at]) for at in chosen])
            assert {k: (d.watermark, list(d.starts), list(d.prints)) for k, d in book._devices.items()} == \
                {k: (d.watermark, list(d.starts), list(d.prints)) for k, d in alone._devices.items()}
            continue
        verdicts = book.verdicts_of("u1", "steps", numbers, starts, bodies)
        expected = [book.decide(n, ("u1", "steps", DEVICES[d].encode()), s, b)
                    for (n, d, s, _), b in zip(samples, bodies, strict=True)]
        assert (verdicts or [(NEW, 0)] * len(samples)) == expected
