"""The sync ledger's costs: its restore time (Kafka) and its per-sample cost in the pipeline (in process).

`run`: 1M remembered samples in one ledger partition, read back and loaded. Writes 1,000 ledger records of 1,000
samples each (10 devices x 100 samples a record, 10,000 devices) to a fresh one-partition topic, then times what
an assignment does: stream.ledger_store.read_partition (Kafka), and stream.ledger.Ledger.restore (decode and load
into the packed arrays). Prints seconds and ns per sample.

`per_sample` (no Kafka: `python -m bench.ledgerbench`): what stream.ledger_sync.LedgerSync costs per sample of a
batch, screened before it is sent (`screen`) and recorded once accepted (`record`: the state, the ledger record
built, encoded and handed to a writer), for batches of one user and data type whose samples are all new, and
screened again as a re-sync sends them a second time (all duplicates: nothing recorded).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any

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


# -- per sample, in process --------------------------------------------------------------------------------------

DEVICE_NAMES = ('"iPhone"', '"Apple Watch"', '"J\\u00fcrgen\'s \\"Band\\""')  # the last one with escapes


class _Source:  # what the ledger reads of an Entry's source: .tp.partition
    def __init__(self, partition: int) -> None:
        from stream.offsets import TopicPartition

        self.tp = TopicPartition("samples", partition)


class _Written:  # a write's acknowledgement, never resolved: the bench measures the ledger, not the writer
    def add_done_callback(self, callback: Callable[..., Any]) -> None:
        pass


class _Writer:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, topic: str, key: bytes, value: bytes, headers: list, partition: int | None = None) -> _Written:
        self.bytes += len(key) + len(value)
        return _Written()


def _entry(start: int, body: bytes, source: _Source, offset: int) -> Any:
    """An Entry whatever its current fields (stream.batching is being tuned): the ledger reads start, body, source."""
    from stream.batching import Entry

    fields = getattr(Entry, "__struct_fields__", None) or Entry._fields
    known = {"start": start, "body": body, "source": source, "offset": offset, "timestamp": 1.7e9, "born": 1.7e9}
    return Entry(**{name: known.get(name) for name in fields})


def batches_of(batches: int = 200, size: int = 180, devices: int = 1, users: int = 20,
               seed: int = 11) -> list[tuple[str, list[Any]]]:
    """`batches` batches of `size` samples of one user each, from one source partition: users in turn, each
    user's batches in time order (before `_sync`'s wall clock); with `devices` > 1 the user's devices take turns
    sample by sample (one of them with escapes in its name)."""
    rng = random.Random(seed)
    source = _Source(0)
    clock = {f"user-{u}": 1_699_000_000 * SECOND for u in range(users)}
    out = []
    for b in range(batches):
        user = f"user-{b % users}"
        entries = []
        for i in range(size):
            start = clock[user] = clock[user] + rng.randrange(1, 5) * SECOND
            device = DEVICE_NAMES[i % devices]
            body = (b'{"device_name":%s,"start_date":"%d","unit":"count","value":%d}'
                    % (device.encode(), start // SECOND, rng.randrange(1, 200)))
            entries.append(_entry(start, body, source, b * size + i))
        out.append((user, entries))
    return out


def _sync() -> Any:
    import msgspec

    from stream import config
    from stream.ledger_sync import LedgerSync
    from stream.metrics import Metrics

    class Store:
        async def ensure(self) -> int:
            return 1

    settings = msgspec.convert({"api_token": "t", "metrics_port": 0}, config.Settings)
    sync = LedgerSync(settings, Metrics(), Store(), None, clock=lambda: 0.0, wall=lambda: 1.7e9)  # type: ignore[arg-type]
    sync.partition_count = 1
    sync._new_state(0, 0)  # partition 0 restored (empty)
    sync.ready.add(0)
    return sync


def per_sample(batches: int = 200, size: int = 180, devices: int = 1, repeat: int = 5,
               make: Callable[[], Any] = _sync) -> dict[str, float]:
    """Best of `repeat` µs per sample: screen (all new), record, both, and screen of a re-sync (all duplicates).
    `make` builds the LedgerSync (a fresh one each round)."""
    work = batches_of(batches, size, devices)
    samples = batches * size
    best = {"screen_new_us": float("inf"), "record_us": float("inf"), "screen_duplicate_us": float("inf")}
    for _ in range(repeat):
        sync, writer = make(), _Writer()
        screen = record = 0.0
        for user, entries in work:
            started = time.perf_counter()
            screened = sync.screen(user, "steps", entries)
            screened_at = time.perf_counter()
            sync.record(writer, user, "steps", screened.send)
            screen += screened_at - started
            record += time.perf_counter() - screened_at
            assert len(screened.send) == size
        started = time.perf_counter()
        for user, entries in work:
            assert len(sync.screen(user, "steps", entries).duplicates) == size
        again = time.perf_counter() - started
        for name, seconds in (("screen_new_us", screen), ("record_us", record), ("screen_duplicate_us", again)):
            best[name] = min(best[name], seconds / samples * 1e6)
    best["new_us"] = best["screen_new_us"] + best["record_us"]
    return {"batches": batches, "size": size, "devices": devices, **best}


if __name__ == "__main__":
    for devices in (1, 3):
        row = per_sample(devices=devices)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
