"""`stream demo`: the main job end to end on an embedded default, then a short report.

Starts a local Apache Kafka broker and the sandbox API, writes generated wearable events (with a few bad
records among them), runs the service until every record is done and committed, stops it gracefully and
prints what happened. `stream generate` writes the same kind of events to a Kafka of your choice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import Counter

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from stream import config, logs
from stream.dev.generate import INVALID_RECORDS, Record, WearableData, produce
from stream.dev.localkafka import LocalKafka
from stream.dev.sandbox import SandboxServer
from stream.metrics import Metrics
from stream.pipeline import Pipeline

log = logging.getLogger("stream.dev.demo")

DEMO_TOKEN = "demo-token"


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1000, help="users to generate (default 1000)")
    p.add_argument("--min-samples", type=int, default=3, help="fewest samples per user and data type (default 3)")
    p.add_argument("--max-samples", type=int, default=300, help="most samples per user and data type (default 300)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the input topic (default 4)")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated data (default 7)")
    p.add_argument("--log-level", default="WARNING", help="the service's log level during the demo")
    p.add_argument("--timeout", type=float, default=600, help="give up waiting after this many seconds (600)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = demo_parser().parse_args(argv)
    logs.configure(args.log_level)
    print("starting a local Kafka broker (the first run resolves it from Maven Central, then it is cached) ...",
          flush=True)
    with LocalKafka(port=0) as broker:
        print(f"kafka: {broker.bootstrap}", flush=True)
        report = asyncio.run(_demo(broker.bootstrap, args))
    print(report)
    return 0


async def _demo(bootstrap: str, args: argparse.Namespace) -> str:
    data = WearableData(seed=args.seed)
    records = data.mixed(args.users, (args.min_samples, args.max_samples))
    records += [Record(b"bad-producer", value, 0) for value in INVALID_RECORDS.values()]
    valid_samples = sum(r.samples for r in records)

    async with SandboxServer(token=DEMO_TOKEN, port=0) as sandbox:
        settings = config.load(
            env={},
            overrides={
                "kafka_bootstrap_servers": bootstrap,
                "api_url": sandbox.url,
                "api_token": DEMO_TOKEN,
                # The whole topic is read in seconds: a window that outlasts it gathers each user's samples
                # into one batch, and memory room for all of them avoids early flushes. A tail of 1-2
                # samples that meets no more is parked, then dead-lettered once older than 15 s (24 h in
                # production), so the demo ends.
                "batch_window_seconds": "10",
                "max_buffered_samples": "1000000",
                "min_batch_hold_seconds": "3",
                "min_batch_max_age_seconds": "15",
                "metrics_port": "0",
            },
        )
        await _create_topics(bootstrap, settings, args.partitions)
        print(f"sandbox API: {sandbox.url}; producing {len(records)} records ({valid_samples} valid samples, "
              f"{len(INVALID_RECORDS)} bad records) to '{settings.kafka_topics[0]}' ...", flush=True)
        await produce(bootstrap, settings.kafka_topics[0], records)

        metrics = Metrics()
        pipeline = Pipeline(settings, metrics)
        started = time.monotonic()
        task = asyncio.create_task(pipeline.run())
        print("running `stream run` until every record is done and committed ...", flush=True)
        deadline = started + args.timeout
        while not await _all_done(bootstrap, settings, metrics, len(records)):
            if task.done():
                task.result()  # surfaces the error that stopped the service
            if time.monotonic() > deadline:
                print(f"not done after {args.timeout:.0f} s: stopping and reporting what happened", flush=True)
                break
            await asyncio.sleep(0.25)
        seconds = time.monotonic() - started
        pipeline.stop()
        await task
        stats = sandbox.state.stats()
    return _report(records, valid_samples, metrics, stats, seconds)


async def _create_topics(bootstrap: str, settings: config.Settings, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [*settings.kafka_topics, settings.pending_topic, settings.dlq_topic]
        for name in names:
            try:
                await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def _all_done(bootstrap: str, settings: config.Settings, metrics: Metrics, records: int) -> bool:
    consumed = sum(_samples(metrics, "stream_records_consumed_total").values())
    if consumed < records:
        return False
    try:
        return await _committed_to_end(bootstrap, settings)
    except KafkaError:
        return False


async def _committed_to_end(bootstrap: str, settings: config.Settings) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.kafka_group_id)
        topics = settings.input_topics
        partitions = await _partitions(consumer, topics)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
        await admin.close()
    done = {(tp.topic, tp.partition): meta.offset for tp, meta in committed.items()}
    return all(done.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items() if end > 0)


async def _partitions(consumer: AIOKafkaConsumer, topics: tuple[str, ...]):
    from aiokafka import TopicPartition

    await consumer._client.force_metadata_update()
    return [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]


def _samples(metrics: Metrics, name: str) -> Counter:
    out: Counter = Counter()
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] += sample.value
    return out


def _report(records: list[Record], valid: int, metrics: Metrics, stats: dict, seconds: float) -> str:
    outcomes: Counter = Counter()
    for labels, value in _samples(metrics, "stream_samples_total").items():
        outcomes[dict(labels)["outcome"]] += value
    reasons = {dict(k)["reason"]: int(v) for k, v in _samples(metrics, "stream_dead_letters_total").items() if v}
    batches = int(sum(_samples(metrics, "stream_batches_total").values()))
    lines = [
        "",
        "demo report",
        f"  records produced        {len(records)}",
        f"  valid samples produced  {valid}",
        f"  samples accepted        {int(outcomes['accepted'])}",
        f"  dead-lettered records   {sum(reasons.values())}  {reasons}",
        f"  batches sent            {batches}",
        f"  seconds                 {seconds:.1f}  ({int(outcomes['accepted'] / seconds) if seconds else 0} samples/s)",
    ]
    if stats:
        lines.append(f"  sandbox: requests {stats.get('requests')}, batch sizes {stats.get('min_batch')}.."
                     f"{stats.get('max_batch')}, statuses {stats.get('status_counts')}")
    lonely = reasons.get("below_min_batch", 0)
    ok = int(outcomes["accepted"]) + lonely == valid
    verdict = "OK: every valid sample accepted" + (f" ({lonely} tails of 1-2 samples dead-lettered)" if lonely else "")
    lines.append("  result                  " + (verdict if ok else "INCOMPLETE: samples missing"))
    return "\n".join(lines)


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream generate", description="Write generated wearable events to Kafka.")
    p.add_argument("--bootstrap-servers", default="localhost:9092")
    p.add_argument("--topic", default="samples")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--min-samples", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=300)
    p.add_argument("--invalid", action="store_true", help="add one bad record of each kind")
    p.add_argument("--seed", type=int, default=7)
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    records = WearableData(seed=args.seed).mixed(args.users, (args.min_samples, args.max_samples))
    if args.invalid:
        records += [Record(b"bad-producer", v, 0) for v in INVALID_RECORDS.values()]
    asyncio.run(produce(args.bootstrap_servers, args.topic, records))
    print(f"wrote {len(records)} records ({sum(r.samples for r in records)} valid samples) to {args.topic}")
    return 0
