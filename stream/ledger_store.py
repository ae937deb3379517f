"""The sync ledger's Kafka side: its compacted topic, reading a partition back at assignment, and the
operator's `stream ledger show` / `stream ledger forget`. No ledger decisions here: this module only moves
ledger records (stream/ledger_format.py says what they hold)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError, for_code

from stream.ledger_format import LedgerKey, decode_key, decode_record, encode_key, unpack

log = logging.getLogger("stream.ledger")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
TOPIC_WAIT_SECONDS = 30.0  # for a topic just created to show in the metadata with a leader per partition

# A restore is one long sequential read of records of ~16 bytes per sample: large fetches, few round trips.
_RESTORE_FETCH = {"max_partition_fetch_bytes": 16 * 1024 * 1024, "fetch_max_bytes": 64 * 1024 * 1024}
_RESTORE_MAX_RECORDS = 10_000
_POLL_MS = 500


class LedgerTopicError(ValueError):
    """The ledger topic cannot serve (too few partitions, missing, cannot be created); the message says why
    and what to do."""


def ledger_topic_configs(horizon_seconds: float) -> dict[str, str]:
    """The configs a new ledger topic is created with (an existing one keeps whatever it has)."""
    if not horizon_seconds > 0:
        raise ValueError(f"horizon_seconds must be positive, got {horizon_seconds!r}")
    return {
        # compact: the same batch recorded twice (a crash between ledger write and commit) is one key, kept
        # once. delete: a record older than the horizon plus a day remembers only samples beyond the horizon,
        # which the ledger no longer judges, so its segment goes without anyone writing a tombstone.
        "cleanup.policy": "compact,delete",
        "retention.ms": str(round(horizon_seconds * 1000) + DAY_MS),
        # Retention and compaction only touch closed segments; the broker's default (a week or 1 GiB) would
        # keep a quiet ledger's expired records for days longer and make every restore read them.
        "segment.ms": str(HOUR_MS),
        # How long a tombstone (`stream ledger forget`) stays readable after compaction: a restore running
        # while the record it deletes is compacted away must still see the tombstone. A day is ample.
        "delete.retention.ms": str(DAY_MS),
    }


def check_partitions(ledger_topic: str, ledger_partitions: int, input_partitions: dict[str, int]) -> None:
    """Raise LedgerTopicError when an input topic has more partitions than the ledger topic: the ledger of
    input partition N lives in ledger partition N, which must exist."""
    short = {name: count for name, count in input_partitions.items() if count > ledger_partitions}
    if not short:
        return
    needed = max(short.values())
    inputs = ", ".join(f"{name!r} has {count}" for name, count in sorted(short.items()))
    raise LedgerTopicError(
        f"ledger topic {ledger_topic!r} has {ledger_partitions} partitions, fewer than input topic {inputs}: "
        f"the ledger of input partition N is kept in ledger partition N. Add partitions to the ledger topic "
        f"(kafka-topics --bootstrap-server BROKERS --alter --topic {ledger_topic} --partitions {needed}); "
        "its records stay where they are"
    )


# The admin client takes the connection options but not the consumer's or producer's own ones.
_ADMIN_PARAMETERS = frozenset(inspect.signature(AIOKafkaAdminClient.__init__).parameters) - {"self", "loop"}


def _admin(options: dict) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**{k: v for k, v in options.items() if k in _ADMIN_PARAMETERS})


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    """Partitions of every topic. Asked for all topics, not by name: a metadata request naming a missing
    topic makes a broker with auto.create.topics.enable create it, with its defaults (not compacted)."""
    return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if t["partitions"]}


async def ensure_ledger_topic(options: dict, topic: str, input_topics: list[str], horizon_seconds: float) -> int:
    """Create the ledger topic if it is missing, check that it has a partition for every input partition, and
    return its partition count.

    An input topic that does not exist yet is left out (it is checked at the next start, once it exists), as is
    one created a moment ago that the broker's metadata does not list yet; with none listed the ledger gets 1
    partition. An existing ledger topic's configs are never changed (an
    operator may have tuned them); a cleanup.policy without compact is logged as a warning.
    """
    configs = ledger_topic_configs(horizon_seconds)
    admin = _admin(options)
    try:
        await admin.start()
        counts = await _partition_counts(admin)
        inputs = {name: counts[name] for name in input_topics if name in counts}
        if topic not in counts:
            brokers = len((await admin.describe_cluster())["brokers"])
            new = NewTopic(topic, max([*inputs.values(), 1]), min(3, brokers), topic_configs=configs)
            if await _create(admin, new, configs):
                log.info(
                    "ledger topic created",
                    extra={"event": "ledger_topic_created", "topic": topic, "partitions": new.num_partitions},
                )
            ledger_partitions = await _wait_for_topic(admin, topic)
        else:
            ledger_partitions = counts[topic]
        await _warn_unless_compacted(admin, topic)  # also when another member or an operator created it first
        check_partitions(topic, ledger_partitions, inputs)
        return ledger_partitions
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, new: NewTopic, configs: dict[str, str]) -> bool:
    """Create the topic; False when another member created it first (two members starting at once)."""
    response = await admin.create_topics([new])
    for _name, code, message in response.topic_errors:
        if code == TopicAlreadyExistsError.errno:
            return False
        if code:
            error = for_code(code).__name__
            settings = " ".join(f"--config {k}={v}" for k, v in configs.items())
            raise LedgerTopicError(
                f"cannot create the ledger topic {new.name!r} ({error}: {message}); create it yourself: "
                f"kafka-topics --bootstrap-server BROKERS --create --topic {new.name} "
                f"--partitions {new.num_partitions} {settings}"
            )
    return True


async def _wait_for_topic(admin: AIOKafkaAdminClient, topic: str) -> int:
    """A created topic reaches the brokers' metadata a moment later; a client using it before then fails."""
    try:
        async with asyncio.timeout(TOPIC_WAIT_SECONDS):
            while True:
                for meta in await admin.describe_topics():
                    partitions = meta["partitions"]
                    if meta["topic"] == topic and partitions and all(p["leader"] >= 0 for p in partitions):
                        return len(partitions)
                await asyncio.sleep(0.1)  # paces the polling; the metadata is what we wait for
    except TimeoutError:
        raise LedgerTopicError(
            f"ledger topic {topic!r} was created but has no leader for every partition after "
            f"{TOPIC_WAIT_SECONDS:.0f} s"
        ) from None


