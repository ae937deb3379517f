"""The ledger's glue in the service (stream.ledger_sync): a partition waits for its restore, and nothing the
ledger cannot handle (a broken record, a partition the ledger topic lacks) holds a partition for good."""

from __future__ import annotations

import asyncio

import msgspec

from stream import config
from stream.ledger import DUPLICATE, LATE, NEW
from stream.ledger_format import DeviceSamples, LedgerRecord, encode_record, pack
from stream.ledger_store import Restored, Tail
from stream.ledger_sync import PARKED_SECONDS, LedgerSync
from stream.metrics import Metrics
from stream.offsets import TopicPartition

SETTINGS = msgspec.convert({"api_token": "t", "metrics_port": 0}, config.Settings)
TP = TopicPartition("samples", 0)


class Holder:
    def __init__(self) -> None:
        self.held: set[TopicPartition] = set()
        self.released = asyncio.Event()

    def hold(self, tps):
        self.held.update(tps)

    def release(self, tps):
        self.held.difference_update(tps)
        self.released.set()

    def forget(self, tps):
        self.held.difference_update(tps)


class Store:
    """The ledger topic in memory: per partition, a log of (key, value); value None is a tombstone."""

    def __init__(self, values: list[bytes], partitions: int = 1) -> None:
        self.logs: dict[int, list[tuple[bytes | None, bytes | None]]] = {
            p: [(b"k%d" % i, v) for i, v in enumerate(values)] if p == 0 else [] for p in range(partitions)}
        self.partitions = partitions
        self.gate = asyncio.Event()
        self.reads = 0
        self.tail_reads = 0
        self.first = 0  # the partition's beginning offset (retention moves it up)

    def append(self, partition: int, key: bytes | None, value: bytes | None) -> int:
        self.logs[partition].append((key, value))
        return len(self.logs[partition]) - 1

    async def ensure(self) -> int:
        return self.partitions

    async def read(self, partition: int) -> Restored:
        await self.gate.wait()
        self.reads += 1
        latest: dict[bytes | None, bytes] = {}
        for key, value in self.logs[partition]:
            if value is None:
                latest.pop(key, None)
            else:
                latest[key] = value
        return Restored(list(latest.values()), len(self.logs[partition]), 0.0, len(self.logs[partition]))

    async def read_since(self, partition: int, start: int) -> Tail:
        await self.gate.wait()
        self.tail_reads += 1
        log = self.logs[partition]
        begin = max(start, self.first)
        return Tail([(offset, *log[offset]) for offset in range(begin, len(log))], len(log), begin)

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        return {p: len(self.logs[p]) for p in partitions}

    async def close(self) -> None:
        pass


