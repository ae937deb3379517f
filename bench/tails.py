"""What tails of 1-2 samples cost once the input is read (`python -m bench.tails`).

As a new user would try it: one `stream run` (the defaults but STREAM_BATCH_WINDOW_SECONDS=--window, so the
sync ledger is on) consumes a fresh topic (--partitions) of an existing broker (--bootstrap) while a producer
writes --events single-sample events into it: each event from a random one of --users users, of a data type
the user sends (steps and heart rate, or just steps for a --steps-only share of the users), each (user, data
type)'s samples in chronological order. The sandbox API (normal mode: it keeps every accepted sample) takes
the batches. Once the service consumed every produced record (stream_records_consumed_total of the input
topic) and a short settle passed, no more input comes for --after seconds: whatever the service writes to
its pending topic (`<group id>-pending`) then is tails of 1-2 samples being parked, again and again or not.

Figures per contender:
  backlog s                 produce start until the last sample the sandbox accepted before a quiet spell of
                            the batch window + 3 s that began after every input record was consumed (what is
                            still held then is tails: parked or waiting to be); also the time to consume;
  requests / samples        what the sandbox accepted by the end of the settle, samples per request and
                            requests per 1,000 samples;
  pending records /min      growth of the pending topic's end offsets (sum over partitions) per minute over
                            the --after window, over its second half, and per waiting tail;
  tails waiting             stream_resting_tails (when the tree has it), stream_buffers and
                            stream_buffered_samples at the end of the window;
  dead letters              the DLQ topic's end offsets;
  CPU s                     the service's user+sys seconds during the backlog and during the window;
  accounting                distinct samples accepted, duplicates, and produced - accepted - buffered.

The pure part (scraped counts and offsets into figures) is in plain functions, tested in
tests/bench/test_tails.py. Contenders: `new` (this tree) and `old` (the tree given by --old-tree, run with
PYTHONPATH on it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import proc, rolling
from bench.rolling import TOKEN, _open_log, child_env, free_port, tail

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.5  # seconds between scrapes while the backlog is read
SAMPLE_EVERY = 5.0  # seconds between samples of the pending topic's end offsets after the backlog
QUIET = 3.0  # the backlog ends once the sandbox accepted nothing for this long (plus the batch window)
GAUGES = ("stream_resting_tails", "stream_buffers", "stream_buffered_samples")


# ------------------------------------------------------------------------------------------- pure figures


def prom_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of a series' samples whose labels include `labels` (all label sets when none given) in a
    Prometheus text exposition; None when the series is absent altogether."""
    total, seen = 0.0, False
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in (" ", "{"):
            continue
        head, _, value = line.rpartition(" ")
        if wanted:
            inside = head[head.find("{") + 1 : head.rfind("}")] if "{" in head else ""
            parts = set(inside.split(","))
            if not all(w in parts for w in wanted):
                continue
        total += float(value)
        seen = True
    return total if seen else None


def data_type_plan(users: int, events: int, seed: int, steps_only_share: float) -> tuple[list[int], list[list[str]]]:
    """(for each event the index of its (user, data type) key, each user's data types).

    Each user sends steps and heart rate ("bpm"), or just steps with probability `steps_only_share`; each
    event is a uniformly random user and, among that user's data types, a uniformly random one. Keys are
    numbered user * 2 + (0 steps, 1 bpm).
    """
    rng = random.Random(seed)
    types = [["steps"] if rng.random() < steps_only_share else ["steps", "bpm"] for _ in range(users)]
    order = []
    for _ in range(events):
        u = rng.randrange(users)
        kinds = types[u]
        order.append(u * 2 + (rng.randrange(len(kinds)) if len(kinds) > 1 else 0))
    return order, types