async def _warn_unless_compacted(admin: AIOKafkaAdminClient, topic: str) -> None:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})
    [response] = await admin.describe_configs([resource])
    for code, message, _type, _name, entries in response.resources:
        if code:
            log.warning(
                "cannot read the ledger topic's configs",
                extra={"event": "ledger_topic_configs_unreadable", "topic": topic, "reason": message},
            )
        for name, value, *_ in entries:
            if name == "cleanup.policy" and "compact" not in (value or "").split(","):
                # Without compaction nothing deduplicates the ledger's records and tombstones delete nothing.
                log.warning(
                    "ledger topic is not compacted",
                    extra={"event": "ledger_topic_not_compacted", "topic": topic, "cleanup_policy": value},
                )


@dataclass(frozen=True, slots=True)
class Restored:
    """One ledger partition as read back: the latest value of each key, tombstoned keys left out."""

    values: list[bytes]
    records: int  # records read, superseded ones and tombstones included
    seconds: float
    end_offset: int  # the partition's end when the read began; the read covers the offsets below it


@dataclass(frozen=True, slots=True)
class Tail:
    """A ledger partition's records from an offset on, in order, tombstones included (how a member that holds
    the partition learns what others wrote to it: `stream ledger forget`, or a member that held it meanwhile)."""

    records: list[tuple[int, bytes | None, bytes | None]]  # (offset, key, value); value None: a tombstone
    end_offset: int  # the partition's end when the read began; the read covers the offsets below it
    first: int | None = None  # where the read began: above the offset asked for when retention took records


@dataclass(slots=True)
class _Partition:
    end_offset: int
    latest: dict[bytes, bytes] = field(default_factory=dict)
    records: int = 0
    ordered: list[tuple[int, bytes | None, bytes | None]] | None = None  # every record, when a Tail is read
    first: int | None = None  # the offset the read began at


async def read_partition(options: dict, topic: str, partition: int, *, timeout: float | None = None) -> Restored:
    """Read one ledger partition from its beginning to its end as of now (records written meanwhile are not
    waited for). Raises TimeoutError after `timeout` seconds.

    Call ensure_ledger_topic first: a consumer asking for a missing topic makes a broker that auto-creates
    topics create it, uncompacted.
    """
    started = time.monotonic()
    [part] = (await _read_to_end(options, topic, [partition], timeout=timeout)).values()
    return Restored(list(part.latest.values()), part.records, time.monotonic() - started, part.end_offset)


