"""Property: whatever the API answers, whenever the group rebalances and however the service stops, every sample
taken from Kafka ends accepted by the API, or in the DLQ with a reason, or still uncommitted (issue #8).

The REAL `stream.pipeline.Pipeline` runs (its loop, batcher, delivery, settle, park, expire, dead-letter, revoke
and commit logic) against the fakes of `tests/unit/fakes.py`, on an event loop with virtual time. Hypothesis draws
the input (users, single-sample events and bundles, producer re-sends, invalid records, offset gaps, 2-3
partitions, records keyed by user id or not), the API's answers (200, 207 with readable, odd or unreadable lists,
3xx, 400/413/422, 401/403, 404/408/425/429/5xx with Retry-After, timeouts the API may have processed, connection
errors, a poison user next to steady traffic), the settings (small windows, holds, ages, retry limits, the
refusal-storm guard, the sync ledger on, in shadow or off), Kafka's behaviour (dead-letter, parking and ledger
writes landing and acknowledged late, or lost in a crash; commits refused or slow; fetch errors; a position rewound
within an assignment; fetches slower than the loop's tick) and a script of members starting, rebalancing, draining
and crashing, up to two at a time (restarts are new Pipelines on the same fake Kafka: committed offsets, the
pending and the ledger topics survive), of operators forgetting a user while members run (`stream ledger forget`:
tombstones and forget markers in the ledger topic, the API deleting the user's data at that moment, the user's
full re-sync FORGET_WAIT later, as the original records or as bundles), and of another writer on a held ledger
partition (a live ledger record written again, into its own partition or another). Partitions are assigned by
number (co-partitioned, as the service's assignor does), or in a quarter of the examples topic by topic (as
aiokafka's default assignor would). Then a last member runs against a healed API and drains. A third property
runs scripts that always forget a user, with the ledger on.

Checked at every commit that Kafka takes, and at the end:
- safety: for every record below its partition's committed offset (input and pending topics), each of its
  valid samples was accepted by the API, or is in a dead letter, or sits in a pending record not yet
  committed; each invalid record (and invalid bundle element) has its dead letter, pointing at it;
- no request carries two copies of a sample, nor fewer than 3 or more than the maximum, nor a sample out of
  chronological order, nor an unknown field; nothing is sent, parked or accepted that was not in the input
  (another group's parked record is never sent);
- dead letters carry a known reason and point at a record that holds their sample; `api_rejected` only for
  samples the API refused, `api_partial_unknown` only for samples of a batch answered 207;
- nothing goes wrong inside the pipeline (an exception in a callback, a delivery, a graceful stop that does
  not end, a commit of a partition the member does not hold);
- liveness: once the API is healthy and the last member drained, every input partition is committed to its end;
- parking with the ledger (on or shadow), README "What it guarantees": a parked sample comes back under its own
  partition number, i.e. every parked record sits in a pending partition of one of its samples' numbers (below);
  with the co-partitioned assignment and a pending partition of each number, that of its source partition;
- forgetting (README, "The ledger topic and `stream ledger`"): after a forget and a re-sync FORGET_WAIT later,
  every re-sent sample of the user ends accepted by the API again, or dead-lettered with a reason, or in a re-sent
  record not committed: never held back as a duplicate by a member that still remembered it. Except a sample the
  API accepted before the forget whose ledger record landed after the forget marker (a sample the API accepts is
  remembered "whenever their own ledger records land");
- the sync ledger (README, "What it guarantees"), with STREAM_LEDGER=on: no sample is accepted by the API twice,
  unless an earlier acceptance of it could not be remembered, for a cause the README allows:
  - the answer never told the member readably (a timeout or connection error after the API processed the
    request; a 207 whose list of refusals cannot be read; any other answer not read as acceptance);
  - the request was on the wire when its member crashed, or when its member gave up waiting in a revoke or a
    drain that ran out of time (`revoke_timeout`, `drain_timeout`) and cancelled it;
  - the member's ledger record of it was not yet in Kafka when the member crashed, or when it let its
    partitions go (revoke, stop) after such a timeout. A record in Kafka but not yet acknowledged is enough:
    the next owner reads it back. Without a timeout, a revoke or a stop must wait for it: no allowance;
  and unless the sample can be screened under several partition numbers, each number once. The numbers come
  from the INPUT and the README's rules, not from where the pipeline parked: those of the input partitions that
  hold it (the ledger works per number); and the pending partition its user id hashes to only where the README
  lets a parked copy go there: the pending topic has no partition of its number (fewer partitions than the
  input), or a rebalance did not co-partition (pending partition N not held with input partition N). After such
  a rebalance (input N and pending N with different members, each screening against its own copy of ledger
  partition N), each parked copy once more. A producer's re-send alone is no allowance. Acceptances from before
  the API deleted the sample's data (a forget) no longer count. Nothing in the input lies outside what the
  ledger can remember (int64 nanoseconds, a day ahead), which is checked;
- with the ledger on or in shadow: every sample the API accepted and said so readably has a ledger record,
  written by that member at that moment, in a ledger partition of one of its numbers; in shadow nothing is held
  back as a duplicate (it sends all it would send with the ledger off).

A case the property found, where the pipeline lost a sample (a stale fetch ingested after a rebalance), is kept
below as a regression test, and so are two fixed stories of the ledger's promise: a hand-off while a ledger
record is on its way (the revoke waits for it, the next owner knows the samples), and the same without the
ledger, which the ledger check must call duplicates (it is not vacuous); and a forget that only a running
member's follow can apply. Two bugs the forget check found in stream/ledger_sync.py (fixed) are kept as stories:
a forget undone for a ledger record not yet acknowledged, and a forget applied late while ledger writes were
slow to be acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import config
from stream.deadletter import PARKED_BORN_HEADER, PARKED_GROUP_HEADER
from stream.ledger import FUTURE_TOLERANCE_NS
from stream.ledger_format import decode_record, unpack
from stream.ledger_store import _user_filter, _with_markers
from stream.ledger_sync import FOLLOW_SECONDS
from stream.offsets import TopicPartition
from stream.pipeline import Pipeline
from stream.schema import REASONS
from tests.unit.fakes import (
    NOISE_KINDS,
    UNREADABLE_207,
    CommitFault,
    Cycle,
    FakeApi,
    FakeKafka,
    FakeLedgerStore,
    FakeRecord,
    FakeSink,
    FakeSource,
    FakeWriter,
    Norm,
    Reply,
    Request,
    VirtualTimeLoop,
    Write,
    WriteDelay,
    norm,
)

TOPIC = "samples"
GROUP = "g"
DLQ = "samples.dlq"
PENDING = f"{GROUP}-pending"
LEDGER = f"{GROUP}-ledger"
WALL0 = 1_700_000_000.0  # wall time when the virtual clock reads 0
START = 1000.0  # the virtual clock at the start of an example
SAMPLE_REASONS = {"api_rejected", "retry_exhausted", "api_partial_unknown", "below_min_batch"}
MAX_PROBLEMS = 12
HEALED_EXTRA_SECONDS = 120  # at most, beyond the time a healed run needs (liveness: then it must have finished)

# -- input ------------------------------------------------------------------------------------------------

USERS = ("u1", "u2", "u3")
BASE = datetime(2023, 11, 1, 4, 0, tzinfo=UTC)
ZONES = ((timedelta(hours=4), "+04:00"), (timedelta(0), "Z"), (timedelta(hours=-5, minutes=-30), "-05:30"))
VALUES = {  # (unit, value) pairs, all valid
    "steps": (("count", 14), ("count", 30000), ("count", 2.5), ("count/s", 50000)),
    "bpm": (("count/min", 61), ("count/min", 300), ("count/min", 61.5), ("count/s", 1.25)),
}


@dataclass(frozen=True)
class SampleSpec:
    minute: int  # start = BASE + minute: few minutes, so equal starts (and exact copies) are common
    value: int
    zone: int
    device: int
    version: bool
    end: bool
    extra: bool  # an unknown field, which must not be forwarded


@dataclass(frozen=True)
class EventSpec:
    kind: str  # single | bundle | invalid | dup
    user: int = 0
    data_type: str = "steps"
    samples: tuple[SampleSpec, ...] = ()
    bad: tuple[tuple[int, int], ...] = ()  # bundle: (position, kind) of invalid elements
    invalid: int = 0  # invalid: which kind of bad record
    copy_of: int = 0  # dup: an earlier event, re-sent byte for byte
    partition: int = 0
    delay: float = 0.0  # seconds after the previous event
    gap: int = 0  # offsets skipped before this record


@dataclass
class RecordMeta:
    """What the test knows about an input record."""

    valid: list[Norm] = field(default_factory=list)
    invalid: bool = False  # the whole record is refused (dead-lettered as it is)
    markers: list[str] = field(default_factory=list)  # device names of its invalid bundle elements


def render(moment: datetime, zone: int, millis: bool) -> str:
    delta, suffix = ZONES[zone]
    return (moment + delta).strftime("%Y-%m-%dT%H:%M:%S") + (".000" if millis else "") + suffix


def sample_dict(spec: SampleSpec, data_type: str) -> dict[str, Any]:
    unit, value = VALUES[data_type][spec.value]
    start = BASE + timedelta(minutes=spec.minute)
    sample: dict[str, Any] = {
        "device_name": ("Apple Watch", "iPhone")[spec.device],
        "start_date": render(start, spec.zone, spec.zone == 0),
        "unit": unit,
        "value": value,
    }
    if spec.end:
        sample["end_date"] = render(start + timedelta(seconds=7), spec.zone, False)
    if spec.version:
        sample["device_version"] = "17.0.3"
    if spec.extra:
        sample["note"] = "unknown fields are ignored"
    return sample


def bad_element(kind: int, marker: str) -> dict[str, Any]:
    element: dict[str, Any] = {"device_name": marker, "start_date": "2023-11-01T08:00:00+04:00", "unit": "count",
                               "value": 5}
    if kind == 0:
        element["value"] = -1
    elif kind == 1:
        element["start_date"] = "2023-11-01T08:00:00"  # no UTC offset
    elif kind == 2:
        del element["unit"]
    else:
        element["value"] = 40000  # above the maximum for `count`
    return element


def bad_record(kind: int) -> bytes | None:
    good = {"user_id": "u1", "data_type": "steps", "device_name": "d", "start_date": "2023-11-01T08:00:00Z",
            "unit": "count", "value": 5}
    return [
        b"not json {",
        b"[1, 2, 3]",
        json.dumps({k: v for k, v in good.items() if k != "unit"}).encode(),
        None,  # a tombstone
        json.dumps({**good, "data_type": "sleep"}).encode(),
        json.dumps({**good, "value": 40000}).encode(),
        json.dumps({"user_id": "u2", "data_type": "bpm", "data": []}).encode(),
        json.dumps({**good, "start_date": "2023-11-01T08:00:00"}).encode(),
        json.dumps({**good, "end_date": "2023-11-01T07:00:00Z"}).encode(),
        json.dumps({**good, "user_id": ""}).encode(),
    ][kind % 10]


def build_records(events: list[EventSpec], keyed: int = 0) -> list[tuple[EventSpec, bytes | None, RecordMeta]]:
    """Each event as record bytes plus what the test knows of it. With `keyed` (the input topic's partition
    count), the producer keys by user id as the README asks: a user's records (and re-sends) go to one partition."""
    out: list[tuple[EventSpec, bytes | None, RecordMeta]] = []
    markers = 0
    for event in events:
        if keyed and event.kind in ("single", "bundle"):
            event = replace(event, partition=event.user % keyed)
        if event.kind == "dup" and out:
            original, value, meta = out[event.copy_of % len(out)]
            if keyed and original.kind != "invalid":
                event = replace(event, partition=original.partition)
            out.append((event, value, RecordMeta(list(meta.valid), meta.invalid, list(meta.markers))))
            continue
        if event.kind in ("invalid", "dup"):  # a re-send of nothing: a bad record instead
            out.append((event, bad_record(event.invalid), RecordMeta(invalid=True)))
            continue
        user = USERS[event.user]
        samples = [sample_dict(s, event.data_type) for s in event.samples]
        meta = RecordMeta(valid=[norm(user, event.data_type, s) for s in samples])
        if event.kind == "bundle":
            data: list[Any] = list(samples)
            for position, kind in event.bad:
                markers += 1
                marker = f"bad-{markers}"
                meta.markers.append(marker)
                data.insert(position % (len(data) + 1), bad_element(kind, marker))
            value = json.dumps({"user_id": user, "data_type": event.data_type, "data": data}).encode()
        else:
            value = json.dumps({"user_id": user, "data_type": event.data_type, **samples[0]}).encode()
        out.append((event, value, meta))
    return out


