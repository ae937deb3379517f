"""`stream run` as a real process: killed with SIGKILL mid-run and started again it loses nothing; stopped
with SIGTERM it drains, commits and exits 0; a bad setting stops the start naming the variable."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter

import aiohttp
import pytest

from stream.dev.generate import WearableData, produce
from stream.dev.localkafka import die_with_parent

from .conftest import (
    accepted_identities,
    all_done,
    eventually,
    make_settings,
    sample_identity,
    sandbox_stats,
    settings_env,
)

pytestmark = pytest.mark.integration


def start_service(env: dict[str, str]) -> subprocess.Popen:
    # Logs go to a file, not a pipe: a pipe nobody reads would block the service once it is full.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "stream", "run"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),  # a test session that dies takes its services along
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def metric(port: int, name: str) -> float:
    """Sum of a metric's samples on the service's /metrics (0 while the server is not up yet)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def log_tail(process: subprocess.Popen, limit: int | None = 3000) -> str:
    """The process's log so far (its last `limit` characters, or all of it)."""
    process.log.seek(0)  # type: ignore[attr-defined]
    text = process.log.read().decode(errors="replace")  # type: ignore[attr-defined]
    return text if limit is None else text[-limit:]


async def wait_exit(process: subprocess.Popen, timeout: float) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: process.wait(timeout))


def expected_identities(records) -> Counter:
    import msgspec

    out: Counter = Counter()
    for r in records:
        event = msgspec.json.decode(r.value)
        samples = event.pop("data", None) or [event]
        for s in samples:
            out[sample_identity(event["user_id"], event["data_type"], s)] += 1
    return out


async def test_sigkill_mid_run_then_restart_loses_no_sample(kafka, topics, sandbox):
    data = WearableData(seed=21)
    records = data.mixed(users=400, per_user=(20, 60))
    await produce(kafka, topics.samples, records)
    expected = expected_identities(records)
    # A slow API keeps plenty of batches in flight at the moment of the kill.
    from .conftest import set_faults

    await set_faults(sandbox, latency_ms=30)
    env = settings_env(make_settings(kafka, topics, sandbox.url, batch_window_seconds=0.5, max_in_flight=8))

    first = start_service(env)
    try:

        async def some_accepted() -> bool:
            return (await sandbox_stats(sandbox))["accepted_samples"] >= sum(expected.values()) // 4

        await eventually(some_accepted, what="a quarter of the samples accepted")
        first.send_signal(signal.SIGKILL)
        await wait_exit(first, 10)
    finally:
        first.kill()

    second = start_service(env)
    try:
        await eventually(lambda: all_done(kafka, topics), timeout=120,
                         what="the restarted service to finish")
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second, 30) == 0
    finally:
        second.kill()

    accepted = Counter(await accepted_identities(sandbox))
    missing = expected - accepted
    assert not missing, f"{sum(missing.values())} samples lost"
    assert set(accepted) == set(expected)  # nothing invented; duplicates only from the redelivery


async def test_sigterm_drains_commits_and_exits_zero(kafka, topics, sandbox):
    data = WearableData(seed=22)
    records = data.mixed(users=200, per_user=(10, 40))
    await produce(kafka, topics.samples, records)
    expected = expected_identities(records)
    port = free_port()
    env = settings_env(make_settings(kafka, topics, sandbox.url, batch_window_seconds=60.0, metrics_port=port))
    service = start_service(env)
    try:

        async def all_buffered() -> bool:
            # The window is 60 s and no buffer is full: every sample sits in memory when SIGTERM comes.
            return await metric(port, "stream_records_consumed_total") >= len(records)

        await eventually(all_buffered, what="the service to consume every record")
        assert (await sandbox_stats(sandbox))["requests"] == 0
        service.send_signal(signal.SIGTERM)
        code = await wait_exit(service, 60)
    finally:
        service.kill()
    assert code == 0, log_tail(service)
    # Everything that could make a batch was sent at shutdown; the rest was parked, and all was committed.
    assert await all_done(kafka, topics)
    accepted = Counter(await accepted_identities(sandbox))
    assert accepted == expected


def test_a_bad_setting_stops_the_start_and_names_the_variable():
    env = {**os.environ, "STREAM_API_TOKEN": "x", "STREAM_BATCH_MAX_SAMPLES": "1001"}
    result = subprocess.run([sys.executable, "-m", "stream", "run"], env=env, capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"STREAM_BATCH_MAX_SAMPLES" in result.stderr