async def read_since(options: dict, topic: str, partition: int, start: int, *, timeout: float | None = None) -> Tail:
    """Read one ledger partition from offset `start` (or its beginning, if compaction or retention removed that
    offset) to its end as of now, every record in order. Raises TimeoutError after `timeout` seconds."""
    [part] = (await _read_to_end(options, topic, [partition], since=start, timeout=timeout)).values()
    assert part.ordered is not None
    return Tail(part.ordered, part.end_offset, part.first)


class EndOffsets:
    """The ledger partitions' end offsets, asked often (a member compares them with its own writes to learn
    whether anyone else wrote): one client kept for the process, not a connection per question."""

    def __init__(self, options: dict, topic: str) -> None:
        self._options = options
        self._topic = topic
        self._consumer: AIOKafkaConsumer | None = None

    async def ends(self, partitions: list[int], *, timeout: float) -> dict[int, int]:
        async with asyncio.timeout(timeout):
            if self._consumer is None:
                consumer = AIOKafkaConsumer(**self._options, group_id=None, enable_auto_commit=False,
                                            isolation_level="read_committed")
                try:
                    await consumer.start()
                except BaseException:  # a failed or timed-out start leaves nothing running behind
                    await consumer.stop()
                    raise
                self._consumer = consumer
            tps = [TopicPartition(self._topic, p) for p in partitions]
            ends = await self._consumer.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


async def _read_to_end(
    options: dict,
    topic: str,
    partitions: list[int],
    *,
    keep: Callable[[bytes | None], bool] | None = None,
    since: int | None = None,
    timeout: float | None = None,
) -> dict[int, _Partition]:
    """Latest value per key of each partition, up to the end offsets captured first; only keys `keep` accepts.
    With `since`, every record from that offset on instead, in order (`_Partition.ordered`).

    Loops on the position, not on a count: compaction leaves gaps in the offsets, and transaction markers take
    offsets no record is returned for.
    """
    consumer = AIOKafkaConsumer(
        **options,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",  # end_offsets is then the last stable offset, and aborts are skipped
        **_RESTORE_FETCH,
    )
    try:
        async with asyncio.timeout(timeout):
            await consumer.start()
            tps = [TopicPartition(topic, p) for p in partitions]
            ends = await consumer.end_offsets(tps)
            firsts = await consumer.beginning_offsets(tps)
            out = {tp.partition: _Partition(end_offset=ends[tp], ordered=None if since is None else [])
                   for tp in tps}
            starts = {tp: max(firsts[tp], since or 0) for tp in tps}
            for tp in tps:
                out[tp.partition].first = starts[tp]
            remaining = {tp for tp in tps if ends[tp] > starts[tp]}
            if remaining:
                consumer.assign(list(remaining))
                for tp in remaining:
                    consumer.seek(tp, starts[tp])
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=_POLL_MS, max_records=_RESTORE_MAX_RECORDS)
                for tp, records in batches.items():
                    _apply(out[tp.partition], records, keep)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
                        consumer.pause(tp)  # no more fetching beyond its end
            return out
    finally:
        await consumer.stop()


def _apply(part: _Partition, records: Iterable, keep: Callable[[bytes | None], bool] | None) -> None:
    latest, end = part.latest, part.end_offset
    for record in records:
        if record.offset >= end:
            break  # written after the read began
        part.records += 1
        if keep is not None and not keep(record.key):
            continue
        if part.ordered is not None:
            part.ordered.append((record.offset, record.key, record.value))
            continue
        if record.value is None:
            latest.pop(record.key, None)
        else:
            latest[record.key] = record.value


# --- one user's records: for the operator ----------------------------------------------------------------


async def ledger_partitions(options: dict, topic: str) -> list[int]:
    """The ledger topic's partition numbers; LedgerTopicError when it does not exist (never creates it)."""
    admin = _admin(options)
    try:
        await admin.start()
        counts = await _partition_counts(admin)
    finally:
        await admin.close()
    if topic not in counts:
        raise LedgerTopicError(
            f"ledger topic {topic!r} does not exist (named from STREAM_KAFKA_GROUP_ID; --topic names another)"
        )
    return list(range(counts[topic]))


