"""Delivery integrity on the real broker and the sandbox: a revoke that must not outlast the group's patience,
a drain that parks before it waits, parked records that belong to one consumer group, dead letters that
cannot be written holding fetching back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream.deadletter import PARKED_BORN_HEADER, PARKED_GROUP_HEADER
from stream.dev.generate import WearableData, produce

from .conftest import (
    accepted_identities,
    all_committed,
    all_done,
    committed_offsets,
    eventually,
    make_settings,
    read_topic,
    running,
    sample_identity,
    set_faults,
)
from .test_failures import status_count_at_least
from .test_process import expected_identities

pytestmark = pytest.mark.integration


async def produce_to(bootstrap: str, topic: str, partition: int, values: list[bytes], key: bytes | None = None,
                     headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key, partition=partition, headers=headers)
    finally:
        await producer.stop()


def events(user_id: str, data_type: str, samples: list[dict]) -> list[bytes]:
    return [msgspec.json.encode({"user_id": user_id, "data_type": data_type, **s}) for s in samples]


def counter(pipeline, name: str, **labels: str) -> float:
    value = pipeline.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_a_revoke_while_a_batch_sleeps_in_backoff_ends_at_once_and_the_member_stays(kafka, topics, sandbox):
    """The poison user's batch sleeps in a long backoff when a second member joins. The revoke must not wait
    for it (the new owner sends it), and must end well within the rebalance timeout: the first member keeps
    its membership (its commits are not refused, no rebalance beyond the join)."""
    data = WearableData(seed=81)
    (poison_user,) = data.user_ids(1)
    poison = list(data.records(poison_user, "steps", 10))
    others = data.mixed(users=40, per_user=(5, 20))
    await set_faults(sandbox, poison_user_ids=[poison_user])
    await produce(kafka, topics.samples, poison + others)
    # The defaults that matter here: a 30 s drain (the revoke used to wait half of it) against the group's
    # timeouts; a backoff long enough that the poison batch is asleep when the rebalance comes.
    first_settings = make_settings(kafka, topics, sandbox.url, drain_timeout_seconds=30.0,
                                   retry_backoff_first_seconds=20.0, retry_backoff_max_seconds=20.0,
                                   retry_max_seconds=0.0)
    async with running(first_settings) as first:
        await eventually(lambda: status_count_at_least(sandbox, 500, 1), what="the poison batch to fail")
        await eventually(lambda: asyncio.sleep(0, result=bool(first.delivery.sleeping)),
                         what="the poison batch to sleep in backoff")
        await set_faults(sandbox, poison_user_ids=[])  # the new owner of its partition can deliver it
        joined = time.monotonic()
        second_settings = make_settings(kafka, topics, sandbox.url, retry_backoff_max_seconds=0.5)
        async with running(second_settings) as second:
            await eventually(lambda: asyncio.sleep(0, result=counter(second, "stream_rebalances_total",
                                                                      kind="assigned") >= 1),
                             what="the second member's assignment")
            rebalance_took = time.monotonic() - joined
            await eventually(lambda: all_done(kafka, topics), timeout=60, what="everything delivered")
            assert counter(first, "stream_rebalances_total", kind="revoked") == 1
            assert counter(first, "stream_rebalances_total", kind="assigned") == 2
            assert counter(first, "stream_commits_total", result="failed") == 0
    assert rebalance_took < 10.0, f"the rebalance took {rebalance_took:.1f} s"
    revoke = first.metrics.registry.get_sample_value("stream_revoke_duration_seconds_sum")
    assert revoke < 3.0, f"the revoke took {revoke:.1f} s"
    expected = expected_identities(poison + others)
    accepted = await accepted_identities(sandbox)
    assert not (expected - Counter(accepted)), "samples lost"


async def test_a_drain_parks_tails_first_and_commits_them_even_when_a_batch_never_finishes(kafka, topics, sandbox):
    """A batch of partition 0 fails for the whole drain; a 2-sample tail of partition 1 must still be parked,
    acknowledged and committed before the service exits, not parked at the last moment and left uncommitted
    (its parked copy would then come back beside the original after a restart)."""
    data = WearableData(seed=82)
    poison_user, lonely_user = data.user_ids(2)
    await produce_to(kafka, topics.samples, 0, events(poison_user, "steps", data.samples("steps", 5)))
    await produce_to(kafka, topics.samples, 1, events(lonely_user, "bpm", data.samples("bpm", 2)))
    await set_faults(sandbox, poison_user_ids=[poison_user])
    settings = make_settings(kafka, topics, sandbox.url, drain_timeout_seconds=3.0, min_batch_hold_seconds=600.0,
                             min_batch_max_age_seconds=3600.0, retry_max_seconds=0.0, commit_interval_seconds=600.0)
    async with running(settings) as pipeline:
        await eventually(lambda: status_count_at_least(sandbox, 500, 1), what="the poison batch to fail")
        await eventually(lambda: asyncio.sleep(0, result=pipeline.batcher.buffered_samples == 2),
                         what="the tail to be buffered")
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 3.0 + 8.0
    committed = await committed_offsets(kafka, topics.group, topics.samples)
    assert committed.get(1) == 2, f"the parked tail was not committed: {committed}"
    assert committed.get(0, 0) == 0, "committed past a batch the API never accepted"
    parked = await read_topic(kafka, topics.pending, expected=1, timeout=10)
    assert len(parked) == 1
    assert parked[0].headers[PARKED_GROUP_HEADER] == topics.group
    assert len(parked[0].headers[PARKED_BORN_HEADER].split(",")) == 2  # one birth per sample


async def test_records_parked_by_another_consumer_group_are_never_sent(kafka, topics, sandbox):
    """Two deployments configured with one pending topic: each takes back only what it parked itself."""
    data = WearableData(seed=83)
    ours, theirs = data.user_ids(2)
    foreign = msgspec.json.encode({"user_id": theirs, "data_type": "steps", "data": data.samples("steps", 2)})
    await produce_to(kafka, topics.pending, 0, [foreign], key=theirs.encode(),
                     headers=[(PARKED_GROUP_HEADER, b"another-deployment"), (PARKED_BORN_HEADER, b"1.0,1.0")])
    mine = events(ours, "bpm", data.samples("bpm", 5))
    await produce_to(kafka, topics.samples, 0, mine)
    settings = make_settings(kafka, topics, sandbox.url)
    async with running(settings) as pipeline:
        await eventually(lambda: all_done(kafka, topics), what="input and pending topics committed")
        assert counter(pipeline, "stream_foreign_parked_records_total") == 1
    accepted = await accepted_identities(sandbox)
    assert {a[0] for a in accepted} == {ours}, "sent samples another group had parked"
    assert len(accepted) == 5


async def test_the_default_pending_topic_belongs_to_the_group(kafka, topics, sandbox):
    settings = make_settings(kafka, topics, sandbox.url, pending_topic="")
    assert settings.pending_topic == f"{topics.group}-pending"


async def test_dead_letters_that_cannot_be_written_pause_fetching_and_hold_commits(kafka, topics, sandbox, caplog):
    """The DLQ refuses every write (its records are too large for it) for a while, as input keeps coming:
    fetching pauses once the pending writes reach STREAM_MAX_BUFFERED_SAMPLES and stays paused (what is held
    stays flat), nothing is committed past an unwritten dead letter, the trouble is logged a few times (not
    once per record or retry), and once the topic takes them every dead letter is written once and committed."""
    dlq = topics.dlq + "-tiny"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(dlq, 2, 1, topic_configs={"max.message.bytes": "64"})])
        sample = {**WearableData(seed=84).samples("steps", 1)[0], "value": -1}
        bad = [msgspec.json.encode({"user_id": f"u-{i}", "data_type": "steps", **sample}) for i in range(3000)]
        await produce_to(kafka, topics.samples, 0, bad)
        settings = make_settings(kafka, topics, sandbox.url, dlq_topic=dlq, max_buffered_samples=1000,
                                 kafka_max_poll_records=200)
        async with running(settings) as pipeline:
            await eventually(lambda: asyncio.sleep(0, result=counter(pipeline, "stream_fetch_paused") == 1),
                             what="fetching to pause")
            consumed = counter(pipeline, "stream_records_consumed_total", topic=topics.samples)
            assert consumed < 1000 + 2 * 200, f"{consumed} records read while nothing could be written"
            # The outage goes on (a scenario's length, not a synchronisation): input keeps arriving, and
            # nothing more is read, held or committed meanwhile.
            more = [msgspec.json.encode({"user_id": f"v-{i}", "data_type": "steps", **sample}) for i in range(1000)]
            await produce_to(kafka, topics.samples, 1, more)
            for _ in range(20):
                await asyncio.sleep(0.5)
                assert counter(pipeline, "stream_records_consumed_total", topic=topics.samples) == consumed
                assert pipeline.writer.pending <= consumed
            assert set((await committed_offsets(kafka, topics.group, topics.samples)).values()) <= {0}
            retries = pipeline.writer.retried
            assert retries > 0
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, dlq, configs={"max.message.bytes": "1048588"})]
            )
            await eventually(lambda: all_committed(kafka, topics.group, topics.samples), timeout=90,
                             what="every dead letter written and committed")
    finally:
        await admin.close()
    dead = await read_topic(kafka, dlq, expected=4000, timeout=30)
    assert len(dead) == 4000, "a dead letter lost or written twice"
    assert {d.reason for d in dead} == {"invalid_value"}
    logged = [r for r in caplog.records if getattr(r, "event", None) == "write_retry"]
    assert 1 <= len(logged) <= 3, f"{len(logged)} write_retry lines for {retries} retries"


async def test_a_redirecting_api_gets_nothing_committed_until_it_really_accepts(kafka, topics, sandbox):
    """A 302 to a page that answers 200 is not an acceptance: nothing is committed while the API redirects,
    and once it accepts again every sample arrives exactly once."""
    records = WearableData(seed=85).mixed(users=10, per_user=(5, 10))
    await produce(kafka, topics.samples, records)
    await set_faults(sandbox, redirect_status=302)
    async with running(make_settings(kafka, topics, sandbox.url)) as pipeline:
        await eventually(lambda: asyncio.sleep(0, result=counter(pipeline, "stream_retries_total",
                                                                  reason="redirect") >= 5),
                         what="redirects to be retried")
        assert await accepted_identities(sandbox) == []
        committed = await committed_offsets(kafka, topics.group, topics.samples)
        assert set(committed.values()) <= {0}, f"committed past samples the API never accepted: {committed}"
        await set_faults(sandbox, redirect_status=0)
        await eventually(lambda: all_done(kafka, topics), what="delivery once the API stops redirecting")
    assert Counter(await accepted_identities(sandbox)) == expected_identities(records)


@pytest.mark.parametrize(("shape", "reason", "dead"), [("not_json", "api_partial_unknown", 10),
                                                       ("index_string", "api_rejected", 1)])
async def test_a_207_is_settled_by_what_it_says_readably(kafka, topics, sandbox, shape, reason, dead):
    """A 207 whose list of refused samples is readable, even oddly written, dead-letters exactly the refused
    sample; one that says nothing readable dead-letters the whole batch rather than calling it accepted."""
    data = WearableData(seed=86)
    (user,) = data.user_ids(1)
    records = list(data.records(user, "steps", 10))
    await produce(kafka, topics.samples, records)
    await set_faults(sandbox, partial_rate=1.0, odd_207=shape)
    async with running(make_settings(kafka, topics, sandbox.url, batch_window_seconds=1.0)):
        await eventually(lambda: all_done(kafka, topics), what="the batch settled")
    letters = await read_topic(kafka, topics.dlq, expected=dead, timeout=10)
    assert len(letters) == dead
    assert {d.reason for d in letters} == {reason}
    accepted = await accepted_identities(sandbox)
    assert len(accepted) == 9  # the sandbox refused one sample of the batch
    if reason == "api_rejected":  # exactly the refused one: the rest were acknowledged as accepted
        refused = expected_identities(records) - Counter(accepted)
        event = msgspec.json.decode(letters[0].value)
        assert refused == Counter([sample_identity(event["user_id"], event["data_type"], event)])
