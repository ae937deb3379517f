"""Restore time of the sync ledger: 1M remembered samples in one ledger partition, read back and loaded.

Writes 1,000 ledger records of 1,000 samples each (10 devices x 100 samples a record, 10,000 devices) to a
fresh one-partition topic, then times what an assignment does: stream.ledger_store.read_partition (Kafka),
and stream.ledger.Ledger.restore (decode and load into the packed arrays). Prints seconds and ns per sample.
"""

from __future__ import annotations

import random
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.ledger import Ledger
from stream.ledger_format import DeviceSamples, LedgerRecord, decode_record, encode_record, pack
from stream.ledger_store import read_partition

SECOND = 10**9
RECORDS, DEVICES, PER_DEVICE = 1000, 10, 100


async def run(bootstrap: str) -> dict[str, float]:
    topic = f"bench-ledger-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    rng = random.Random(5)
    start = 1_780_000_000 * SECOND
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, compression_type="lz4",
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        for r in range(RECORDS):
            devices = []
            for d in range(DEVICES):
                starts = [start + (r * PER_DEVICE + i) * SECOND for i in range(PER_DEVICE)]
                prints = [rng.getrandbits(63) for _ in starts]
                devices.append(DeviceSamples(f'"device-{r % 1000}-{d}"', pack(starts), pack(prints)))
            key, value = encode_record(LedgerRecord(f"user-{r}", "steps", devices))
            await producer.send(topic, value, key=key, partition=0)
        await producer.flush()
    finally:
        await producer.stop()

    started = time.perf_counter()
    restored = await read_partition({"bootstrap_servers": bootstrap}, topic, 0, timeout=120)
    read = time.perf_counter() - started
    ledger = Ledger(horizon_ns=30 * 86400 * SECOND, max_bytes=1 << 31, max_per_device=1_000_000)
    samples = ledger.restore(0, [decode_record(value) for value in restored.values])
    total = time.perf_counter() - started
    return {
        "samples": samples,
        "bytes": sum(len(v) for v in restored.values),
        "read_seconds": read,
        "restore_seconds": total,
        "ns_per_sample": total / samples * 1e9,
        "resident_mb": ledger.resident_bytes / 1e6,
    }