class Writer:
    """The pipeline's writer over a Store: a write lands at once, its future resolves to its offset."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def write(self, topic, key, value, headers, partition=None):
        done = asyncio.get_running_loop().create_future()
        done.set_result(self.store.append(partition, key, value))
        return done


def sync(store: Store, holder: Holder) -> LedgerSync:
    return LedgerSync(SETTINGS, Metrics(), store, holder, clock=lambda: 0.0, wall=lambda: 1.7e9)


async def test_an_assigned_partition_waits_for_its_restore_and_is_released_after():
    good = encode_record(LedgerRecord("u", "steps", [DeviceSamples('"d"', pack([1]), pack([2]))]))[1]
    store, holder = Store([good]), Holder()
    ledger = sync(store, holder)
    await ledger.ensure()

    ledger.assigned([TP])
    await asyncio.sleep(0)
    assert holder.held == {TP} and 0 not in ledger.ready
    store.gate.set()
    await asyncio.wait_for(holder.released.wait(), 5)

    assert holder.held == set() and 0 in ledger.ready and ledger.ledger.entries == 1


async def test_records_that_break_the_restore_are_skipped_and_the_partition_released():
    broken = [b"\xff not msgpack", msgspec.msgpack.encode(["u", "steps", [['"d"', b"123", b"12345678"]]])]
    store, holder = Store(broken), Holder()
    store.gate.set()
    ledger = sync(store, holder)
    await ledger.ensure()

    ledger.assigned([TP])
    await asyncio.wait_for(holder.released.wait(), 5)

    assert 0 in ledger.ready and ledger.ledger.entries == 0


async def test_a_partition_the_ledger_topic_lacks_is_never_held_and_its_acceptances_need_no_write():
    store, holder = Store([], partitions=1), Holder()
    ledger = sync(store, holder)
    await ledger.ensure()
    wider = TopicPartition("samples", 3)

    ledger.assigned([wider])

    assert holder.held == set() and ledger.uncovered == {3}
    class Source:  # an Entry's parts that the ledger reads: .source.tp, .start and .body
        tp = wider

    class Entry:
        source, start, body = Source(), 1, b'{"device_name":"d","start_date":"x","unit":"count","value":1}'

    class Writer:
        def write(self, *args, **kwargs):
            raise AssertionError("no partition 3 to write to")

    [(written, entries)] = ledger.record(Writer(), "u", "steps", [Entry()])
    assert written.done() and len(entries) == 1


# -- following the topic: forgets and other members' writes reach a running member ---------------------------

BODY = b'{"device_name":"d","start_date":"2023-11-14T22:13:20Z","unit":"count","value":%d}'
START = 1_700_000_000 * 10**9


class Sample:
    """An accepted Entry as far as the ledger reads it: .source.tp, .start and .body."""

    def __init__(self, value: int, tp: TopicPartition = TP) -> None:
        self.source = type("Source", (), {"tp": tp})()
        self.start = START + value * 10**9
        self.body = BODY % value


def record_value(user: str, *samples: Sample) -> bytes:
    from stream.ledger import Ledger

    record = Ledger(10**15, 10**9, 10**6).record_of(0, user, "steps", [(s.start, s.body) for s in samples], START)
    return encode_record(record)[1]


def kind(ledger: LedgerSync, user: str, sample: Sample) -> str:
    return ledger.ledger.decide(0, (user, "steps", b'"d"'), sample.start, sample.body)[0]


async def ready_sync(values: list[bytes] = (), partitions: int = 1) -> tuple[LedgerSync, Store, Holder]:
    store, holder = Store(list(values), partitions), Holder()
    store.gate.set()
    ledger = sync(store, holder)
    await ledger.ensure()
    ledger.assigned([TP])
    await asyncio.wait_for(holder.released.wait(), 5)
    return ledger, store, holder


async def test_a_forget_written_while_the_member_runs_is_applied_at_its_next_look():
    ledger, store, _ = await ready_sync([record_value("u", Sample(1), Sample(2))])
    assert kind(ledger, "u", Sample(1)) == DUPLICATE

    from stream.ledger_format import LedgerKey
    store.append(0, msgspec.msgpack.encode(LedgerKey("u", "steps", "00")), None)  # `stream ledger forget`
    await ledger.follow()

    assert kind(ledger, "u", Sample(1)) == NEW and kind(ledger, "u", Sample(2)) == NEW
    assert ledger.metrics.ledger_foreign.labels("tombstone")._value.get() == 1


async def test_own_writes_are_never_read_back_and_another_writers_records_are_merged():
    ledger, store, _ = await ready_sync()
    writer = Writer(store)
    ledger.record(writer, "u", "steps", [Sample(1), Sample(2), Sample(3)])
    ledger.record(writer, "u", "steps", [Sample(4), Sample(5), Sample(6)])
    await asyncio.sleep(0)  # the writes' done callbacks

    assert await ledger.follow() == 0 and store.tail_reads == 0  # only our own writes since: nothing to read

    store.append(0, b"other", record_value("u", Sample(7)))  # a member that held partition 0 too
    ledger.record(writer, "u", "steps", [Sample(8), Sample(9), Sample(10)])
    await asyncio.sleep(0)
    assert await ledger.follow() == 2 and store.tail_reads == 1  # the other's record and our own after it
    assert kind(ledger, "u", Sample(7)) == DUPLICATE and kind(ledger, "u", Sample(10)) == DUPLICATE
    assert ledger.metrics.ledger_foreign.labels("record")._value.get() == 1
    assert await ledger.follow() == 0 and store.tail_reads == 1


async def test_a_write_after_a_forget_is_remembered_and_one_before_it_is_not():
    ledger, store, _ = await ready_sync()
    writer = Writer(store)
    ledger.record(writer, "u", "steps", [Sample(1)])
    from stream.ledger_format import LedgerKey
    store.append(0, msgspec.msgpack.encode(LedgerKey("u", "steps", "00")), None)
    ledger.record(writer, "u", "steps", [Sample(2)])
    await asyncio.sleep(0)

    await ledger.follow()

    # Sample 1 is sent again (late: older than what is remembered), sample 2 is not.
    assert kind(ledger, "u", Sample(1)) == LATE and kind(ledger, "u", Sample(2)) == DUPLICATE


async def test_a_partition_back_after_a_rebalance_keeps_its_state_and_reads_only_what_was_written_meanwhile():
    ledger, store, holder = await ready_sync([record_value("u", Sample(1))])
    assert store.reads == 1

    ledger.revoked([TP])
    store.append(0, b"other", record_value("u", Sample(2)))  # the member that held it meanwhile
    holder.released.clear()
    ledger.assigned([TP])
    assert holder.held == {TP}
    await asyncio.wait_for(holder.released.wait(), 5)

    assert store.reads == 1 and store.tail_reads == 1  # no restore: a catch-up
    assert kind(ledger, "u", Sample(1)) == DUPLICATE and kind(ledger, "u", Sample(2)) == DUPLICATE
    assert ledger.metrics.ledger_kept._value.get() == 1


async def test_a_partition_not_back_after_a_rebalance_is_forgotten():
    ledger, _, holder = await ready_sync([record_value("u", Sample(1))], partitions=2)
    other = TopicPartition("samples", 1)

    ledger.revoked([TP])
    assert ledger.ledger.entries == 1  # kept until the assignment says
    ledger.assigned([other])
    await asyncio.wait_for(holder.released.wait(), 5)

    assert ledger.ledger.entries == 0 and ledger.ready == {1}


async def test_samples_are_parked_in_the_pending_partition_of_their_own_number_when_this_member_holds_it():
    ledger, _, _ = await ready_sync(partitions=3)
    pending = TopicPartition(SETTINGS.pending_topic, 2)
    from_two = [Sample(1, TopicPartition("samples", 2))]
    assert ledger.pending_partition(from_two) is None  # not held: where the user id hashes, as without a ledger

    ledger.assigned([TopicPartition("samples", 2), pending])

    assert ledger.pending_partition(from_two) == 2


def forget_marker(user: str, data_type: str = "") -> bytes:
    from stream.ledger_format import LedgerKey

    return msgspec.msgpack.encode(LedgerKey(user, data_type, "forget"))


class SlowWriter:
    """A writer whose writes land in the topic and are acknowledged only when the test says so."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: list[tuple[int, bytes, bytes, asyncio.Future]] = []

    def write(self, topic, key, value, headers, partition=None):
        done = asyncio.get_running_loop().create_future()
        self.queue.append((partition, key, value, done))
        return done

    def land(self, acknowledge: bool = True) -> list[tuple[int, asyncio.Future]]:
        landed = [(self.store.append(partition, key, value), done) for partition, key, value, done in self.queue]
        self.queue = []
        if acknowledge:
            for offset, done in landed:
                done.set_result(offset)
        return landed


