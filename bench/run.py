"""`python -m bench`: the service against its ceilings and against Quix Streams, in one run, on this machine.

One local Apache Kafka broker (stream.dev.localkafka) and one sandbox API (``stream sandbox --fast``, a
subprocess) serve every contender. For each workload of ``--workload`` a topic of ``--events`` single-sample
events of ``--users`` users is produced once and read by each contender with its own fresh consumer group:

  random    each event from a random (user, data type): the worst case for batching (data.throughput_records)
  sessions  phones syncing in sessions of 30-300 samples of one data type, 50 sessions active at a time,
            their events interleaved at random (data.session_records; --session-concurrency/--session-lengths)

The contenders, run on each workload's topic:

  (a) aiokafka consumer, records discarded       -- the Kafka client's ceiling  (bench/consume.py)
  (b) (a) + msgspec decoding of every value       -- the client + decoding ceiling (bench/consume.py)
  (c) Quix Streams doing the whole job            -- consume, batch per key, POST (bench/quix_job.py)
  (d) ``stream run``                              -- the service, configured by STREAM_* variables

Each contender is a subprocess, so its CPU time (user+sys from /proc/PID/stat) and peak RSS (VmHWM from
/proc/PID/status) are its own. Progress: (a)/(b) print when they read their first record, 99 % and 100 %;
(c)/(d) are followed through the sandbox's ``accepted_samples`` (reset before each). Figures:

  steady samples/s   over the middle half of the run: (samples at the 75 % mark - at the 25 % mark) / (time
                     between the two marks). Not from the first sample on: a service that buffers reads
                     ahead of its first acceptance, and those samples would count in its favour.
  with start-up      samples at the 99 % mark / time from spawning the process to the 99 % mark
  CPU s / M samples  steady: the process's CPU seconds between the 25 % and 75 % marks per million samples
                     between them; with start-up: its CPU seconds at the 99 % mark per million samples
  peak RSS           VmHWM at the end of the contender's run
  samples / request  (c)/(d): mean samples a POST carried ((d): its stream_batch_size_samples histogram; (c): the
                     sandbox's accepted samples / requests)

Then: a latency run (events produced at a fixed rate while ``stream run`` runs with a 1 s window; from each
record's Kafka timestamp to the moment the sandbox, in this process, accepts its sample), a dead-letter run
(``--dead-letters`` invalid events, one dead letter each: how fast ``stream run`` writes them to its
dead-letter topic and what CPU that costs), a many-keys run (RSS per buffered sample and per key with
``--keys`` users of 1-2 samples each, which can never be sent), and a micro-benchmark of the service's
window bookkeeping (stream.batching.Batcher) for growing key counts and of decode_record, and a ledger restore
(1M remembered samples read back from a ledger topic and loaded: the cost of an assignment).
Those runs are made once per benchmark, whatever ``--workload`` says. Results: a table on stdout,
``bench/results/latest.json`` and ``bench/results/latest.md``. In the JSON each workload's throughput results
are under ``workloads.<name>`` (``produce``, ``contenders``, ``ratios``, ``targets``); the top-level
``produce``, ``contenders`` and ``ratios`` repeat the random workload's (as before there were workloads);
``phase_seconds`` holds the wall-clock seconds of each part of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from bench import data, decodebench, ledgerbench, microbench, proc, report, snapshot

ALL = ("a", "b", "c", "d", "latency", "deadletters", "keys", "ledger")
WORKLOADS = ("random", "sessions")
TOKEN = "bench-token"
RESULTS = Path(__file__).resolve().parent / "results"
POLL = 0.025  # seconds between progress polls of the sandbox
DLQ_POLL = 0.05  # seconds between /metrics scrapes of the dead-letter run (each costs the service ~1 ms)


# ----------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def now() -> float:
    return time.time()


def tag() -> str:
    return uuid.uuid4().hex[:8]


def prom_value(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prom_histogram_quantile(text: str, name: str, q: float) -> float | None:
    """Upper bound of the bucket holding quantile q of a Prometheus histogram (summed over label sets)."""
    buckets: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix) :].rsplit(" ", 1)
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    if not buckets:
        return None
    total = buckets[max(buckets)]
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


@dataclass
class Proc:
    """A contender's subprocess and what it costs."""

    name: str
    process: asyncio.subprocess.Process
    spawned: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def usage(self) -> proc.Usage:
        return proc.usage(self.pid)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _open_log(path: Path):
    return open(path, "ab")  # handed to the child, closed by spawn() right after


