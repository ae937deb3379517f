"""What a rolling restart of the consumer group costs under load (`python -m bench.rolling`).

A Kubernetes Deployment's RollingUpdate with maxSurge 0, maxUnavailable 1 and minReadySeconds N, simulated
with subprocesses: R replicas of `stream run` in one group read fresh topics of an existing broker
(--bootstrap) while a producer writes single-sample wearable events at a steady rate (many users, keyed by
user_id, so every partition gets traffic) and the sandbox API (normal mode: it keeps every accepted sample)
takes the batches. After a steady spell each replica in turn gets SIGTERM, exits, is replaced, the
replacement answers 200 on /readyz, then N seconds pass before the next. The load goes on a while, stops
(the last thing each (user, data type) sends is three samples, so no tail of 1-2 samples is left to be
parked: parking is not what this measures), and once everything produced reached the sandbox (or a
timeout) every replica gets SIGTERM.

Figures, over the window from the first SIGTERM of the roll to the end of the load:
  rebalances        group generations (`assigned` log events of all members, clustered in time) and
                    the `assigned` events themselves;
  group stall s     seconds in which the sandbox accepted no sample while samples were waiting
                    (produced - accepted > 0), sampled every 0.25 s; and the longest such spell;
  member STW s      per member, time from each `revoked` to its next `assigned` log line, summed over members;
  produced / distinct accepted / duplicates / lost   (a duplicate: one (user, data type, start_date)
                    accepted twice; lost: produced but never accepted);
  restores          stream_ledger_restore_seconds_count (partitions held back for a restore or catch-up),
                    restored samples and kept partitions, from /metrics scraped before each SIGTERM.

The pure part (log lines and samples into figures) is in plain functions, tested in tests/bench/test_rolling.py.
Contenders: `new` (this tree) and `old` (an older tree given by --old-tree, run with PYTHONPATH on it).
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "rolling-token"
TICK = 0.25  # seconds between samples of the sandbox's accepted count
GENERATION_GAP = 1.0  # `assigned` events of all members closer than this belong to one generation
LEDGER_SERIES = (
    "stream_ledger_restore_seconds_count",
    "stream_ledger_restore_seconds_sum",
    "stream_ledger_restored_samples_total",
    "stream_ledger_kept_partitions_total",
)


# ------------------------------------------------------------------------------------------- pure figures


def parse_ts(text: str) -> float:
    """The log's `ts` ("2026-11-29T22:38:18.123Z", UTC) as epoch seconds."""
    whole, _, rest = text.partition(".")
    millis = int(rest.rstrip("Z") or 0)
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + millis / 1000