# -- strategies -------------------------------------------------------------------------------------------

sample_specs = st.builds(
    SampleSpec,
    minute=st.integers(0, 5),
    value=st.integers(0, 3),
    zone=st.integers(0, 2),
    device=st.integers(0, 1),
    version=st.booleans(),
    end=st.booleans(),
    extra=st.booleans(),
)
delays = st.sampled_from((0.0, 0.0, 0.05, 0.3, 1.0, 2.5))


@st.composite
def event_specs(draw, partitions: int, users: int) -> EventSpec:
    kind = draw(st.sampled_from(("single", "single", "single", "bundle", "bundle", "invalid", "dup")))
    common = {
        "partition": draw(st.integers(0, partitions - 1)),
        "delay": draw(delays),
        "gap": draw(st.sampled_from((0, 0, 0, 1, 3))),
    }
    if kind == "invalid":
        return EventSpec("invalid", invalid=draw(st.integers(0, 9)), **common)
    if kind == "dup":
        return EventSpec("dup", copy_of=draw(st.integers(0, 30)), **common)
    user = draw(st.integers(0, users - 1))
    data_type = draw(st.sampled_from(("steps", "bpm")))
    if kind == "single":
        return EventSpec("single", user, data_type, (draw(sample_specs),), **common)
    samples = tuple(draw(st.lists(sample_specs, min_size=1, max_size=5)))
    bad = tuple(draw(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=2)))
    return EventSpec("bundle", user, data_type, samples, bad, **common)


STATUSES = (200, 207, 200, 207, 500, 429, None, 400, 200, 207, 503, 201, 413, 422, 401, 403, 301, 307, 404, 408,
            425, 502, 504, None)
replies = st.builds(
    Reply,
    status=st.sampled_from(STATUSES),
    latency=st.sampled_from((0.0, 0.01, 0.2, 1.0, 3.0)),
    retry_after=st.sampled_from((None, None, "0", "1", "3", "date+2", "soon")),
    refused=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    readable=st.booleans(),
    forms=st.lists(st.integers(0, 2), min_size=1, max_size=3).map(tuple),
    noise=st.lists(st.integers(0, NOISE_KINDS - 1), max_size=2).map(tuple),
    unreadable=st.integers(0, UNREADABLE_207 - 1),
    processed=st.booleans(),
    error=st.sampled_from(("timeout", "timeout", "ClientConnectorError", "ServerDisconnectedError")),
)
write_delays = st.sampled_from((
    WriteDelay(), WriteDelay(), WriteDelay(0.05, 0.0), WriteDelay(0.0, 0.5), WriteDelay(0.5, 0.5),
    WriteDelay(2.0, 0.0), WriteDelay(0.0, 3.0), WriteDelay(6.0, 0.0),
))
# The ledger topic's writes on a script of their own, slow more often: a ledger record still on its way when the
# member lets its partitions go (or dies) is where the ledger's promise is at stake.
ledger_write_delays = st.sampled_from((
    WriteDelay(), WriteDelay(0.05, 0.0), WriteDelay(0.5, 0.5), WriteDelay(2.0, 0.0), WriteDelay(0.0, 3.0),
    WriteDelay(3.0, 1.0), WriteDelay(6.0, 0.0),
))
commit_faults = st.sampled_from((CommitFault(), CommitFault(), CommitFault(fail=True), CommitFault(delay=0.3),
                                 CommitFault(delay=1.5)))


@dataclass(frozen=True)
class Action:
    kind: str  # rebalance | start | stop | crash | restart | rewind | forget | foreign
    delay: float  # seconds after the previous action
    plan: tuple[int, ...] = ()  # rebalance: owner of each partition
    graceful: bool = True  # restart: drain the old members (else crash them)
    land: bool = False  # crash: writes on the wire land anyway
    user: int = 0  # forget: whose samples (of the recorded acceptances); foreign: which ledger record is copied
    scope: int = 0  # forget: 0 every data type of the user, else the acceptance's; foreign: partitions along
    bundled: bool = False  # forget: the re-sync comes as one bundle per partition (else the original records)
    settle: float = 0.0  # forget, foreign: seconds after the first recorded acceptance (or ledger record)


actions = st.builds(
    Action,
    kind=st.sampled_from(("rebalance", "rebalance", "start", "stop", "crash", "restart", "rewind", "forget",
                          "foreign")),
    delay=st.sampled_from((0.1, 0.5, 1.0, 2.0, 4.0, 8.0)),
    plan=st.lists(st.integers(0, 1), max_size=5).map(tuple),
    graceful=st.booleans(),
    land=st.booleans(),
    user=st.integers(0, 7),
    scope=st.integers(0, 2),
    bundled=st.booleans(),
    settle=st.sampled_from((0.0, 0.0, 0.5, 3.0)),
)
# The re-sync waits this long after a forget, as the README tells operators to: running members apply a forget
# within FOLLOW_SECONDS (they look at the ledger's end offsets that often), plus a margin for the look itself.
FORGET_WAIT = FOLLOW_SECONDS + 1.0
# A forget waits (at most this long) for the API to have accepted something, and said so: forgetting a user the
# ledger knows nothing of yet would check nothing.
FORGET_PATIENCE = 20.0


@dataclass
class Forget:
    """A `stream ledger forget --user U [--data-type T]` while members run, with the API deleting U's data at that
    moment, and U's re-sync FORGET_WAIT later."""

    at: float  # wall time
    user: str
    data_type: str | None
    markers: dict[int, int]  # ledger partition -> offset of its forget marker
    before: dict[TopicPartition, int]  # the input's end offsets at the forget: what the re-sync sends again
    # Each re-sent sample of U -> the re-sent input records (topic partition, offset) holding it.
    resent: dict[Norm, list[tuple[TopicPartition, int]]] = field(default_factory=dict)

    def covers(self, sample: Norm) -> bool:
        return sample[0] == self.user and self.data_type in (None, sample[1])