async def test_a_forget_marker_forgets_every_data_type_even_with_no_record_of_the_user_left_in_the_topic():
    ledger, store, _ = await ready_sync()
    ledger.record(Writer(store), "u", "steps", [Sample(1), Sample(2), Sample(3)])
    ledger.record(Writer(store), "u", "bpm", [Sample(1), Sample(2), Sample(3)])
    await asyncio.sleep(0)
    store.logs[0] = [(b"gone", None)] * len(store.logs[0])  # retention took the records; memory still has them

    store.append(0, forget_marker("u"), None)  # `stream ledger forget --user u`
    await ledger.follow()

    assert ledger.ledger.entries == 0


async def test_samples_accepted_after_a_forget_stay_remembered_whenever_their_write_lands():
    ledger, store, _ = await ready_sync()
    writer = SlowWriter(store)
    store.append(0, forget_marker("u", "steps"), None)
    ledger.record(writer, "u", "steps", [Sample(1), Sample(2), Sample(3)])  # accepted after the forget

    await ledger.follow()  # the forget is applied while that write is still on its way
    writer.land()
    await asyncio.sleep(0)
    await ledger.follow()

    assert kind(ledger, "u", Sample(1)) == DUPLICATE and store.tail_reads == 1


async def test_a_write_not_acknowledged_yet_is_waited_for_not_read_back_nor_taken_for_another_writers(monkeypatch):
    ledger, store, _ = await ready_sync()
    writer = SlowWriter(store)
    ledger.record(writer, "u", "steps", [Sample(1), Sample(2), Sample(3)])
    [(_, done)] = writer.land(acknowledge=False)  # in the topic, its acknowledgement on its way

    follow = asyncio.ensure_future(ledger.follow())
    await asyncio.sleep(0)
    done.set_result(0)
    assert await follow == 0 and store.tail_reads == 0  # walked past once acknowledged

    monkeypatch.setattr("stream.ledger_sync.ACK_WAIT_SECONDS", 0.01)
    ledger.record(writer, "u", "steps", [Sample(4), Sample(5), Sample(6)])
    writer.land(acknowledge=False)  # an acknowledgement that does not come in time: the tail is read
    assert await ledger.follow() == 1 and store.tail_reads == 1
    assert ledger.metrics.ledger_foreign.labels("record")._value.get() == 0  # known as ours by its key