def log_entries(lines: Iterable[str], events: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON log lines (with a `ts`) whose event is one of `events`, in order; other lines skipped."""
    wanted = set(events)
    for line in lines:
        if '"event"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") in wanted and "ts" in entry:
            yield entry


def group_events(lines: Iterable[str]) -> list[tuple[float, str]]:
    """(epoch seconds, "assigned" | "revoked") of a process's JSON log lines, in order; other lines skipped."""
    return [(parse_ts(entry["ts"]), entry["event"]) for entry in log_entries(lines, ("assigned", "revoked"))]


OWNERSHIP_EVENTS = ("assigned", "revoked", "draining", "stopped")


def ownership_events(lines: Iterable[str], topic: str) -> list[tuple[float, str, frozenset[int]]]:
    """(epoch seconds, event, partition numbers of `topic`) of a member's assigned/revoked/draining/stopped lines.

    `draining` (a stop request: fetching ends) and `stopped` carry no partitions: they end all ownership.
    """
    out: list[tuple[float, str, frozenset[int]]] = []
    for entry in log_entries(lines, OWNERSHIP_EVENTS):
        numbers = set()
        for name in str(entry.get("partitions") or "").split(","):
            base, _, number = name.strip().rpartition("-")
            if base == topic and number.isdigit():
                numbers.add(int(number))
        out.append((parse_ts(entry["ts"]), entry["event"], frozenset(numbers)))
    return out


def idle_seconds(
    members: Sequence[Sequence[tuple[float, str, frozenset[int]]]], partitions: int, start: float, end: float
) -> list[float]:
    """Per partition number, seconds within [start, end] in which no member fetched it: not between an
    `assigned` that lists it and the member's next `revoked` (listing it), `draining` or `stopped`.
    A member whose log ends while it holds partitions holds them to the end."""
    owned: list[list[tuple[float, float]]] = [[] for _ in range(partitions)]
    for events in members:
        since: dict[int, float] = {}
        for t, kind, numbers in sorted(events, key=lambda e: e[0]):
            if kind == "assigned":
                for n in numbers:
                    since.setdefault(n, t)
            else:
                ending = numbers if kind == "revoked" and numbers else set(since)
                for n in ending:
                    if n in since:
                        owned[n].append((since.pop(n), t))
        for n, t in since.items():
            owned[n].append((t, math.inf))
    out = []
    for intervals in owned[:partitions] if partitions else []:
        covered, reach = 0.0, start
        for lo, hi in sorted(intervals):
            lo, hi = max(lo, reach), min(hi, end)
            if hi > lo:
                covered += hi - lo
                reach = hi
        out.append(max(0.0, end - start - covered))
    return out


def backlog_peak(ticks: Sequence[tuple[float, int, int]], start: float, end: float) -> int:
    """Largest produced - accepted (samples waiting anywhere between the producer and the API) in [start, end]."""
    return max((p - a for t, p, a in ticks if start <= t <= end), default=0)


def stop_the_world(events: Sequence[tuple[float, str]], start: float, end: float) -> tuple[float, int]:
    """(seconds, spells) from each `revoked` in [start, end] to the member's next `assigned`.

    A `revoked` with no `assigned` after it (the member stopped) is not counted: it left the group.
    """
    total, spells = 0.0, 0
    revoked_at: float | None = None
    for t, kind in sorted(events):
        if kind == "revoked":
            if revoked_at is None:
                revoked_at = t
        elif revoked_at is not None:
            if start <= revoked_at <= end:
                total += t - revoked_at
                spells += 1
            revoked_at = None
    return total, spells


def generations(assigned_at: Iterable[float], gap: float = GENERATION_GAP) -> int:
    """Group generations: `assigned` events of all members, clustered (a gap over `gap` starts a new one)."""
    count, last = 0, None
    for t in sorted(assigned_at):
        if last is None or t - last > gap:
            count += 1
        last = t
    return count


def stall_seconds(ticks: Sequence[tuple[float, int, int]], start: float, end: float) -> tuple[float, float]:
    """(total, longest) seconds within [start, end] in which `accepted` did not grow while it was below
    `produced`. `ticks` are (time, produced so far, accepted so far), in time order; an interval counts
    as stalled when accepted is unchanged from its first tick to its last and there was lag at its start.
    """
    total = longest = run = 0.0
    for (t0, produced0, accepted0), (t1, _, accepted1) in itertools.pairwise(ticks):
        lo, hi = max(t0, start), min(t1, end)
        if hi <= lo:
            continue
        if accepted1 == accepted0 and produced0 > accepted0:
            run += hi - lo
            total += hi - lo
            longest = max(longest, run)
        else:
            run = 0.0
    return total, longest


def duplicates(keys: Iterable[tuple[str, str, str]]) -> tuple[int, int]:
    """(distinct, duplicates) of accepted (user_id, data_type, start_date): a duplicate is a key seen again."""
    seen = Counter(keys)
    return len(seen), sum(seen.values()) - len(seen)


def prom_sum(text: str, name: str) -> float:
    """Sum of a series' samples over all label sets in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ledger_figures(scrapes: Iterable[str]) -> dict[str, float]:
    """The ledger series summed over scrapes (one scrape a process)."""
    texts = list(scrapes)
    return {name: sum(prom_sum(t, name) for t in texts) for name in LEDGER_SERIES}


def ledger_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}


def figures(
    ticks: Sequence[tuple[float, int, int]],
    member_events: Sequence[Sequence[tuple[float, str]]],
    window: tuple[float, float],
    produced: int,
    accepted_keys: tuple[int, int],
    restores: dict[str, float],
    *,
    ownership: Sequence[Sequence[tuple[float, str, frozenset[int]]]] = (),
    partitions: int = 0,
    rate: float = 0.0,
    steady: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Everything printed for one run, from its raw observations.

    `ownership`: each member's ownership_events, for the input partitions' idle time; `steady`: a window of
    steady load before the roll, against which the backlog's peak is compared (in seconds of load at `rate`).
    """
    start, end = window
    idle = idle_seconds(ownership, partitions, start, end)
    peak = backlog_peak(ticks, start, end)
    steady_peak = backlog_peak(ticks, *steady) if steady else 0
    assigned = [t for events in member_events for t, kind in events if kind == "assigned" and start <= t <= end]
    stw = [stop_the_world(events, start, end) for events in member_events]
    stall, longest = stall_seconds(ticks, start, end)
    distinct, dups = accepted_keys
    return {
        "generations": generations(assigned),
        "assigned_events": len(assigned),
        "group_stall_s": stall,
        "longest_stall_s": longest,
        "member_stw_s": sum(s for s, _ in stw),
        "stw_spells": sum(n for _, n in stw),
        "max_member_stw_s": max((s for s, _ in stw), default=0.0),
        "partition_idle_s": sum(idle),
        "max_partition_idle_s": max(idle, default=0.0),
        "backlog_peak": peak,
        "steady_backlog_peak": steady_peak,
        "extra_backlog_s": (peak - steady_peak) / rate if rate else None,
        "produced": produced,
        "distinct_accepted": distinct,
        "duplicates": dups,
        "lost": max(0, produced - distinct),
        "restored_partitions": restores.get("stream_ledger_restore_seconds_count", 0.0),
        "restore_wait_s": restores.get("stream_ledger_restore_seconds_sum", 0.0),
        "restored_samples": restores.get("stream_ledger_restored_samples_total", 0.0),
        "kept_partitions": restores.get("stream_ledger_kept_partitions_total", 0.0),
    }


ROWS = (
    ("roll seconds", "roll_s", "{:.1f}"),
    ("replacement ready s (max)", "ready_max_s", "{:.1f}"),
    ("SIGTERM->exit s (max)", "exit_max_s", "{:.1f}"),
    ("rebalances (generations)", "generations", "{}"),
    ("assigned events", "assigned_events", "{}"),
    ("group stall s", "group_stall_s", "{:.2f}"),
    ("longest group stall s", "longest_stall_s", "{:.2f}"),
    ("  steady stall s (scaled)", "steady_stall_s", "{:.2f}"),
    ("member stop-the-world s", "member_stw_s", "{:.2f}"),
    ("  revoke->assign spells", "stw_spells", "{}"),
    ("  worst member s", "max_member_stw_s", "{:.2f}"),
    ("input partition idle s (sum)", "partition_idle_s", "{:.1f}"),
    ("  worst partition s", "max_partition_idle_s", "{:.1f}"),
    ("backlog peak (samples)", "backlog_peak", "{}"),
    ("  steady backlog peak", "steady_backlog_peak", "{}"),
    ("  extra, in s of load", "extra_backlog_s", "{:.2f}"),
    ("samples produced", "produced", "{}"),
    ("  producer rate /s", "producer_rate", "{:.0f}"),
    ("distinct accepted", "distinct_accepted", "{}"),
    ("duplicates", "duplicates", "{}"),
    ("lost", "lost", "{}"),
    ("ledger restores (partitions)", "restored_partitions", "{:.0f}"),
    ("ledger restore wait s (sum)", "restore_wait_s", "{:.2f}"),
    ("ledger restored samples", "restored_samples", "{:.0f}"),
    ("ledger kept partitions", "kept_partitions", "{:.0f}"),
)


def table(runs: Sequence[tuple[str, dict[str, Any]]], rows: Sequence[tuple[str, str, str]] = ROWS) -> str:
    """A plain table: one row per figure (label, key, format), one column per run."""
    width = max(len(label) for label, _, _ in rows) + 2
    cols = [max(12, len(name) + 2) for name, _ in runs]
    lines = ["".ljust(width) + "".join(name.rjust(c) for (name, _), c in zip(runs, cols, strict=True))]
    for label, key, fmt in rows:
        cells = []
        for (_, result), c in zip(runs, cols, strict=True):
            value = result.get(key)
            cells.append(("-" if value is None else fmt.format(value)).rjust(c))
        lines.append(label.ljust(width) + "".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- helper processes (subcommands)


async def serve_sandbox(port: int) -> None:
    """The sandbox in normal mode, plus /_rolling/summary: (distinct, duplicates) of what it accepted."""
    from aiohttp import web

    from stream.dev.sandbox import SandboxServer

    server = SandboxServer(token=TOKEN, port=port)

    async def summary(request: web.Request) -> web.Response:
        state = server.state
        keys = (
            (user_id, data_type, sample.start_date)
            for user_id, data_type, samples in state._accepted_batches  # normal mode keeps them all
            for sample in samples
        )
        distinct, dups = duplicates(keys)
        return web.json_response({"accepted": state.accepted_samples, "distinct": distinct, "duplicates": dups})

    server.app.router.add_get("/_rolling/summary", summary)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop()


_EPOCH = calendar.timegm((2026, 11, 1, 0, 0, 0))
DEVICES = ((b"iPhone", b"17.0.3"), (b"Apple Watch", b"10.1"), (b"Pixel 8", b"14"), (b"Galaxy Watch6", b"5.0"))


@dataclass
class Lane:
    """One (user, data type): its samples go out in chronological order, 10 s apart."""

    key: bytes
    prefix: bytes
    steps: bool
    partition: int
    at: int
    n: int = 0

    def next_value(self, rng: random.Random) -> bytes:
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at)).encode()
        self.at += 10
        self.n += 1
        if self.steps:
            end = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at - 5)).encode()
            tail = b'.000Z","value":%d,"unit":"count"}' % rng.randint(1, 200)
        else:
            end = start
            tail = b'.000Z","value":%d,"unit":"count/min"}' % rng.randint(55, 120)
        return self.prefix + start + b'.000Z","end_date":"' + end + tail