@dataclass(frozen=True)
class Scenario:
    settings: dict[str, Any]
    partitions: int
    pending_partitions: int
    events: tuple[EventSpec, ...]
    actions: tuple[Action, ...]
    replies: tuple[Reply, ...]
    write_delays: tuple[WriteDelay, ...]
    commit_faults: tuple[CommitFault, ...]
    poison: tuple[int, ...]  # users whose batches always fail (until the API heals)
    max_records: int  # records per partition per fetch
    session_timeout: float  # how long the group takes to notice a crashed member
    tail: float  # seconds the script goes on after its last action
    end_crash: bool  # the script ends with a crash of every member (else a graceful stop)
    end_land: bool
    foreign: bool  # another group's parked record sits in the pending topic
    seed: int
    chatter: int = 0  # steady traffic of the poison user and another: single samples, one every 0.25 s
    chatter_user: int = 0
    fetch_slow: float = 0.0  # seconds a fetch waits before taking records (beyond the pipeline's tick: it runs on)
    fetch_fail_every: int = 0  # every n-th fetch raises a KafkaError (0: never)
    keyed: bool = False  # the producer keys records by user id (a user's records on one partition)
    ledger_write_delays: tuple[WriteDelay, ...] = ()  # the ledger topic's own (empty: as the other writes)
    copartitioned: bool = True  # the group assigns by partition number (else topic by topic: see FakeKafka)


@st.composite
def scenarios(draw, slow_fetches: bool = False, forgets: bool = False) -> Scenario:
    """With `slow_fetches`, a fetch outlives the pipeline's tick (it runs on while the loop commits, slowly or not).
    With `forgets`, the ledger is on and the script holds a forget (among fewer other actions), in half the
    examples a foreign ledger write too."""
    hold = draw(st.sampled_from((0.5, 1.0, 3.0)))
    knobs = {
        "batch_max_samples": draw(st.integers(3, 6)),
        "batch_window_seconds": draw(st.sampled_from((0.2, 0.5, 2.0))),
        "min_batch_hold_seconds": hold,
        "min_batch_max_age_seconds": hold + draw(st.sampled_from((0.5, 3.0, 10.0))),
        "commit_interval_seconds": draw(st.sampled_from((0.2, 1.0, 2.0))),
        "drain_timeout_seconds": draw(st.sampled_from((1.0, 3.0, 8.0))),
        "revoke_timeout_seconds": draw(st.sampled_from((0.5, 2.0, 5.0))),
        "retry_backoff_first_seconds": draw(st.sampled_from((0.05, 0.2))),
        "retry_backoff_max_seconds": draw(st.sampled_from((0.5, 2.0))),
        "retry_max_seconds": draw(st.sampled_from((0.0, 0.3, 1.0, 4.0))),
        "max_in_flight": draw(st.integers(1, 4)),
        "api_timeout_seconds": draw(st.sampled_from((0.5, 2.0))),
        "ledger": draw(st.sampled_from(("on", "on", "shadow", "off"))),
    }
    if "refusal_storm_guard" in config.Settings.__struct_fields__:  # the refusal-storm guard (stream/refusals.py)
        knobs.update({
            "refusal_storm_guard": draw(st.booleans()),
            "refusal_storm_window_seconds": draw(st.sampled_from((1.0, 5.0, 60.0))),
            "refusal_storm_min_batches": draw(st.integers(1, 3)),
            "refusal_storm_share": draw(st.sampled_from((0.3, 0.5, 0.9))),
        })
    partitions = draw(st.integers(2, 3))
    users = draw(st.sampled_from((1, 1, 2, 3)))
    poison = draw(st.sampled_from(((), (0,)))) if users > 1 else ()
    scenario = Scenario(
        settings=knobs,
        partitions=partitions,
        pending_partitions=draw(st.integers(1, 3)),
        events=tuple(draw(st.lists(event_specs(partitions, users), min_size=1, max_size=40))),
        actions=tuple(draw(st.lists(actions, max_size=6))),
        replies=tuple(draw(st.lists(replies, max_size=10))),
        write_delays=tuple(draw(st.lists(write_delays, max_size=5))),
        commit_faults=tuple(draw(st.lists(commit_faults, max_size=4))),
        poison=poison,
        max_records=draw(st.integers(1, 5)),
        fetch_slow=draw(st.sampled_from((0.3, 1.0))) if slow_fetches else 0.0,
        fetch_fail_every=draw(st.sampled_from((0, 0, 0, 3, 10))),
        session_timeout=draw(st.sampled_from((0.5, 3.0))),
        tail=draw(st.sampled_from((0.0, 1.0, 5.0))),
        end_crash=draw(st.booleans()),
        end_land=draw(st.booleans()),
        foreign=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        chatter=draw(st.sampled_from((0, 40))) if poison else 0,
        chatter_user=users - 1,
        keyed=draw(st.booleans()),
        ledger_write_delays=tuple(draw(st.lists(ledger_write_delays, min_size=1, max_size=3))),
        copartitioned=draw(st.sampled_from((True, True, True, False))),
    )
    if forgets:
        script = list(scenario.actions[:3])
        script.insert(draw(st.integers(0, len(script))), draw(actions.map(lambda a: replace(a, kind="forget"))))
        if draw(st.booleans()):  # and another writer on a ledger partition
            script.insert(draw(st.integers(0, len(script))), draw(actions.map(lambda a: replace(a, kind="foreign"))))
        scenario = replace(scenario, settings={**knobs, "ledger": "on"}, actions=tuple(script))
    return scenario


# -- the world --------------------------------------------------------------------------------------------


TIMEOUTS = ("revoke_timeout", "drain_timeout")


class _Watch(logging.Handler):
    """The pipeline's log: unexpected errors (findings), and the timeouts the ledger's promise allows for."""

    def __init__(self, world: World) -> None:
        super().__init__(logging.WARNING)
        self.world = world
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event == "delivery_error":
            self.events.append(f"delivery failed unexpectedly: {record.exc_info[1]!r}" if record.exc_info else
                               "delivery failed unexpectedly")
        elif event in TIMEOUTS:
            self.world.timed_out(event)


class Member:
    def __init__(self, world: World, name: str) -> None:
        self.name = name
        self.source = FakeSource(world.kafka, name, world.settings.input_topics, world.scenario.max_records,
                                 world.scenario.fetch_slow, world.scenario.fetch_fail_every)
        self.writer = FakeWriter(world.kafka, name, world.write_delays, {LEDGER: world.ledger_delays})
        self.sink = FakeSink(world.api, name)
        self.pipeline = Pipeline(
            world.settings, clock=world.loop.time, wall=world.wall,
            source=self.source, writer=self.writer, sink=self.sink, sleep=asyncio.sleep,  # type: ignore[arg-type]
            ledger_store=FakeLedgerStore(world.kafka, LEDGER),
        )
        # Backoff jitter from a seeded generator: the same example always runs the same way.
        self.pipeline.delivery._rng = random.Random(world.scenario.seed + len(world.members))
        self.source.bind(self.pipeline._on_assigned, self.pipeline._on_revoked)
        self.task: asyncio.Task | None = None
        self.timeouts: list[tuple[float, str]] = []  # (wall time, revoke_timeout | drain_timeout)
        # The forgets (tombstones, markers) its ledger applied: (wall time, ledger partition, user, in a follow).
        self.forgot: list[tuple[float, int, str, bool]] = []
        sync = self.pipeline.ledger
        if sync is not None:
            forget = sync.ledger.forget

            def observed(number: int, user_id: str, data_type: str | None = None) -> int:
                self.forgot.append((world.wall(), number, user_id, asyncio.current_task() is sync._following))
                return forget(number, user_id, data_type)

            sync.ledger.forget = observed  # type: ignore[method-assign]

    def tenure(self, moment: float) -> tuple[float, float, str]:
        """The hold on its partitions that `moment` falls in: (start, end, how it ended: revoke|crash|stop)."""
        start = -math.inf
        for end, kind in self.source.tenure_ends:
            if end >= moment:
                return start, end, kind
            start = end
        return start, math.inf, "none"

    def timed_out(self, start: float, end: float) -> str | None:
        """The first revoke or drain timeout of this member within (start, end]."""
        return next((event for at, event in self.timeouts if start < at <= end), None)


