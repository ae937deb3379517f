"""Integration fixtures: one real Kafka broker for the session, a sandbox API per test, pipeline runners.

The broker is the project's own LocalKafka (Apache Kafka from Maven Central, KRaft, single node). Set
STREAM_TEST_BOOTSTRAP to use a broker that is already running instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from stream import config
from stream.dev.localkafka import LocalKafka
from stream.dev.sandbox import SandboxServer
from stream.pipeline import Pipeline

TOKEN = "integration-token"


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    existing = os.environ.get("STREAM_TEST_BOOTSTRAP")
    if existing:
        asyncio.run(wait_for_group_coordinator(existing))  # a broker started just before may not serve groups yet
        yield existing
        return
    broker = LocalKafka(port=0)
    broker.start()
    try:
        asyncio.run(wait_for_group_coordinator(broker.bootstrap))
        yield broker.bootstrap
    finally:
        broker.stop()


async def wait_for_group_coordinator(bootstrap: str, timeout: float = 60.0) -> None:
    """A fresh broker creates __consumer_offsets on the first group request; wait until groups work."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await committed_offsets(bootstrap, "warm-up", "none")
            return
        except KafkaError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def dedicated_broker(name: str, **options: object) -> AsyncIterator[tuple[LocalKafka, Topics]]:
    """A broker of the test's own (to kill, restart or secure it) with fresh topics; stopped on exit."""
    broker = LocalKafka(port=0, **options)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, broker.start)  # blocking: kept off the loop the pipeline runs on
    try:
        await wait_for_group_coordinator(broker.bootstrap)
        topics = Topics(f"samples-{name}", f"dlq-{name}", f"pending-{name}", f"group-{name}")
        await create_topics(broker.bootstrap, [topics.samples, topics.dlq, topics.pending], partitions=4)
        yield broker, topics
    finally:
        await loop.run_in_executor(None, broker.stop)


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = SandboxServer(token=TOKEN, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Topics(msgspec.Struct):
    samples: str
    dlq: str
    pending: str
    group: str


@pytest.fixture
async def topics(kafka: str) -> Topics:
    """Fresh topic names and group for one test, created up front with 4 partitions each."""
    tag = uuid.uuid4().hex[:8]
    names = Topics(f"samples-{tag}", f"dlq-{tag}", f"pending-{tag}", f"group-{tag}")
    await create_topics(kafka, [names.samples, names.dlq, names.pending], partitions=4)
    return names


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


def make_settings(kafka: str, topics: Topics, api_url: str, **overrides: object) -> config.Settings:
    values: dict[str, object] = {
        "kafka_bootstrap_servers": kafka,
        "kafka_topics": (topics.samples,),
        "kafka_group_id": topics.group,
        "dlq_topic": topics.dlq,
        "pending_topic": topics.pending,
        "api_url": api_url,
        "api_token": TOKEN,
        "batch_window_seconds": 0.3,
        "min_batch_hold_seconds": 1.0,
        "min_batch_max_age_seconds": 60.0,
        "commit_interval_seconds": 0.2,
        "retry_backoff_first_seconds": 0.05,
        "retry_backoff_max_seconds": 0.5,
        "drain_timeout_seconds": 10.0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return msgspec.convert(values, config.Settings)


def settings_env(settings: config.Settings) -> dict[str, str]:
    """The same settings as STREAM_* variables, for a `stream run` subprocess."""
    env: dict[str, str] = {}
    for field in settings.__struct_fields__:
        value = getattr(settings, field)
        env[config.env_name(field)] = ",".join(value) if isinstance(value, tuple) else str(value)
    return env


@contextlib.asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[Pipeline]:
    """Run a pipeline in this event loop; on exit stop it gracefully and re-raise anything it raised."""
    pipeline = Pipeline(settings)
    task = asyncio.create_task(pipeline.run())
    try:
        yield pipeline
    finally:
        pipeline.stop()
        await asyncio.wait_for(task, timeout=60)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll a condition until it holds; the sleep only paces the polling, the condition is what we wait for."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def all_committed(bootstrap: str, group: str, topic: str) -> bool:
    """Committed offsets reach the end of every non-empty partition of the topic."""
    ends = await end_offsets(bootstrap, topic)
    committed = await committed_offsets(bootstrap, group, topic)
    return all(committed.get(p, 0) >= end for p, end in ends.items() if end > 0)


async def all_done(bootstrap: str, topics: Topics) -> bool:
    """Input and pending topics committed to their ends: every sample accepted, dead-lettered or... nothing
    left parked either (a parked buffer is a record of the pending topic not yet consumed back)."""
    return await all_committed(bootstrap, topics.group, topics.samples) and await all_committed(
        bootstrap, topics.group, topics.pending
    )


class DeadLetter(msgspec.Struct):
    value: bytes
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers["stream.error.reason"]


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[DeadLetter]:
    """Read at least `expected` records from the start of a topic (all partitions)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    out: list[DeadLetter] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend(
                    DeadLetter(r.value or b"", {k: v.decode() for k, v in r.headers}) for r in records
                )
        # Anything beyond the expected count within a short grace period is a bug too: read it.
        batches = await consumer.getmany(timeout_ms=300)
        for records in batches.values():
            out.extend(DeadLetter(r.value or b"", {k: v.decode() for k, v in r.headers}) for r in records)
    finally:
        await consumer.stop()
    return out


def sample_identity(user_id: str, data_type: str, sample: dict) -> tuple:
    """What makes a sample itself, independent of how its timestamp was spelled on the way."""
    start = datetime.fromisoformat(sample["start_date"])
    return (user_id, data_type, sample["device_name"], start.timestamp(), float(sample["value"]), sample["unit"])


async def accepted_identities(sandbox: SandboxServer) -> list[tuple]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(sandbox.url + "/_sandbox/accepted") as r:
        items = await r.json()
    return [sample_identity(i["user_id"], i["data_type"], i) for i in items]


async def sandbox_stats(sandbox: SandboxServer) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(sandbox.url + "/_sandbox/stats") as r:
        return await r.json()


async def set_faults(sandbox: SandboxServer, **faults: object) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.put(sandbox.url + "/_sandbox/faults", json=faults) as r:
        assert r.status == 200, await r.text()
