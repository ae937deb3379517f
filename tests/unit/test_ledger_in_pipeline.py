"""The ledger where the pipeline lets go of samples without a request: a small buffer about to be parked or
dead-lettered below_min_batch loses the samples the API already has (done, not parked again and again, nor
dead-lettered), and keeps the others."""

from __future__ import annotations

import msgspec

from stream import config
from stream.batching import Entry, Small
from stream.offsets import TopicPartition
from stream.pipeline import Pipeline
from tests.unit.test_refusal_hold import Source, Writer

TP = TopicPartition("samples", 0)
KEY = ("u1", "steps")
START = 1_698_825_600 * 10**9  # 2023-11-01T08:00:00Z


class Store:
    async def ensure(self) -> int:
        return 1


def body(i: int) -> bytes:
    return b'{"device_name":"Watch","start_date":"2023-11-01T08:00:%02dZ","unit":"count","value":%d}' % (i, i + 1)


def pipeline(mode: str) -> tuple[Pipeline, Writer, list[Entry]]:
    settings = msgspec.convert({"api_token": "t", "ledger": mode}, config.Settings)
    writer = Writer()
    p = Pipeline(settings, source=Source(), writer=writer, sink=object(), clock=lambda: 100.0, wall=lambda: 1.7e9,
                 ledger_store=Store())
    state = p.tracker.assign(TP)
    entries = []
    for i in range(3):
        state.track(i, 1)
        entries.append(Entry(START + i * 10**9, body(i), state, i, 1.7e9, 1.7e9))
    assert p.ledger is not None
    p.ledger.ledger.record(0, ("u1", "steps", b'"Watch"'), [entries[0].start], [_print(entries[0].body)])
    return p, writer, entries


def _print(value: bytes) -> int:
    from stream.ledger_format import fingerprint

    return fingerprint(value)


async def test_a_small_buffer_is_parked_without_the_samples_the_api_already_has():
    p, writer, entries = pipeline("on")
    p._park(Small(KEY, [entries[0], entries[1]]))

    [(topic, value, _)] = writer.writes
    assert topic == p.settings.pending_topic and body(1) in value and body(0) not in value
    assert p.tracker.get(TP).committable() == 1  # the duplicate is done; the parked one waits for its write
    assert p.metrics.registry.get_sample_value("stream_samples_total",
                                               {"outcome": "duplicate", "data_type": "steps"}) == 1


async def test_a_small_buffer_of_duplicates_only_is_neither_parked_nor_dead_lettered():
    p, writer, entries = pipeline("on")
    p._expire(Small(KEY, [entries[0]]))

    assert writer.writes == [] and p.tracker.get(TP).committable() == 1


async def test_in_shadow_mode_a_small_buffer_is_parked_whole():
    p, writer, entries = pipeline("shadow")
    p._park(Small(KEY, [entries[0], entries[1]]))

    [(_, value, _)] = writer.writes
    assert body(0) in value and body(1) in value