class World:
    def __init__(self, scenario: Scenario, loop: asyncio.AbstractEventLoop) -> None:
        self.scenario = scenario
        self.loop = loop
        self.settings = msgspec.convert(
            {"api_token": "t", "metrics_port": 0, "kafka_group_id": GROUP, "kafka_topics": [TOPIC],
             "dlq_topic": DLQ, "api_url": "http://api.test", **scenario.settings},
            config.Settings,
        )
        assert self.settings.pending_topic == PENDING
        self.kafka = FakeKafka(
            {TOPIC: scenario.partitions, PENDING: scenario.pending_partitions, DLQ: 1,
             LEDGER: max(scenario.partitions, scenario.pending_partitions)},
            self.wall, scenario.commit_faults, self._on_commit,
            rebalance_timeout=self.settings.kafka_rebalance_timeout_seconds, copartitioned=scenario.copartitioned,
        )
        self.api = FakeApi(
            Cycle(scenario.replies, Reply(200)), self.wall,
            frozenset(USERS[u] for u in scenario.poison), self.settings.api_timeout_seconds,
        )
        self.write_delays = Cycle(scenario.write_delays, WriteDelay())
        self.ledger_delays = Cycle(scenario.ledger_write_delays, WriteDelay())
        keyed = scenario.partitions if scenario.keyed else 0
        self.records = build_records(list(scenario.events), keyed)
        self.chatter = build_records([
            EventSpec("single", (0, scenario.chatter_user)[k % 2], "steps",
                      (SampleSpec(10 + k, 0, 1, 0, False, False, False),),
                      partition=k % scenario.partitions, delay=0.25)
            for k in range(scenario.chatter)
        ], keyed)
        self.valid_norms: set[Norm] = {n for _, _, meta in self.records + self.chatter for n in meta.valid}
        self.foreign_norms: set[Norm] = set()
        self.duplicates: list[str] = []  # what the ledger's promise does not allow (see check_ledger)
        self.members: list[Member] = []
        self.live: list[Member] = []
        self.problems: list[str] = []
        self.background: set[asyncio.Task] = set()
        self.errors = _Watch(self)
        self._dlq_seen = 0
        self._dlq_norms: set[Norm] = set()
        self._dlq_at: dict[tuple[str, int, int], list[FakeRecord]] = {}
        self.phase = "script"
        self.forgets: list[Forget] = []
        self.resyncs: list[asyncio.Task] = []  # forgets with their re-syncs, foreign writes: awaited before the end

    def wall(self) -> float:
        return WALL0 + self.loop.time()

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"[{self.loop.time() - START:.2f} s, {self.phase}] {text}")

    # -- driving ------------------------------------------------------------------------------------------

    async def play(self) -> None:
        logger = logging.getLogger("stream.pipeline")
        level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:  # the timeouts are warnings
            logger.setLevel(logging.WARNING)
        logger.addHandler(self.errors)
        try:
            await self._play()
        finally:
            logger.removeHandler(self.errors)
            logger.setLevel(level)
        for text in self.errors.events:
            self.problem(text)
        for text in self.kafka.errors:
            self.problem(text)

    async def _play(self) -> None:
        if self.scenario.foreign:
            self._park_foreign()
        producer = asyncio.create_task(self._produce(self.records))
        chatter = asyncio.create_task(self._produce(self.chatter))
        await self.start_member()
        for action in self.scenario.actions:
            await asyncio.sleep(action.delay)
            await self.act(action)
        await producer
        await chatter
        for resync in self.resyncs:
            await resync
        await asyncio.sleep(self.scenario.tail)
        for member in list(self.live):
            if self.scenario.end_crash:
                await self.crash(member, self.scenario.end_land, rebalance=False)
            else:
                await self.stop(member, rebalance=False)
        await self._settle_background()
        self.check_safety("after the script")

        # A healed world: the API accepts everything, Kafka is prompt. A last member must finish the job.
        self.phase = "healed"
        self.api.healthy = True
        self.write_delays.override = WriteDelay()
        self.ledger_delays.override = WriteDelay()
        self.kafka.commit_faults.override = CommitFault()
        member = await self.start_member()
        s = self.settings
        await asyncio.sleep(s.batch_window_seconds + s.min_batch_hold_seconds + s.min_batch_max_age_seconds + 8)
        for _ in range(HEALED_EXTRA_SECONDS):  # a slow fetch may need longer to read it all
            if self._input_committed():
                break
            await asyncio.sleep(1.0)
        await self.stop(member, rebalance=False)
        await self._settle_background()
        self.check_safety("at the end")
        self.check_end()
        self.check_forgets()
        self.check_ledger()

    def timed_out(self, event: str) -> None:
        """A member logged a revoke or drain timeout (from within its revoke callback or its run task)."""
        task = asyncio.current_task()
        for member in self.members:
            if task is member.task or task in member.source._callbacks:
                member.timeouts.append((self.wall(), event))
                self.kafka.trace.append(f"{self.wall():.2f} {member.name}: {event}")
                return
        self.problem(f"{event} logged by a task of no member")

    def _input_committed(self) -> bool:
        return all(self.kafka.committed.get(tp, 0) >= self.kafka.end_offset(tp) or not self.kafka.logs[tp]
                   for tp in self.kafka.tps(TOPIC))

    async def _produce(self, records: list[tuple[EventSpec, bytes | None, RecordMeta]]) -> None:
        for event, value, meta in records:
            await asyncio.sleep(event.delay)
            user = None if value is None else USERS[event.user].encode()
            self.kafka.append(TOPIC, event.partition, user, value, [], gap=event.gap, meta=meta)

    def _park_foreign(self) -> None:
        samples = [{**sample_dict(SampleSpec(m, 0, 1, 0, False, False, False), "steps"), "device_name": "Foreign"}
                   for m in (1, 2)]
        self.foreign_norms = {norm("u1", "steps", s) for s in samples}
        value = json.dumps({"user_id": "u1", "data_type": "steps", "data": samples}).encode()
        headers = [(PARKED_BORN_HEADER, f"{self.wall()},{self.wall()}".encode()), (PARKED_GROUP_HEADER, b"other")]
        self.kafka.append(PENDING, 0, b"u1", value, headers)

    async def act(self, action: Action) -> None:
        if action.kind == "rebalance":
            if self.live:
                await self.kafka.rebalance(list(action.plan) or None)
        elif action.kind == "start":
            if len(self.live) < 2:
                await self.start_member()
        elif action.kind == "stop":
            if self.live:  # the script goes on while the member drains (a rebalance may come meanwhile)
                member = self.live.pop(0)
                self._spawn(self._stop(member, rebalance=True))
        elif action.kind == "crash":
            if self.live:
                await self.crash(self.live[-1], action.land)
        elif action.kind == "rewind":
            for member in self.live:
                member.source.rewind()
        elif action.kind == "forget":  # in the background: the script goes on meanwhile
            self.resyncs.append(asyncio.create_task(self._forget_and_resync(action)))
        elif action.kind == "foreign":  # in the background too, once there is a ledger record to copy
            self.resyncs.append(asyncio.create_task(self._copy_later(action)))
        elif action.kind == "restart":
            for member in list(self.live):
                if action.graceful:
                    await self.stop(member, rebalance=False)
                else:
                    await self.crash(member, action.land, rebalance=False)
            await self.start_member()

    def _live_ledger_records(self, number: int) -> dict[bytes | None, FakeRecord]:
        """Ledger partition `number` as compaction would leave it: the latest record per key, tombstones applied."""
        latest: dict[bytes | None, FakeRecord] = {}
        for record in self.kafka.logs[TopicPartition(LEDGER, number)]:
            if record.value is None:
                latest.pop(record.key, None)
            else:
                latest[record.key] = record
        return latest

    async def _forget_and_resync(self, action: Action) -> None:
        """Once the API accepted samples, said so and their ledger record landed (or FORGET_PATIENCE passed), and
        `settle` seconds more, a forget of the user of one such acceptance; U's full re-sync FORGET_WAIT after it.
        The script does not end before the re-sync is committed (or FORGET_PATIENCE passed): the members that held
        the partitions through the forget are the ones to screen it."""
        for _ in range(int(FORGET_PATIENCE / 0.5)):
            if self._recorded():
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(action.settle)
        forget = self.forget(action)
        if forget is None:
            return
        await asyncio.sleep(FORGET_WAIT)
        self._resync(forget, action.bundled)
        for _ in range(int(FORGET_PATIENCE / 0.5)):
            if all(self.kafka.committed.get(tp, 0) > offset for copies in forget.resent.values()
                   for tp, offset in copies):
                break
            await asyncio.sleep(0.5)

    def _recorded(self) -> list[tuple[str, str]]:
        """(user, data type) of the acceptances the API told readably and whose ledger record is in Kafka (without
        the ledger: told), in order, once each."""
        landed = {(write.member, write.written) for write in self.kafka.writes
                  if write.topic == LEDGER and write.landed is not None}
        return list(dict.fromkeys(
            (request.user_id, request.data_type) for request in self.api.requests
            if request.told and (self.settings.ledger == "off" or (request.member, request.answered) in landed)))

    def forget(self, action: Action) -> Forget | None:
        """`stream ledger forget --user U [--data-type T]` while members run (stream/ledger_store.py's forget_user:
        a tombstone for each live ledger record of U, then a forget marker in every partition; its own key filter
        and markers), and the API deletes U's data at the same moment."""
        known = self._recorded() or [(s[0], None) for _, _, meta in self.records + self.chatter for s in meta.valid]
        if not known:
            return None
        user, data_type = known[action.user % len(known)]
        data_type = data_type if action.scope else None
        keep = _user_filter(user, data_type)
        numbers = [tp.partition for tp in self.kafka.tps(LEDGER)]
        found: dict[int, dict[bytes, bytes]] = {}
        for number in numbers:
            live = {key: record.value for key, record in self._live_ledger_records(number).items()
                    if key is not None and record.value is not None and keep(key)}
            if live:
                found[number] = live
        markers: dict[int, int] = {}
        for number, keys in _with_markers(found, user, data_type, numbers).items():
            for key in keys:  # the tombstones, then the marker (last)
                markers[number] = self.kafka.append(LEDGER, number, key, None).offset
        forget = Forget(self.wall(), user, data_type, markers,
                        before={tp: self.kafka.end_offset(tp) for tp in self.kafka.tps(TOPIC)})
        self.forgets.append(forget)
        self.api.forget(user, data_type)
        self.kafka.trace.append(f"{self.wall():.2f} forget {user}/{data_type or '*'}: "
                                f"{sum(len(v) for v in found.values())} tombstones, markers at {markers}")
        return forget

    def _resync(self, forget: Forget, bundled: bool) -> None:
        """The user's full re-sync after a forget: every record of the forgotten samples produced before it, again
        in its partition, byte for byte, or (`bundled`) their valid samples as one bundle per partition and data
        type (what a phone's re-sync sends)."""
        bundles: dict[tuple[int, str], dict[Norm, dict[str, Any]]] = {}
        for tp, end in forget.before.items():
            for record in list(self.kafka.logs[tp]):
                if record.offset >= end:
                    break
                meta: RecordMeta = record.meta
                if not any(forget.covers(sample) for sample in meta.valid):
                    continue  # (a record's valid samples are all of one user and data type)
                if bundled:
                    for sample, body in _valid_samples(record.value, meta.valid):
                        bundles.setdefault((tp.partition, sample[1]), {}).setdefault(sample, body)
                    continue
                copy = self.kafka.append(TOPIC, tp.partition, record.key, record.value,
                                         meta=RecordMeta(list(meta.valid), meta.invalid, list(meta.markers)))
                for sample in meta.valid:
                    forget.resent.setdefault(sample, []).append((tp, copy.offset))
        for (partition, data_type), samples in sorted(bundles.items()):
            value = json.dumps({"user_id": forget.user, "data_type": data_type, "data": list(samples.values())})
            copy = self.kafka.append(TOPIC, partition, forget.user.encode(), value.encode(),
                                     meta=RecordMeta(list(samples)))
            for sample in samples:
                forget.resent.setdefault(sample, []).append((TopicPartition(TOPIC, partition), copy.offset))
        self.kafka.trace.append(f"{self.wall():.2f} re-sync {forget.user}/{forget.data_type or '*'}: "
                                f"{len(forget.resent)} samples{' (bundled)' if bundled else ''}")

    async def _copy_later(self, action: Action) -> None:
        if self.settings.ledger == "off":
            return
        for _ in range(int(FORGET_PATIENCE / 0.5)):
            if any(self._live_ledger_records(tp.partition) for tp in self.kafka.tps(LEDGER)):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(action.settle)
        self.copy_ledger_record(action)

    def copy_ledger_record(self, action: Action) -> None:
        """Another writer on a held ledger partition (a member that held the partition number too, as after a
        rebalance that did not co-partition): a live ledger record, of samples the API accepted, written again
        into partition number + `scope` (the same partition, or another). Members following the partition merge
        it. It adds no check of its own (what it makes a member know, the API has, or a forget raced its record):
        every check must hold as before, with others' records among the member's own in the partitions it follows."""
        live = [record for tp in self.kafka.tps(LEDGER)
                for record in self._live_ledger_records(tp.partition).values()]
        if not live:
            return
        record = live[action.user % len(live)]
        number = (record.partition + action.scope) % self.kafka.partitions[LEDGER]
        self.kafka.append(LEDGER, number, record.key, record.value)
        self.kafka.trace.append(f"{self.wall():.2f} foreign ledger record: {LEDGER}-{record.partition}@"
                                f"{record.offset} copied into partition {number}")

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _settle_background(self) -> None:
        while self.background:
            await asyncio.wait(set(self.background))

    async def start_member(self) -> Member:
        member = Member(self, f"m{len(self.members)}")
        self.members.append(member)
        self.live.append(member)
        self.kafka.trace.append(f"{self.wall():.2f} start {member.name}")
        member.task = asyncio.create_task(member.pipeline.run())
        await member.source.started.wait()
        await self.kafka.rebalance()
        return member

    async def stop(self, member: Member, rebalance: bool = True) -> None:
        """A graceful stop (SIGTERM): the member drains, commits and leaves the group."""
        if member in self.live:
            self.live.remove(member)
            await self._stop(member, rebalance)

    async def _stop(self, member: Member, rebalance: bool) -> None:
        self.kafka.trace.append(f"{self.wall():.2f} stop {member.name}")
        member.pipeline.stop()
        assert member.task is not None
        bound = self.settings.drain_timeout_seconds + 60
        done, _ = await asyncio.wait({member.task}, timeout=bound)
        if not done:
            self.problem(f"{member.name}: a graceful stop did not end within {bound:.0f} s")
            member.source.crash()
            member.task.cancel()
            await asyncio.wait({member.task})
        elif member.task.exception() is not None:
            self.problem(f"{member.name}: run() raised {member.task.exception()!r}")
        if rebalance and self.live:
            await self.kafka.rebalance()

    async def crash(self, member: Member, land: bool, rebalance: bool = True) -> None:
        """SIGKILL: nothing of the member reaches Kafka or the API any more; the group notices later."""
        if member not in self.live:
            return
        self.live.remove(member)
        self.kafka.trace.append(f"{self.wall():.2f} crash {member.name} (writes on the wire land: {land})")
        member.source.crash()
        member.writer.crash(land)
        member.sink.dead = True
        assert member.task is not None
        member.task.cancel()
        await asyncio.wait({member.task})
        self.kafka.leave(member.source)
        if rebalance:
            self._spawn(self._rebalance_later(self.scenario.session_timeout))

    async def _rebalance_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.live:
            await self.kafka.rebalance()

    # -- checks -------------------------------------------------------------------------------------------

    def _on_commit(self, member: str, offsets: dict[TopicPartition, int]) -> None:
        if not self.problems:
            self.check_safety(f"commit by {member} of " + ",".join(f"{t.topic}-{t.partition}@{o}"
                                                                    for t, o in sorted(offsets.items())))

    def _index_dead_letters(self) -> None:
        log = self.kafka.logs[TopicPartition(DLQ, 0)]
        for record in log[self._dlq_seen:]:
            source = (
                (record.header("stream.source.topic") or b"").decode(),
                int(record.header("stream.source.partition") or b"-1"),
                int(record.header("stream.source.offset") or b"-1"),
            )
            self._dlq_at.setdefault(source, []).append(record)
            reason = (record.header("stream.error.reason") or b"").decode()
            if reason in SAMPLE_REASONS:
                sample = _single_event_norm(record.value)
                if sample is not None:
                    self._dlq_norms.add(sample)
        self._dlq_seen = len(log)

    def _pending_norms(self, record: FakeRecord) -> list[Norm]:
        if record.meta is None:
            parsed = json.loads(record.value or b"{}")
            record.meta = [norm(parsed["user_id"], parsed["data_type"], s) for s in parsed["data"]]
        return record.meta

    def _ours(self, record: FakeRecord) -> bool:
        return record.header(PARKED_GROUP_HEADER) in (None, GROUP.encode())

    def check_safety(self, when: str) -> None:
        """Every record below its committed offset is safe: each sample accepted, dead-lettered, or parked in a
        pending record not yet committed; each invalid record and invalid bundle element dead-lettered."""
        self._index_dead_letters()
        covered = set(self.api.accepted) | self._dlq_norms
        for tp in self.kafka.tps(PENDING):
            committed = self.kafka.committed.get(tp, 0)
            for record in self.kafka.logs[tp]:
                if record.offset >= committed and self._ours(record):
                    covered.update(self._pending_norms(record))
        for tp in self.kafka.tps(TOPIC):
            committed = self.kafka.committed.get(tp, 0)
            for record in self.kafka.logs[tp]:
                if record.offset >= committed:
                    break
                meta: RecordMeta = record.meta
                where = f"{tp.topic}-{tp.partition}@{record.offset} (committed to {committed})"
                for sample in meta.valid:
                    if sample not in covered:
                        self.problem(f"{when}: LOST sample {_short(sample)} of {where}: not accepted, not "
                                     "dead-lettered, not parked in an uncommitted pending record")
                letters = self._dlq_at.get((tp.topic, tp.partition, record.offset), [])
                if meta.invalid and not any(r.value == (record.value or b"") and r.header("stream.error.reason")
                                            for r in letters):
                    self.problem(f"{when}: invalid record {where} committed without its dead letter")
                for marker in meta.markers:
                    if not any(f'"{marker}"'.encode() in (r.value or b"") for r in letters):
                        self.problem(f"{when}: invalid bundle element {marker} of {where} committed without its "
                                     "dead letter")
        for tp in self.kafka.tps(PENDING):
            committed = self.kafka.committed.get(tp, 0)
            for record in self.kafka.logs[tp]:
                if record.offset >= committed:
                    break
                if not self._ours(record):
                    continue
                for sample in self._pending_norms(record):
                    if sample not in covered:
                        self.problem(f"{when}: LOST parked sample {_short(sample)} of {tp.topic}-{tp.partition}@"
                                     f"{record.offset} (committed to {committed})")

    def check_end(self) -> None:
        s = self.settings
        self._index_dead_letters()
        for i, request in enumerate(self.api.requests):
            n = len(request.norms)
            if not 3 <= n <= s.batch_max_samples:
                self.problem(f"request {i} carries {n} samples (3..{s.batch_max_samples})")
            if len(set(request.norms)) != n:
                self.problem(f"request {i} carries two copies of one sample: {[_short(x) for x in request.norms]}")
            starts = [x[3][0] for x in request.norms]
            if starts != sorted(starts):
                self.problem(f"request {i} is not in chronological order")
            for sample in request.norms:
                if sample in self.foreign_norms:
                    self.problem(f"request {i} sends another group's parked sample {_short(sample)}")
                elif sample not in self.valid_norms:
                    self.problem(f"request {i} sends a sample that was never in the input: {_short(sample)}")
        for text in self.api.malformed:
            self.problem(text)
        for tp in self.kafka.tps(PENDING):
            for record in self.kafka.logs[tp]:
                if not self._ours(record):
                    continue
                parked = self._pending_norms(record)
                if not 1 <= len(parked) <= 2:
                    self.problem(f"a parked record holds {len(parked)} samples")
                if any(x not in self.valid_norms for x in parked):
                    self.problem("a parked record holds a sample that was never in the input")
        self._check_dead_letters()
        for tp in self.kafka.tps(TOPIC):
            end, committed = self.kafka.end_offset(tp), self.kafka.committed.get(tp, 0)
            if self.kafka.logs[tp] and committed < end:
                self.problem(f"STUCK: {tp.topic}-{tp.partition} committed to {committed} of {end} after the healed "
                             "run and its drain")

    def _check_dead_letters(self) -> None:
        for record in self.kafka.logs[TopicPartition(DLQ, 0)]:
            reason = (record.header("stream.error.reason") or b"").decode()
            if reason not in REASONS:
                self.problem(f"dead letter with an unknown reason {reason!r}")
                continue
            source_tp = TopicPartition((record.header("stream.source.topic") or b"").decode(),
                                       int(record.header("stream.source.partition") or b"-1"))
            offset = int(record.header("stream.source.offset") or b"-1")
            source = next((r for r in self.kafka.logs.get(source_tp, []) if r.offset == offset), None)
            if source is None:
                self.problem(f"dead letter ({reason}) points at no record: {source_tp}@{offset}")
                continue
            if reason not in SAMPLE_REASONS:
                meta = source.meta
                if source_tp.topic != TOPIC or not (meta.invalid or meta.markers):
                    self.problem(f"dead letter ({reason}) for a valid record {source_tp.topic}-"
                                 f"{source_tp.partition}@{offset}")
                continue
            sample = _single_event_norm(record.value)
            if sample is None or sample not in self.valid_norms:
                self.problem(f"dead letter ({reason}) whose value is no sample of the input: {record.value!r}")
                continue
            held = source.meta.valid if source_tp.topic == TOPIC else self._pending_norms(source)
            if sample not in held:
                self.problem(f"dead letter ({reason}) of {_short(sample)} points at {source_tp.topic}-"
                             f"{source_tp.partition}@{offset}, which does not hold it")
            if reason == "api_rejected" and sample not in self.api.refused:
                self.problem(f"dead letter (api_rejected) of {_short(sample)}, which the API never refused")
            if reason == "api_partial_unknown" and sample not in self.api.answered_207:
                self.problem(f"dead letter (api_partial_unknown) of {_short(sample)}, never in a batch answered 207")
            if reason == "retry_exhausted" and not self.settings.retry_max_seconds:
                self.problem("retry_exhausted although STREAM_RETRY_MAX_SECONDS is 0")

    # -- the ledger's promise ---------------------------------------------------------------------------------

    def check_ledger(self, mode: str | None = None) -> None:
        """With the ledger (on or shadow): every sample the API accepted, and said so readably to the member that
        sent it, has a ledger record written at that moment, in a partition of its number. With it on: no sample
        is accepted twice, except where an earlier acceptance could not be remembered (`_unsecured`) or where the
        sample can be screened under more than one partition number. `mode` overrides the settings' (a test
        shows that the check sees the duplicates of a run without the ledger)."""
        mode = mode or self.settings.ledger
        if mode == "shadow":
            self._check_shadow()
        if mode == "off":
            return
        latest = self.wall() + FUTURE_TOLERANCE_NS / 1e9
        for sample in self.valid_norms:  # what the ledger cannot remember by design (README): none in this input
            if not -(2**63) / 1e9 < sample[3][0] <= min(latest, (2**63 - 1) / 1e9):
                self.problem(f"the input holds a sample the ledger cannot remember: {_short(sample)}")
        members = {m.name: m for m in self.members}
        numbers = self._ledger_numbers()
        if self.settings.ledger != "off":
            self._check_parking(numbers)
        written = self._ledger_writes()
        history: dict[Norm, list[tuple[int, Request, str | None]]] = defaultdict(list)
        for index, request in enumerate(self.api.requests):
            member = members[request.member]
            writes = written.get((request.member, request.answered), []) if request.answered is not None else []
            for i in sorted(request.accepted):
                sample = request.norms[i]
                why = self._unsecured(member, index, request, i, writes, numbers[sample])
                if request.at >= self.api.forgotten_at(sample):  # (the API deleted what it accepted before)
                    history[sample].append((index, request, why))
        if mode != "on":
            return
        # A non-co-partitioned assignment gives input partition N and pending partition N (one ledger partition)
        # to two members, each screening against its own copy of the state: a parked copy may then be sent once
        # more (README: the ledger works per partition number). Only parked copies get that allowance.
        parked: Counter[Norm] = Counter()
        if self.kafka.split_rebalances:
            for tp in self.kafka.tps(PENDING):
                for record in self.kafka.logs[tp]:
                    if self._ours(record):
                        parked.update(set(self._pending_norms(record)))
        for sample, acceptances in history.items():
            allowed = len(numbers[sample]) + parked[sample]
            remembered = 0
            for k, (_, _, why) in enumerate(acceptances):
                if remembered >= allowed:
                    lines = [f"{r.at - WALL0 - START:.2f} s by {r.member} (request {i}): {w or 'remembered'}"
                             for i, r, w in acceptances[: k + 1]]
                    self.duplicates.append(
                        f"DUPLICATE: {_short(sample)} accepted {k + 1} times although the ledger knew it (partition "
                        f"numbers {sorted(numbers[sample])}, parked copies {parked[sample]}): " + "; ".join(lines))
                    self.problem(self.duplicates[-1])
                    break
                if why is None:
                    remembered += 1

    def _unsecured(self, member: Member, index: int, request: Request, i: int,
                   writes: list[tuple[Write, set[tuple[str, str, int]]]], numbers: set[int]) -> str | None:
        """Why the ledger may not know that the API accepted sample `i` of `request` (the causes the README
        allows); None when it must: the answer told the member readably, and the member's ledger record of it
        was in the ledger topic before the member's hold on its partitions ended."""
        sample = request.norms[i]
        if request.answered is None:
            if request.lost_in_crash or (request.cancelled is None and member.source.dead):
                return "in flight when its member crashed"
            if request.cancelled is not None:
                start, end, _ = member.tenure(request.cancelled)
                if event := member.timed_out(start, end):
                    return f"in flight when its member gave up waiting ({event})"
                return None  # cancelled without a timeout: not an allowed cause (a later copy is a finding)
            self.problem(f"request {index} ({request.member}) was never answered nor given up")
            return None
        if i not in request.told:
            status = request.reply.status if request.reply else None
            return f"the answer ({status}) did not say readably that it was accepted"
        key = (request.user_id, request.data_type, request.prints[i])
        mine = [write for write, keys in writes if key in keys]
        if not mine:
            if self.settings.ledger == "off":  # (a run without the ledger, checked as if it had one)
                return None
            self.problem(f"{_short(sample)} accepted by request {index} ({request.member}), and so told, has no "
                         "ledger record")
            return None
        if not any(write.partition in numbers for write in mine):
            self.problem(f"{_short(sample)} recorded in ledger partition {[w.partition for w in mine]}, not one of "
                         f"its numbers {sorted(numbers)}")
        start, end, kind = member.tenure(request.answered)
        if any(write.landed is not None and write.landed <= end for write in mine):
            return None
        if kind == "crash":
            return "its ledger record was not in Kafka when its member crashed"
        if event := member.timed_out(start, end):
            return f"its ledger record was not in Kafka when its member let its partitions go ({event})"
        # A revoke or a stop that did not run out of time waits for every ledger record: the next owner of the
        # partition would restore a ledger that does not know these samples.
        self.problem(f"{_short(sample)} accepted by request {index} ({request.member}): its ledger record was not in "
                     f"Kafka when the member's {kind} ended at {end - WALL0 - START:.2f} s, without a timeout")
        return None

    def _ledger_numbers(self) -> dict[Norm, set[int]]:
        """The partition numbers under which each sample may be screened, from where the INPUT holds it and the
        README's rules for parking (not from where the pipeline did park: a parking bug must not widen the
        allowance): the numbers of the input partitions that hold it. A parked sample comes back under its own
        number (the pipeline parks it in pending partition N, N its source partition's number, whenever the
        member holds that partition: with the co-partitioning assignor, always when the pending topic has one).
        Only where the README lets it go elsewhere, to the pending partition its user id hashes to, is that
        number added: the pending topic has no partition N (fewer partitions than the input), or a rebalance did
        not co-partition (pending partition N with another member than input partition N)."""
        numbers: dict[Norm, set[int]] = defaultdict(set)
        pending, split = self.scenario.pending_partitions, bool(self.kafka.split_rebalances)
        for tp in self.kafka.tps(TOPIC):
            for record in self.kafka.logs[tp]:
                for sample in record.meta.valid:
                    numbers[sample].add(tp.partition)
                    if split or tp.partition >= pending:
                        numbers[sample].add(zlib.crc32(sample[0].encode()) % pending)  # as FakeKafka.append hashes
        return numbers

    def _check_parking(self, numbers: dict[Norm, set[int]]) -> None:
        """With the ledger (on or shadow): every parked record of this group sits in a pending partition of one of
        its samples' numbers (`_ledger_numbers`): with the co-partitioned assignment and a pending partition of
        each number, its source partition's number."""
        for tp in self.kafka.tps(PENDING):
            for record in self.kafka.logs[tp]:
                if not self._ours(record):
                    continue
                for sample in self._pending_norms(record):
                    if tp.partition not in numbers[sample]:
                        self.problem(f"PARKED ELSEWHERE: {_short(sample)} parked in {tp.topic}-{tp.partition}@"
                                     f"{record.offset}, not under one of its numbers {sorted(numbers[sample])}: its "
                                     "ledger partition will not know it when it comes back")

    def _ledger_writes(self) -> dict[tuple[str, float], list[tuple[Write, set[tuple[str, str, int]]]]]:
        """Every ledger record a member wrote, by (member, when), with the (user, data type, fingerprint) it holds."""
        written: dict[tuple[str, float], list[tuple[Write, set[tuple[str, str, int]]]]] = defaultdict(list)
        for write in self.kafka.writes:
            if write.topic == LEDGER:
                record = decode_record(write.value)
                keys = {(record.user_id, record.data_type, p) for d in record.devices for p in unpack(d.prints)}
                written[(write.member, write.written)].append((write, keys))
        return written

    def check_forgets(self) -> None:
        """After a forget (and its re-sync, FORGET_WAIT later), every re-sent sample of the user ends accepted by the
        API again, or dead-lettered with a reason, or in a re-sent record not committed: never held back as a
        duplicate because a member still remembered it. Except where the ledger may remember it by design (README:
        a sample the API accepts is remembered "whenever their own ledger records land"): the API accepted it
        before the forget but its ledger record landed after the forget marker in its partition (the request or its
        record was on its way at the forget), so the forget could not tombstone it."""
        if not self.forgets:
            return
        self._index_dead_letters()
        accepted_at: dict[Norm, list[float]] = defaultdict(list)
        for request in self.api.requests:
            for i in request.accepted:
                accepted_at[request.norms[i]].append(request.at)
        dead_at: dict[Norm, list[float]] = defaultdict(list)
        for record in self.kafka.logs[TopicPartition(DLQ, 0)]:
            if (record.header("stream.error.reason") or b"").decode() in SAMPLE_REASONS:
                sample = _single_event_norm(record.value)
                if sample is not None:
                    dead_at[sample].append(record.timestamp / 1000)
        written = self._ledger_writes()
        numbers = self._ledger_numbers()
        for forget in self.forgets:
            for sample, copies in forget.resent.items():
                if any(at >= forget.at for at in accepted_at[sample]):
                    continue
                if any(at >= forget.at - 0.001 for at in dead_at[sample]):  # (timestamps in milliseconds)
                    continue
                if any(offset >= self.kafka.committed.get(tp, 0) for tp, offset in copies):
                    continue
                why = self._raced(forget, sample, written) or self._late(forget, sample, numbers[sample])
                if why == "raced":
                    continue
                self.problem(f"FORGET NOT APPLIED: {_short(sample)}, forgotten at {forget.at - WALL0 - START:.2f} s "
                             f"({forget.user}/{forget.data_type or '*'}) and re-sent at "
                             f"{forget.at + FORGET_WAIT - WALL0 - START:.2f} s in {_names(copies)}, was never "
                             "accepted again nor dead-lettered: held back as a duplicate by a member that still "
                             "remembered it" + {
                                 "unacked": " (its ledger record, tombstoned by the forget, was not yet acknowledged "
                                            "when the member applied the forget)",
                                 "late": " (a member applied the forget in a follow more than FORGET_WAIT after it)",
                             }.get(why or "", ""))

    def _late(self, forget: Forget, sample: Norm, numbers: set[int]) -> str | None:
        """"late" when a member first applied the forget in one of the sample's ledger partitions in a follow, more
        than FORGET_WAIT after it."""
        for member in self.members:
            for number in numbers:
                first = next(((at, follow) for at, n, user, follow in member.forgot
                              if at >= forget.at and n == number and user == forget.user), None)
                if first is not None and first[1] and first[0] > forget.at + FORGET_WAIT:
                    return "late"
        return None

    def _raced(self, forget: Forget, sample: Norm,
               written: dict[tuple[str, float], list[tuple[Write, set[tuple[str, str, int]]]]]) -> str | None:
        """"raced" when the API accepted `sample` before the forget in a request whose ledger record landed after
        the forget marker of its partition (which the forget could not tombstone); "unacked" when its record landed
        before the marker but was acknowledged after the forget (which the forget must not undo)."""
        why = None
        for request in self.api.requests:
            if request.at >= forget.at or request.answered is None:
                continue
            for i in request.accepted:
                if request.norms[i] != sample:
                    continue
                key = (request.user_id, request.data_type, request.prints[i])
                for write, keys in written.get((request.member, request.answered), []):
                    if key not in keys or write.record is None:
                        continue
                    if write.record.offset > forget.markers[write.record.partition]:
                        return "raced"
                    if write.acked is None or write.acked > forget.at:
                        why = "unacked"
        return why

    def _check_shadow(self) -> None:
        """Shadow mode decides but sends all it would send without the ledger: nothing held back as a duplicate
        or dead-lettered as beyond the horizon."""
        for member in self.members:
            registry = member.pipeline.metrics.registry
            for data_type in VALUES:
                if registry.get_sample_value("stream_samples_total", {"outcome": "duplicate", "data_type": data_type}):
                    self.problem(f"shadow mode: {member.name} held samples back as duplicates")
            if registry.get_sample_value("stream_dead_letters_total", {"reason": "beyond_ledger_horizon"}):
                self.problem(f"shadow mode: {member.name} dead-lettered samples beyond the horizon")

    def report(self) -> str:
        lines = ["problems:", *self.problems, "", "trace (last lines):", *self.kafka.trace[-40:], "", "requests:"]
        for request in self.api.requests[-25:]:
            status = request.reply.status if request.reply else None
            lines.append(f"  {request.at - WALL0 - START:.2f} {request.member} {request.user_id}/{request.data_type}"
                         f" n={len(request.norms)} -> {status}")
        return "\n".join(lines)


