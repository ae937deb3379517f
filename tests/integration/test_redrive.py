"""`stream redrive` on the real broker: samples the API refused are dead-lettered, the API recovers, a redrive
(stopped half-way and started again) sends every one back exactly once, the service delivers them, and a
second redrive sends nothing. A record the API keeps refusing is redriven at most --max-redrives times."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer

from stream import config, deadletter
from stream.dev.generate import INVALID_RECORDS, Record, WearableData, produce
from stream.redrive import (
    COUNT_HEADER,
    FROM_HEADER,
    REASON_HEADER,
    RETRYABLE,
    Criteria,
    Request,
    progress_group,
)
from stream.redrive_kafka import redrive

from .conftest import (
    Topics,
    accepted_identities,
    all_done,
    committed_offsets,
    end_offsets,
    eventually,
    make_settings,
    running,
    sandbox_stats,
    set_faults,
    settings_env,
)
from .test_offsets_and_refusals import with_device
from .test_process import expected_identities

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUGGY = "BuggyBand"


def request_for(settings: config.Settings, **options: object) -> Request:
    reasons = options.pop("reasons", tuple(RETRYABLE))
    max_redrives = options.pop("max_redrives", 3)
    criteria = Criteria(frozenset(reasons), settings.dlq_topic, settings.kafka_topics[0], settings.pending_topic,
                        max_redrives=max_redrives)
    return Request(criteria, **options)


class Written(msgspec.Struct):
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


async def read_all(bootstrap: str, topic: str) -> list[Written]:
    """Every record of a topic, up to its end now."""
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[Written] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < sum(ends.values()):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(Written(r.partition, r.offset, r.key, r.value, dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return out


async def run_service_until_done(settings: config.Settings, kafka: str, topics: Topics) -> None:
    async with running(settings):
        await eventually(lambda: all_done(kafka, topics), timeout=90, what="every record done")


async def test_a_redrive_after_the_api_recovers_delivers_every_dead_letter_once(kafka, topics, sandbox):
    data = WearableData(seed=141)
    users = data.user_ids(6)
    good = data.mixed(users=10, per_user=(3, 12), bundle_share=0.3)
    # Six users, each with samples of a device the API refuses (a partner bug): 3 to 6 per user, so that once
    # redriven they make batches of 3 or more of their own.
    buggy = [r for i, user in enumerate(users) for r in with_device(list(data.records(user, "steps", 3 + i % 4)),
                                                                    BUGGY)]
    invalid = [Record(b"u-bad", INVALID_RECORDS[k], 0) for k in ("malformed_json", "invalid_unit")]
    await set_faults(sandbox, refuse_device_names=[BUGGY])
    await produce(kafka, topics.samples, good + buggy + invalid)
    # Refusals go straight to the DLQ (the refusal-storm guard would hold a 400 while it has no evidence).
    settings = make_settings(kafka, topics, sandbox.url, refusal_storm_guard=False)
    await run_service_until_done(settings, kafka, topics)

    dead = await read_all(kafka, topics.dlq)
    reasons = Counter(d.headers["stream.error.reason"].decode() for d in dead)
    assert reasons == {"api_rejected": len(buggy), "malformed_json": 1, "invalid_unit": 1}
    refused_at = {f"{topics.dlq}/{d.partition}/{d.offset}" for d in dead
                  if d.headers["stream.error.reason"] == b"api_rejected"}
    assert (await sandbox_stats(sandbox))["accepted_samples"] == sum(expected_identities(good).values())

    await set_faults(sandbox)  # the partner fixed its bug
    samples_before = sum((await end_offsets(kafka, topics.samples)).values())
    # A dry run first: counts, a few values, nothing written, nothing committed.
    dry = await redrive(settings, request_for(settings, dry_run=True, show=2))
    assert dry.status == 0
    assert dry.tally.sent == {"api_rejected": len(buggy)}
    assert dry.tally.not_selected == {"malformed_json": 1, "invalid_unit": 1}
    assert len(dry.tally.shown) == 2 and BUGGY in dry.tally.shown[0]
    assert sum((await end_offsets(kafka, topics.samples)).values()) == samples_before
    for reason in RETRYABLE:
        assert await committed_offsets(kafka, progress_group(topics.dlq, reason), topics.dlq) == {}

    # Stopped before it wrote anything (SIGINT at once): status 1, nothing written, nothing passed.
    stopped = asyncio.Event()
    stopped.set()
    halted = await redrive(settings, request_for(settings), stop=stopped)
    assert (halted.status, halted.tally.read) == (1, 0) and "run again" in halted.message
    assert sum((await end_offsets(kafka, topics.samples)).values()) == samples_before

    # A redrive stopped after 7 records, then started again: all of them, once each.
    first = await redrive(settings, request_for(settings, limit=7, chunk=3))
    assert first.status == 0 and first.tally.sent_total == 7
    rest = await redrive(settings, request_for(settings, chunk=3))
    assert rest.status == 0 and rest.tally.sent_total == len(buggy) - 7
    # The second run went on where the first stopped: between them, every DLQ record was read once.
    assert rest.tally.earlier == 0
    assert first.tally.read + rest.tally.read == len(dead)
    redriven = [w for w in await read_all(kafka, topics.samples) if FROM_HEADER in w.headers]
    assert sorted(w.headers[FROM_HEADER].decode() for w in redriven) == sorted(refused_at)
    assert sum((await end_offsets(kafka, topics.samples)).values()) == samples_before + len(buggy)
    for w in redriven:
        event = msgspec.json.decode(w.value)
        assert w.key == event["user_id"].encode()  # keyed as producers key them
        assert w.headers[COUNT_HEADER] == b"1"
        assert w.headers[REASON_HEADER] == b"api_rejected"

    # The service delivers them: every sample reached the API exactly once.
    await run_service_until_done(settings, kafka, topics)
    assert Counter(await accepted_identities(sandbox)) == expected_identities(good + buggy)
    assert len(await read_all(kafka, topics.dlq)) == len(dead)  # nothing dead-lettered again

    # A second redrive sends nothing; run as an operator would (a process), it says so and exits 0.
    env = {**os.environ, **settings_env(settings)}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "stream", "redrive"], env=env,
                                   cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "read 0 records" in done.stdout
    assert sum((await end_offsets(kafka, topics.samples)).values()) == samples_before + len(buggy)

    # --from-beginning reads again but never moves a reason's progress back: the next plain run sends nothing.
    group = progress_group(topics.dlq, "api_rejected")
    progress = await committed_offsets(kafka, group, topics.dlq)
    again = await redrive(settings, request_for(settings, from_beginning=True, limit=2))
    assert again.status == 0 and again.tally.sent_total == 2
    assert await committed_offsets(kafka, group, topics.dlq) == progress
    after = await redrive(settings, request_for(settings))
    assert after.status == 0 and after.tally.sent_total == 0


async def test_a_record_the_api_keeps_refusing_is_redriven_at_most_max_redrives_times(kafka, topics, sandbox):
    data = WearableData(seed=142)
    (user,) = data.user_ids(1)
    buggy = with_device(list(data.records(user, "bpm", 4)), BUGGY)
    await set_faults(sandbox, refuse_device_names=[BUGGY])  # and the partner never fixes it
    await produce(kafka, topics.samples, buggy)
    settings = make_settings(kafka, topics, sandbox.url, refusal_storm_guard=False)
    await run_service_until_done(settings, kafka, topics)

    for round_ in (1, 2):
        outcome = await redrive(settings, request_for(settings, max_redrives=2))
        assert outcome.status == 0
        assert outcome.tally.sent == {"api_rejected": 4}, round_
        await run_service_until_done(settings, kafka, topics)
    dead = await read_all(kafka, topics.dlq)
    assert len(dead) == 12  # refused three times: the original and two redrives
    if hasattr(deadletter, "REDRIVE_COUNT_HEADER"):  # a service that carries the count to the dead letter
        assert Counter(d.headers.get(COUNT_HEADER) for d in dead) == {b"0": 4, b"1": 4, b"2": 4}
    # Otherwise the redrive reads it from the source record each dead letter points at: the same counts.

    last = await redrive(settings, request_for(settings, max_redrives=2))
    assert last.status == 0
    assert last.tally.sent_total == 0
    assert last.tally.over_max == {"api_rejected": 4}
    assert all("redriven 2 times" in at for at in last.tally.over_max_at)
    assert last.tally.unknown_counts == 0
    assert len(await read_all(kafka, topics.dlq)) == 12
    assert (await sandbox_stats(sandbox))["accepted_samples"] == 0
