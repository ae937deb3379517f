"""Contenders (a) and (b): a plain aiokafka consumer that reads the topic and discards each record, or that
also decodes each value with msgspec into a Struct of the event shape. The client's ceilings.

Run as a subprocess by the benchmark (``python -m bench.consume``): it joins its own consumer group with the
service's consumer settings, counts records, and prints one JSON line per mark on stdout (``first``,
``p25``, ``p75``, ``p99``, ``done``) with the wall time (time.time()) it was reached. After ``done`` it
waits for its stdin to close, so the benchmark can read its CPU time and peak RSS from /proc before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import msgspec
from aiokafka import AIOKafkaConsumer


class Event(msgspec.Struct, gc=False):
    """One single-sample event, as the service's input contract describes it."""

    user_id: str
    data_type: str
    device_name: str
    start_date: str
    unit: str
    value: int | float
    device_version: str | None = None
    end_date: str | None = None


def _emit(mark: str, count: int, **extra: object) -> None:
    times = os.times()
    line = {"mark": mark, "t": time.time(), "n": count, "self_cpu": times.user + times.system, **extra}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def consume(args: argparse.Namespace) -> None:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        client_id="bench-" + args.mode,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the service
        max_poll_records=args.max_poll_records,  # as the service's default
        enable_auto_commit=True,  # a consumer group that commits what it read, without per-record work
    )
    decode = msgspec.json.Decoder(Event).decode if args.mode == "msgspec" else None
    expect, mark99 = args.expect, int(args.expect * 0.99)
    quarters = [("p25", int(args.expect * 0.25)), ("p75", int(args.expect * 0.75))]
    count = 0
    first = p99 = False
    await consumer.start()
    try:
        while count < expect:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                if decode is not None:
                    for record in records:
                        decode(record.value)
                count += len(records)
            if not batches:
                continue
            if not first:
                first = True
                _emit("first", count)
            while quarters and count >= quarters[0][1]:
                _emit(quarters.pop(0)[0], count)
            if not p99 and count >= mark99:
                p99 = True
                _emit("p99", count)
        _emit("done", count)
        sys.stdin.read()  # the benchmark reads /proc, then closes our stdin
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.consume", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--expect", type=int, required=True, help="records in the topic: stop after reading them")
    p.add_argument("--mode", choices=("plain", "msgspec"), default="plain")
    p.add_argument("--max-poll-records", type=int, default=5000)
    asyncio.run(consume(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
