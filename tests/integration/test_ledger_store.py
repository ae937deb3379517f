"""The ledger topic against a real broker: created to match the input topics, read back latest-per-key up to
the end captured at the start, one user forgotten or summarised, and how fast a restore of 1M samples is."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream.ledger import Ledger
from stream.ledger_format import DeviceSamples, LedgerRecord, decode_record, encode_record, pack, unpack
from stream.ledger_store import (
    DAY_MS,
    LedgerTopicError,
    ensure_ledger_topic,
    forget_user,
    iso_utc,
    read_partition,
    show_user,
)

from .conftest import Topics, eventually

pytestmark = pytest.mark.integration

HORIZON = 7 * 86400.0
SECOND = 10**9


def opts(kafka: str) -> dict:
    return {"bootstrap_servers": kafka, "client_id": "ledger-store-test"}


async def topic_configs(kafka: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [(code, message, _type, _name, entries)] = response.resources
    assert code == 0, message
    return {name: value for name, value, *_ in entries}


async def existing_topics(kafka: str) -> dict[str, list[dict]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        return {t["topic"]: t["partitions"] for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def new_topic(kafka: str, partitions: int, **configs: str) -> str:
    name = f"ledger-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()
    await listed(kafka, name)
    return name


async def listed(kafka: str, *names: str) -> None:
    """Wait until the broker's metadata lists the topics: a topic created a moment ago may not be yet."""

    async def all_listed() -> bool:
        return set(names) <= set(await existing_topics(kafka))

    await eventually(all_listed, timeout=30, what=f"topics {names} in the metadata")