async def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, **kw: Any) -> Proc:
    log_path = workdir / f"{name}.log"
    log = _open_log(log_path)
    spawned = now()
    # cwd: the run's directory, never the repository: `python -m` puts the cwd first on sys.path, and `stream`
    # must come from the copy that bench.snapshot put on PYTHONPATH.
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=kw.pop("stdout", log), stderr=log, env=env if env is not None else os.environ.copy(),
        cwd=workdir, **kw,
    )
    log.close()  # the child has its own copy of the descriptor
    return Proc(name, process, spawned, log_path)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without STREAM_* variables (the caller's settings must not leak into contenders)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


@dataclass
class Bench:
    args: argparse.Namespace
    bootstrap: str
    broker_pid: int | None
    kafka_version: str
    workdir: Path
    http: aiohttp.ClientSession
    sandbox: Proc | None = None
    sandbox_url: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    # -- the shared fast sandbox (a subprocess)

    async def start_sandbox(self) -> None:
        port = free_port()
        self.sandbox = await spawn(
            "sandbox",
            [sys.executable, "-m", "stream", "sandbox", "--fast", "--port", str(port), "--token", TOKEN],
            self.workdir,
            env=clean_env(),
        )
        self.sandbox_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.sandbox_stats()
                return
            if self.sandbox.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox did not start:\n{self.sandbox.log_tail()}")
            await asyncio.sleep(0.1)

    async def sandbox_stats(self) -> dict[str, Any]:
        async with self.http.get(self.sandbox_url + "/_sandbox/stats") as response:
            response.raise_for_status()
            return await response.json()

    async def sandbox_reset(self) -> None:
        async with self.http.post(self.sandbox_url + "/_sandbox/reset") as response:
            response.raise_for_status()

    def other_cpu(self) -> dict[str, float]:
        """CPU seconds so far of the broker and the sandbox (what a contender makes them spend)."""
        out = {}
        if self.broker_pid:
            with contextlib.suppress(OSError):
                out["broker"] = proc.cpu_seconds(self.broker_pid)
        if self.sandbox is not None:
            with contextlib.suppress(OSError):
                out["sandbox"] = proc.cpu_seconds(self.sandbox.pid)
        return out

    def stream_env(self, topic: str, group: str, api_url: str, metrics_port: int, **settings: str) -> dict[str, str]:
        t = tag()
        env = {
            "STREAM_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STREAM_KAFKA_TOPICS": topic,
            "STREAM_KAFKA_GROUP_ID": group,
            "STREAM_DLQ_TOPIC": f"bench-dlq-{t}",
            "STREAM_PENDING_TOPIC": f"bench-pending-{t}",
            "STREAM_API_URL": api_url,
            "STREAM_API_TOKEN": TOKEN,
            "STREAM_METRICS_PORT": str(metrics_port),
        }
        env.update({f"STREAM_{k.upper()}": v for k, v in settings.items()})
        return clean_env(**env)

    async def create_side_topics(self, env: dict[str, str]) -> None:
        """The service's dead-letter and pending topics, fresh for each run (parked samples stay in their run)."""
        await data.create_topics(
            self.bootstrap, [env["STREAM_DLQ_TOPIC"], env["STREAM_PENDING_TOPIC"]], self.args.partitions
        )

    async def metrics_text(self, port: int) -> str:
        async with self.http.get(f"http://127.0.0.1:{port}/metrics") as response:
            response.raise_for_status()
            return await response.text()

    async def wait_ready(self, service: Proc, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            if service.process.returncode is not None:
                raise RuntimeError(f"stream run exited with {service.process.returncode}:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"stream run not ready after {timeout:.0f}s:\n{service.log_tail()}")
            await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------------- throughput contenders


@dataclass
class Marks:
    spawned: float
    first_t: float | None = None
    first_n: int = 0
    cpu_first: float = 0.0
    zero_t: float | None = None  # last observation with nothing yet (fallback for tiny runs)
    cpu_zero: float = 0.0
    quarter: tuple[float, int, float] | None = None  # (time, samples, CPU s) at the 25 % mark
    three_quarters: tuple[float, int, float] | None = None  # the same at the 75 % mark
    t99: float | None = None
    n99: int = 0
    cpu99: float = 0.0
    other99: dict[str, float] = field(default_factory=dict)
    t100: float | None = None
    n_end: int = 0


def contender_figures(marks: Marks, total: int, usage_end: proc.Usage, other0: dict[str, float]) -> dict[str, Any]:
    assert marks.t99 is not None and marks.first_t is not None
    first_t, first_n, cpu_first = marks.first_t, marks.first_n, marks.cpu_first
    if marks.t99 <= first_t or marks.n99 <= first_n:
        # Tiny runs: the first observation already held 99 %; measure from the last empty one instead.
        first_t, first_n, cpu_first = (marks.zero_t or marks.spawned), 0, marks.cpu_zero
    # Steady: the middle half of the run (read-ahead before the first acceptance and the last stragglers
    # left out); from the first mark to the 99 % one when the run was too short to tell its quarters apart
    # (or for the CPU clock, which ticks every 10 ms, to see it).
    start, end = marks.quarter, marks.three_quarters
    if start is None or end is None or end[0] <= start[0] or end[1] <= start[1] or end[2] <= start[2]:
        start, end = (first_t, first_n, cpu_first), (marks.t99, marks.n99, marks.cpu99)
    return {
        "samples": total,
        "steady_samples_per_s": (end[1] - start[1]) / (end[0] - start[0]),
        "startup_samples_per_s": marks.n99 / (marks.t99 - marks.spawned),
        "steady_cpu_s_per_million": (end[2] - start[2]) / (end[1] - start[1]) * 1e6,
        "cpu_s_per_million": marks.cpu99 / marks.n99 * 1e6,
        "cpu_s_at_99": marks.cpu99,
        "peak_rss_bytes": usage_end.hwm_bytes,
        "rss_end_bytes": usage_end.rss_bytes,
        "first_s": marks.first_t - marks.spawned,
        "t99_s": marks.t99 - marks.spawned,
        "t100_s": (marks.t100 - marks.spawned) if marks.t100 is not None else None,
        "delivered_fraction": marks.n_end / total,
        "other_cpu_s_to_99": {k: v - other0.get(k, 0.0) for k, v in marks.other99.items()},
    }


async def run_self_reporting(bench: Bench, name: str, mode: str, topic: str, total: int) -> dict[str, Any]:
    """(a)/(b): the script prints its marks; its CPU is read from /proc the moment each line arrives."""
    argv = [
        sys.executable, "-m", "bench.consume", "--bootstrap", bench.bootstrap, "--topic", topic,
        "--group", f"bench-{name}-{tag()}", "--expect", str(total), "--mode", mode,
    ]  # fmt: skip
    other0 = bench.other_cpu()
    contender = await spawn(name, argv, bench.workdir, env=clean_env(), stdin=asyncio.subprocess.PIPE,
                            stdout=asyncio.subprocess.PIPE)
    marks = Marks(spawned=contender.spawned)
    assert contender.process.stdout is not None and contender.process.stdin is not None
    try:
        async with asyncio.timeout(bench.args.timeout):
            while True:
                line = await contender.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name} ended early:\n{contender.log_tail()}")
                cpu = contender.usage().cpu_seconds
                mark = json.loads(line)
                if mark["mark"] == "first":
                    marks.first_t, marks.first_n, marks.cpu_first = mark["t"], mark["n"], cpu
                elif mark["mark"] == "p25":
                    marks.quarter = (mark["t"], mark["n"], cpu)
                elif mark["mark"] == "p75":
                    marks.three_quarters = (mark["t"], mark["n"], cpu)
                elif mark["mark"] == "p99":
                    marks.t99, marks.n99, marks.cpu99 = mark["t"], mark["n"], cpu
                    marks.other99 = bench.other_cpu()
                elif mark["mark"] == "done":
                    marks.t100, marks.n_end = mark["t"], mark["n"]
                    break
        usage_end = contender.usage()
    finally:
        contender.process.stdin.close()
        await contender.stop(timeout=10)
    return contender_figures(marks, total, usage_end, other0)


async def run_sandbox_polled(
    bench: Bench, name: str, argv: list[str], env: dict[str, str], total: int, metrics_port: int | None = None
) -> dict[str, Any]:
    """(c)/(d): progress is the sandbox's accepted_samples, polled every POLL seconds."""
    await bench.sandbox_reset()
    other0 = bench.other_cpu()
    contender = await spawn(name, argv, bench.workdir, env=env)
    marks = Marks(spawned=contender.spawned)
    mark99 = math.ceil(total * 0.99)
    extra: dict[str, Any] = {}
    try:
        async with asyncio.timeout(bench.args.timeout):
            while True:
                stats = await bench.sandbox_stats()
                t, n = now(), stats["accepted_samples"]
                if marks.t99 is None:
                    cpu = contender.usage().cpu_seconds
                    if marks.quarter is None and n >= total * 0.25:
                        marks.quarter = (t, n, cpu)
                    if marks.three_quarters is None and n >= total * 0.75:
                        marks.three_quarters = (t, n, cpu)
                    if n >= mark99:
                        marks.t99, marks.n99, marks.cpu99 = t, n, cpu
                        marks.other99 = bench.other_cpu()
                    if n > 0 and marks.first_t is None:
                        marks.first_t, marks.first_n, marks.cpu_first = t, n, cpu
                    elif n == 0:
                        marks.zero_t, marks.cpu_zero = t, cpu
                marks.n_end = n
                if n >= total:
                    marks.t100 = t
                    break
                if marks.t99 is not None and t - marks.t99 > bench.args.tail_seconds:
                    break  # the last samples are parked (1-2 per key): they wait for more of their user
                if contender.process.returncode is not None:
                    raise RuntimeError(f"{name} exited with {contender.process.returncode}:\n{contender.log_tail()}")
                await asyncio.sleep(POLL)
        usage_end = contender.usage()
        stats = await bench.sandbox_stats()
        extra["sandbox"] = {k: stats.get(k) for k in ("requests", "min_batch", "max_batch", "status_counts",
                                                       "accepted_samples", "rejected_samples", "accepted_batches")}
        if stats.get("requests"):  # every POST of the run, retries and refused ones included
            extra["samples_per_request"] = stats.get("accepted_samples", 0) / stats["requests"]
        if metrics_port:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                text = await bench.metrics_text(metrics_port)
                extra["service_metrics"] = {
                    "records_consumed": prom_value(text, "stream_records_consumed_total"),
                    "batches": prom_value(text, "stream_batches_total"),
                    "fetch_paused_now": prom_value(text, "stream_fetch_paused"),
                    "buffered_samples_now": prom_value(text, "stream_buffered_samples"),
                    **batch_size_metrics(text),
                }
    finally:
        code = await contender.stop()
        extra["exit_code"] = code
    return {**contender_figures(marks, total, usage_end, other0), **extra}


def batch_size_metrics(text: str) -> dict[str, Any]:
    """Samples per request from `stream run`'s stream_batch_size_samples histogram (when it exposes one)."""
    name = "stream_batch_size_samples"
    count = prom_value(text, name + "_count")
    if not count:
        return {}
    return {
        "batch_size_requests": count,
        "batch_size_mean": prom_value(text, name + "_sum") / count,
        "batch_size_p50_le": prom_histogram_quantile(text, name, 0.5),
    }


def workload_records(args: argparse.Namespace, workload: str) -> list[tuple[bytes, bytes]]:
    if workload == "sessions":
        return data.session_records(args.events, args.users, seed=args.seed, concurrent=args.session_concurrency,
                                    lengths=args.session_lengths)
    return data.throughput_records(args.events, args.users, seed=args.seed)


def workload_description(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    if workload == "sessions":
        lo, hi = args.session_lengths
        return {"description": f"phones syncing in sessions of {lo}-{hi} samples of one data type, "
                f"{args.session_concurrency} sessions active at a time, their events interleaved at random",
                "session_concurrency": args.session_concurrency, "session_lengths": [lo, hi]}
    return {"description": "each event from a random (user, data type): the worst case for batching"}


async def run_throughput(bench: Bench, which: list[str], workload: str) -> dict[str, Any]:
    """Produce the workload's topic and run the throughput contenders `which` on it; returns the workload's
    results: {"produce", "contenders", ...}."""
    args = bench.args
    out: dict[str, Any] = workload_description(args, workload)
    topic = f"bench-{workload}-{tag()}"
    await data.create_topics(bench.bootstrap, [topic], args.partitions)
    t0 = time.monotonic()
    records = workload_records(args, workload)
    generated = time.monotonic() - t0
    keys = len({key for key, _ in records})
    print(f"[{workload}] producing {len(records):,} events of {keys:,} users to {topic} ({args.partitions} "
          f"partitions) ...", flush=True)
    seconds = await data.produce(bench.bootstrap, topic, records)
    total = await data.end_offsets(bench.bootstrap, topic)
    if total != len(records):
        raise RuntimeError(f"topic holds {total} records, {len(records)} were produced")
    del records
    out["produce"] = {"topic": topic, "records": total, "users": keys, "generate_seconds": generated,
                      "produce_seconds": seconds, "records_per_s": total / seconds}
    contenders = out["contenders"] = {}
    for name in which:
        print(f"[{workload}] contender ({name}) {report.CONTENDERS[name]} ...", flush=True)
        try:
            if name == "a":
                result = await run_self_reporting(bench, "a", "plain", topic, total)
            elif name == "b":
                result = await run_self_reporting(bench, "b", "msgspec", topic, total)
            elif name == "c":
                result = await run_quix(bench, topic, total)
            else:
                result = await run_stream(bench, topic, total)
        except Exception as exc:  # one contender failing must not lose the others' figures
            result = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  ({name}) FAILED: {result['error']}", flush=True)
        else:
            print("  " + report.contender_line(name, result), flush=True)
        contenders[name] = result
        await asyncio.sleep(1.0)  # let the broker settle between contenders
    return out


async def run_quix(bench: Bench, topic: str, total: int) -> dict[str, Any]:
    if importlib.util.find_spec("quixstreams") is None:
        raise RuntimeError("quixstreams is not installed (pip install quixstreams)")
    pending = f"bench-quix-pending-{tag()}"
    await data.create_topics(bench.bootstrap, [pending], bench.args.partitions)
    state_dir = tempfile.mkdtemp(prefix="quix-state-", dir=bench.workdir)
    argv = [
        sys.executable, "-m", "bench.quix_job", "--bootstrap", bench.bootstrap, "--topic", topic,
        "--pending-topic", pending, "--group", f"bench-c-{tag()}", "--api-url", bench.sandbox_url,
        "--token", TOKEN, "--state-dir", state_dir,
    ]  # fmt: skip
    result = await run_sandbox_polled(bench, "c", argv, clean_env(), total)
    result["notes"] = "no per-sample validation, no dead-letter topic, no max age for parked samples"
    return result


async def run_stream(bench: Bench, topic: str, total: int) -> dict[str, Any]:
    port = free_port()
    env = bench.stream_env(topic, f"bench-d-{tag()}", bench.sandbox_url, port)
    env.update(bench.args.stream_settings)
    await bench.create_side_topics(env)
    argv = [sys.executable, "-m", "stream", "run"]
    profile = bench.workdir / "d.prof"
    if bench.args.profile_stream:  # cProfile writes its stats when `stream run` exits after SIGTERM
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "stream", "run"]
    result = await run_sandbox_polled(bench, "d", argv, env, total, metrics_port=port)
    result["settings"] = bench.args.stream_settings or "defaults"
    result["backpressure_pauses"] = count_log_events(bench.workdir / "d.log", "backpressure_on")
    if bench.args.profile_stream:
        result["profiled"] = True
        result["profile_top"] = profile_top(profile) if profile.exists() else []
    return result


def count_log_events(path: Path, event: str) -> int:
    """How many JSON log lines of `stream run` carry this event."""
    count = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(msgspec.DecodeError):
                if line.startswith("{") and msgspec.json.decode(line).get("event") == event:
                    count += 1
    return count


def profile_top(path: Path, count: int = 25) -> list[dict[str, Any]]:
    """The functions where the profiled `stream run` spent the most time of their own."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in stats.values()) or 1.0
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [
        {
            "function": f"{Path(file).parent.name}/{Path(file).name}:{line}({name})" if line else name,
            "calls": nc,
            "tottime_s": tt,
            "share": tt / total,
            "cumtime_s": ct,
        }
        for (file, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


# ----------------------------------------------------------------------------------------------- latency


class AcceptanceLog:
    """Stamps time.time() on every sandbox answer that accepted samples, with the request's body.

    Composed around the unchanged sandbox app as an aiohttp middleware: the body is read (aiohttp caches
    it, so the handler reads the same bytes) and kept; decoding waits until the run is over.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, bytes, bytes | None]] = []
        self.accepted = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.method != "POST" or not request.path.endswith("/samples"):
            return await handler(request)
        body = await request.read()
        response = await handler(request)
        if response.status in (200, 207):
            accepted_at = time.time()
            answer: bytes = response.body  # type: ignore[assignment]  # the sandbox answers with bytes
            self.entries.append((accepted_at, response.status, body, answer if response.status == 207 else None))
            self.accepted += msgspec.json.decode(answer)["accepted"]
        return response

    def latencies(self, since: float = 0.0) -> list[float]:
        out = []
        for accepted_at, _status, body, answer in self.entries:
            request = msgspec.json.decode(body)
            refused = {r["index"] for r in msgspec.json.decode(answer)["rejected"]} if answer else set()
            for i, sample in enumerate(request["data"]):
                if i in refused:
                    continue
                produced = int(sample["device_version"]) / 1e9
                if produced >= since:
                    out.append(accepted_at - produced)
        out.sort()
        return out


