"""Dead letters count as samples in stream_samples_total{outcome="dead_lettered"}, whatever made them: the
dead-letter ratio alert (dead-lettered samples over samples) must see a producer whose every record is refused,
and a bundle refused whole weighs its samples, not one."""

from __future__ import annotations

import msgspec

from stream.offsets import TopicPartition
from stream.schema import MAX_SAMPLE_LETTERS
from tests.unit.test_redrive_count_carried import event, pipeline, record

TP = TopicPartition("samples", 0)


def dead_lettered(p) -> dict[str, float]:
    return {dict(s.labels)["data_type"]: s.value
            for family in p.metrics.registry.collect() if family.name == "stream_samples"
            for s in family.samples
            if s.name == "stream_samples_total" and dict(s.labels)["outcome"] == "dead_lettered"}


def bundle(valid: int, invalid: int) -> bytes:
    good = [msgspec.json.decode(event(i)) for i in range(valid)]
    bad = [{**msgspec.json.decode(event(i)), "unit": "furlongs"} for i in range(invalid)]
    for sample in good + bad:
        del sample["user_id"], sample["data_type"]
    return msgspec.json.encode({"user_id": "u1", "data_type": "steps", "data": good + bad})


async def test_a_record_that_cannot_be_read_counts_one_sample_of_an_unknown_data_type():
    p, writer = pipeline()
    state = p.tracker.assign(TP)
    p._ingest(state, [record(0, b"{not json"), record(1, b"[1, 2]")], 100.0, 1e9)
    assert len(writer.writes) == 2
    assert dead_lettered(p) == {"unknown": 2.0}


async def test_a_bundle_refused_whole_counts_its_samples():
    p, _writer = pipeline()
    state = p.tracker.assign(TP)
    refused = MAX_SAMPLE_LETTERS + 5  # past the per-sample letters: one dead letter for all of them
    p._ingest(state, [record(0, bundle(0, refused))], 100.0, 1e9)
    assert dead_lettered(p) == {"unknown": float(refused)}


async def test_many_refused_samples_of_a_bundle_count_as_many_and_a_few_count_one_each():
    p, writer = pipeline()
    state = p.tracker.assign(TP)
    many, few = MAX_SAMPLE_LETTERS + 3, 2
    p._ingest(state, [record(0, bundle(4, many)), record(1, bundle(4, few))], 100.0, 1e9)
    assert len(writer.writes) == 1 + few  # one letter for the many, one for each of the few
    assert dead_lettered(p) == {"steps": float(many + few)}
