"""What the pipeline does with a 207 during a refusal storm: the accepted samples are acknowledged as always,
the refused ones go back into their buffer (the same entries, offsets unacknowledged, copies along) instead
of the DLQ; outside a storm they are dead-lettered as before. And /readyz reports the storm."""

from __future__ import annotations

import asyncio

import msgspec

from stream import config
from stream.batching import Batch, Entry
from stream.offsets import TopicPartition
from stream.outcome import Partial, Rejected
from stream.pipeline import Pipeline

TP = TopicPartition("samples", 0)
KEY = ("u1", "steps")


class Writer:
    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes, dict[str, bytes]]] = []

    def write(self, topic, key, value, headers, partition=None):
        self.writes.append((topic, value, dict(headers)))
        return asyncio.get_running_loop().create_future()


class Source:
    paused = False

    def connected(self) -> bool:
        return True


def pipeline() -> tuple[Pipeline, Writer]:
    settings = msgspec.convert({"api_token": "t", "batch_window_seconds": 5.0, "ledger": "off"}, config.Settings)
    writer = Writer()
    p = Pipeline(settings, source=Source(), writer=writer, sink=object(), clock=lambda: 100.0, wall=lambda: 1e9)
    p._assigned = True
    return p, writer


def sample(i: int) -> bytes:
    return b'{"device_name":"Watch","start_date":"2023-11-01T08:00:%02d.000Z","value":%d,"unit":"count"}' % (i, i + 1)


def batch_of(p: Pipeline, n: int, copies: tuple[int, ...] = ()) -> tuple[Batch, list[Entry], list[Entry]]:
    state = p.tracker.assign(TP)
    entries = []
    for i in range(n):
        state.track(i, 1)
        entries.append(Entry(i, sample(i), state, i, 1e9 - 1, 1e9 - 1))
    twins = []
    for j, i in enumerate(copies):  # a producer's re-send of sample i, at a later offset
        state.track(n + j, 1)
        twins.append(Entry(i, sample(i), state, n + j, 1e9 - 1, 1e9 - 1))
    return Batch(KEY, entries, "window", [(entries[i], c) for i, c in zip(copies, twins, strict=True)]), entries, twins


async def test_during_a_storm_a_207s_refused_samples_go_back_to_their_buffer_unacknowledged():
    p, writer = pipeline()
    batch, entries, twins = batch_of(p, 5, copies=(3,))
    p.delivery.guard.tripped = True
    p._settle(batch, Partial({1: "refused", 3: "refused"}))
    assert writer.writes == []  # nothing dead-lettered
    state = p.tracker.get(TP)
    assert state.committable() == 1  # 0 accepted; 1 (refused, held) holds the commit back
    assert state.pending == 3  # offsets 1 and 3, and 5 (the copy of 3) wait
    assert p.batcher.buffered_samples == 3
    assert p.metrics.registry.get_sample_value("stream_samples_total",
                                               {"outcome": "accepted", "data_type": "steps"}) == 3
    # The very entries come back out with the key's next batch (the copy rides along with its original again).
    state.track(10, 1)
    later = Entry(10, sample(10), state, 10, 1e9, 1e9)
    p.batcher.add(KEY, [later], 100.0)
    work = p.batcher.poll(200.0, 1e9, 10)
    (again,) = work.batches
    assert again.entries == [entries[1], entries[3], later]
    assert again.twins == [(again.entries[1], twins[0])]  # paired with the original as it leaves now


async def test_outside_a_storm_a_207s_refused_samples_are_dead_lettered_as_before():
    p, writer = pipeline()
    batch, _entries, _ = batch_of(p, 5)
    p._settle(batch, Partial({1: "refused", 3: "refused"}))
    assert [h["stream.error.reason"] for _, _, h in writer.writes] == [b"api_rejected", b"api_rejected"]
    assert p.batcher.buffered_samples == 0


async def test_a_207_without_a_readable_list_is_dead_lettered_whole_even_during_a_storm():
    p, writer = pipeline()
    batch, _entries, _ = batch_of(p, 4)
    p.delivery.guard.tripped = True
    p._settle(batch, Partial(None, "<html>"))
    assert [h["stream.error.reason"] for _, _, h in writer.writes] == [b"api_partial_unknown"] * 4
    assert p.batcher.buffered_samples == 0


async def test_a_whole_refusal_that_reaches_settle_is_dead_lettered():
    # Delivery returns Rejected only once the guard judged the refusal isolated: it is final here.
    p, writer = pipeline()
    batch, _entries, _ = batch_of(p, 3)
    p._settle(batch, Rejected("bad"))
    assert [h["stream.error.reason"] for _, _, h in writer.writes] == [b"api_rejected"] * 3


async def test_held_samples_of_a_partition_revoked_meanwhile_are_dropped_not_requeued():
    p, writer = pipeline()
    batch, _entries, _ = batch_of(p, 5)
    p.tracker.revoke(TP)  # the revoke finished while the batch was on the wire
    p.delivery.guard.tripped = True
    p._settle(batch, Partial({0: "refused", 1: "refused"}))
    assert writer.writes == []
    assert p.batcher.buffered_samples == 0  # the partition's new owner reads them again


async def test_readyz_reports_a_refusal_storm():
    p, _ = pipeline()
    p.tracker.assign(TP)
    assert p.ready() == (True, "ready")
    p.delivery.guard.tripped = True
    ready, why = p.ready()
    assert not ready and "refusal storm" in why