def _user_filter(user_id: str, data_type: str | None) -> Callable[[bytes | None], bool]:
    def keep(key: bytes | None) -> bool:
        if key is None:
            return False
        try:
            ledger_key = decode_key(key)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False  # not a ledger record: nothing of this user
        return ledger_key.user_id == user_id and (data_type is None or ledger_key.data_type == data_type)

    return keep


async def find_user_records(
    options: dict, topic: str, user_id: str, data_type: str | None = None, *, timeout: float | None = None
) -> dict[int, dict[bytes, bytes]]:
    """The live ledger records (key -> value) of a user, of one data type if given, per partition number.
    Reads every partition: a user's records are where the user's samples were, whatever partition that was."""
    partitions = await ledger_partitions(options, topic)
    parts = await _read_to_end(options, topic, partitions, keep=_user_filter(user_id, data_type), timeout=timeout)
    return {number: part.latest for number, part in parts.items() if part.latest}


async def write_tombstones(options: dict, topic: str, keys: dict[int, Iterable[bytes]]) -> int:
    """A tombstone for each key, in the partition given with it; returns once every one is acknowledged."""
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    try:
        await producer.start()
        sent = [
            await producer.send(topic, key=key, value=None, partition=partition)
            for partition, partition_keys in keys.items()
            for key in partition_keys
        ]
        await producer.flush()
        await asyncio.gather(*sent)
        return len(sent)
    finally:
        await producer.stop()


FORGET_DIGEST = "forget"  # the key of a forget marker: a tombstone for no record, in every partition


def forget_markers(user_id: str, data_type: str | None, partitions: Iterable[int]) -> dict[int, list[bytes]]:
    """One tombstone per ledger partition telling running members to forget the user (of a data type, or of
    all: an empty data type). A member may remember samples whose records the topic no longer holds (they
    outlive the topic's retention in memory): the markers reach it whatever the topic holds."""
    key = encode_key(LedgerKey(user_id, data_type or "", FORGET_DIGEST))
    return {partition: [key] for partition in partitions}


async def forget_user(
    options: dict, topic: str, user_id: str, data_type: str | None = None, *, timeout: float | None = None
) -> int:
    """Tombstone every live ledger record of a user (of one data type if given), and a forget marker in every
    partition; returns the tombstones written.

    Running members apply them within stream.ledger_sync.FOLLOW_SECONDS; what the API accepts of the user
    afterwards is remembered again.
    """
    found = await find_user_records(options, topic, user_id, data_type, timeout=timeout)
    partitions = await ledger_partitions(options, topic)
    return await write_tombstones(options, topic, _with_markers(found, user_id, data_type, partitions))


def _with_markers(found: dict[int, dict[bytes, bytes]], user_id: str, data_type: str | None,
                  partitions: list[int]) -> dict[int, list[bytes]]:
    keys = {partition: list(latest) for partition, latest in found.items()}
    for partition, markers in forget_markers(user_id, data_type, partitions).items():
        keys.setdefault(partition, []).extend(markers)
    return keys


class DeviceSummary(msgspec.Struct, frozen=True):
    """What the ledger remembers of one device's samples of one data type."""

    data_type: str
    device: str  # the device_name's JSON text as the producer wrote it (quotes included)
    records: int  # ledger records holding samples of this device
    samples: int  # distinct (start, fingerprint) pairs
    oldest: str  # earliest start remembered, ISO 8601 UTC
    watermark: str  # latest start remembered, ISO 8601 UTC


def summarise(values: Iterable[bytes]) -> list[DeviceSummary]:
    """Per (data type, device) summaries of ledger record values, sorted. Raises msgspec errors on a value
    that is no ledger record."""
    records: dict[tuple[str, str], int] = {}
    samples: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for value in values:
        record = decode_record(value)
        for device in record.devices:
            starts = unpack(device.starts)
            if not starts:
                continue
            key = (record.data_type, device.device)
            records[key] = records.get(key, 0) + 1
            samples.setdefault(key, set()).update(zip(starts, unpack(device.prints), strict=True))
    summaries = []
    for key in sorted(records):
        starts = [start for start, _ in samples[key]]
        summaries.append(
            DeviceSummary(*key, records[key], len(samples[key]), iso_utc(min(starts)), iso_utc(max(starts)))
        )
    return summaries