def _single_event_norm(value: bytes | None) -> Norm | None:
    try:
        event = json.loads(value or b"")
        return norm(event["user_id"], event["data_type"], event)
    except (ValueError, KeyError, TypeError):
        return None


def _valid_samples(value: bytes | None, valid: list[Norm]) -> list[tuple[Norm, dict[str, Any]]]:
    """The valid samples of an input record (single event or bundle), each with its fields as written."""
    parsed = json.loads(value or b"{}")
    user_id, data_type = parsed["user_id"], parsed["data_type"]
    if "data" in parsed:
        candidates = [element for element in parsed["data"] if isinstance(element, dict)]
    else:
        candidates = [{k: v for k, v in parsed.items() if k not in ("user_id", "data_type")}]
    out = []
    for candidate in candidates:
        try:
            sample = norm(user_id, data_type, candidate)
        except (KeyError, TypeError, ValueError):
            continue
        if sample in valid:
            out.append((sample, candidate))
    return out


def _names(copies: list[tuple[TopicPartition, int]]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}@{offset}" for tp, offset in copies)


def _short(sample: Norm) -> str:
    user, data_type, device, start, _end, unit, _kind, value, _version = sample
    return f"{user}/{data_type}/{device}/{start[0] - BASE.timestamp():.0f}s@{start[1]:+.0f}/{value}{unit}"