async def produce(kafka: str, topic: str, items: list[tuple[int, bytes, bytes | None]]) -> None:
    """(partition, key, value) records, acknowledged before returning."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka, acks="all", linger_ms=5, max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        sent = [await producer.send(topic, key=k, value=v, partition=p) for p, k, v in items]
        await producer.flush()
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def record(user: str, data_type: str, devices: dict[str, list[tuple[int, int]]]) -> LedgerRecord:
    return LedgerRecord(
        user,
        data_type,
        [DeviceSamples(d, pack([s for s, _ in pairs]), pack([p for _, p in pairs])) for d, pairs in devices.items()],
    )


# --- ensure_ledger_topic ------------------------------------------------------------------------------------


async def test_ensure_creates_the_topic_with_the_input_partitions_and_the_ledger_configs(kafka: str, topics: Topics):
    wider = await new_topic(kafka, 6)
    await listed(kafka, topics.samples, topics.pending)
    ledger = f"{topics.group}-ledger"  # STREAM_LEDGER_TOPIC's default
    assert ledger == f"{topics.group}-ledger"

    partitions = await ensure_ledger_topic(opts(kafka), ledger, [topics.samples, wider, topics.pending], HORIZON)

    assert partitions == 6
    described = (await existing_topics(kafka))[ledger]
    assert len(described) == 6 and all(len(p["replicas"]) == 1 for p in described)  # one broker: factor 1
    configs = await topic_configs(kafka, ledger)
    assert configs["cleanup.policy"] == "compact,delete"
    assert configs["retention.ms"] == str(int(HORIZON * 1000) + DAY_MS)
    assert configs["segment.ms"] == "3600000"
    assert configs["delete.retention.ms"] == str(DAY_MS)


async def test_ensure_is_idempotent_and_keeps_an_operators_configs(kafka: str, topics: Topics):
    await listed(kafka, topics.samples)
    ledger = f"{topics.group}-ledger"  # STREAM_LEDGER_TOPIC's default
    assert await ensure_ledger_topic(opts(kafka), ledger, [topics.samples], HORIZON) == 4
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, ledger, {
            "cleanup.policy": "compact,delete", "retention.ms": "123456789"})])
    finally:
        await admin.close()

    assert await ensure_ledger_topic(opts(kafka), ledger, [topics.samples], 2 * HORIZON) == 4

    assert (await topic_configs(kafka, ledger))["retention.ms"] == "123456789"


async def test_two_members_starting_at_once_both_get_the_topic(kafka: str, topics: Topics):
    await listed(kafka, topics.samples)
    ledger = f"{topics.group}-ledger"  # STREAM_LEDGER_TOPIC's default
    results = await asyncio.gather(
        *(ensure_ledger_topic(opts(kafka), ledger, [topics.samples], HORIZON) for _ in range(3))
    )
    assert results == [4, 4, 4]


async def test_ensure_refuses_a_ledger_topic_with_fewer_partitions_than_an_input_topic(kafka: str, topics: Topics):
    wider = await new_topic(kafka, 8)
    await listed(kafka, topics.samples)
    ledger = await new_topic(kafka, 4, **{"cleanup.policy": "compact"})

    with pytest.raises(LedgerTopicError) as refused:
        await ensure_ledger_topic(opts(kafka), ledger, [topics.samples, wider], HORIZON)

    message = str(refused.value)
    assert ledger in message and wider in message and "4 partitions" in message and "has 8" in message
    assert topics.samples not in message  # 4 partitions, as many as the ledger: not the problem
    assert f"--alter --topic {ledger} --partitions 8" in message


async def test_a_missing_input_topic_is_skipped_and_not_created(kafka: str, topics: Topics):
    missing = f"not-yet-{uuid.uuid4().hex[:8]}"
    ledger = f"{topics.group}-ledger"  # STREAM_LEDGER_TOPIC's default

    assert await ensure_ledger_topic(opts(kafka), ledger, [missing], HORIZON) == 1

    assert missing not in await existing_topics(kafka)


async def test_an_existing_ledger_topic_without_compaction_is_warned_about(kafka: str, topics: Topics, caplog):
    ledger = await new_topic(kafka, 4, **{"cleanup.policy": "delete"})
    await listed(kafka, topics.samples)
    with caplog.at_level(logging.WARNING, logger="stream.ledger"):
        assert await ensure_ledger_topic(opts(kafka), ledger, [topics.samples], HORIZON) == 4
    assert [r.event for r in caplog.records if r.name == "stream.ledger"] == ["ledger_topic_not_compacted"]
    assert (await topic_configs(kafka, ledger))["cleanup.policy"] == "delete"  # warned, not changed


# --- read_partition -----------------------------------------------------------------------------------------


async def test_read_partition_returns_the_latest_value_per_key_without_tombstoned_keys(kafka: str):
    ledger = await new_topic(kafka, 2)
    await produce(kafka, ledger, [
        (1, b"a", b"a1"), (1, b"b", b"b1"), (1, b"c", b"c1"), (0, b"x", b"other partition"),
        (1, b"a", b"a2"), (1, b"b", None), (1, b"c", None), (1, b"c", b"c2"),
    ])

    restored = await read_partition(opts(kafka), ledger, 1, timeout=30)

    assert sorted(restored.values) == [b"a2", b"c2"]
    assert restored.records == 7 and restored.end_offset == 7


async def test_read_partition_of_an_empty_partition_returns_at_once(kafka: str):
    ledger = await new_topic(kafka, 2)
    restored = await read_partition(opts(kafka), ledger, 0, timeout=10)
    assert (restored.values, restored.records, restored.end_offset) == ([], 0, 0)


async def test_read_partition_stops_at_the_end_it_saw_first_while_records_keep_coming(kafka: str):
    ledger = await new_topic(kafka, 1)
    await produce(kafka, ledger, [(0, f"k{i}".encode(), f"v{i}".encode()) for i in range(200)])
    writing = asyncio.Event()
    stop = asyncio.Event()

    async def keep_writing() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks=1)
        await producer.start()
        try:
            i = 200
            while not stop.is_set():
                await producer.send_and_wait(ledger, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0)
                writing.set()
                i += 1
            return i
        finally:
            await producer.stop()

    writer = asyncio.create_task(keep_writing())
    await writing.wait()
    try:
        restored = await read_partition(opts(kafka), ledger, 0, timeout=30)
    finally:
        stop.set()
        written = await writer

    # The partition never stopped growing, yet the read ended, with exactly the records below its end offset.
    assert restored.end_offset > 200 and written > restored.end_offset
    assert sorted(restored.values) == sorted(f"v{i}".encode() for i in range(restored.end_offset))
    assert restored.records == restored.end_offset


async def test_read_partition_reads_committed_records_only_and_does_not_wait_for_an_open_transaction(kafka: str):
    ledger = await new_topic(kafka, 1)
    await produce(kafka, ledger, [(0, b"plain", b"plain")])
    producer = AIOKafkaProducer(bootstrap_servers=kafka, transactional_id=f"ledger-test-{uuid.uuid4().hex[:8]}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(ledger, key=b"committed", value=b"committed", partition=0)
        await producer.begin_transaction()
        await producer.send_and_wait(ledger, key=b"aborted", value=b"aborted", partition=0)
        await producer.abort_transaction()
        await producer.begin_transaction()
        await producer.send_and_wait(ledger, key=b"open", value=b"open", partition=0)

        restored = await read_partition(opts(kafka), ledger, 0, timeout=30)

        await producer.abort_transaction()
    finally:
        await producer.stop()
    assert sorted(restored.values) == [b"committed", b"plain"]


async def test_read_partition_raises_timeout_error_when_the_time_is_up(kafka: str):
    ledger = await new_topic(kafka, 1)
    await produce(kafka, ledger, [(0, b"k", b"v")])
    with pytest.raises(TimeoutError):
        await read_partition(opts(kafka), ledger, 0, timeout=0.001)


# --- forget_user and show_user ------------------------------------------------------------------------------


async def test_forget_user_tombstones_that_users_records_only(kafka: str):
    ledger = await new_topic(kafka, 2)
    items = []
    for partition, user, data_type in [(0, "ann", "steps"), (1, "ann", "steps"), (1, "ann", "heart_rate"),
                                       (0, "bob", "steps"), (1, "anna", "steps")]:
        key, value = encode_record(record(user, data_type, {'"Watch"': [(partition * SECOND, 7)]}))
        items.append((partition, key, value))
    await produce(kafka, ledger, items)

    def users(restored) -> list[tuple[str, str]]:
        return sorted((r.user_id, r.data_type) for r in map(decode_record, restored.values))

    markers = 2  # a forget marker in each partition, found records or not
    assert await forget_user(opts(kafka), ledger, "ann", "steps", timeout=30) == 2 + markers
    assert users(await read_partition(opts(kafka), ledger, 0, timeout=30)) == [("bob", "steps")]
    assert users(await read_partition(opts(kafka), ledger, 1, timeout=30)) == [("ann", "heart_rate"), ("anna", "steps")]

    assert await forget_user(opts(kafka), ledger, "ann", None, timeout=30) == 1 + markers
    assert await forget_user(opts(kafka), ledger, "ann", None, timeout=30) == markers  # no live record is left
    assert users(await read_partition(opts(kafka), ledger, 1, timeout=30)) == [("anna", "steps")]


async def test_show_user_summarises_per_data_type_and_device(kafka: str):
    ledger = await new_topic(kafka, 2)
    t0 = 1_714_000_000 * SECOND
    first = record("ann", "steps", {'"Watch"': [(t0, 1), (t0 + 60 * SECOND, 2)], '"Phone"': [(t0 + 5, 3)]})
    second = record("ann", "steps", {'"Watch"': [(t0 + 60 * SECOND, 2), (t0 + 120 * SECOND + 500, 4)]})
    other_type = record("ann", "heart_rate", {'"Watch"': [(t0, 9)]})
    other_user = record("bob", "steps", {'"Watch"': [(t0 - SECOND, 1)]})
    await produce(kafka, ledger, [(0, *encode_record(first)), (1, *encode_record(second)),
                                  (1, *encode_record(other_type)), (0, *encode_record(other_user))])

    summaries = await show_user(opts(kafka), ledger, "ann", "steps", timeout=30)

    assert [(s.data_type, s.device, s.records, s.samples, s.oldest, s.watermark) for s in summaries] == [
        ("steps", '"Phone"', 1, 1, iso_utc(t0 + 5), iso_utc(t0 + 5)),
        ("steps", '"Watch"', 2, 3, iso_utc(t0), iso_utc(t0 + 120 * SECOND + 500)),
    ]
    assert summaries[1].watermark == "2024-04-24T23:08:40.000000500Z"
    assert [s.data_type for s in await show_user(opts(kafka), ledger, "ann", None, timeout=30)] == [
        "heart_rate", "steps", "steps"]
    assert await show_user(opts(kafka), ledger, "nobody", None, timeout=30) == []


async def test_show_user_refuses_a_missing_ledger_topic_without_creating_it(kafka: str):
    missing = f"no-ledger-{uuid.uuid4().hex[:8]}"
    with pytest.raises(LedgerTopicError, match="does not exist"):
        await show_user(opts(kafka), missing, "ann", None, timeout=30)
    assert missing not in await existing_topics(kafka)


# --- the CLI ------------------------------------------------------------------------------------------------


async def stream_ledger(kafka: str, group: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    env |= {"STREAM_KAFKA_BOOTSTRAP_SERVERS": kafka, "STREAM_KAFKA_GROUP_ID": group}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream", "ledger", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out.decode(), err.decode()


async def test_cli_shows_and_forgets_a_user(kafka: str, topics: Topics):
    await listed(kafka, topics.samples)
    ledger = f"{topics.group}-ledger"  # STREAM_LEDGER_TOPIC's default
    assert await ensure_ledger_topic(opts(kafka), ledger, [topics.samples], HORIZON) == 4
    t0 = 1_714_000_000 * SECOND
    await produce(kafka, ledger, [
        (2, *encode_record(record("ann", "steps", {'"Watch"': [(t0, 1), (t0 + SECOND, 2)]}))),
        (3, *encode_record(record("bob", "steps", {'"Watch"': [(t0, 1)]}))),
    ])

    status, out, err = await stream_ledger(kafka, topics.group, "show", "--user", "ann", "--json")
    assert status == 0, err
    assert msgspec.json.decode(out) == [{"data_type": "steps", "device": '"Watch"', "records": 1, "samples": 2,
                                         "oldest": "2024-04-24T23:06:40Z", "watermark": "2024-04-24T23:06:41Z"}]
    status, out, err = await stream_ledger(kafka, topics.group, "show", "--user", "ann")
    assert status == 0, err
    assert "WATERMARK" in out and '"Watch"' in out and "2024-04-24T23:06:41Z" in out

    status, _, err = await stream_ledger(kafka, topics.group, "forget", "--user", "ann")
    assert status == 2 and "--yes" in err  # no terminal to confirm on
    assert len((await read_partition(opts(kafka), ledger, 2, timeout=30)).values) == 1

    status, out, err = await stream_ledger(kafka, topics.group, "forget", "--user", "ann", "--yes")
    assert status == 0, err
    assert "wrote 5 tombstones" in out and "1 of its records, a forget marker per partition" in out
    assert (await read_partition(opts(kafka), ledger, 2, timeout=30)).values == []
    assert len((await read_partition(opts(kafka), ledger, 3, timeout=30)).values) == 1

    status, out, err = await stream_ledger(kafka, "other-group", "show", "--user", "bob", "--topic", ledger, "--json")
    assert status == 0, err
    assert [s["records"] for s in msgspec.json.decode(out)] == [1]


async def test_cli_says_so_when_the_ledger_topic_is_missing(kafka: str):
    status, _, err = await stream_ledger(kafka, f"no-group-{uuid.uuid4().hex[:8]}", "show", "--user", "ann")
    assert status == 1 and "does not exist" in err


# --- how fast a restore is ----------------------------------------------------------------------------------


async def test_restoring_a_million_samples(kafka: str, capsys):
    """1,000 ledger records of 1,000 samples each (10 devices x 100), 10,000 devices in all, in one partition:
    read back and decoded into arrays, as a restore at assignment does."""
    ledger = await new_topic(kafka, 1)
    rng = random.Random(7)
    t0 = 1_714_000_000 * SECOND
    items = []
    for r in range(1000):
        devices = {
            f'"device-{r}-{d}"': [(t0 + (r * 100 + i) * SECOND, rng.getrandbits(63)) for i in range(100)]
            for d in range(10)
        }
        items.append((0, *encode_record(record(f"user-{r}", "steps", devices))))
    await produce(kafka, ledger, items)

    started = time.perf_counter()
    restored = await read_partition(opts(kafka), ledger, 0, timeout=60)
    read_seconds = time.perf_counter() - started
    samples = prints = 0
    for value in restored.values:
        for device in decode_record(value).devices:
            samples += len(unpack(device.starts))
            prints += len(unpack(device.prints))
    decoded_seconds = time.perf_counter() - started
    book = Ledger(horizon_ns=30 * 86400 * SECOND, max_bytes=1 << 30, max_per_device=200_000)
    loaded = book.restore(0, [decode_record(value) for value in restored.values])
    seconds = time.perf_counter() - started

    assert samples == prints == loaded == book.entries == 1_000_000 and restored.records == 1000
    with capsys.disabled():
        print(f"\nledger restore: 1,000,000 samples in 1,000 records ({sum(len(v) for v in restored.values) / 1e6:.1f}"
              f" MB): read {read_seconds:.2f} s, read + decode {decoded_seconds:.2f} s, into the ledger "
              f"{seconds:.2f} s ({seconds / 1e6 * 1e9:.0f} ns per sample, {book.resident_bytes / 1e6:.0f} MB resident)")
    assert seconds < 20