def iso_utc(nanos: int) -> str:
    """Epoch nanoseconds as ISO 8601 UTC, with as many fraction digits as needed (in groups of 3)."""
    seconds, fraction = divmod(nanos, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{fraction:09d}"
    while digits.endswith("000"):
        digits = digits[:-3]
    return text + (f".{digits}" if digits else "") + "Z"


async def show_user(
    options: dict, topic: str, user_id: str, data_type: str | None = None, *, timeout: float | None = None
) -> list[DeviceSummary]:
    found = await find_user_records(options, topic, user_id, data_type, timeout=timeout)
    return summarise(value for latest in found.values() for value in latest.values())


# --- `stream ledger` ----------------------------------------------------------------------------------


def ledger_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream ledger",
        description="Look at or forget what the sync ledger remembers of a user. Kafka is reached with the same "
        "STREAM_* variables as `stream run`; the ledger topic is STREAM_LEDGER_TOPIC ({STREAM_KAFKA_GROUP_ID}-ledger).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="per data type and device: samples remembered, oldest, watermark")
    forget = actions.add_parser("forget", help="write tombstones for the user's ledger records")
    for sub in (show, forget):
        sub.add_argument("--user", required=True, help="user id")
        sub.add_argument("--data-type", default=None, help="only this data type (default: all)")
        sub.add_argument("--topic", default=None, help="ledger topic (default: STREAM_LEDGER_TOPIC)")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds to read the ledger (default: 120)")
    show.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")
    return parser


def main(argv: list[str]) -> int:
    from stream import config, logs
    from stream.cli import _check_kafka_files
    from stream.kafka_options import kafka_client_options

    args = ledger_parser().parse_args(argv)
    name = f"stream ledger {args.action}"
    if args.action == "forget" and not args.yes and not sys.stdin.isatty():
        print(f"{name}: refusing to forget without --yes when no terminal can confirm", file=sys.stderr)
        return 2
    try:
        settings = config.load()
        _check_kafka_files(settings)
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    options = kafka_client_options(settings)
    topic = args.topic or settings.ledger_topic
    try:
        if args.action == "show":
            return _show(options, topic, args)
        return _forget(options, topic, args)
    except LedgerTopicError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
    except KafkaConnectionError:
        print(f"{name}: cannot reach Kafka at {settings.kafka_bootstrap_servers}", file=sys.stderr)
    except TimeoutError:
        print(f"{name}: the ledger was not read within {args.timeout:g} s (--timeout)", file=sys.stderr)
    return 1


def _scope(args: argparse.Namespace) -> str:
    return f"user {args.user!r}" + (f", data type {args.data_type!r}" if args.data_type else "")


def _show(options: dict, topic: str, args: argparse.Namespace) -> int:
    try:
        summaries = asyncio.run(show_user(options, topic, args.user, args.data_type, timeout=args.timeout))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"stream ledger show: a ledger record of {_scope(args)} cannot be decoded ({exc})", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(summaries).decode())
    elif not summaries:
        print(f"the ledger ({topic}) remembers nothing of {_scope(args)}")
    else:
        print(f"ledger {topic}, {_scope(args)}:")
        print(format_table(summaries))
    return 0


def format_table(summaries: list[DeviceSummary]) -> str:
    header = ("DATA TYPE", "DEVICE", "RECORDS", "SAMPLES", "OLDEST", "WATERMARK")
    rows = [header] + [
        (s.data_type, s.device, str(s.records), str(s.samples), s.oldest, s.watermark) for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _forget(options: dict, topic: str, args: argparse.Namespace) -> int:
    found = asyncio.run(find_user_records(options, topic, args.user, args.data_type, timeout=args.timeout))
    count = sum(len(latest) for latest in found.values())
    partitions = asyncio.run(ledger_partitions(options, topic))
    if not args.yes:
        answer = input(f"write {count} tombstones and {len(partitions)} forget markers to {topic} for "
                       f"{_scope(args)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing written")
            return 1
    keys = _with_markers(found, args.user, args.data_type, partitions)
    written = asyncio.run(write_tombstones(options, topic, keys))
    print(
        f"wrote {written} tombstones to {topic} for {_scope(args)} ({count} of its records, a forget marker per "
        "partition); running replicas forget the user within about 5 s: wait that long before a full re-sync"
    )
    return 0
