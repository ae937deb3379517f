"""A stop request ends `stream run` within STREAM_DRAIN_TIMEOUT_SECONDS plus a few seconds in every state of
the consumer group (issue #8, item 5): before the first assignment, in the middle of a rebalance, and with
the broker gone. aiokafka waits for the group without limit in the first two (in the consumer's start and
in getmany), and commits and the client's stop wait for a coordinator that is away in all three; the
service must exit 0 within the bound anyway, and commit nothing past samples the API did not accept.

Each test runs `stream run` as a real process, holds it in the state with the group's own mechanics (a
member frozen with SIGSTOP keeps a rebalance open; a killed broker takes the coordinator away), sends
SIGTERM and measures how long the process takes to exit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter

import aiohttp
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.dev.generate import WearableData, produce

from .conftest import (
    Topics,
    accepted_identities,
    committed_offsets,
    dedicated_broker,
    end_offsets,
    eventually,
    make_settings,
    sample_identity,
    set_faults,
    settings_env,
)
from .test_process import free_port, log_tail, metric, start_service, wait_exit

pytestmark = pytest.mark.integration

DRAIN = 3.0  # STREAM_DRAIN_TIMEOUT_SECONDS of the services stopped here
BOUND = DRAIN + 10.0  # the longest a stop may take, whatever the state
# A frozen member keeps a rebalance open until the group gives up on it: at its session timeout, or at the
# rebalance timeout (the largest of the members'), whichever comes first. Both are far longer than a test
# needs to send SIGTERM and watch the exit.
SESSION = 45.0
REBALANCE = 60.0
PATIENCE = SESSION + 15  # how long an overrunning stop is still waited for, to measure it


def stop_settings(kafka: str, topics: Topics, api_url: str, **overrides: object):
    """Settings of a service under test: a short drain, a revoke that fits the rebalance timeout."""
    values: dict[str, object] = {
        "drain_timeout_seconds": DRAIN,
        "revoke_timeout_seconds": 1.0,
        "kafka_session_timeout_seconds": SESSION,
        "kafka_rebalance_timeout_seconds": REBALANCE,
    }
    values.update(overrides)
    settings = make_settings(kafka, topics, api_url, **values)  # runs the settings' own checks, as `stream run` does
    assert settings.revoke_budget_seconds <= settings.kafka_rebalance_timeout_seconds  # 1 + 10 + 5 <= 60
    return settings


def events(process: subprocess.Popen) -> list[str]:
    """The `event` of each JSON log line the process wrote so far, in order."""
    out: list[str] = []
    for line in log_tail(process, None).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry:
            out.append(entry["event"])
    return out


# The service's own log events worth showing (the Kafka client's reconnection messages are left out).
STREAM_EVENTS = {"started", "assigned", "revoked", "revoke_timeout", "commit_failed", "draining", "drain_timeout",
                 "consumer_stop_timeout", "write_abandoned", "fetch_failed", "stopped"}


def membership(process: subprocess.Popen) -> str | None:
    """The last membership change the process logged: "assigned", "revoked" or None (none yet)."""
    changes = [e for e in events(process) if e in ("assigned", "revoked")]
    return changes[-1] if changes else None


async def readyz(port: int) -> tuple[int, str] | None:
    """(status, reason) of the service's /readyz; None while it does not answer."""
    try:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            f"http://127.0.0.1:{port}/readyz"
        ) as r:
            return r.status, (await r.text()).strip()
    except (aiohttp.ClientError, TimeoutError):
        return None


async def group_state(bootstrap: str, group: str) -> tuple[str, int]:
    """The group's state as the coordinator sees it (Stable, PreparingRebalance, ...) and its member count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    _, _, state, _, _, members, *_ = response.groups[0]
    return state, len(members)


async def sigterm_and_time(process: subprocess.Popen, what: str) -> float:
    """SIGTERM, wait for the exit and return how long it took; fail unless it is status 0 within BOUND.

    The wait goes on well past the bound (up to PATIENCE), so that a stop that overruns is measured and shown
    rather than cut short: a stop stuck in the group's rebalance ends when the group gives up a frozen member."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z"
    process.send_signal(signal.SIGTERM)
    try:
        code = await wait_exit(process, PATIENCE)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{what}: no exit {PATIENCE:.0f} s after SIGTERM (sent at {sent})\n{service_log(process)}"
        ) from None
    elapsed = loop.time() - started
    print(f"\n{what}: exited with status {code} {elapsed:.2f} s after SIGTERM (sent at {sent}, bound {BOUND:.0f} s)")
    assert code == 0, f"{what}: status {code} (SIGTERM at {sent})\n{service_log(process)}"
    assert elapsed <= BOUND, f"{what}: took {elapsed:.1f} s, more than {BOUND:.0f} s (SIGTERM at {sent})\n" + (
        service_log(process)
    )
    return elapsed


