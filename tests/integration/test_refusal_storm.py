"""The refusal-storm guard on the real broker with the sandbox: an API that refuses everything for 30 s costs
no dead letter and no duplicate, and says so on /readyz and in the metrics; rare refusals over a long run
are dead-lettered exactly as before, and the guard never trips on them."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest

from stream.dev.generate import WearableData, produce

from .conftest import (
    accepted_identities,
    all_committed,
    all_done,
    eventually,
    make_settings,
    read_topic,
    running,
    sample_identity,
    sandbox_stats,
    set_faults,
)
from .test_offsets_and_refusals import with_device
from .test_process import expected_identities

pytestmark = pytest.mark.integration

STORM_SECONDS = 30.0


def storm_gauge(pipeline) -> float:
    return pipeline.metrics.registry.get_sample_value("stream_api_refusal_storm")


async def watch(pipeline, seen: list[tuple[float, bool, str, float]], stop: asyncio.Event) -> None:
    """What /readyz and the storm gauge said, every 50 ms."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        ready, why = pipeline.ready()
        seen.append((loop.time(), ready, why, storm_gauge(pipeline)))
        await asyncio.sleep(0.05)


async def test_an_api_refusing_everything_for_30_s_costs_no_dead_letter_and_no_duplicate(kafka, topics, sandbox):
    data = WearableData(seed=41)
    before = data.mixed(users=30, per_user=(5, 30))  # healthy traffic first: the storm starts mid-flight
    during = data.mixed(users=120, per_user=(5, 30))
    settings = make_settings(kafka, topics, sandbox.url, batch_window_seconds=1.0, min_batch_max_age_seconds=600.0)
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, bool, str, float]] = []
    stop = asyncio.Event()
    async with running(settings) as pipeline:
        watcher = asyncio.create_task(watch(pipeline, seen, stop))
        await produce(kafka, topics.samples, before)
        await eventually(lambda: all_done(kafka, topics), what="the healthy traffic to be delivered")
        assert pipeline.ready()[0]

        await set_faults(sandbox, fail_all_status=400)  # a proxy or a bad deploy answers 400 to everything
        storm_started = loop.time()
        await produce(kafka, topics.samples, during)
        await eventually(lambda: asyncio.sleep(0, result=storm_gauge(pipeline) == 1.0),
                         what="the guard to recognise the storm")
        # The scenario's clock, not a synchronisation: the API refuses everything for 30 s.
        await asyncio.sleep(max(0.0, storm_started + STORM_SECONDS - loop.time()))
        storm_ended = loop.time()
        ready, why = pipeline.ready()
        assert not ready and "refusal storm" in why
        assert not await all_committed(kafka, topics.group, topics.samples), "committed past refused samples"
        refused_requests = (await sandbox_stats(sandbox))["status_counts"].get("400", 0)

        await set_faults(sandbox)  # the API recovers
        await eventually(lambda: all_done(kafka, topics), timeout=60, what="delivery after the storm")
        await eventually(lambda: asyncio.sleep(0, result=pipeline.ready()[0]), what="/readyz to recover")
        stop.set()
        await watcher
        assert storm_gauge(pipeline) == 0.0
        assert pipeline.delivery.guard.storms == 1

    # No valid sample dead-lettered; every sample accepted exactly once.
    assert await read_topic(kafka, topics.dlq, expected=0, timeout=1) == []
    accepted = Counter(await accepted_identities(sandbox))
    assert accepted == expected_identities(before + during)
    # /readyz said 503 with the reason through the storm, and the gauge said 1.
    stormy = [(t, why) for t, ready, why, _ in seen if storm_started <= t <= storm_ended and not ready]
    assert stormy and all("refusal storm" in why for _, why in stormy)
    assert any(gauge == 1.0 for t, _, _, gauge in seen if storm_started <= t <= storm_ended)
    first_503 = min(t for t, _ in stormy)
    assert first_503 - storm_started < 10.0, "the storm took long to be recognised"
    ready_during = [t for t, ready, _, _ in seen if first_503 <= t <= storm_ended and ready]
    assert not ready_during, "/readyz answered 200 in the middle of the storm"
    # One probe at a time, every few seconds, once the storm was recognised: not a flood of refused requests.
    assert refused_requests < 50, refused_requests


async def test_rare_refusals_over_a_long_run_are_dead_lettered_exactly_and_the_guard_never_trips(
    kafka, topics, sandbox
):
    data = WearableData(seed=42)
    buggy_users = data.user_ids(3)
    # Whole batches the API refuses (every sample from a device it chokes on: a 400) ...
    buggy = []
    for user in buggy_users:
        buggy += with_device(list(data.records(user, "steps", 12)), "BuggyBand")
    # ... and, at random, one sample of some valid batches (a 207): about 1 % of the samples in all.
    waves = [data.mixed(users=60, per_user=(10, 40)) for _ in range(5)]
    await set_faults(sandbox, refuse_device_names=["BuggyBand"], partial_rate=0.1)
    settings = make_settings(kafka, topics, sandbox.url, batch_window_seconds=1.0, min_batch_max_age_seconds=600.0)
    seen: list[tuple[float, bool, str, float]] = []
    stop = asyncio.Event()
    async with running(settings) as pipeline:
        watcher = asyncio.create_task(watch(pipeline, seen, stop))
        await produce(kafka, topics.samples, buggy + waves[0])
        for wave in waves[1:]:
            await asyncio.sleep(1.0)  # traffic over time, not one burst
            await produce(kafka, topics.samples, wave)
        await eventually(lambda: all_done(kafka, topics), timeout=90, what="every record done")
        stop.set()
        await watcher
        assert pipeline.delivery.guard.storms == 0
        # The refused whole batches were held until the batches after them showed the API working.
        held = pipeline.metrics.registry.get_sample_value("stream_retries_total", {"reason": "refused"})
        assert held is not None and held >= len(buggy_users)
    assert all(gauge == 0.0 for *_, gauge in seen), "the guard tripped on isolated refusals"
    assert all(ready for _, ready, _, _ in seen[-5:])

    expected = expected_identities(buggy + [r for wave in waves for r in wave])
    stats = await sandbox_stats(sandbox)
    partial = stats["faults_injected"].get("partial", 0)
    total = sum(expected.values())
    assert total > 3000 and 0.005 < (partial + len(buggy)) / total < 0.03  # about 1 % refused

    letters = await read_topic(kafka, topics.dlq, expected=partial + len(buggy))
    assert {d.reason for d in letters} == {"api_rejected"}
    events = [msgspec.json.decode(d.value) for d in letters]
    dead = Counter(sample_identity(e["user_id"], e["data_type"], e) for e in events)
    accepted = Counter(await accepted_identities(sandbox))
    # Exactly the refused samples are dead-lettered: each BuggyBand sample, and each sample a 207 refused.
    assert sum(1 for d in letters if "partial_refused" in d.headers["stream.error.message"]) == partial
    assert Counter(e["user_id"] for e in events if e["device_name"] == "BuggyBand") == Counter(
        {user: 12 for user in buggy_users}
    )
    assert not set(dead) & set(accepted), "a sample both accepted and dead-lettered"
    assert accepted + dead == expected, "a sample lost or sent twice"