def run(scenario: Scenario) -> World:
    loop = VirtualTimeLoop(start=START, real_budget=20.0)
    world = World(scenario, loop)
    try:
        loop.run_until_complete(asyncio.wait_for(world.play(), timeout=3600))
    finally:
        loop.real_deadline = time.monotonic() + 5.0  # time to clean up, even after the budget ran out
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.close()
    return world


# Deterministic in CI: the same examples every run (derandomize), nothing stored between runs (database).
# Within one process a run is reproducible; across processes the order of a few set iterations in the pipeline
# follows PYTHONHASHSEED: set it to replay a failure exactly in another process.
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@settings(PROPERTY, max_examples=400)
@given(scenarios())
def test_every_sample_ends_accepted_dead_lettered_or_uncommitted(scenario: Scenario) -> None:
    world = run(scenario)
    assert not world.problems, world.report()


@settings(PROPERTY, max_examples=150)
@given(scenarios(slow_fetches=True))
def test_every_sample_ends_accepted_dead_lettered_or_uncommitted_with_fetches_slower_than_the_tick(
    scenario: Scenario,
) -> None:
    # The fetch task outlives the loop's tick and finishes while the loop does something else (a slow commit too).
    world = run(scenario)
    assert not world.problems, world.report()


@settings(PROPERTY, max_examples=70)
@given(scenarios(forgets=True))
def test_a_forgotten_user_s_re_sync_is_accepted_again(scenario: Scenario) -> None:
    # Every example forgets a user while members run (the ledger on): the re-sync must reach the API again.
    world = run(scenario)
    assert not world.problems, world.report()


