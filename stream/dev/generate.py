"""Realistic wearable events for the demo, the tests and the benchmarks: steps and heart rate per user.

Deterministic for a seed. Each user wears a phone and/or a watch; steps come in short walking intervals
(unit `count`), heart rate as point readings (unit `count/min`) that follow a slow random walk. A share
of records can be made invalid on purpose (one of each kind the service must dead-letter).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import msgspec

_encode = msgspec.json.encode

DEVICES = (("iPhone", "17.0.3"), ("Apple Watch", "10.1"), ("Pixel 8", "14"), ("Galaxy Watch6", "5.0"))

# One malformed record per kind; the key is the reason the service must give it.
INVALID_RECORDS: dict[str, bytes] = {
    "malformed_json": b'{"user_id": "u-bad", "data_type": "steps", ',
    "not_an_object": b'["steps", 14]',
    "missing_field": b'{"data_type": "steps", "device_name": "iPhone", "start_date": "2023-11-01T08:04:51+00:00",'
    b' "unit": "count", "value": 3}',
    "invalid_data_type": b'{"user_id": "u-bad", "data_type": "sleep", "device_name": "iPhone",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "count", "value": 3}',
    "invalid_unit": b'{"user_id": "u-bad", "data_type": "steps", "device_name": "iPhone",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "steps", "value": 3}',
    "invalid_value": b'{"user_id": "u-bad", "data_type": "steps", "device_name": "iPhone",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "count", "value": 0}',
    "value_above_max": b'{"user_id": "u-bad", "data_type": "bpm", "device_name": "Apple Watch",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "count/min", "value": 301}',
    "invalid_date": b'{"user_id": "u-bad", "data_type": "steps", "device_name": "iPhone",'
    b' "start_date": "yesterday", "unit": "count", "value": 3}',
    "end_before_start": b'{"user_id": "u-bad", "data_type": "steps", "device_name": "iPhone",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "end_date": "2023-11-01T08:04:50+00:00",'
    b' "unit": "count", "value": 3}',
    "invalid_user_id": b'{"user_id": "", "data_type": "steps", "device_name": "iPhone",'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "count", "value": 3}',
    "invalid_field": b'{"user_id": "u-bad", "data_type": "steps", "device_name": 42,'
    b' "start_date": "2023-11-01T08:04:51+00:00", "unit": "count", "value": 3}',
    "empty_bundle": b'{"user_id": "u-bad", "data_type": "steps", "data": []}',
}


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    value: bytes
    samples: int  # valid samples inside


class WearableData:
    def __init__(self, seed: int = 7, start: datetime | None = None) -> None:
        self._rng = random.Random(seed)
        self._start = start or datetime(2026, 11, 1, 6, 0, tzinfo=timezone(timedelta(hours=1)))

    def user_ids(self, count: int) -> list[str]:
        return [str(uuid.UUID(int=self._rng.getrandbits(128), version=4)) for _ in range(count)]

    def samples(self, data_type: str, count: int) -> list[dict[str, object]]:
        """`count` chronological samples of one data type from one device."""
        rng = self._rng
        device, version = rng.choice(DEVICES)
        at = self._start + timedelta(seconds=rng.randint(0, 3600))
        heart = rng.uniform(58, 80)
        out: list[dict[str, object]] = []
        for _ in range(count):
            if data_type == "steps":
                length = rng.randint(5, 120)
                value: float = rng.randint(1, max(2, length * 2))
                end = at + timedelta(seconds=length)
                unit = "count"
            else:
                heart = min(200.0, max(40.0, heart + rng.gauss(0, 3)))
                value, end, unit = round(heart), at, "count/min"
            out.append(
                {
                    "device_name": device,
                    "device_version": version,
                    "start_date": at.isoformat(timespec="milliseconds"),
                    "end_date": end.isoformat(timespec="milliseconds"),
                    "value": value,
                    "unit": unit,
                }
            )
            at = end + timedelta(seconds=rng.randint(1, 300))
        return out

    def records(
        self, user_id: str, data_type: str, count: int, bundle_size: int = 1
    ) -> Iterator[Record]:
        """`count` samples of one user as records: single-sample events, or bundles of up to `bundle_size`."""
        samples = self.samples(data_type, count)
        key = user_id.encode()
        if bundle_size <= 1:
            for sample in samples:
                yield Record(key, _encode({"user_id": user_id, "data_type": data_type, **sample}), 1)
            return
        for i in range(0, len(samples), bundle_size):
            chunk = samples[i : i + bundle_size]
            yield Record(key, _encode({"user_id": user_id, "data_type": data_type, "data": chunk}), len(chunk))

    def mixed(self, users: int, per_user: tuple[int, int], bundle_share: float = 0.2) -> list[Record]:
        """A shuffled day of data: each user sends both data types, sometimes as bundles."""
        out: list[Record] = []
        for user_id in self.user_ids(users):
            for data_type in ("steps", "bpm"):
                count = self._rng.randint(*per_user)
                bundle = self._rng.randint(2, 50) if self._rng.random() < bundle_share else 1
                out.extend(self.records(user_id, data_type, count, bundle))
        # Interleave users as real traffic does, but keep each user's records in their own order.
        return _interleave(out, self._rng)


def _interleave(records: list[Record], rng: random.Random) -> list[Record]:
    lanes: dict[bytes, list[Record]] = {}
    for record in records:
        lanes.setdefault(record.key, []).append(record)
    queues = [list(reversed(lane)) for lane in lanes.values()]
    out: list[Record] = []
    while queues:
        i = rng.randrange(len(queues))
        out.append(queues[i].pop())
        if not queues[i]:
            queues[i] = queues[-1]
            queues.pop()
    return out


async def produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    """Write records to Kafka keyed by user_id (so one partition holds a user's samples)."""
    from aiokafka import AIOKafkaProducer  # only the producing commands need a producer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=r.value, key=r.key) for r in records]
        await producer.flush()
        for future in futures:
            await future
    finally:
        await producer.stop()
