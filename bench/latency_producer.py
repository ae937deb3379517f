"""Produce single-sample events at a fixed rate for the latency run (a subprocess of the benchmark).

Each event carries its production time twice: as the Kafka record timestamp (CreateTime, ms) and, with ns
precision, in the sample's ``device_version`` (a free-form string the API passes through), so the benchmark
can match every sample the API accepts with the moment it was produced, on the same clock (time.time()).
Prints one JSON line at the end: how many were produced, over how long, and how far the pacing fell behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import msgspec
from aiokafka import AIOKafkaProducer

from stream.dev.generate import WearableData

TICK = 0.002  # seconds between pacing checks


def _pool(users: int, seed: int, per_key: int = 32) -> list[tuple[bytes, str, str, list[dict[str, object]]]]:
    data = WearableData(seed=seed)
    return [
        (user_id.encode(), user_id, data_type, data.samples(data_type, per_key))
        for user_id in data.user_ids(users)
        for data_type in ("steps", "bpm")
    ]


async def produce(args: argparse.Namespace) -> dict[str, float]:
    pool = _pool(args.users, args.seed)
    encode = msgspec.json.Encoder().encode
    total = int(args.rate * args.seconds)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=2, max_batch_size=256 * 1024)
    await producer.start()
    sent = 0
    behind = 0.0
    try:
        start = time.monotonic()
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * args.rate) + 1)
            if due - sent > 1:
                behind = max(behind, (due - sent - 1) / args.rate)
            while sent < due:
                key, user_id, data_type, samples = pool[sent % len(pool)]
                sample = samples[(sent // len(pool)) % len(samples)]
                ns = time.time_ns()
                value = encode({"user_id": user_id, "data_type": data_type, **sample, "device_version": str(ns)})
                await producer.send(args.topic, value=value, key=key, timestamp_ms=ns // 1_000_000)
                sent += 1
            await asyncio.sleep(max(0.0, start + (sent / args.rate) - time.monotonic(), TICK / 4))
        elapsed = time.monotonic() - start
        await producer.flush()
    finally:
        await producer.stop()
    return {"produced": sent, "seconds": elapsed, "rate": sent / elapsed, "max_behind_seconds": behind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency_producer", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--rate", type=float, default=20_000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=11)
    result = asyncio.run(produce(p.parse_args(argv)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