# -- a bug the property found (fixed: records fetched under an older assignment are dropped) --------------

def test_a_fetch_that_finished_before_a_rebalance_giving_the_partition_back_lets_no_commit_pass_a_dropped_record():
    # One member, one input partition, two single-sample records; fetches take 1 s (a slow broker) and one
    # record at a time. 1.0 s: r0 is ingested (its sample buffered, offset 0 pending). 1.5 s: the loop commits
    # offset 0, a commit that takes 1.5 s; meanwhile a fetch, still running from the previous tick, finishes
    # at 2.0 s with r1. 2.3 s: a rebalance revokes the partition (r0's sample is dropped from memory, offset 0
    # committed) and assigns it back to the same member. 3.0 s: the slow commit returns; the loop ingests the
    # finished fetch's r1 into the NEW assignment's offsets, which have not seen offset 0, and commits offset
    # 1. 3.5 s: a graceful stop parks r1 and commits offset 2. r0 was never read again: its sample is lost.
    scenario = Scenario(
        settings={"batch_max_samples": 3, "batch_window_seconds": 2.0, "min_batch_hold_seconds": 3.0,
                  "min_batch_max_age_seconds": 6.0, "commit_interval_seconds": 0.2},
        partitions=1,
        pending_partitions=1,
        events=(EventSpec("single", 0, "steps", (SampleSpec(0, 0, 0, 0, False, False, False),)),
                EventSpec("single", 0, "steps", (SampleSpec(1, 0, 0, 0, False, False, False),), delay=0.1)),
        actions=(Action("rebalance", 2.3), Action("stop", 1.2)),
        replies=(), write_delays=(),
        commit_faults=(CommitFault(fail=True), CommitFault(delay=1.5), *[CommitFault()] * 5),
        poison=(), max_records=1, session_timeout=0.5, tail=0.0, end_crash=False, end_land=False,
        foreign=False, seed=0, fetch_slow=1.0,
    )
    world = run(scenario)
    assert not world.problems, world.report()