def service_log(process: subprocess.Popen, lines: int = 60) -> str:
    """The process's own log lines (and tracebacks), without the Kafka client's reconnection chatter."""
    out: list[str] = []
    for line in log_tail(process, None).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            out.append(line)  # a traceback
            continue
        if isinstance(entry, dict) and not str(entry.get("logger", "")).startswith("aiokafka"):
            out.append(line[:400])
    return "\n".join(out[-lines:])


def kill(*processes: subprocess.Popen) -> None:
    """Clean-up: SIGKILL (it ends a SIGSTOPped process too) and reap."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def a_few_hundred_samples(seed: int) -> list:
    return WearableData(seed=seed).mixed(users=30, per_user=(5, 15), bundle_share=0.1)


async def test_sigterm_before_the_first_assignment_exits_within_the_drain_timeout(kafka, topics, sandbox):
    """How a member is held before its first assignment: member A consumes the group's partitions and is
    then frozen with SIGSTOP (its process is alive, its session not yet expired, but it answers nothing).
    Member B joins: the coordinator opens a rebalance and holds B's JoinGroup until every known member has
    rejoined, i.e. until it gives A up at A's session timeout (45 s here) or the rebalance timeout (60 s).
    B thus waits for its first assignment inside aiokafka for tens of seconds: the group's state says
    PreparingRebalance with two members, and B's /readyz says it has no partitions. SIGTERM B then. (A single
    member cannot be held so: a group of one completes its join at once.)"""
    records = a_few_hundred_samples(seed=81)
    await produce(kafka, topics.samples, records)
    port_a, port_b = free_port(), free_port()
    first = start_service(settings_env(stop_settings(kafka, topics, sandbox.url, metrics_port=port_a)))
    second = None
    try:

        async def a_consumed_everything() -> bool:
            return await metric(port_a, "stream_records_consumed_total") >= len(records)

        await eventually(a_consumed_everything, what="member A to consume every record")
        first.send_signal(signal.SIGSTOP)

        second = start_service(settings_env(stop_settings(kafka, topics, sandbox.url, metrics_port=port_b)))

        async def b_waits_for_its_first_assignment() -> bool:
            # B's join arrived (the group has two members and, A being frozen, cannot leave PreparingRebalance),
            # and B has no partitions.
            waiting = (503, "waiting for the consumer group to assign partitions")
            in_join = await group_state(kafka, topics.group) == ("PreparingRebalance", 2)
            return in_join and await readyz(port_b) == waiting

        await eventually(b_waits_for_its_first_assignment, what="member B to wait in its join")
        # Not a synchronisation: the state is reached; this holds it a moment so that the SIGTERM finds B
        # well inside its unbounded wait rather than at its start.
        await asyncio.sleep(1.0)
        assert await group_state(kafka, topics.group) == ("PreparingRebalance", 2)

        await sigterm_and_time(second, "before the first assignment")
        assert "assigned" not in events(second), "B was assigned after all: the state under test was not reached"
        assert events(second)[-1] == "stopped"
    finally:
        kill(first, *([second] if second else []))


async def test_sigterm_in_the_middle_of_a_rebalance_exits_within_the_drain_timeout_and_commits_nothing_early(
    kafka, topics, sandbox
):
    """Members M1 and M3 share the partitions, delivering slowly (a slow API, two requests at a time); M3 is
    frozen with SIGSTOP and M2 joins. The coordinator opens a rebalance: M1 revokes its partitions (sending,
    waiting up to the revoke timeout, committing what is done) and rejoins, and its join is then held until
    the group gives up on frozen M3 (45 s). SIGTERM M1 in that join. Afterwards, every record below the
    committed offsets must have all its samples accepted by the API (or parked in the pending topic, which
    also counts as done): the revoke and the stop commit nothing that was still in flight."""
    records = a_few_hundred_samples(seed=82)
    await produce(kafka, topics.samples, records)
    await set_faults(sandbox, latency_ms=1000)
    settings = stop_settings(kafka, topics, sandbox.url, max_in_flight=2)
    m1 = start_service(settings_env(settings))
    m3 = start_service(settings_env(settings))
    m2 = None
    try:

        async def both_assigned() -> bool:
            if membership(m1) != "assigned" or membership(m3) != "assigned":
                return False
            return await group_state(kafka, topics.group) == ("Stable", 2)

        await eventually(both_assigned, what="M1 and M3 to share the partitions")

        async def some_committed() -> bool:
            return sum((await committed_offsets(kafka, topics.group, topics.samples)).values()) > 0

        await eventually(some_committed, what="a first commit, so that the check below is not empty")
        m3.send_signal(signal.SIGSTOP)
        revokes_before = events(m1).count("revoked")

        m2 = start_service(settings_env(settings))

        async def m1_in_the_rebalance() -> bool:
            # M1 revoked since M2 started, got nothing back yet, and the group waits (for frozen M3).
            if events(m1).count("revoked") <= revokes_before or membership(m1) != "revoked":
                return False
            return (await group_state(kafka, topics.group))[0] == "PreparingRebalance"

        await eventually(m1_in_the_rebalance, what="M1 to revoke and wait in the rebalance")
        # Not a synchronisation: the state is reached; this holds it a moment so that M1 is well inside its
        # rejoin (getmany waiting without limit) when SIGTERM comes.
        await asyncio.sleep(1.0)
        assert membership(m1) == "revoked"

        await sigterm_and_time(m1, "mid-rebalance")
        logged = events(m1)
        print("M1's events:", [e for e in logged if e in STREAM_EVENTS])
        assert membership(m1) == "revoked", "M1 was assigned again before the stop: not mid-rebalance"
        assert logged[-1] == "stopped"
    finally:
        kill(m1, m3, *([m2] if m2 else []))

    # Nothing committed past a sample that was not accepted (nor parked).
    committed = await committed_offsets(kafka, topics.group, topics.samples)
    below = [r for r in await read_all(kafka, topics.samples) if r.offset < committed.get(r.partition, 0)]
    done = Counter(await accepted_identities(sandbox))
    done.update(identities(await read_all(kafka, topics.pending)))
    missing = [r.offset for r in below if any(i not in done for i in identities([r]))]
    print(f"committed {committed}; {len(below)} of {len(records)} records below the commits; "
          f"{sum(done.values())} samples accepted or parked")
    assert below, "nothing was committed: the check would be empty"
    assert not missing, f"committed past {len(missing)} records whose samples were not all accepted"


async def test_sigterm_with_the_broker_down_exits_within_the_drain_timeout(sandbox):
    """A broker of the test's own is killed (SIGKILL, like a crash) while the service holds buffers; once
    /readyz reports the coordinator lost, SIGTERM. The drain sends the sendable buffers to the API, but its
    parking writes, its commits and the clients' stops all wait for a broker that does not come back: each
    must give up in time."""
    loop = asyncio.get_running_loop()
    async with dedicated_broker("stop-down") as (broker, topics):
        records = a_few_hundred_samples(seed=83)
        await produce(broker.bootstrap, topics.samples, records)
        port = free_port()
        # A long window and hold: every sample is still buffered when the broker goes, so the drain has work
        # for the API (sent) and tails to park (in Kafka, which is down).
        settings = stop_settings(broker.bootstrap, topics, sandbox.url, metrics_port=port,
                                 batch_window_seconds=60.0, min_batch_hold_seconds=60.0)
        service = start_service(settings_env(settings))
        try:

            async def consumed_everything() -> bool:
                return await metric(port, "stream_records_consumed_total") >= len(records)

            await eventually(consumed_everything, what="the service to consume every record")
            await loop.run_in_executor(None, broker.kill)

            async def coordinator_lost() -> bool:
                return await readyz(port) == (503, "cannot reach the Kafka group coordinator")

            await eventually(coordinator_lost, what="/readyz to report the lost broker")
            await sigterm_and_time(service, "broker down")
            logged = events(service)
            print("events:", [e for e in logged if e in STREAM_EVENTS])
            assert logged[-1] == "stopped"
        finally:
            kill(service)


async def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Every record of a topic, up to its end offsets as of now."""
    ends = {p: end for p, end in (await end_offsets(bootstrap, topic)).items() if end > 0}
    if not ends:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        partitions = [TopicPartition(topic, p) for p in ends]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = dict.fromkeys(ends, -1)
        deadline = asyncio.get_running_loop().time() + timeout
        while any(seen[p] < ends[p] - 1 for p in ends):
            assert asyncio.get_running_loop().time() < deadline, f"could not read {topic} to its end"
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                for record in batch:
                    if record.offset < ends[tp.partition]:
                        out.append(record)
                        seen[tp.partition] = max(seen[tp.partition], record.offset)
    finally:
        await consumer.stop()
    return out


def identities(records: list[ConsumerRecord]) -> Counter:
    """The sample identities inside records (single-sample events or bundles)."""
    out: Counter = Counter()
    for record in records:
        event = msgspec.json.decode(record.value)
        for sample in event.pop("data", None) or [event]:
            out[sample_identity(event["user_id"], event["data_type"], sample)] += 1
    return out
