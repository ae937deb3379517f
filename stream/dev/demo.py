"""`stream demo`: the main job end to end on an embedded default, then a short report.

Starts a local Apache Kafka broker and the sandbox API, writes generated wearable events (with a few bad
records among them), runs the service until every record is done and committed, stops it gracefully and
prints what happened. `stream generate` writes the same kind of events to a Kafka of your choice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TextIO

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
PROGRESS_EVERY_TERMINAL = 0.5  # seconds between two frames of the live line on a terminal
PROGRESS_EVERY_PLAIN = 5.0  # seconds between two progress lines when stdout is not a terminal (a pipe, CI)


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
        progress = Progress(metrics, len(records), valid_samples, started, sys.stdout)
        progress.start()
        deadline = started + args.timeout
        timed_out = False
        try:
            while not await _all_done(bootstrap, settings, metrics, len(records)):
                if task.done():
                    task.result()  # surfaces the error that stopped the service
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                await asyncio.sleep(0.25)
        finally:
            await progress.stop()
        seconds = time.monotonic() - started
        if timed_out:
            print(f"not done after {args.timeout:.0f} s: stopping and reporting what happened", flush=True)
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


class Figures(NamedTuple):
    read: int  # records consumed
    records: int  # records produced
    accepted: int  # samples the API accepted
    valid: int  # valid samples produced
    batches: int  # batches sent
    dead_letters: int  # records dead-lettered


def _figures(metrics: Metrics, records: int, valid: int) -> Figures:
    accepted = sum(v for labels, v in _samples(metrics, "stream_samples_total").items()
                   if dict(labels).get("outcome") == "accepted")
    return Figures(
        read=int(sum(_samples(metrics, "stream_records_consumed_total").values())),
        records=records,
        accepted=int(accepted),
        valid=valid,
        batches=int(sum(_samples(metrics, "stream_batches_total").values())),
        dead_letters=int(sum(_samples(metrics, "stream_dead_letters_total").values())),
    )


def progress_line(elapsed: float, figures: Figures, width: int | None = None) -> str:
    """One line of progress; within `width` characters when given (a shorter wording, then cut)."""
    f = figures
    line = (f"{elapsed:5.1f} s  records read {f.read}/{f.records}  samples accepted {f.accepted}/{f.valid}  "
            f"batches {f.batches}  dead letters {f.dead_letters}")
    if width is None or len(line) <= width:
        return line
    short = (f"{elapsed:.0f} s: read {f.read}/{f.records}, accepted {f.accepted}/{f.valid}, batches {f.batches}, "
             f"dead letters {f.dead_letters}")  # 79 characters for the default demo's figures
    return short[:max(width, 0)]


class LiveLine:
    """One line on a terminal, rewritten in place; `clear` blanks it (before a log line or the report)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown = 0  # characters on the line now
        self._lock = threading.Lock()  # a log line may come from another thread

    def show(self, text: str) -> None:
        with self._lock:
            self._out.write("\r" + text.ljust(self._shown))
            self._out.flush()
            self._shown = len(text)

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self._out.write("\r" + " " * self._shown + "\r")
                self._out.flush()
                self._shown = 0


class _ClearBeforeLogging(logging.Filter):
    """On the log handlers while the live line is shown: blank it first, so a log line starts at column 0 (the
    next frame comes back on the line below)."""

    def __init__(self, line: LiveLine) -> None:
        super().__init__()
        self._line = line

    def filter(self, record: logging.LogRecord) -> bool:
        self._line.clear()
        return True


class Progress:
    """While the demo runs: on a terminal a live line (twice a second), else a plain line every 5 s."""

    def __init__(self, metrics: Metrics, records: int, valid: int, started: float, out: TextIO,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._figures = lambda: _figures(metrics, records, valid)
        self._sleep = sleep
        self._started = started
        self._out = out
        self._terminal = out.isatty()
        self._line = LiveLine(out) if self._terminal else None
        self._guard = _ClearBeforeLogging(self._line) if self._line else None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._guard:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._guard)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        if self._line:
            while True:
                width = shutil.get_terminal_size().columns - 1  # a full line would wrap, and \r would not undo it
                self._line.show(progress_line(time.monotonic() - self._started, self._figures(), width))
                await self._sleep(PROGRESS_EVERY_TERMINAL)
        while True:
            await self._sleep(PROGRESS_EVERY_PLAIN)
            print(progress_line(time.monotonic() - self._started, self._figures()), file=self._out, flush=True)

    async def stop(self) -> None:
        """Stop the updates and blank the live line: what prints next starts on a clean line."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._line:
            self._line.clear()
        if self._guard:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._guard)


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