async def run_latency(bench: Bench) -> dict[str, Any]:
    from stream.dev.sandbox import SandboxServer

    args = bench.args
    window = 1.0
    topic = f"bench-latency-{tag()}"
    await data.create_topics(bench.bootstrap, [topic], args.partitions)
    stamps = AcceptanceLog()
    sandbox = SandboxServer(token=TOKEN, port=0, fast=False)
    sandbox.app.middlewares.append(stamps.middleware)
    await sandbox.start()
    port = free_port()
    env = bench.stream_env(topic, f"bench-latency-{tag()}", sandbox.url, port, batch_window_seconds=str(window))
    await bench.create_side_topics(env)
    service = await spawn("latency-stream", [sys.executable, "-m", "stream", "run"], bench.workdir, env=env)
    try:
        await bench.wait_ready(service, port)
        await asyncio.sleep(0.5)
        print(f"  producing {args.latency_rate:,.0f} samples/s for {args.latency_seconds:g} s "
              f"({args.latency_users} users) ...", flush=True)
        producer = await spawn(
            "latency-producer",
            [sys.executable, "-m", "bench.latency_producer", "--bootstrap", bench.bootstrap, "--topic", topic,
             "--rate", str(args.latency_rate), "--seconds", str(args.latency_seconds),
             "--users", str(args.latency_users)],
            bench.workdir, env=clean_env(), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(producer.process.communicate(), args.latency_seconds * 3 + 60)
        if producer.process.returncode != 0:
            raise RuntimeError(f"latency producer failed:\n{producer.log_tail()}")
        produced = json.loads(out.decode().strip().splitlines()[-1])
        # Wait for the last windows to close; what is left after that is parked (1-2 samples of a key).
        deadline = time.monotonic() + 30
        last, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            accepted = stamps.accepted
            if accepted >= produced["produced"]:
                break
            if accepted != last:
                last, still_since = accepted, time.monotonic()
            elif time.monotonic() - still_since > window + 3:
                break
            await asyncio.sleep(0.2)
        metrics = await bench.metrics_text(port)
    finally:
        await service.stop()
        await sandbox.stop()
    latencies = stamps.latencies()
    mean = sum(latencies) / len(latencies) if latencies else math.nan
    return {
        "window_seconds": window,
        "target_rate": args.latency_rate,
        "seconds": args.latency_seconds,
        "users": args.latency_users,
        "producer": produced,
        "measured_samples": len(latencies),
        "measured_fraction": len(latencies) / produced["produced"],
        "p50_seconds": percentile(latencies, 0.50),
        "p90_seconds": percentile(latencies, 0.90),
        "p99_seconds": percentile(latencies, 0.99),
        "max_seconds": latencies[-1] if latencies else math.nan,
        "mean_seconds": mean,
        "requests": len(stamps.entries),
        "service_histogram": {  # the service's own view (stream_end_to_end_latency_seconds): bucket bounds
            "p50_le_seconds": prom_histogram_quantile(metrics, "stream_end_to_end_latency_seconds", 0.5),
            "p99_le_seconds": prom_histogram_quantile(metrics, "stream_end_to_end_latency_seconds", 0.99),
        },
    }


# ------------------------------------------------------------------------------------------- dead letters


async def run_dead_letters(bench: Bench) -> dict[str, Any]:
    """`--dead-letters` events that are valid but for their value (-1), produced before `stream run` starts:
    each is one `invalid_value` dead letter and nothing reaches the API. `stream run` runs as its own
    process (own group, DLQ and pending topics), followed through its /metrics: from the first scrape
    showing a consumed record until stream_dead_letters_total reaches the count with stream_pending_writes
    at 0 (every dead letter acknowledged by Kafka). CPU and peak RSS are the process's own, from /proc."""
    args = bench.args
    total = args.dead_letters
    topic = f"bench-deadletters-{tag()}"
    await data.create_topics(bench.bootstrap, [topic], args.partitions)
    records = data.dead_letter_records(total, args.users, seed=args.seed + 9)
    print(f"  producing {total:,} invalid events of {args.users:,} users ...", flush=True)
    produce_seconds = await data.produce(bench.bootstrap, topic, records)
    del records
    port = free_port()
    env = bench.stream_env(topic, f"bench-deadletters-{tag()}", bench.sandbox_url, port)
    await bench.create_side_topics(env)
    await bench.sandbox_reset()
    other0 = bench.other_cpu()
    service = await spawn("deadletters-stream", [sys.executable, "-m", "stream", "run"], bench.workdir, env=env)
    first: tuple[float, float, float] | None = None  # first scrape showing a consumed record: (t, dead letters, CPU s)
    zero: tuple[float, float] = (service.spawned, 0.0)  # last scrape with nothing consumed: (t, CPU s)
    scrapes = 0
    try:
        async with asyncio.timeout(args.timeout):
            while True:
                text = None
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    text = await bench.metrics_text(port)
                t, usage = now(), service.usage()
                if text is not None:
                    scrapes += 1
                    if "stream_pending_writes" not in text:
                        raise RuntimeError("stream run exposes no stream_pending_writes gauge: cannot tell when "
                                           "its dead letters are written")
                    consumed = prom_value(text, "stream_records_consumed_total")
                    written = prom_value(text, "stream_dead_letters_total")
                    pending = prom_value(text, "stream_pending_writes")
                    if first is None:
                        if consumed > 0:
                            first = (t, written, usage.cpu_seconds)
                        else:
                            zero = (t, usage.cpu_seconds)
                    if written >= total and pending == 0:
                        break
                if service.process.returncode is not None:
                    raise RuntimeError(f"stream run exited with {service.process.returncode}:\n{service.log_tail()}")
                await asyncio.sleep(DLQ_POLL)
        other_end = bench.other_cpu()
        log_lines_done, log_events_done = _log_lines(service.log_path), _log_events(service.log_path)
        metrics = text
        stats = await bench.sandbox_stats()
    finally:
        code = await service.stop()
    assert first is not None and metrics is not None
    first_t, first_written, cpu_first = first
    measured_from = "first record consumed (the first /metrics scrape showing one)"
    if written <= first_written or t <= first_t:  # tiny runs: the first scrape already saw everything
        first_t, first_written, cpu_first = zero[0], 0.0, zero[1]
        measured_from = "the last /metrics scrape before any record was consumed (tiny run)"
    dlq_records = await data.end_offsets(bench.bootstrap, env["STREAM_DLQ_TOPIC"])
    reasons = {}
    for line in metrics.splitlines():
        if line.startswith("stream_dead_letters_total{"):
            reasons[line.split('reason="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    log_lines_end = _log_lines(service.log_path)
    return {
        "dead_letters": total,
        "users": args.users,
        "produce_seconds": produce_seconds,
        "written": written,
        "dlq_records": dlq_records,
        "reasons": reasons,
        "api_requests": stats.get("requests"),
        "measured_from": measured_from,
        "seconds": t - first_t,
        "seconds_incl_startup": t - service.spawned,
        "first_s": first_t - service.spawned,
        "dead_letters_per_s": (written - first_written) / (t - first_t),
        "dead_letters_per_s_incl_startup": written / (t - service.spawned),
        "cpu_s_per_million": (usage.cpu_seconds - cpu_first) / (written - first_written) * 1e6,
        "cpu_s_per_million_incl_startup": usage.cpu_seconds / written * 1e6,
        "cpu_s": usage.cpu_seconds,
        "peak_rss_bytes": usage.hwm_bytes,
        "rss_end_bytes": usage.rss_bytes,
        "other_cpu_s_per_million": {k: (v - other0.get(k, 0.0)) / written * 1e6 for k, v in other_end.items()},
        "log_lines": log_lines_done,
        "log_lines_incl_stop": log_lines_end,
        "log_events": log_events_done,
        "log_events_incl_stop": _log_events(service.log_path),
        "scrapes": scrapes,
        "exit_code": code,
    }


def _log_lines(path: Path) -> int:
    with contextlib.suppress(OSError):
        return len(path.read_text(errors="replace").splitlines())
    return 0


def _log_events(path: Path) -> dict[str, int]:
    """How many JSON log lines of `stream run` carry each event (anything else counts as "other")."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            event = "other"
            with contextlib.suppress(msgspec.DecodeError, AttributeError):
                if line.startswith("{"):
                    event = str(msgspec.json.decode(line).get("event"))
            out[event] = out.get(event, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------- many keys


async def run_keys(bench: Bench) -> dict[str, Any]:
    args = bench.args
    topic = f"bench-keys-{tag()}"
    await data.create_topics(bench.bootstrap, [topic], args.partitions)
    records, samples = data.many_keys_records(args.keys, seed=args.seed + 6)
    port = free_port()
    env = bench.stream_env(
        topic, f"bench-keys-{tag()}", bench.sandbox_url, port,
        min_batch_hold_seconds="3600", max_buffered_samples=str(max(1000, 4 * samples)),
    )  # fmt: skip
    await bench.create_side_topics(env)
    await bench.sandbox_reset()
    service = await spawn("keys-stream", [sys.executable, "-m", "stream", "run"], bench.workdir, env=env)
    try:
        await bench.wait_ready(service, port)
        await asyncio.sleep(1.0)
        start = service.usage()
        print(f"  producing {len(records):,} records of {args.keys:,} users while `stream run` consumes ...",
              flush=True)
        produce_started = now()
        await data.produce(bench.bootstrap, topic, records)
        del records
        async with asyncio.timeout(args.timeout):
            while True:
                consumed = prom_value(await bench.metrics_text(port), "stream_records_consumed_total")
                if consumed >= samples:
                    break
                if service.process.returncode is not None:
                    raise RuntimeError(f"stream run exited:\n{service.log_tail()}")
                await asyncio.sleep(0.2)
        consumed_at = now()
        cpu_consumed = service.usage().cpu_seconds
        await asyncio.sleep(2.0)  # let the last fetch be ingested and the window timers fire
        end = service.usage()
        metrics = await bench.metrics_text(port)
        stats = await bench.sandbox_stats()
    finally:
        # SIGKILL: a graceful stop would park a million small buffers; offsets were never committed anyway.
        await service.stop(signal.SIGKILL)
    buffered = prom_value(metrics, "stream_buffered_samples")
    buffers = prom_value(metrics, "stream_buffers")
    grown = end.rss_bytes - start.rss_bytes
    return {
        "keys": args.keys,
        "samples": samples,
        "buffered_samples": buffered,
        "buffers": buffers,
        "rss_start_bytes": start.rss_bytes,
        "rss_end_bytes": end.rss_bytes,
        "peak_rss_bytes": end.hwm_bytes,
        "rss_growth_bytes": grown,
        "bytes_per_buffered_sample": grown / buffered if buffered else math.nan,
        "bytes_per_key": grown / buffers if buffers else math.nan,
        "requests_sent": stats.get("requests"),
        "consume_seconds": consumed_at - produce_started,
        "cpu_s_per_million_records": (cpu_consumed - start.cpu_seconds) / samples * 1e6,
    }


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=2_000_000,
                   help="single-sample events in each workload's topic (2000000: several times "
                   "STREAM_MAX_BUFFERED_SAMPLES, for the steady figures to see a steady state)")
    p.add_argument("--users", type=int, default=5000, help="users in that topic (5000)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic (4)")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)} (all)")
    p.add_argument("--workload", default=",".join(WORKLOADS),
                   help="comma-separated workloads the throughput contenders (a)-(d) run on, each on its own topic: "
                   "random (each event from a random user), sessions (users syncing in sessions) (random,sessions)")
    p.add_argument("--session-concurrency", type=int, default=50,
                   help="sessions active at a time in the sessions workload (50)")
    p.add_argument("--session-lengths", default="30,300", metavar="MIN,MAX",
                   help="samples per session in the sessions workload, uniform between MIN and MAX (30,300)")
    p.add_argument("--latency-rate", type=float, default=20_000, help="samples/s in the latency run (20000)")
    p.add_argument("--latency-seconds", type=float, default=20, help="length of the latency run (20)")
    p.add_argument("--latency-users", type=int, default=200,
                   help="users in the latency run (200: 400 keys, 50 samples per key per second at 20000/s)")
    p.add_argument("--dead-letters", type=int, default=200_000,
                   help="invalid events (one dead letter each) in the dead-letter run (200000)")
    p.add_argument("--keys", type=int, default=1_000_000, help="users of 1-2 samples in the many-keys run (1000000)")
    p.add_argument("--micro-sizes", default="10000,100000,1000000",
                   help="key counts of the Batcher micro-benchmark, capped at --keys (10000,100000,1000000)")
    p.add_argument("--tail-seconds", type=float, default=5.0,
                   help="after 99 %%, how long (c)/(d) may take to reach 100 %% before the run ends (5)")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds one contender may take (900)")
    p.add_argument("--stream-setting", action="append", default=[], metavar="STREAM_NAME=VALUE",
                   help="a setting for (d) on top of the defaults, e.g. STREAM_MAX_BUFFERED_SAMPLES=1000000 "
                   "(repeatable; the throughput contender only)")
    p.add_argument("--profile-stream", action="store_true",
                   help="run (d) under cProfile and report where `stream run` spends its time (its figures are then "
                   "those of a profiled process: slower, not comparable)")
    p.add_argument("--bootstrap", default=None, help="use this running broker instead of starting a local one")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="JSON results (%(default)s)")
    p.add_argument("--markdown", type=Path, default=RESULTS / "latest.md", help="Markdown table (%(default)s)")
    args = p.parse_args(argv)
    args.only_set = [s.strip() for s in args.only.split(",") if s.strip()]
    args.stream_settings = {}
    for item in args.stream_setting:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("STREAM_"):
            p.error(f"--stream-setting: expected STREAM_NAME=VALUE, got {item!r}")
        args.stream_settings[name] = value
    unknown = set(args.only_set) - set(ALL)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose among {','.join(ALL)}")
    workloads = {s.strip() for s in args.workload.split(",") if s.strip()}
    if not workloads or workloads - set(WORKLOADS):
        p.error(f"--workload: unknown {sorted(workloads - set(WORKLOADS))}; choose among {','.join(WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if w in workloads]  # always random first
    try:
        lo, hi = (int(x) for x in args.session_lengths.split(","))
    except ValueError:
        p.error(f"--session-lengths: expected MIN,MAX, got {args.session_lengths!r}")
    if not 1 <= lo <= hi:
        p.error(f"--session-lengths: expected 1 <= MIN <= MAX, got {lo},{hi}")
    args.session_lengths = (lo, hi)
    if args.session_concurrency < 1:
        p.error("--session-concurrency: at least 1")
    return args


_NOT_PARAMS = ("output", "markdown", "only_set", "stream_setting", "workload")


def _tree_hash(package: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):  # stream/dev/ too: the sandbox and the broker are measured with it
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """Which `stream` is measured: the package this process imports (bench.snapshot's copy when run as
    `python -m bench`), with the working tree's git commit and its uncommitted files in stream/."""
    import subprocess

    import stream

    measured = Path(stream.__file__).resolve().parent
    out: dict[str, Any] = {"stream_sha256": _tree_hash(measured), "measured_from": str(measured)}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(snapshot.REPO)]
        out["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--", "stream"], capture_output=True, text=True,
                                timeout=10).stdout
        out["uncommitted"] = [line[3:] for line in status.splitlines()]
    return out


@contextlib.contextmanager
def phase(results: dict[str, Any], name: str):
    """Record the wall-clock seconds of one part of the run in results["phase_seconds"]."""
    started = time.monotonic()
    try:
        yield
    finally:
        results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)


