"""Three records built to hurt, among normal traffic, against the real service process (issue 10's run):
a 900 KB user_id with 200 empty samples, a bundle of 100,000 numbers, 50,000-deep nesting. Before the input
contract's limits the service peaked at 814 MiB, wrote 26 MiB of dead letters, left the three uncommitted
and did not stop on SIGTERM."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer

from stream.dev.generate import WearableData, produce

from .conftest import accepted_identities, all_done, eventually, make_settings, read_topic, settings_env
from .test_dead_letter_volume import metric_is, peak_rss_mib
from .test_process import expected_identities, free_port, start_service, wait_exit

pytestmark = pytest.mark.integration

HOSTILE = {
    b'{"user_id":"' + b"u" * 900_000 + b'","data_type":"steps","data":[' + b",".join([b"{}"] * 200) + b"]}":
        "field_too_long",
    b'{"user_id":"u","data_type":"steps","data":[' + b",".join([b"1"] * 100_000) + b"]}": "bundle_too_large",
    b'{"user_id":"u","data_type":"steps","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}": "malformed_json",
}
RSS_BOUND_MIB = 250.0
DEAD_LETTER_BOUND_BYTES = 4 << 20
DRAIN_TIMEOUT_SECONDS = 10.0


async def produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=1 << 20, compression_type="lz4")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"u")
    finally:
        await producer.stop()


async def test_hostile_records_among_normal_traffic_cost_little_and_are_committed_past(kafka, topics, sandbox):
    data = WearableData(seed=10)
    before, after = data.mixed(users=30, per_user=(5, 30)), data.mixed(users=30, per_user=(5, 30))
    port = free_port()
    settings = make_settings(kafka, topics, sandbox.url, metrics_port=port,
                             drain_timeout_seconds=DRAIN_TIMEOUT_SECONDS)
    service = start_service(settings_env(settings))
    try:
        await eventually(lambda: metric_is(port, "stream_rebalances_total", 1), what="the service to join")
        await produce(kafka, topics.samples, before)
        await produce_raw(kafka, topics.samples, list(HOSTILE))
        await produce(kafka, topics.samples, after)

        await eventually(lambda: all_done(kafka, topics), timeout=90, what="everything committed, the three too")
        letters = await read_topic(kafka, topics.dlq, expected=len(HOSTILE))
        rss = peak_rss_mib(service.pid)
        service.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        code = await wait_exit(service, DRAIN_TIMEOUT_SECONDS + 20)
        stopped_in = time.monotonic() - stopping
    finally:
        service.kill()

    print(f"\npeak RSS {rss:.0f} MiB; dead letters {sum(len(letter.value) for letter in letters):,} bytes; "
          f"stopped in {stopped_in:.1f} s")
    assert Counter(letter.reason for letter in letters) == Counter(HOSTILE.values())
    assert sum(len(letter.value) for letter in letters) < DEAD_LETTER_BOUND_BYTES
    assert rss < RSS_BOUND_MIB
    assert code == 0 and stopped_in < DRAIN_TIMEOUT_SECONDS + 5
    assert Counter(await accepted_identities(sandbox)) == expected_identities(before + after)
