"""Offsets are committed only after the API accepted (or the DLQ holds) a record; API refusals are
dead-lettered as replayable events with the API's reason."""

from __future__ import annotations

import msgspec
import pytest

from stream.dev.generate import Record, WearableData, produce
from stream.schema import Decoded, decode_record

from .conftest import (
    all_committed,
    all_done,
    committed_offsets,
    end_offsets,
    eventually,
    make_settings,
    read_topic,
    running,
    sandbox_stats,
    set_faults,
)

pytestmark = pytest.mark.integration


def with_device(records: list[Record], device: str) -> list[Record]:
    out = []
    for r in records:
        event = msgspec.json.decode(r.value)
        event["device_name"] = device
        out.append(Record(r.key, msgspec.json.encode(event), r.samples))
    return out


async def test_samples_the_api_refuses_are_dead_lettered_and_the_rest_accepted(kafka, topics, sandbox):
    data = WearableData(seed=3)
    (user_a, user_b) = data.user_ids(2)
    # user_a: a batch where the API refuses 2 of 10 samples (207); user_b: all 5 refused (400).
    good = list(data.records(user_a, "bpm", 8))
    buggy_a = with_device(list(data.records(user_a, "bpm", 2)), "BuggyBand")
    buggy_b = with_device(list(data.records(user_b, "steps", 5)), "BuggyBand")
    await set_faults(sandbox, refuse_device_names=["BuggyBand"])
    await produce(kafka, topics.samples, good + buggy_a + buggy_b)

    # Without the refusal-storm guard: with two batches in all, a lone 400 cannot be told from the first sign of
    # a storm and would wait a whole window for evidence (tests/integration/test_refusal_storm.py covers that).
    settings = make_settings(kafka, topics, sandbox.url, batch_window_seconds=1.0, refusal_storm_guard=False)
    async with running(settings):
        await eventually(lambda: all_done(kafka, topics), what="all records done")
        dead = await read_topic(kafka, topics.dlq, expected=7)

    stats = await sandbox_stats(sandbox)
    assert stats["accepted_samples"] == 8
    assert stats["status_counts"] == {"207": 1, "400": 1}  # refusals are never retried
    assert len(dead) == 7
    for letter in dead:
        assert letter.reason == "api_rejected"
        assert "device_refused" in letter.headers["stream.error.message"]
        assert letter.headers["stream.source.topic"] == topics.samples
        # The value is a single-sample event that can be replayed as input.
        replay = decode_record(letter.value)
        assert isinstance(replay, Decoded) and len(replay.samples) == 1
        assert replay.user_id in (user_a, user_b)


async def test_offsets_are_not_committed_while_the_api_has_not_accepted(kafka, topics, sandbox):
    data = WearableData(seed=4)
    (user,) = data.user_ids(1)
    first = list(data.records(user, "steps", 5))
    second = list(data.records(user, "steps", 5))
    settings = make_settings(kafka, topics, sandbox.url, batch_window_seconds=0.2, commit_interval_seconds=0.1)
    await produce(kafka, topics.samples, first)
    async with running(settings):
        await eventually(lambda: all_committed(kafka, topics.group, topics.samples), what="first records committed")
        committed_before = await committed_offsets(kafka, topics.group, topics.samples)

        await set_faults(sandbox, fail_all_status=503)
        await produce(kafka, topics.samples, second)

        async def retried_several_times() -> bool:
            return (await sandbox_stats(sandbox))["status_counts"].get("503", 0) >= 5

        await eventually(retried_several_times, what="the API to refuse the batch a few times")
        # Many commit intervals have passed while the batch failed: the commit has not moved past it.
        assert await committed_offsets(kafka, topics.group, topics.samples) == committed_before
        assert not await all_committed(kafka, topics.group, topics.samples)

        await set_faults(sandbox)  # the API recovers
        await eventually(lambda: all_done(kafka, topics), what="commit after recovery")

    stats = await sandbox_stats(sandbox)
    assert stats["accepted_samples"] == 10
    ends = await end_offsets(kafka, topics.samples)
    assert sum(ends.values()) == 10