def lanes_for(users: int, partitions: int, seed: int) -> list[Lane]:
    from aiokafka.partitioner import DefaultPartitioner

    rng = random.Random(seed)
    choose = DefaultPartitioner()
    all_partitions = list(range(partitions))
    lanes = []
    for _ in range(users):
        user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        device, version = DEVICES[rng.randrange(len(DEVICES))]
        key = user_id.encode()
        partition = choose(key, all_partitions, all_partitions)
        for data_type in ("steps", "bpm"):
            prefix = (
                b'{"user_id":"%s","data_type":"%s","device_name":"%s","device_version":"%s","start_date":"'
                % (key, data_type.encode(), device, version)
            )
            lanes.append(Lane(key, prefix, data_type == "steps", partition, _EPOCH + rng.randint(0, 3600)))
    return lanes


async def produce(bootstrap: str, topic: str, partitions: int, rate: float, users: int, seed: int) -> None:
    """Write single-sample events at `rate` a second until SIGTERM, then three more for every lane.

    Prints "t produced" every TICK seconds and, at the end, {"produced": n} (records Kafka acknowledged).
    """
    from aiokafka import AIOKafkaProducer

    rng = random.Random(seed + 1)
    lanes = lanes_for(users, partitions, seed)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    acked = 0
    pending: set[asyncio.Future[Any]] = set()

    def done(future: asyncio.Future[Any], count: int) -> None:
        nonlocal acked
        pending.discard(future)
        if future.exception() is None:
            acked += count
        else:
            print(f"error {future.exception()!r}", flush=True)

    async def send(chosen: Iterable[Lane]) -> None:
        batches: dict[int, tuple[Any, int]] = {}
        for lane in chosen:
            batch, count = batches.get(lane.partition) or (producer.create_batch(), 0)
            if batch.append(key=lane.key, value=lane.next_value(rng), timestamp=None) is None:
                await flush_one(lane.partition, batch, count)
                batch, count = producer.create_batch(), 0
                batch.append(key=lane.key, value=lane.next_value(rng), timestamp=None)
            batches[lane.partition] = (batch, count + 1)
        for partition, (batch, count) in batches.items():
            await flush_one(partition, batch, count)

    async def flush_one(partition: int, batch: Any, count: int) -> None:
        batch.close()
        future = await producer.send_batch(batch, topic, partition=partition)
        pending.add(future)
        future.add_done_callback(lambda f, c=count: done(f, c))

    started = time.monotonic()
    sent = 0
    last_report = 0.0
    try:
        while not stop.is_set():
            now = time.monotonic()
            due = int(rate * (now - started)) - sent
            if due > 0:
                await send(lanes[rng.randrange(len(lanes))] for _ in range(due))
                sent += due
            if now - last_report >= TICK:
                print(f"{time.time():.3f} {acked}", flush=True)
                last_report = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
        await send(lane for lane in lanes for _ in range(3))  # no tail of 1-2 samples is left anywhere
        await producer.flush()
        if pending:
            await asyncio.wait(list(pending))
    finally:
        await producer.stop()
    print(json.dumps({"produced": acked}), flush=True)


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Member:
    name: str
    process: asyncio.subprocess.Process
    port: int
    log: Path
    spawned: float
    ready_at: float | None = None
    last_metrics: str = ""


