"""Dead letters at volume: an incident that makes a hundred thousand records invalid at once must not wedge
the producer, the event loop or the group membership, and must not flood the logs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream.deadletter import MAX_PENDING_BYTES
from stream.dev.generate import WearableData, produce

from .conftest import (
    accepted_identities,
    all_done,
    create_topics,
    end_offsets,
    eventually,
    make_settings,
    running,
    settings_env,
)
from .test_process import expected_identities, free_port, log_tail, metric, start_service, wait_exit

pytestmark = pytest.mark.integration

INVALID = 100_000
WRITE_BOUND_SECONDS = 60.0  # measured here: see the README ("Dead letters at volume")
RSS_BOUND_MIB = 300.0  # the README's memory bound with the defaults


async def produce_many(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=512 * 1024,
                                compression_type="lz4")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(topic, value, key=b"bad-%d" % (i % 1000))
        await producer.flush()
    finally:
        await producer.stop()


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_a_hundred_thousand_dead_letters_at_once_keep_the_service_and_the_group_healthy(
    kafka, topics, sandbox
):
    data = WearableData(seed=91)
    before, after = data.mixed(users=50, per_user=(5, 30)), data.mixed(users=50, per_user=(5, 30))
    valid = before + after
    sample = {**data.samples("steps", 1)[0], "value": -1}
    invalid = [msgspec.json.encode({"user_id": f"user-{i % 1000}", "data_type": "steps", **sample})
               for i in range(INVALID)]
    port = free_port()
    # A window long enough that each user's records, produced in one go, leave as one batch (no tails).
    settings = make_settings(kafka, topics, sandbox.url, metrics_port=port, drain_timeout_seconds=10.0,
                             batch_window_seconds=3.0)
    service = start_service(settings_env(settings))
    try:
        await eventually(lambda: metric_is(port, "stream_rebalances_total", 1), what="the service to join")
        started = time.monotonic()
        await produce(kafka, topics.samples, before)
        await produce_many(kafka, topics.samples, invalid)
        await produce(kafka, topics.samples, after)
        await eventually(lambda: dead_letters_at_least(port, INVALID), timeout=WRITE_BOUND_SECONDS * 2,
                         what="every dead letter written")
        took = time.monotonic() - started
        await eventually(lambda: all_done(kafka, topics), timeout=60, what="everything committed")
        assert await metric(port, "stream_rebalances_total") == 1, "the member lost its partitions"
        rss = peak_rss_mib(service.pid)
        service.send_signal(signal.SIGTERM)
        assert await wait_exit(service, 30) == 0
    finally:
        service.kill()
    log = log_tail(service, limit=None)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    events = Counter(line.get("event") for line in lines)
    print(f"\n{INVALID} dead letters in {took:.1f} s; peak RSS {rss:.0f} MiB; log events {dict(events)}")
    assert took < WRITE_BOUND_SECONDS
    assert rss < RSS_BOUND_MIB
    assert events["revoke_timeout"] == 0
    noisy = sum(n for e, n in events.items() if e in {"write_retry", "dead_letter", "fetch_failed", "commit_failed"})
    assert len(lines) < 100 and noisy < 100, f"{len(lines)} log lines"
    assert Counter(await accepted_identities(sandbox)) == expected_identities(valid)
    ends = await end_offsets(kafka, topics.dlq)
    assert sum(ends.values()) == INVALID, "a dead letter written twice or missing"


async def metric_is(port: int, name: str, value: float) -> bool:
    return await metric(port, name) == value


async def dead_letters_at_least(port: int, n: int) -> bool:
    # Counted when queued; written when nothing is pending any more.
    return await metric(port, "stream_dead_letters_total") >= n and await metric(port, "stream_pending_writes") == 0


async def test_waiting_writes_are_bounded_by_bytes_too(kafka, topics, sandbox):
    """Large dead letters (the records are big) pause fetching by their bytes, long before their count would."""
    big = [b'{"user_id": "u", "data_type": "steps", "junk": "' + b"x" * 200_000 + b'", "value": -1}'] * 600
    dlq = topics.dlq + "-small"
    await create_topics(kafka, [dlq], partitions=1)
    await _unwritable(kafka, dlq)
    await produce_many(kafka, topics.samples, big)
    settings = make_settings(kafka, topics, sandbox.url, dlq_topic=dlq, kafka_max_poll_records=50)
    async with running(settings) as pipeline:
        await eventually(lambda: asyncio.sleep(0, result=pipeline.metrics.paused._value.get() == 1),
                         what="fetching to pause on bytes")
        assert pipeline.writer.pending < 600
        assert pipeline.writer.pending_bytes < MAX_PENDING_BYTES + 60 * 210_000


async def _unwritable(kafka: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        tiny = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": "64"})
        await admin.alter_configs([tiny])
    finally:
        await admin.close()
