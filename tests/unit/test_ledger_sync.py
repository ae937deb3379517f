"""The ledger's glue in the service (stream.ledger_sync): a partition waits for its restore, and nothing the
ledger cannot handle (a broken record, a partition the ledger topic lacks) holds a partition for good."""

from __future__ import annotations

import asyncio

import msgspec

from stream import config
from stream.ledger_format import DeviceSamples, LedgerRecord, encode_record, pack
from stream.ledger_sync import LedgerSync
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
    def __init__(self, values: list[bytes], partitions: int = 1) -> None:
        self.values = values
        self.partitions = partitions
        self.gate = asyncio.Event()

    async def ensure(self) -> int:
        return self.partitions

    async def read(self, partition: int) -> list[bytes]:
        await self.gate.wait()
        return self.values


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