@dataclass
class Run:
    contender: str
    min_ready: float
    ticks: list[tuple[float, int, int]] = field(default_factory=list)
    produced_now: int = 0
    accepted_now: int = 0


async def start_sandbox() -> tuple[asyncio.subprocess.Process, str]:
    """The sandbox API in a subprocess of its own (`_sandbox` below), once it listens: (process, its URL)."""
    port = free_port()
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.rolling", "_sandbox", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, env=child_env(str(ROOT)), cwd=ROOT,
    )  # fmt: skip
    assert sandbox.stdout is not None
    await asyncio.wait_for(sandbox.stdout.readline(), 30)
    return sandbox, f"http://127.0.0.1:{port}"


async def stop_helpers(helpers: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM each helper still running, SIGKILL after 20 s."""
    for helper in helpers:
        if helper.returncode is None:
            helper.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(helper.wait(), 20)
            except TimeoutError:
                helper.kill()
                await helper.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(pythonpath: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = pythonpath
    env.update(extra)
    return env


class Scenario:
    def __init__(self, args: argparse.Namespace, contender: str, min_ready: float, workdir: Path) -> None:
        self.args = args
        self.contender = contender
        self.min_ready = min_ready
        self.workdir = workdir
        self.tag = f"{contender}-{int(min_ready)}-{uuid.uuid4().hex[:6]}"
        self.tree = str(ROOT) if contender == "new" else args.old_tree
        self.members: list[Member] = []
        self.retired: list[Member] = []
        self.run = Run(contender, min_ready)
        self.http: Any = None
        self.target: int | None = None  # samples produced, once the load ended
        self.drained = asyncio.Event()  # set once the sandbox accepted that many

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.tag}: {message}", file=sys.stderr, flush=True)

    async def spawn_member(self, index: int, generation: int) -> Member:
        port = free_port()
        name = f"m{index}g{generation}"
        env = child_env(
            self.tree,
            STREAM_KAFKA_BOOTSTRAP_SERVERS=self.args.bootstrap,
            STREAM_KAFKA_TOPICS=self.topic,
            STREAM_KAFKA_GROUP_ID=f"rolling-{self.tag}",
            STREAM_DLQ_TOPIC=f"rolling-dlq-{self.tag}",
            STREAM_PENDING_TOPIC=f"rolling-pending-{self.tag}",
            STREAM_API_URL=self.sandbox_url,
            STREAM_API_TOKEN=TOKEN,
            STREAM_METRICS_PORT=str(port),
            STREAM_KAFKA_CLIENT_ID=f"rolling-{name}",
        )
        log = self.workdir / f"{self.tag}-{name}.log"
        with _open_log(log) as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stream", "run", stdout=out, stderr=out, env=env, cwd=self.workdir
            )
        return Member(name, process, port, log, time.time())

    async def get(self, url: str) -> tuple[int, str]:
        import aiohttp

        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, ""

    async def wait_ready(self, member: Member, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status, _ = await self.get(f"http://127.0.0.1:{member.port}/readyz")
            if status == 200:
                member.ready_at = time.time()
                return
            if member.process.returncode is not None:
                raise RuntimeError(f"{member.name} exited {member.process.returncode}: {tail(member.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{member.name} not ready after {timeout:.0f} s: {tail(member.log)}")
            await asyncio.sleep(0.1)

    async def scrape(self, member: Member) -> str:
        status, text = await self.get(f"http://127.0.0.1:{member.port}/metrics")
        if status == 200:
            member.last_metrics = text
        return member.last_metrics

    async def stop_member(self, member: Member, timeout: float = 90.0) -> float:
        """SIGTERM, wait for the exit; returns the seconds it took."""
        await self.scrape(member)
        sent = time.time()
        if member.process.returncode is None:
            member.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(member.process.wait(), timeout)
        except TimeoutError:
            self.log(f"{member.name} did not exit in {timeout:.0f} s: SIGKILL")
            member.process.kill()
            await member.process.wait()
        if member.process.returncode not in (0, None):
            self.log(f"{member.name} exited {member.process.returncode}")
        return time.time() - sent

    async def sample(self) -> None:
        """Every TICK: (time, produced, accepted)."""
        while True:
            status, text = await self.get(self.sandbox_url + "/_sandbox/stats")
            if status == 200:
                self.run.accepted_now = json.loads(text)["accepted_samples"]
                self.run.ticks.append((time.time(), self.run.produced_now, self.run.accepted_now))
                if self.target is not None and self.run.accepted_now >= self.target:
                    self.drained.set()
            await asyncio.sleep(TICK)

    async def read_producer(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            text = line.decode().strip()
            if text.startswith("{"):
                self.produced_final = json.loads(text)["produced"]
            elif text.startswith("error"):
                self.log(f"producer: {text}")
            else:
                with contextlib.suppress(ValueError, IndexError):
                    self.run.produced_now = int(text.split()[1])

    async def execute(self) -> dict[str, Any]:
        import aiohttp
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        args = self.args
        self.topic = f"rolling-{self.tag}"
        admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([
                NewTopic(n, num_partitions=args.partitions, replication_factor=1)
                for n in (self.topic, f"rolling-dlq-{self.tag}", f"rolling-pending-{self.tag}")
            ])
        finally:
            await admin.close()
        self.http = aiohttp.ClientSession()
        helpers: list[asyncio.subprocess.Process] = []
        tasks: list[asyncio.Task[None]] = []
        self.produced_final: int | None = None
        try:
            sandbox, self.sandbox_url = await start_sandbox()
            helpers.append(sandbox)
            tasks.append(asyncio.create_task(self.sample()))

            self.members = [await self.spawn_member(i, 0) for i in range(args.replicas)]
            producer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.rolling", "_produce", "--bootstrap", args.bootstrap,
                "--topic", self.topic, "--partitions", str(args.partitions), "--rate", str(args.rate),
                "--users", str(args.users), stdout=asyncio.subprocess.PIPE, env=child_env(str(ROOT)), cwd=ROOT,
            )  # fmt: skip
            helpers.append(producer)
            load_start = time.time()
            assert producer.stdout is not None
            tasks.append(asyncio.create_task(self.read_producer(producer.stdout)))
            await asyncio.gather(*(self.wait_ready(m) for m in self.members))
            self.log(f"{args.replicas} members ready; steady load for {args.steady:.0f} s")
            await asyncio.sleep(args.steady)

            baseline = ledger_figures([await self.scrape(m) for m in self.members])
            roll_start = time.time()
            ready_seconds, exit_seconds = [], []
            for i in range(args.replicas):
                old = self.members[i]
                exit_seconds.append(await self.stop_member(old))
                self.retired.append(old)
                new = await self.spawn_member(i, 1)
                self.members[i] = new
                await self.wait_ready(new)
                assert new.ready_at is not None
                ready_seconds.append(new.ready_at - new.spawned)
                self.log(f"replaced {old.name} by {new.name}: ready after {ready_seconds[-1]:.1f} s")
                await asyncio.sleep(self.min_ready)  # minReadySeconds: the last one too, before the roll is done
            roll_end = time.time()
            self.log(f"roll done in {roll_end - roll_start:.1f} s; load for {args.after:.0f} s more")
            await asyncio.sleep(args.after)

            producer.send_signal(signal.SIGTERM)
            await asyncio.wait_for(producer.wait(), 120)
            await asyncio.sleep(0.2)
            load_end = time.time()
            produced = self.produced_final or 0
            self.target = produced
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), args.drain_timeout)
            await asyncio.sleep(2)
            for member in self.members:
                await self.scrape(member)
            await asyncio.gather(*(self.stop_member(m) for m in self.members))
            status, text = await self.get(self.sandbox_url + "/_rolling/summary")
            summary = json.loads(text) if status == 200 else {"distinct": 0, "duplicates": 0}
        finally:
            for task in tasks:
                task.cancel()
            for member in self.members + self.retired:
                if member.process.returncode is None:
                    member.process.kill()
                    await member.process.wait()
            await stop_helpers(helpers)
            await self.http.close()

        every = self.retired + self.members
        texts = [m.log.read_text(errors="replace").splitlines() for m in every]
        events = [group_events(lines) for lines in texts]
        ownership = [ownership_events(lines, self.topic) for lines in texts]
        length = min(load_end - roll_start, args.steady)
        after_roll = ledger_figures(m.last_metrics for m in every)
        result = figures(
            self.run.ticks, events, (roll_start, load_end), produced,
            (summary["distinct"], summary["duplicates"]), ledger_delta(baseline, after_roll),
            ownership=ownership, partitions=args.partitions, rate=args.rate, steady=(roll_start - length, roll_start),
        )  # fmt: skip
        result["roll_s"] = roll_end - roll_start
        result["ready_max_s"] = max(ready_seconds)
        result["exit_max_s"] = max(exit_seconds)
        result["exit_s"] = exit_seconds
        # The same stall measure over the steady spell before the roll, scaled to the length of the window.
        result["steady_stall_s"] = stall_seconds(self.run.ticks, roll_start - length, roll_start)[0] * (
            (load_end - roll_start) / length
        )
        result["producer_rate"] = produced / (load_end - load_start)
        result["ready_s"] = ready_seconds
        result["sandbox_accepted"] = summary.get("accepted")
        result["logs"] = [str(m.log) for m in every]
        return result


def _open_log(path: Path) -> Any:
    return open(path, "ab")  # the child gets its own copy of the descriptor


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rolling", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="an existing Kafka broker")
    p.add_argument("--min-ready", default="15", help="minReadySeconds; a comma list runs each (e.g. 0,15)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--rate", type=float, default=20000, help="events (= samples) a second")
    p.add_argument("--users", type=int, default=2000, help="users (two data types each)")
    p.add_argument("--steady", type=float, default=20, help="seconds of load before the roll")
    p.add_argument("--after", type=float, default=30, help="seconds of load after the roll")
    p.add_argument("--drain-timeout", type=float, default=120, help="seconds to wait for every sample at the end")
    p.add_argument("--contenders", default="new", help="comma list of new, old")
    p.add_argument("--old-tree", default="/tmp/oldstream", help="tree of the old contender (PYTHONPATH)")
    p.add_argument("--output", type=Path, help="write the figures as JSON here too")
    return p.parse_args(argv)


async def run_all(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    workdir = Path(tempfile.mkdtemp(prefix="rolling-"))
    print(f"logs in {workdir}", file=sys.stderr)
    runs = []
    for contender in args.contenders.split(","):
        for min_ready in [float(v) for v in args.min_ready.split(",")]:
            result = await Scenario(args, contender, min_ready, workdir).execute()
            runs.append((f"{contender} mr={min_ready:g}", result))
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_sandbox"]:
        asyncio.run(serve_sandbox(int(argv[argv.index("--port") + 1])))
        return 0
    if argv[:1] == ["_produce"]:
        p = argparse.ArgumentParser()
        for name in ("--bootstrap", "--topic"):
            p.add_argument(name)
        p.add_argument("--partitions", type=int)
        p.add_argument("--rate", type=float)
        p.add_argument("--users", type=int)
        p.add_argument("--seed", type=int, default=7)
        a = p.parse_args(argv[1:])
        asyncio.run(produce(a.bootstrap, a.topic, a.partitions, a.rate, a.users, a.seed))
        return 0
    args = parse_args(argv)
    runs = asyncio.run(run_all(args))
    print(f"rolling restart: {args.replicas} replicas, {args.partitions} partitions, {args.rate:g} samples/s, "
          f"maxSurge 0, maxUnavailable 1; window: first SIGTERM of the roll to the end of the load")
    print(table(runs))
    if args.output:
        args.output.write_text(json.dumps(dict(runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
