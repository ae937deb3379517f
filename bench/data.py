"""The benchmark's data: generated wearable events written to fresh topics of the local broker."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from stream.dev.generate import WearableData

DATA_TYPES = ("steps", "bpm")


def throughput_records(events: int, users: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """`events` single-sample events of `users` users (both data types), interleaved as real traffic is.

    Each (user, data type) gets an equal share (the remainder spread over the first keys); a key's events
    keep their chronological order in the topic.
    """
    data = WearableData(seed=seed)
    keys = [(u, t) for u in data.user_ids(users) for t in DATA_TYPES]
    share, extra = divmod(events, len(keys))
    lanes: list[list[tuple[bytes, bytes]]] = []
    for i, (user_id, data_type) in enumerate(keys):
        count = share + (i < extra)
        if count:
            lanes.append([(r.key, r.value) for r in data.records(user_id, data_type, count)][::-1])
    rng = random.Random(seed)
    out: list[tuple[bytes, bytes]] = []
    while lanes:  # pick a random key for each next event, keeping each key's own order
        i = rng.randrange(len(lanes))
        lane = lanes[i]
        out.append(lane.pop())
        if not lane:
            lanes[i] = lanes[-1]
            lanes.pop()
    return out


def session_records(
    events: int, users: int, seed: int = 7, concurrent: int = 50, lengths: tuple[int, int] = (30, 300)
) -> list[tuple[bytes, bytes]]:
    """`events` single-sample events of phones syncing in sessions: `concurrent` sessions active at a time.

    A session is one user's upload of one data type: `lengths[0]`-`lengths[1]` consecutive samples (uniform),
    sent as single-sample events keyed by user_id. At each next event one of the active sessions is picked
    at random and sends its next sample; when a session ends a new one starts at once, for a random (user,
    data type) not active at that moment (another user, or the same one later). A (user, data type) thus never
    has two sessions active at once, and its sessions follow one another in time: every (user, data type)'s
    events are in chronological order in the topic, as in throughput_records. The users are the same as
    throughput_records' for the same seed and count. The topic ends after `events` events: the sessions still
    active then are cut short. `concurrent` is capped at the number of (user, data type) pairs.
    """
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"lengths must be 1 <= min <= max, got {lengths}")
    data = WearableData(seed=seed)
    keys = [(u, t) for u in data.user_ids(users) for t in DATA_TYPES]
    concurrent = max(1, min(concurrent, len(keys)))
    rng = random.Random(seed)
    # Pass 1, counts only: which (user, data type) sends each event.
    active: set[int] = set()
    slot_key: list[int] = []
    slot_left: list[int] = []

    def start(slot: int | None) -> None:
        while True:
            k = rng.randrange(len(keys))
            if k not in active:
                break
        active.add(k)
        if slot is None:
            slot_key.append(k)
            slot_left.append(rng.randint(lo, hi))
        else:
            slot_key[slot], slot_left[slot] = k, rng.randint(lo, hi)

    for _ in range(concurrent):
        start(None)
    order: list[int] = []
    counts = [0] * len(keys)
    for _ in range(events):
        slot = rng.randrange(concurrent)
        k = slot_key[slot]
        order.append(k)
        counts[k] += 1
        slot_left[slot] -= 1
        if not slot_left[slot]:
            active.discard(k)
            start(slot)
    # Pass 2: each (user, data type)'s samples, chronological over all its sessions, handed out in event order.
    lanes: dict[int, list[tuple[bytes, bytes]]] = {}
    for k, count in enumerate(counts):
        if count:
            user_id, data_type = keys[k]
            lanes[k] = [(r.key, r.value) for r in data.records(user_id, data_type, count)][::-1]
    return [lanes[k].pop() for k in order]


def many_keys_records(keys: int, seed: int = 13) -> tuple[list[tuple[bytes, bytes]], int]:
    """One record per sample for `keys` distinct users with 1 or 2 samples each (one data type per user).

    Returns (records, samples). Samples come from a small pool of realistic ones: only the user differs.
    """
    data = WearableData(seed=seed)
    pool = [(t, s) for t in DATA_TYPES for s in data.samples(t, 500)]
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    out: list[tuple[bytes, bytes]] = []
    half = len(pool) // 2
    for user_id in data.user_ids(keys):
        key = user_id.encode()
        base = half * rng.randrange(2)  # one data type per user: one key per user
        for _ in range(rng.randint(1, 2)):
            data_type, sample = pool[base + rng.randrange(half)]
            out.append((key, encode({"user_id": user_id, "data_type": data_type, **sample})))
    rng.shuffle(out)
    return out, len(out)


def dead_letter_records(count: int, users: int, seed: int = 19) -> list[tuple[bytes, bytes]]:
    """`count` single-sample events of `users` users, each valid but for its value (-1): every one is a dead
    letter of reason `invalid_value`, and nothing ever goes to the API.

    Samples come from a small pool of realistic ones (only the user and the value differ); keyed by user,
    in a random order of users.
    """
    data = WearableData(seed=seed)
    pool = [(t, s) for t in DATA_TYPES for s in data.samples(t, 500)]
    user_ids = data.user_ids(users)
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    out: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        user_id = user_ids[rng.randrange(users)]
        data_type, sample = pool[rng.randrange(len(pool))]
        out.append((user_id.encode(), encode({"user_id": user_id, "data_type": data_type, **sample, "value": -1})))
    return out


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Write keyed records (default partitioner: a user's records share a partition); returns seconds."""
    started = time.monotonic()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=50, max_batch_size=1024 * 1024, compression_type=None
    )
    await producer.start()
    try:
        send = producer.send
        futures = [await send(topic, value=value, key=key) for key, value in records]
        await producer.flush()
        for future in futures:
            future.result()  # raises if a write failed
    finally:
        await producer.stop()
    return time.monotonic() - started


async def wait_for_group_coordinator(bootstrap: str, timeout: float = 60.0) -> None:
    """A fresh broker creates __consumer_offsets on the first group request: do it before any timing."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            await admin.list_consumer_group_offsets("bench-warm-up")
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
        finally:
            await admin.close()


async def end_offsets(bootstrap: str, topic: str) -> int:
    """Records in the topic (sum of the partitions' end offsets)."""
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()
    return sum(ends.values())