def tail_records(events: int, users: int, seed: int = 7, steps_only_share: float = 0.5) -> list[tuple[bytes, bytes]]:
    """`events` single-sample (key, value) records in random order of users, per data_type_plan; each
    (user, data type)'s samples are chronological in the list (stream.dev.generate's WearableData)."""
    from stream.dev.generate import WearableData

    data = WearableData(seed=seed)
    user_ids = data.user_ids(users)
    order, _ = data_type_plan(users, events, seed, steps_only_share)
    counts: dict[int, int] = {}
    for k in order:
        counts[k] = counts.get(k, 0) + 1
    lanes: dict[int, list[tuple[bytes, bytes]]] = {}
    for k in sorted(counts):
        user_id, data_type = user_ids[k // 2], ("steps", "bpm")[k % 2]
        lanes[k] = [(r.key, r.value) for r in data.records(user_id, data_type, counts[k])][::-1]
    return [lanes[k].pop() for k in order]


def per_minute(series: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Growth of a cumulative count per minute between the samples nearest to `start` and `end` (the
    first at or after start, the last at or before end); None with fewer than two such samples."""
    inside = [(t, v) for t, v in series if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, v0), (t1, v1) = inside[0], inside[-1]
    return (v1 - v0) / (t1 - t0) * 60.0


def ratio(numerator: float | None, denominator: float | None, scale: float = 1.0) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator * scale


@dataclass
class Observations:
    """What one run saw, raw."""

    produced: int
    produce_start: float  # epoch seconds
    consumed_at: float  # the input topic's records all consumed
    last_accept: float  # the sandbox's last acceptance before the quiet spell that ended the backlog
    backlog_end: float  # the end of that quiet spell: the window after the backlog starts here
    sandbox_at_backlog: dict[str, Any]  # /_sandbox/stats at backlog_end
    sandbox_at_end: dict[str, Any]  # /_sandbox/stats at the end of the window
    pending: list[tuple[float, float]]  # (epoch seconds, pending topic end offsets summed), from backlog_end on
    pending_at_start: float  # pending end offsets at backlog_end
    metrics_at_backlog: str  # /metrics at backlog_end
    metrics_at_end: str  # /metrics at the end of the window
    dead_letters: float  # DLQ end offsets at the end
    cpu: tuple[float, float, float]  # service CPU s at produce start, backlog_end, end of the window
    distinct: int  # distinct (user, data type, start_date) the sandbox accepted
    duplicates: int  # accepted more than once
    window_end: float


def figures(obs: Observations) -> dict[str, Any]:
    """Everything printed for one run, from its raw observations."""
    backlog_stats, end_stats = obs.sandbox_at_backlog, obs.sandbox_at_end
    requests = backlog_stats.get("requests", 0)
    accepted = backlog_stats.get("accepted_samples", 0)
    start, end = obs.backlog_end, obs.window_end
    whole = per_minute(obs.pending, start, end)
    second_half = per_minute(obs.pending, start + (end - start) / 2, end)
    m_end = obs.metrics_at_end
    resting = prom_sum(m_end, "stream_resting_tails")
    buffers = prom_sum(m_end, "stream_buffers")
    buffered = prom_sum(m_end, "stream_buffered_samples") or 0.0
    tails = resting if resting is not None else buffers
    pending_end = obs.pending[-1][1] if obs.pending else obs.pending_at_start
    return {
        "produced": obs.produced,
        "backlog_s": max(obs.last_accept, obs.consumed_at) - obs.produce_start,
        "consumed_s": obs.consumed_at - obs.produce_start,
        "requests": requests,
        "samples_accepted": accepted,
        "samples_per_request": ratio(accepted, requests),
        "requests_per_1000": ratio(requests, accepted, 1000.0),
        "rejected_samples": end_stats.get("rejected_samples", 0),
        "non_200": sum(n for status, n in (end_stats.get("status_counts") or {}).items() if status != "200"),
        "min_batch": backlog_stats.get("min_batch"),
        "buffered_at_backlog": prom_sum(obs.metrics_at_backlog, "stream_buffered_samples"),
        "buffers_at_backlog": prom_sum(obs.metrics_at_backlog, "stream_buffers"),
        "pending_at_backlog": obs.pending_at_start,
        "pending_in_window": pending_end - obs.pending_at_start,
        "pending_per_min": whole,
        "pending_per_min_2nd_half": second_half,
        "pending_per_tail_min": ratio(second_half, tails),
        "resting_tails": resting,
        "buffers": buffers,
        "buffered_samples": buffered,
        "requests_in_window": end_stats.get("requests", 0) - requests,
        "accepted_in_window": end_stats.get("accepted_samples", 0) - accepted,
        "samples_per_request_window": ratio(
            end_stats.get("accepted_samples", 0) - accepted, end_stats.get("requests", 0) - requests
        ),
        "dead_letters": obs.dead_letters,
        "cpu_backlog_s": obs.cpu[1] - obs.cpu[0],
        "cpu_window_s": obs.cpu[2] - obs.cpu[1],
        "distinct_accepted": obs.distinct,
        "duplicates": obs.duplicates,
        "unaccounted": obs.produced - obs.distinct - int(buffered),
        "window_s": end - start,
    }


ROWS = (
    ("samples produced", "produced", "{:,}"),
    ("backlog s", "backlog_s", "{:.1f}"),
    ("  input consumed after s", "consumed_s", "{:.1f}"),
    ("requests (backlog)", "requests", "{:,}"),
    ("samples accepted (backlog)", "samples_accepted", "{:,}"),
    ("samples per request", "samples_per_request", "{:.2f}"),
    ("requests per 1,000 samples", "requests_per_1000", "{:.1f}"),
    ("smallest batch", "min_batch", "{}"),
    ("samples per request, window", "samples_per_request_window", "{:.2f}"),
    ("buffered samples at backlog end", "buffered_at_backlog", "{:,.0f}"),
    ("buffers at backlog end", "buffers_at_backlog", "{:,.0f}"),
    ("pending records at backlog end", "pending_at_backlog", "{:,.0f}"),
    ("after: window s", "window_s", "{:.0f}"),
    ("after: pending records written", "pending_in_window", "{:,.0f}"),
    ("after: pending records /min", "pending_per_min", "{:,.0f}"),
    ("  2nd half of window /min", "pending_per_min_2nd_half", "{:,.0f}"),
    ("  per tail per min", "pending_per_tail_min", "{:.2f}"),
    ("after: resting tails (end)", "resting_tails", "{:,.0f}"),
    ("after: buffers (end)", "buffers", "{:,.0f}"),
    ("after: buffered samples (end)", "buffered_samples", "{:,.0f}"),
    ("after: requests", "requests_in_window", "{:,}"),
    ("after: samples accepted", "accepted_in_window", "{:,}"),
    ("dead letters", "dead_letters", "{:,.0f}"),
    ("rejected samples / non-200", "rejected_and_errors", "{}"),
    ("CPU s, backlog", "cpu_backlog_s", "{:.1f}"),
    ("CPU s, after window", "cpu_window_s", "{:.1f}"),
    ("distinct samples accepted", "distinct_accepted", "{:,}"),
    ("duplicates", "duplicates", "{:,}"),
    ("produced - accepted - buffered", "unaccounted", "{:,}"),
)


def table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A plain table: one row per figure, one column per run."""
    shown = [(name, {**result, "rejected_and_errors":
                     f"{result.get('rejected_samples', 0)} / {result.get('non_200', 0)}"}) for name, result in runs]
    return rolling.table(shown, ROWS)


# --------------------------------------------------------------------------- helper processes (subcommands)


async def produce_records(bootstrap: str, topic: str, events: int, users: int, seed: int, share: float) -> None:
    """Generate the records, print "producing <epoch>", write them, print {"produced": n, "seconds": s}."""
    from bench import data

    records = tail_records(events, users, seed, share)
    print(f"producing {time.time():.3f}", flush=True)
    seconds = await data.produce(bootstrap, topic, records)
    print(json.dumps({"produced": len(records), "seconds": seconds}), flush=True)


# ----------------------------------------------------------------------------------------------- the run


class Scenario:
    def __init__(self, args: argparse.Namespace, contender: str, workdir: Path) -> None:
        self.args = args
        self.contender = contender
        self.workdir = workdir
        self.tag = f"{contender}-{uuid.uuid4().hex[:6]}"
        self.tree = str(ROOT) if contender == "new" else args.old_tree
        self.topic = f"tails-{self.tag}"
        self.group = f"tails-{self.tag}"
        self.pending_topic = f"{self.group}-pending"  # the default: not set for the service
        self.dlq_topic = f"tails-dlq-{self.tag}"
        self.http: Any = None

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.tag}: {message}", file=sys.stderr, flush=True)

    async def get(self, url: str) -> tuple[int, str]:
        import aiohttp

        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, ""

    async def sandbox_stats(self) -> dict[str, Any]:
        status, text = await self.get(self.sandbox_url + "/_sandbox/stats")
        return json.loads(text) if status == 200 else {}

    async def metrics(self) -> str:
        return (await self.get(f"http://127.0.0.1:{self.metrics_port}/metrics"))[1]

    async def offsets(self, consumer: Any, topic: str) -> float:
        from aiokafka import TopicPartition

        parts = [TopicPartition(topic, p) for p in range(self.args.partitions)]
        return float(sum((await consumer.end_offsets(parts)).values()))

    async def execute(self) -> dict[str, Any]:
        import aiohttp
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        args = self.args
        admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(n, num_partitions=args.partitions, replication_factor=1)
                    for n in (self.topic, self.pending_topic, self.dlq_topic)
                ]
            )
        finally:
            await admin.close()
        self.http = aiohttp.ClientSession()
        offsets = AIOKafkaConsumer(bootstrap_servers=args.bootstrap)
        await offsets.start()
        helpers: list[asyncio.subprocess.Process] = []
        service: asyncio.subprocess.Process | None = None
        log = self.workdir / f"{self.tag}-stream.log"
        try:
            sandbox, self.sandbox_url = await rolling.start_sandbox()
            helpers.append(sandbox)

            self.metrics_port = free_port()
            env = child_env(
                self.tree,
                STREAM_KAFKA_BOOTSTRAP_SERVERS=args.bootstrap,
                STREAM_KAFKA_TOPICS=self.topic,
                STREAM_KAFKA_GROUP_ID=self.group,
                STREAM_DLQ_TOPIC=self.dlq_topic,
                STREAM_API_URL=self.sandbox_url,
                STREAM_API_TOKEN=TOKEN,
                STREAM_METRICS_PORT=str(self.metrics_port),
                STREAM_BATCH_WINDOW_SECONDS=str(args.window),
            )
            with _open_log(log) as out:
                service = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "stream", "run", stdout=out, stderr=out, env=env, cwd=self.workdir
                )
            deadline = time.monotonic() + 120
            while (await self.get(f"http://127.0.0.1:{self.metrics_port}/readyz"))[0] != 200:
                if service.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stream run not ready: {tail(log)}")
                await asyncio.sleep(0.2)
            self.log("service ready; generating and producing")

            producer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.tails", "_produce", "--bootstrap", args.bootstrap, "--topic",
                self.topic, "--events", str(args.events), "--users", str(args.users), "--seed", str(args.seed),
                "--steps-only-share", str(args.steps_only_share),
                stdout=asyncio.subprocess.PIPE, env=child_env(str(ROOT)), cwd=ROOT,
            )  # fmt: skip
            helpers.append(producer)
            assert producer.stdout is not None
            line = (await asyncio.wait_for(producer.stdout.readline(), 300)).decode()
            if not line.startswith("producing"):
                raise RuntimeError(f"producer: {line!r}")
            produce_start = float(line.split()[1])
            cpu0 = proc.cpu_seconds(service.pid)
            produced_info: dict[str, Any] = {}

            async def read_producer() -> None:
                assert producer.stdout is not None
                while text := (await producer.stdout.readline()).decode().strip():
                    if text.startswith("{"):
                        produced_info.update(json.loads(text))
                    else:
                        self.log(f"producer: {text}")

            reader = asyncio.create_task(read_producer())
            consumed = 0.0
            deadline = time.monotonic() + args.timeout
            while consumed < args.events:
                if service.returncode is not None:
                    raise RuntimeError(f"stream run exited {service.returncode}: {tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {consumed:.0f} of {args.events} consumed after {args.timeout:.0f} s")
                await asyncio.sleep(POLL)
                consumed = prom_sum(await self.metrics(), "stream_records_consumed_total", topic=self.topic) or 0.0
            consumed_at = time.time()
            await asyncio.wait_for(reader, 120)
            self.log(f"{consumed:.0f} consumed after {consumed_at - produce_start:.1f} s "
                     f"(producer: {produced_info}); waiting for the sandbox to go quiet")  # fmt: skip
            accepted, last_accept = -1, consumed_at
            while (now := time.time()) - last_accept < args.window + QUIET:
                count = (await self.sandbox_stats()).get("accepted_samples", 0)
                if count != accepted:
                    accepted, last_accept = count, now
                if service.returncode is not None:
                    raise RuntimeError(f"stream run exited {service.returncode}: {tail(log)}")
                await asyncio.sleep(POLL)
            backlog_end = time.time()
            metrics_at_backlog = await self.metrics()
            stats_at_backlog = await self.sandbox_stats()
            pending0 = await self.offsets(offsets, self.pending_topic)
            cpu1 = proc.cpu_seconds(service.pid)
            series = [(backlog_end, pending0)]
            self.log(f"backlog done: {stats_at_backlog.get('requests')} requests, "
                     f"{stats_at_backlog.get('accepted_samples')} samples; watching {args.after:.0f} s")  # fmt: skip
            window_end = backlog_end + args.after
            while (now := time.time()) < window_end:
                await asyncio.sleep(min(SAMPLE_EVERY, window_end - now))
                series.append((time.time(), await self.offsets(offsets, self.pending_topic)))
            window_end = series[-1][0]
            metrics_at_end = await self.metrics()
            stats_at_end = await self.sandbox_stats()
            cpu2 = proc.cpu_seconds(service.pid)
            dead = await self.offsets(offsets, self.dlq_topic)
            status, text = await self.get(self.sandbox_url + "/_rolling/summary")
            summary = json.loads(text) if status == 200 else {"distinct": 0, "duplicates": 0}
            service.send_signal(signal.SIGTERM)
            stop_sent = time.monotonic()
            try:
                await asyncio.wait_for(service.wait(), 90)
            except TimeoutError:
                self.log("stream run did not exit in 90 s: SIGKILL")
                service.kill()
                await service.wait()
            exit_s = time.monotonic() - stop_sent
            pending_after_stop = await self.offsets(offsets, self.pending_topic)
        finally:
            if service is not None and service.returncode is None:
                service.kill()
                await service.wait()
            await rolling.stop_helpers(helpers)
            await offsets.stop()
            await self.http.close()

        result = figures(Observations(
            produced=int(produced_info.get("produced", args.events)), produce_start=produce_start,
            consumed_at=consumed_at, last_accept=last_accept, backlog_end=backlog_end,
            sandbox_at_backlog=stats_at_backlog,
            sandbox_at_end=stats_at_end, pending=series, pending_at_start=pending0,
            metrics_at_backlog=metrics_at_backlog, metrics_at_end=metrics_at_end, dead_letters=dead,
            cpu=(cpu0, cpu1, cpu2), distinct=summary["distinct"], duplicates=summary["duplicates"],
            window_end=window_end,
        ))  # fmt: skip
        result["produce_s"] = produced_info.get("seconds")
        result["exit_s"] = exit_s
        result["exit_code"] = service.returncode
        result["pending_parked_at_stop"] = pending_after_stop - series[-1][1]
        result["pending_series"] = series
        result["dead_letter_reasons"] = {
            line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics_at_end.splitlines()
            if line.startswith("stream_dead_letters_total{")
        }
        result["sandbox_end"] = stats_at_end
        result["log"] = str(log)
        parked = result["pending_parked_at_stop"]
        self.log(f"exit {service.returncode} after {exit_s:.1f} s; parked at stop: {parked:.0f}")
        return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tails", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="an existing Kafka broker")
    p.add_argument("--events", type=int, default=1_000_000, help="single-sample events (1000000)")
    p.add_argument("--users", type=int, default=50_000, help="users (50000)")
    p.add_argument(
        "--steps-only-share",
        type=float,
        default=0.5,
        help="share of users sending steps only; the others send steps and heart rate (0.5)",
    )
    p.add_argument("--window", type=float, default=1.0, help="STREAM_BATCH_WINDOW_SECONDS (1)")
    p.add_argument("--after", type=float, default=180.0, help="seconds watched after the backlog (180)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the input, pending and DLQ topics (4)")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds the backlog may take (900)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--contenders", default="new", help="comma list of new, old")
    p.add_argument("--old-tree", default="/tmp/oldtails", help="tree of the old contender (PYTHONPATH)")
    p.add_argument("--output", type=Path, help="write the figures as JSON here too")
    return p.parse_args(argv)


async def run_all(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    workdir = Path(tempfile.mkdtemp(prefix="tails-"))
    print(f"logs in {workdir}", file=sys.stderr)
    return [(c, await Scenario(args, c, workdir).execute()) for c in args.contenders.split(",")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_produce"]:
        p = argparse.ArgumentParser()
        p.add_argument("--bootstrap")
        p.add_argument("--topic")
        p.add_argument("--events", type=int)
        p.add_argument("--users", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--steps-only-share", type=float)
        a = p.parse_args(argv[1:])
        asyncio.run(produce_records(a.bootstrap, a.topic, a.events, a.users, a.seed, a.steps_only_share))
        return 0
    args = parse_args(argv)
    runs = asyncio.run(run_all(args))
    print(f"tails: {args.events:,} single-sample events of {args.users:,} users (steps only: "
          f"{args.steps_only_share:.0%}), {args.partitions} partitions, window {args.window:g} s, "
          f"then {args.after:g} s without input; defaults otherwise (ledger on, hold 30 s)")  # fmt: skip
    print(table(runs))
    if args.output:
        args.output.write_text(json.dumps(dict(runs), indent=2, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
