"""Failure semantics on the real broker with the sandbox's fault injection: an API outage with a crash in
the middle, throttling with Retry-After, a refused and then rotated token, a poison batch, a broker that
goes away and comes back. Each test checks that no valid sample is lost."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import aiohttp
import msgspec
import pytest

from stream.dev.generate import WearableData, produce
from stream.pipeline import Pipeline
from stream.token import TokenSource

from .conftest import (
    TOKEN,
    DeadLetter,
    Topics,
    accepted_identities,
    all_done,
    committed_offsets,
    dedicated_broker,
    eventually,
    make_settings,
    read_topic,
    running,
    sample_identity,
    sandbox_stats,
    set_faults,
    settings_env,
)
from .test_process import expected_identities, metric, start_service, wait_exit

pytestmark = pytest.mark.integration


async def status_count(sandbox, status: int) -> int:
    return (await sandbox_stats(sandbox))["status_counts"].get(str(status), 0)


async def requests_log(sandbox) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.get(sandbox.url + "/_sandbox/requests") as r:
        return await r.json()


def assert_nothing_lost(expected: Counter, accepted: list[tuple], lonely: list[DeadLetter] = ()) -> None:
    """Every sample reached the API, or (a tail of 1-2 that never met more) the DLQ as below_min_batch."""
    assert {d.reason for d in lonely} <= {"below_min_batch"}
    events = [msgspec.json.decode(d.value) for d in lonely]
    parked_out = Counter(sample_identity(e["user_id"], e["data_type"], e) for e in events)
    missing = expected - Counter(accepted) - parked_out
    assert not missing, f"{sum(missing.values())} samples lost"
    assert set(accepted) <= set(expected)


async def test_api_outage_with_a_crash_in_the_middle_loses_nothing_and_commits_nothing_early(
    kafka, topics, sandbox
):
    records = WearableData(seed=31).mixed(users=100, per_user=(5, 30))
    expected = expected_identities(records)
    await produce(kafka, topics.samples, records)
    await set_faults(sandbox, fail_all_status=503)
    outage_started = asyncio.get_running_loop().time()
    env = settings_env(make_settings(kafka, topics, sandbox.url, retry_backoff_max_seconds=2.0))

    first = start_service(env)
    try:
        await eventually(lambda: status_count_at_least(sandbox, 503, 10), what="the service to hit the outage")
        assert await nothing_committed(kafka, topics), "committed during the outage"
        first.send_signal(signal.SIGKILL)
        await wait_exit(first, 10)
    finally:
        first.kill()

    second = start_service(env)
    try:
        await eventually(lambda: status_count_at_least(sandbox, 503, 20), what="the restarted service to retry")
        # The outage lasts 20 s in all; the scenario's clock, not a synchronisation.
        await asyncio.sleep(max(0.0, outage_started + 20 - asyncio.get_running_loop().time()))
        assert await nothing_committed(kafka, topics), "committed during the outage"
        await set_faults(sandbox)  # the API recovers
        await eventually(lambda: all_done(kafka, topics), timeout=90,
                         what="delivery after the outage")
        second.send_signal(signal.SIGTERM)
        assert await wait_exit(second, 30) == 0
    finally:
        second.kill()
    assert_nothing_lost(expected, await accepted_identities(sandbox))
    assert await read_topic(kafka, topics.dlq, expected=0, timeout=1) == []


async def nothing_committed(kafka: str, topics: Topics) -> bool:
    """No commit has moved past the first record of any partition (the topics are fresh: they start at 0)."""
    return all(offset == 0 for offset in (await committed_offsets(kafka, topics.group, topics.samples)).values())


async def status_count_at_least(sandbox, status: int, n: int) -> bool:
    return await status_count(sandbox, status) >= n


async def test_429_with_retry_after_is_honoured_for_every_batch(kafka, topics, sandbox):
    records = WearableData(seed=32).mixed(users=40, per_user=(5, 20))
    expected = expected_identities(records)
    await produce(kafka, topics.samples, records)
    await set_faults(sandbox, throttle_rate=0.3, retry_after=2)
    async with running(make_settings(kafka, topics, sandbox.url, max_in_flight=8)):
        await eventually(lambda: all_done(kafka, topics), timeout=120,
                         what="delivery through the throttling")
    log = await requests_log(sandbox)
    throttled = [r for r in log if r["status"] == 429]
    assert len(throttled) >= 5
    for refused in throttled:
        later = [r["t"] for r in log if r["digest"] == refused["digest"] and r["t"] > refused["t"]]
        assert later, "a throttled batch was never tried again"
        assert min(later) - refused["t"] >= 2.0, "retried sooner than Retry-After"
    assert_nothing_lost(expected, await accepted_identities(sandbox))


async def test_a_refused_token_pauses_delivery_until_the_token_file_is_rotated(kafka, topics, sandbox, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("expired-token\n")
    records = WearableData(seed=33).mixed(users=20, per_user=(5, 20))
    expected = expected_identities(records)
    await produce(kafka, topics.samples, records)
    settings = make_settings(kafka, topics, sandbox.url, api_token="", api_token_file=str(token_file))
    pipeline = Pipeline(settings, token=TokenSource(settings).current)
    task = asyncio.create_task(pipeline.run())
    try:
        await eventually(lambda: status_count_at_least(sandbox, 401, 2), what="the API to refuse the token")
        ready, why = pipeline.ready()
        assert not ready and "token" in why
        assert await nothing_committed(kafka, topics)
        assert pipeline.metrics.auth_failure._value.get() == 1

        token_file.write_text(TOKEN + "\n")  # the Secret is rotated; no restart
        await eventually(lambda: all_done(kafka, topics), what="delivery after rotation")
        assert pipeline.ready()[0]
    finally:
        pipeline.stop()
        await asyncio.wait_for(task, 60)
    assert_nothing_lost(expected, await accepted_identities(sandbox))
    assert await read_topic(kafka, topics.dlq, expected=0, timeout=1) == [], "a token problem dead-lettered data"
    # Requests were slowed down while refused: a few probes, not one per batch per backoff step.
    assert await status_count(sandbox, 401) < 20


async def test_a_poison_batch_is_dead_lettered_after_retry_max_and_everything_else_is_delivered(
    kafka, topics, sandbox
):
    data = WearableData(seed=34)
    (poison_user,) = data.user_ids(1)
    poison = list(data.records(poison_user, "steps", 10))
    first_wave = data.mixed(users=20, per_user=(5, 20))
    waves: list = []
    await set_faults(sandbox, poison_user_ids=[poison_user])
    await produce(kafka, topics.samples, poison + first_wave)
    settings = make_settings(kafka, topics, sandbox.url, retry_max_seconds=3.0)
    async with running(settings) as pipeline:
        await eventually(lambda: status_count_at_least(sandbox, 500, 1), what="the poison batch to fail")
        # Other users' data keeps flowing while the poison batch fails: it holds nobody else up. Only time
        # failing while the API accepts others counts toward giving up, so waves keep coming until it does.
        while pipeline.metrics.registry.get_sample_value(
            "stream_dead_letters_total", {"reason": "retry_exhausted"}
        ) is None:
            wave = data.mixed(users=5, per_user=(3, 6))
            waves += wave
            before = len(await accepted_identities(sandbox))
            await produce(kafka, topics.samples, wave)
            await eventually(lambda b=before: accepted_at_least(sandbox, b + 1), what="the wave to be accepted")
        await eventually(lambda: all_done(kafka, topics), timeout=60,
                         what="everything done, the poison batch included")
    second_wave = waves
    dead = await read_topic(kafka, topics.dlq, expected=10)
    assert len(dead) == 10
    assert {d.reason for d in dead} == {"retry_exhausted"}
    assert all(poison_user.encode() in d.value for d in dead)
    assert_nothing_lost(expected_identities(first_wave + second_wave), await accepted_identities(sandbox))


async def test_the_broker_going_away_and_coming_back_loses_nothing(sandbox, tmp_path):
    loop = asyncio.get_running_loop()
    async with dedicated_broker("restart", data_dir=tmp_path / "kafka") as (broker, topics):
        records = WearableData(seed=35).mixed(users=200, per_user=(10, 40))
        half = len(records) // 2
        await produce(broker.bootstrap, topics.samples, records[:half])
        await set_faults(sandbox, latency_ms=20)
        # The kill splits users' streams, leaving tails of 1-2 samples that get parked; those that never
        # meet more samples expire after this maximum age, which bounds the test's duration.
        settings = make_settings(broker.bootstrap, topics, sandbox.url, min_batch_max_age_seconds=10.0)
        async with running(settings) as pipeline:
            await eventually(lambda: accepted_at_least(sandbox, 1000), what="delivery to start")
            await loop.run_in_executor(None, broker.kill)
            await eventually(lambda: not_ready(pipeline), what="/readyz to report the lost broker")
            await loop.run_in_executor(None, broker.start)
            await produce(broker.bootstrap, topics.samples, records[half:])
            await eventually(lambda: all_done(broker.bootstrap, topics), timeout=120,
                             what="delivery after the broker came back")
            await eventually(lambda: is_ready(pipeline), what="/readyz to recover")
        dead = await read_topic(broker.bootstrap, topics.dlq, expected=0, timeout=2)
    assert_nothing_lost(expected_identities(records), await accepted_identities(sandbox), dead)


async def metric_at_least(port: int, name: str, value: float) -> bool:
    return await metric(port, name) >= value


async def accepted_at_least(sandbox, n: int) -> bool:
    return (await sandbox_stats(sandbox))["accepted_samples"] >= n


async def not_ready(pipeline: Pipeline) -> bool:
    return not pipeline.ready()[0]


async def is_ready(pipeline: Pipeline) -> bool:
    return pipeline.ready()[0]
