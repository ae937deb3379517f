"""The service carries a redriven record's redrive count (stream.redrive.count, written by `stream redrive`) to
its dead letters and to the parked tails its samples go into, so that the next redrive can count how many times
it went round, and a poison record is left in the DLQ after --max-redrives instead of looping."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec

from stream import config, redrive
from stream.deadletter import REDRIVE_COUNT_HEADER
from stream.offsets import TopicPartition
from stream.outcome import Rejected
from stream.pipeline import Pipeline

TP = TopicPartition("samples", 0)
PENDING = TopicPartition("samples-sync-pending", 0)


class Writer:
    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes, dict[str, bytes]]] = []

    def write(self, topic, key, value, headers, partition=None):
        self.writes.append((topic, value, dict(headers)))
        done = asyncio.get_running_loop().create_future()
        done.set_result(len(self.writes) - 1)  # acknowledged at once
        return done


class Source:
    paused = False

    def __init__(self) -> None:
        self.commits: list[dict] = []

    def connected(self) -> bool:
        return True

    async def commit(self, offsets, timeout=10.0) -> bool:
        self.commits.append(dict(offsets))
        return True

    def highwater(self, tp):
        return None


def pipeline() -> tuple[Pipeline, Writer]:
    settings = msgspec.convert({"api_token": "t", "batch_window_seconds": 5.0, "min_batch_hold_seconds": 30.0,
                                "ledger": "off"}, config.Settings)
    writer = Writer()
    p = Pipeline(settings, source=Source(), writer=writer, sink=object(), clock=lambda: 100.0, wall=lambda: 1e9)
    p._assigned = True
    return p, writer


def event(i: int) -> bytes:
    return (b'{"user_id":"u1","data_type":"steps","device_name":"Watch","start_date":"2023-11-01T08:00:%02d.000Z",'
            b'"value":%d,"unit":"count"}' % (i, i + 1))


def record(offset: int, value: bytes, count: int | None = None, headers=()) -> SimpleNamespace:
    headers = list(headers) + ([(REDRIVE_COUNT_HEADER, str(count).encode())] if count is not None else [])
    return SimpleNamespace(offset=offset, value=value, timestamp=1e12, headers=tuple(headers), key=b"u1")


def test_the_header_is_the_one_stream_redrive_writes():
    assert REDRIVE_COUNT_HEADER == redrive.COUNT_HEADER


async def test_a_redriven_record_refused_again_keeps_its_count_in_its_dead_letter():
    p, writer = pipeline()
    state = p.tracker.assign(TP)
    p._ingest(state, [record(0, b"{not json", count=2), record(1, b"[1]")], 100.0, 1e9)
    assert [(w[2]["stream.error.reason"], w[2].get(REDRIVE_COUNT_HEADER)) for w in writer.writes] == [
        (b"malformed_json", b"2"), (b"not_an_object", b"0")]


async def test_samples_the_api_refuses_again_keep_their_records_counts():
    p, writer = pipeline()
    state = p.tracker.assign(TP)
    p._ingest(state, [record(0, event(0), count=1), record(1, event(1)), record(2, event(2), count=3)], 100.0, 1e9)
    (batch,) = p.batcher.poll(200.0, 1e9, 10).batches
    p._settle(batch, Rejected("bad"))
    assert [w[2].get(REDRIVE_COUNT_HEADER) for w in writer.writes] == [b"1", b"0", b"3"]


async def test_a_parked_tail_carries_the_highest_count_and_its_dead_letter_gets_it_back():
    p, writer = pipeline()
    state = p.tracker.assign(TP)
    p._ingest(state, [record(0, event(0), count=1), record(1, event(1), count=2)], 100.0, 1e9)
    work = p.batcher.poll(200.0, 1e9, 10)
    (small,) = work.park
    p._park(small)
    ((topic, value, headers),) = writer.writes
    assert topic == p.settings.pending_topic and headers[REDRIVE_COUNT_HEADER] == b"2"
    # Read back from the pending topic and expired there: the dead letters carry the count.
    pending = p.tracker.assign(PENDING)
    parked = record(0, value, headers=list(headers.items()))
    p._ingest(pending, [parked], 100.0, 1e9)
    p._expire(p.batcher.poll(1e9, 1e12, 10).expire[0])
    assert [w[2]["stream.error.reason"] for w in writer.writes[1:]] == [b"below_min_batch"] * 2
    assert [w[2][REDRIVE_COUNT_HEADER] for w in writer.writes[1:]] == [b"2", b"2"]


async def test_counts_are_forgotten_once_committed_or_revoked():
    p, _writer = pipeline()
    state = p.tracker.assign(TP)
    # Offset 0 is dead-lettered (done once written); offset 1's sample waits in its buffer (not done).
    p._ingest(state, [record(0, b"{", count=1), record(1, event(1), count=1)], 100.0, 1e9)
    await asyncio.sleep(0)  # the dead letter's acknowledgement
    assert len(p._redrive_counts) == 2
    await p._commit()
    assert p.source.commits == [{TP: 1}]
    assert p._redrive_counts.items() == [(TP, 1, 1)]
    # A revoked partition's counts go with it (its next owner reads the records again).
    other, _ = pipeline()
    pending = other.tracker.assign(PENDING)
    foreign = record(0, event(0), count=1, headers=[("stream.parked.group", b"another-group")])
    other._ingest(pending, [foreign], 100.0, 1e9)
    assert other._redrive_counts.items() == [(PENDING, 0, 1)]
    await other._on_revoked([PENDING])
    assert len(other._redrive_counts) == 0 and other._redrive_counts.items() == []


def test_a_record_without_the_header_costs_nothing_and_a_bad_header_is_ignored():
    from stream.pipeline import _redrive_count

    assert _redrive_count(()) is None
    assert _redrive_count([("stream.parked.born", b"1.0")]) is None
    assert _redrive_count([(REDRIVE_COUNT_HEADER, b"x")]) is None
    assert _redrive_count([(REDRIVE_COUNT_HEADER, b"4")]) == 4