# -- the ledger's promise, on two fixed stories ---------------------------------------------------------------

def _three_samples_then_a_hand_off(ledger: str) -> Scenario:
    # u1's three samples (partition 0) leave as one batch at 0.1 s and are accepted; their ledger record takes
    # 6 s to reach Kafka. At 0.5 s a second member joins: m0's revoke waits for that record (within its 8 s),
    # then the next rebalance gives partition number 0 to m1 (input, pending and ledger partition 0). At 2 s the
    # producer re-sends the three records, which m1 reads after restoring ledger partition 0: it knows them, so
    # they are duplicates, not sent. (Without the wait m1 would restore before the record is in Kafka, and send
    # them again.)
    singles = [EventSpec("single", 0, "steps", (SampleSpec(m, 0, 1, 0, False, False, False),)) for m in range(3)]
    dups = [EventSpec("dup", copy_of=k, delay=2.0 if k == 0 else 0.0) for k in range(3)]
    return Scenario(
        settings={"batch_max_samples": 3, "batch_window_seconds": 0.2, "min_batch_hold_seconds": 3.0,
                  "min_batch_max_age_seconds": 6.0, "commit_interval_seconds": 0.2, "revoke_timeout_seconds": 8.0,
                  "drain_timeout_seconds": 8.0, "ledger": ledger},
        partitions=2, pending_partitions=2, events=(*singles, *dups),
        actions=(Action("start", 0.5), Action("rebalance", 0.0, plan=(1,))),
        replies=(), write_delays=(), commit_faults=(),
        poison=(), max_records=5, session_timeout=0.5, tail=10.0, end_crash=False, end_land=False,
        foreign=False, seed=0, keyed=True, ledger_write_delays=(WriteDelay(6.0, 0.0), WriteDelay()),
    )


def test_a_sample_accepted_before_a_hand_off_is_not_sent_again_by_the_next_owner():
    world = run(_three_samples_then_a_hand_off("on"))
    assert not world.problems, world.report()
    assert any(line.endswith("assign m1: g-pending-0,g-pending-1,samples-0,samples-1") for line in world.kafka.trace)
    assert world.api.accepted_count == 3, world.report()
    m1 = world.members[1].pipeline.metrics.registry
    assert m1.get_sample_value("stream_samples_total", {"outcome": "duplicate", "data_type": "steps"}) == 3


def test_the_ledger_check_sees_the_duplicates_of_a_run_without_the_ledger():
    # The same story without the ledger: the re-sent copies reach the API again, which the check must call
    # duplicates if the ledger were on (it is not vacuous).
    world = run(_three_samples_then_a_hand_off("off"))
    assert not world.problems, world.report()
    assert world.api.accepted_count == 6, world.report()
    world.check_ledger("on")
    assert len(world.duplicates) == 3, world.duplicates


# -- forgetting a user while members run (`stream ledger forget`, README "The ledger topic and `stream ledger`") --

def _a_forget_while_members_run(events: list[EventSpec], settle: float, ledger_delay: WriteDelay) -> Scenario:
    return Scenario(
        settings={"batch_max_samples": 3, "batch_window_seconds": 0.2, "min_batch_hold_seconds": 3.0,
                  "min_batch_max_age_seconds": 6.0, "commit_interval_seconds": 0.2, "ledger": "on"},
        partitions=1, pending_partitions=1, events=tuple(events),
        actions=(Action("forget", 0.0, settle=settle),),
        replies=(), write_delays=(), commit_faults=(),
        poison=(), max_records=5, session_timeout=0.5, tail=0.0, end_crash=False, end_land=False,
        foreign=False, seed=0, keyed=True, ledger_write_delays=(ledger_delay,),
    )


def test_a_running_member_applies_a_forget_and_the_re_sync_reaches_the_api_again():
    # u1's three samples are accepted at 0 s and recorded (ledger partition 0). At 1 s the user is forgotten (a
    # tombstone for the record, a marker in every partition) and the API deletes u1's data; m0 holds partition 0
    # throughout, with no rebalance: only its follow (every FOLLOW_SECONDS) tells it. The re-sync at 7 s must reach
    # the API again (without the follow m0 would hold it back as duplicates).
    singles = [EventSpec("single", 0, "steps", (SampleSpec(m, 0, 1, 0, False, False, False),)) for m in range(3)]
    world = run(_a_forget_while_members_run(singles, 1.0, WriteDelay()))
    assert not world.problems, world.report()
    assert [line.split(" ", 1)[1] for line in world.kafka.trace if "forget" in line or "re-sync" in line] == [
        "forget u1/*: 1 tombstones, markers at {0: 2}", "re-sync u1/*: 3 samples"]
    assert world.api.accepted_count == 6, world.report()
    assert any(follow for _, _, _, follow in world.members[0].forgot)


def test_a_forget_is_not_undone_for_a_ledger_record_not_yet_acknowledged():
    # u1's three samples are accepted at 4.0 s; their ledger record lands in partition 0 at once (offset 0) but is
    # acknowledged only at 7.0 s. 4.8 s: forget u1 (tombstone at offset 1, marker at 2). 5.0 s: m0's follow reads
    # offsets 0-2; the record is still among its unacknowledged writes, so after the tombstones it is applied
    # again "as written after the forget" (the bug this story found): m0 remembered the forgotten samples, and
    # at 10.8 s held the re-sync back as 3 duplicates. Now the tail's own records count where they stand.
    singles = [EventSpec("single", 0, "steps", (SampleSpec(m, 0, 1, 0, False, False, False),),
                         delay=4.0 if m == 0 else 0.0) for m in range(3)]
    world = run(_a_forget_while_members_run(singles, 0.3, WriteDelay(0.0, 3.0)))
    assert not world.problems, world.report()
    assert world.api.accepted_count == 6, world.report()


def test_a_forget_is_applied_in_time_while_ledger_writes_are_slow():
    # u1 sends a sample every 0.5 s (a batch of 3 every 1.5 s), each ledger record landing 6 s after it is written
    # (acknowledged at once then). 8.1 s: forget u1. 10.1 s: m0's follow finds 4 offsets past its position, 3 of
    # them others' (the tombstone, the marker; offset 3 is its own), and 4 writes unacknowledged: "perhaps only our
    # own writes", it reads nothing. 14.1 s: the re-sync (the README's wait of about 5 s, and more) is screened
    # against the unforgotten state: the first samples were held back as duplicates (the bug this story found).
    # Now a follow waits briefly for its own acknowledgements, then reads whatever is not known to be its own.
    singles = [EventSpec("single", 0, "steps", (SampleSpec(m, 0, 1, 0, False, False, False),), delay=0.5)
               for m in range(30)]
    world = run(_a_forget_while_members_run(singles, 0.1, WriteDelay(6.0, 0.0)))
    assert not world.problems, world.report()