async def run_part(results: dict, key: str, label: str, run: Callable[[], Awaitable[dict]],
                   line: Callable[[dict], str]) -> None:
    """One optional part of the run: its figures under `key`, or the error that stopped it (the rest goes on)."""
    try:
        results[key] = await run()
        print("  " + line(results[key]), flush=True)
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {label} FAILED: {results[key]['error']}", flush=True)


async def run_all(args: argparse.Namespace, bootstrap: str, broker_pid: int | None, kafka_version: str) -> dict:
    workdir = snapshot.WORKDIR or Path(tempfile.mkdtemp(prefix="stream-bench-"))
    run_started = time.monotonic()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": {**proc.machine(), "kafka": kafka_version},
        "packages": proc.package_versions(("aiokafka", "msgspec", "aiohttp", "quixstreams", "confluent-kafka")),
        "params": {k: v for k, v in vars(args).items() if k not in _NOT_PARAMS},
        "code": code_version(),
        "logs": str(workdir),
    }
    with contextlib.suppress(ImportError):
        import confluent_kafka

        results["packages"]["librdkafka"] = confluent_kafka.libversion()[0]
    print(f"machine: {results['machine']['nproc']} cpus, {results['machine']['cpu_model']}, "
          f"python {results['machine']['python']}, kafka {kafka_version}; logs in {workdir}", flush=True)
    await data.wait_for_group_coordinator(bootstrap)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        bench = Bench(args, bootstrap, broker_pid, kafka_version, workdir, http, results=results)
        await bench.start_sandbox()
        try:
            throughput = [c for c in ("a", "b", "c", "d") if c in args.only_set]
            if throughput:
                workloads = results["workloads"] = {}
                for workload in args.workloads:
                    with phase(results, workload):
                        workloads[workload] = await run_throughput(bench, throughput, workload)
                    workloads[workload]["ratios"] = report.ratios(workloads[workload]["contenders"])
                    workloads[workload]["targets"] = report.targets(workload, workloads[workload]["contenders"])
                if "random" in workloads:  # where readers of results from before the workloads look for them
                    for key in ("produce", "contenders", "ratios"):
                        results[key] = workloads["random"][key]
            if "latency" in args.only_set:
                with phase(results, "latency"):
                    print("latency run: `stream run` with STREAM_BATCH_WINDOW_SECONDS=1 ...", flush=True)
                    await run_part(results, "latency", "latency", lambda: run_latency(bench), report.latency_line)
            if "deadletters" in args.only_set:
                with phase(results, "deadletters"):
                    print(f"dead-letter run: {args.dead_letters:,} invalid events, one dead letter each ...",
                          flush=True)
                    await run_part(results, "dead_letters", "dead letters", lambda: run_dead_letters(bench),
                                   lambda found: report.dead_letters_line(found, report.ceiling(results)))
            if "keys" in args.only_set:
                with phase(results, "keys"):
                    print(f"many-keys run: {args.keys:,} users with 1-2 samples each ...", flush=True)
                    await run_part(results, "keys", "keys", lambda: run_keys(bench), report.keys_line)
                    sizes = sorted({min(int(s), args.keys) for s in args.micro_sizes.split(",") if s.strip()})
                    print(f"Batcher micro-benchmark: {sizes} keys ...", flush=True)
                    try:
                        results["batcher_micro"] = await asyncio.to_thread(microbench.run, sizes)
                    except Exception as exc:
                        results["batcher_micro_error"] = f"{type(exc).__name__}: {exc}"
                        print(f"  micro-benchmark FAILED: {results['batcher_micro_error']}", flush=True)
                    results["decode_micro"] = await asyncio.to_thread(decodebench.run)
                    print("  " + report.decode_line(results["decode_micro"]), flush=True)
            if "ledger" in args.only_set:
                with phase(results, "ledger"):
                    print("ledger restore: 1M remembered samples in one partition ...", flush=True)
                    try:
                        results["ledger_restore"] = await ledgerbench.run(bootstrap)
                        print("  " + report.ledger_line(results["ledger_restore"]), flush=True)
                    except Exception as exc:
                        results["ledger_restore"] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"  ledger restore FAILED: {results['ledger_restore']['error']}", flush=True)
        finally:
            assert bench.sandbox is not None
            await bench.sandbox.stop()
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["seconds"] = round(time.monotonic() - run_started, 1)  # the broker's start-up not included
    if _tree_hash(Path(results["code"]["measured_from"])) != results["code"]["stream_sha256"]:
        results["code"]["changed_during_run"] = True
        print("WARNING: the measured copy of stream/ changed during the run: its figures mix two versions",
              flush=True)
    if _tree_hash(snapshot.REPO / "stream") != results["code"]["stream_sha256"]:
        results["code"]["working_tree_differs"] = True  # edited since the copy was taken: fine, the copy was run
    results["figures"] = report.figures(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bootstrap:
        results = asyncio.run(run_all(args, args.bootstrap, None, "external broker"))
    else:
        from stream.dev.localkafka import LocalKafka

        with LocalKafka(port=0, heap="1g") as broker:
            results = asyncio.run(run_all(args, broker.bootstrap, broker.pid, f"Apache Kafka {broker.version}"))
    text = report.table(results)
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report.markdown(results))
    print(f"\nwrote {args.output} and {args.markdown}")
    failed = [f"{w}.{k}" for w, workload in results.get("workloads", {}).items()
              for k, v in workload["contenders"].items() if "error" in v]
    failed += [k for k in ("latency", "dead_letters", "keys") if "error" in results.get(k, {})]
    failed += ["batcher_micro"] if "batcher_micro_error" in results else []
    return 1 if failed else 0