async def test_a_follow_stops_when_a_rebalance_takes_the_partition_and_leaves_nothing_of_it():
    ledger, store, _ = await ready_sync(partitions=2)
    for i in range(1200):  # another member held partition 0 meanwhile and wrote a lot
        store.append(0, b"o%d" % i, record_value(f"u{i}", Sample(i)))
    ledger.follow_due(0.0)
    for _ in range(1000):  # until the follow is part-way through (it yields every 500 records)
        if ledger.ledger.entries >= 500:
            break
        await asyncio.sleep(0)
    assert 500 <= ledger.ledger.entries < 1200

    ledger.revoked([TP])
    ledger.assigned([TopicPartition("samples", 1)])
    for _ in range(100):
        await asyncio.sleep(0)

    assert ledger.ledger.partitions() == [] or ledger.ledger.partitions() == [1]
    assert ledger.ledger.entries == 0


async def test_a_partition_away_too_long_is_restored_whole_on_its_return():
    clock = [0.0]
    store, holder = Store([record_value("u", Sample(1))]), Holder()
    store.gate.set()
    ledger = LedgerSync(SETTINGS, Metrics(), store, holder, clock=lambda: clock[0], wall=lambda: 1.7e9)
    await ledger.ensure()
    ledger.assigned([TP])
    await asyncio.wait_for(holder.released.wait(), 5)

    ledger.revoked([TP])
    clock[0] += PARKED_SECONDS + 1
    holder.released.clear()
    ledger.assigned([TP])
    await asyncio.wait_for(holder.released.wait(), 5)

    assert store.reads == 2 and store.tail_reads == 0


async def test_a_catch_up_that_finds_records_gone_restores_the_partition_whole():
    ledger, store, holder = await ready_sync([record_value("u", Sample(1))])
    ledger.revoked([TP])
    store.append(0, b"k", record_value("u", Sample(2)))
    store.first = 2  # retention took the beginning of the partition while it was away

    holder.released.clear()
    ledger.assigned([TP])
    await asyncio.wait_for(holder.released.wait(), 5)

    assert store.reads == 2 and kind(ledger, "u", Sample(2)) == DUPLICATE


async def test_the_oldest_hold_is_measured_from_the_assignment_queue_included():
    clock = [0.0]
    store, holder = Store([]), Holder()
    ledger = LedgerSync(SETTINGS, Metrics(), store, holder, clock=lambda: clock[0], wall=lambda: 1.7e9)
    await ledger.ensure()
    ledger.assigned([TP])
    clock[0] = 42.0

    assert ledger.metrics.registry.get_sample_value("stream_ledger_oldest_hold_seconds") == 42.0
    store.gate.set()
    await asyncio.wait_for(holder.released.wait(), 5)
    assert ledger.metrics.registry.get_sample_value("stream_ledger_oldest_hold_seconds") == 0.0
    assert ledger.metrics.registry.get_sample_value("stream_ledger_restore_seconds_sum") == 42.0
