"""`stream redrive`: dead letters back into the flow, once what sent them there is fixed.

Reads STREAM_DLQ_TOPIC up to its end as it was at the start (`--follow`: on and on), picks records by reason,
source topic and partition, and the time they were dead-lettered, and writes each picked record's value back to
its source topic (or `--to`), keyed by its `user_id` as producers key them, with headers that say it was
redriven, how many times and from which DLQ offset.

Progress is kept per reason, under a consumer group of its own named from the DLQ topic and the reason
(`progress_group`): a record is judged once by the redrives of its reason, whatever the filters of a run. Its
offsets are committed only after Kafka acknowledged every write below them (acks=all, idempotent producer).
A run stopped and started again neither skips nor repeats a record; only a crash between a write and the next
commit (at most a second of writes) repeats writes, which the sync ledger keeps from reaching the API twice.

How many times a record was redriven travels with it: the `stream.redrive.count` header of the redriven record,
copied to its dead letter when the service dead-letters it again (every dead letter carries it, 0 when never
redriven; for a dead letter written by an older version without it, the count is read from the source record
the dead letter points at, `SourceCounts`). A record already redriven
`--max-redrives` times is left in the DLQ and reported: a poison record cannot loop.

Here: the pure decisions (`parse_when`, `select`, `redrive_headers`, `routing_key`, `check_reasons`), the tally
and its report, and the command line (`main`). The Kafka side is stream/redrive_kafka.py.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from stream.deadletter import (
    ERROR_REASON_HEADER,
    REDRIVE_COUNT_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    VALUE_DROPPED_HEADER,
)
from stream.schema import REASONS

log = logging.getLogger("stream.redrive")

# Headers of a redriven record.
COUNT_HEADER = REDRIVE_COUNT_HEADER  # how many times the record has been redriven, this time included
FROM_HEADER = "stream.redrive.from"  # the dead letter it came from: "dlq-topic/partition/offset"
REASON_HEADER = "stream.redrive.reason"  # why it had been dead-lettered

# Headers of a dead letter (stream/deadletter.py writes them).
ERROR_REASON = ERROR_REASON_HEADER
SOURCE_TOPIC = SOURCE_TOPIC_HEADER
SOURCE_PARTITION = SOURCE_PARTITION_HEADER
SOURCE_OFFSET = SOURCE_OFFSET_HEADER
VALUE_DROPPED = VALUE_DROPPED_HEADER

# Reasons that can succeed on a second try once the incident is over: redriven when no --reason is given.
RETRYABLE: dict[str, str] = {
    "api_rejected": "the API refused it: after a partner bug or an API change is fixed, the same bytes are taken",
    "retry_exhausted": "the API kept failing this batch: once it is back, the same bytes go through",
    "below_min_batch": "too few samples of its user and data type came in time: redriven together, or with the "
    "user's later samples, they make a batch of 3",
}
# Reasons redriven only when named with --reason: they can succeed, but not without a decision.
ON_REQUEST: dict[str, str] = {
    "api_partial_unknown": "the API took some samples of that batch and nobody knows which: redriving sends the "
    "whole batch again, and the API counts the samples it already took twice (the ledger never recorded them)",
    "beyond_ledger_horizon": "the service could not tell whether the API already has it: it comes straight back "
    "unless STREAM_LEDGER_BEYOND_HORIZON=send or a longer STREAM_LEDGER_HORIZON_SECONDS is set first",
}
# Every other reason is about the input bytes, which the service judges the same way every time: redriving them
# brings them straight back, unless the service's rules changed (a new release): --force.
INPUT_REASONS: tuple[str, ...] = tuple(r for r in REASONS if r not in RETRYABLE and r not in ON_REQUEST)

MAX_REDRIVES = 3
CHUNK_RECORDS = 500  # DLQ records read, judged and written per round; their acks are awaited before the next
SHOW_BYTES = 300  # a shown value is cut here
REPORT_POSITIONS = 10  # records left over --max-redrives or unreadable: this many are named, the rest counted


def progress_group(dlq_topic: str, reason: str) -> str:
    """The consumer group that keeps how far redrives of `reason` have read `dlq_topic`."""
    return f"{dlq_topic}-redrive-{reason}"


# --- time ------------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta | None:
    """`90s`, `15m`, `2h`, `1d12h`, `1w`: a duration; None when the text is not one."""
    text = text.strip().lower()
    if not text or _DURATION.sub("", text):
        return None
    try:
        return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text)))
    except OverflowError:
        return timedelta.max


def parse_when(text: str, now: datetime) -> datetime:
    """A moment: a duration back from `now` (`2h`: two hours ago), an ISO 8601 time with a UTC offset
    (`2026-11-29T10:00:00Z`, `...+01:00`) or a date (`2026-11-29`: its midnight UTC). ValueError otherwise."""
    duration = parse_duration(text)
    if duration is not None:
        try:
            return now - duration
        except OverflowError:
            raise ValueError(f"{text.strip()!r} goes back before the year 1") from None
    text = text.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (90s, 15m, 2h, 3d, 1w) nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        if len(text) == 10:  # a date alone
            return moment.replace(tzinfo=UTC)
        raise ValueError(f"{text!r} has no UTC offset: add Z or +hh:mm")
    return moment


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --- what a dead letter says, and what to do with it -----------------------------------------------------------


class Letter(msgspec.Struct, frozen=True):
    """What a dead letter's headers say."""

    reason: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    count: int | None = None  # stream.redrive.count, when the dead letter carries it
    value_dropped: bool = False  # too large for the DLQ: written without its value


def read_letter(headers: Iterable[tuple[str, bytes]] | None) -> Letter:
    values: dict[str, bytes] = {}
    for name, value in headers or ():
        values[name] = value or b""
    return Letter(
        reason=_text(values.get(ERROR_REASON)),
        source_topic=_text(values.get(SOURCE_TOPIC)),
        source_partition=_number(values.get(SOURCE_PARTITION)),
        source_offset=_number(values.get(SOURCE_OFFSET)),
        count=_number(values.get(COUNT_HEADER)),
        value_dropped=VALUE_DROPPED in values,
    )


def count_of(headers: Iterable[tuple[str, bytes]] | None) -> int:
    """How many times a record was redriven: its stream.redrive.count header, 0 without one."""
    for name, value in headers or ():
        if name == COUNT_HEADER:
            return _number(value) or 0
    return 0


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def _number(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return number if number >= 0 else None


@dataclass(frozen=True)
class Criteria:
    """Which dead letters a run redrives, and where to."""

    reasons: frozenset[str]
    dlq_topic: str
    default_topic: str  # where a dead letter goes whose source is the pending topic, or unknown
    pending_topic: str = ""
    source_topics: frozenset[str] = frozenset()  # empty: any
    source_partitions: frozenset[int] = frozenset()  # empty: any
    since_ms: int | None = None  # dead-lettered at or after
    until_ms: int | None = None  # dead-lettered at or before
    max_redrives: int = MAX_REDRIVES
    to: str | None = None
    force: bool = False


class Verdict(enum.Enum):
    SEND = "send"
    NOT_SELECTED = "not_selected"  # another reason: left for the redrives of that reason
    FILTERED = "filtered"  # its reason, but another source, or dead-lettered before --since: passed
    LATER = "later"  # dead-lettered after --until: the partition stops here, for a later run
    OVER_MAX = "over_max"  # redriven --max-redrives times already: left in the DLQ, reported
    UNREADABLE = "unreadable"  # no value, or no user_id to key it by (without --force): left, reported


class Decision(msgspec.Struct, frozen=True):
    verdict: Verdict
    reason: str | None
    count: int = 0  # times redriven before
    destination: str | None = None
    key: bytes | None = None
    why: str = ""  # for UNREADABLE


def prefilter(letter: Letter, timestamp_ms: int, criteria: Criteria) -> Verdict | None:
    """The verdict from the headers and the time alone, or None when the record is a candidate (its redrive
    count and value decide)."""
    if letter.reason not in criteria.reasons:
        return Verdict.NOT_SELECTED
    if criteria.until_ms is not None and timestamp_ms > criteria.until_ms:
        return Verdict.LATER
    if criteria.since_ms is not None and timestamp_ms < criteria.since_ms:
        return Verdict.FILTERED
    if criteria.source_topics and letter.source_topic not in criteria.source_topics:
        return Verdict.FILTERED
    if criteria.source_partitions and letter.source_partition not in criteria.source_partitions:
        return Verdict.FILTERED
    return None


def select(letter: Letter, timestamp_ms: int, value: bytes | None, criteria: Criteria,
           count: int | None = None) -> Decision:
    """What to do with one dead letter. `count`: how many times it was redriven before, when known otherwise
    than from its own header (read from its source record); the header wins."""
    verdict = prefilter(letter, timestamp_ms, criteria)
    reason = letter.reason
    if verdict is not None:
        return Decision(verdict, reason)
    before = letter.count if letter.count is not None else (count or 0)
    if before >= criteria.max_redrives:
        return Decision(Verdict.OVER_MAX, reason, before)
    destination = destination_of(letter, criteria)
    if letter.value_dropped or not value:
        why = "written to the DLQ without its value (too large)" if letter.value_dropped else "no value"
        return Decision(Verdict.UNREADABLE, reason, before, destination, why=why)
    key = routing_key(value)
    if key is None and not criteria.force:
        return Decision(Verdict.UNREADABLE, reason, before, destination, why="no readable user_id to key it by")
    return Decision(Verdict.SEND, reason, before, destination, key)


def destination_of(letter: Letter, criteria: Criteria) -> str:
    """--to, else the source topic; a record parked in the pending topic (or of unknown source) goes to the
    first input topic: the pending topic belongs to the service."""
    if criteria.to:
        return criteria.to
    topic = letter.source_topic
    if not topic or topic == criteria.pending_topic:
        return criteria.default_topic
    return topic


class _Routing(msgspec.Struct):
    user_id: str


_routing_decoder = msgspec.json.Decoder(_Routing)


def routing_key(value: bytes | None) -> bytes | None:
    """The record key the service expects: the value's `user_id` as UTF-8, None when there is none to read
    (not JSON, not an object, no user_id, not a non-empty string)."""
    if not value:
        return None
    try:
        return _routing_decoder.decode(value).user_id.encode() or None
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError):
        return None


def redrive_headers(count: int, reason: str | None, dlq_topic: str, partition: int, offset: int
                    ) -> list[tuple[str, bytes]]:
    """Headers of a redriven record: the n-th redrive of the dead letter at dlq_topic/partition/offset. The
    dead letter's own headers (stream.error.*, stream.source.*) are not carried: the record is input again."""
    headers = [(COUNT_HEADER, str(count).encode()), (FROM_HEADER, f"{dlq_topic}/{partition}/{offset}".encode())]
    if reason:
        headers.append((REASON_HEADER, reason.encode()))
    return headers


def check_reasons(reasons: Iterable[str], force: bool) -> list[str]:
    """Problems with the reasons asked for, one line each (empty: fine)."""
    problems = []
    for reason in reasons:
        if reason not in REASONS:
            problems.append(f"unknown reason {reason!r}; the reasons are: {', '.join(REASONS)}")
        elif reason in INPUT_REASONS and not force:
            problems.append(
                f"{reason}: the service refused the record itself ({REASONS[reason]}); it judges the same bytes the "
                "same way every time, so it would come straight back. --force if the service's rules have changed"
            )
    return problems


# --- the tally ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a run did, per reason."""

    read: int = 0
    sent: Counter = field(default_factory=Counter)  # per reason (acknowledged by Kafka; in a dry run: would be)
    filtered: Counter = field(default_factory=Counter)
    over_max: Counter = field(default_factory=Counter)
    unreadable: Counter = field(default_factory=Counter)
    not_selected: Counter = field(default_factory=Counter)  # per reason: other reasons met on the way
    earlier: int = 0  # records of a selected reason a previous run already judged
    destinations: Counter = field(default_factory=Counter)
    unknown_counts: int = 0  # redrive count neither in the dead letter nor readable from its source record
    over_max_at: list[str] = field(default_factory=list)
    unreadable_at: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)  # dry run: values that would be sent
    total: int = 0  # records to read (up to the end offsets at the start)

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    @property
    def left_total(self) -> int:
        return sum(self.filtered.values()) + sum(self.over_max.values()) + sum(self.unreadable.values())

    def leave(self, counts: Counter, positions: list[str], reason: str, where: str) -> None:
        """One record left in the DLQ (over --max-redrives, or unreadable): counted, and named among the first."""
        self.read += 1
        counts[reason] += 1
        if len(positions) < REPORT_POSITIONS:
            positions.append(where)


@dataclass
class Outcome:
    status: int  # 0: done; 1: failed or stopped before the end
    tally: Tally
    message: str = ""


class RedriveError(Exception):
    """The redrive cannot go on: one line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = 1, tally: Tally | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.tally = tally  # set once the run had begun: what it did before the error, for the report


@dataclass(frozen=True)
class Request:
    """A run: its selection and how it goes."""

    criteria: Criteria
    dry_run: bool = False
    follow: bool = False
    limit: int | None = None  # stop after this many records redriven
    show: int = 3  # dry run: values shown
    from_beginning: bool = False  # ignore the progress of the selected reasons
    chunk: int = CHUNK_RECORDS


# --- the report -------------------------------------------------------------------------------------------------


def report(tally: Tally, request: Request, seconds: float) -> str:
    criteria = request.criteria
    dry = request.dry_run
    lines = [
        f"stream redrive{' --dry-run' if dry else ''}: {criteria.dlq_topic}: read {tally.read} records in "
        f"{seconds:.1f} s"
    ]
    columns = ("would redrive" if dry else "redriven", "filtered", "over max", "unreadable")
    rows = [(r, tally.sent[r], tally.filtered[r], tally.over_max[r], tally.unreadable[r])
            for r in sorted(criteria.reasons)]
    rows.append(("total", tally.sent_total, sum(tally.filtered.values()), sum(tally.over_max.values()),
                 sum(tally.unreadable.values())))
    width = max(len(r[0]) for r in rows)
    widths = [max(len(c), 6) for c in columns]
    lines.append("  " + "reason".ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths,
                                                                                              strict=True)))
    for row in rows:
        cells = "  ".join(str(v).rjust(w) for v, w in zip(row[1:], widths, strict=True))
        lines.append("  " + row[0].ljust(width) + "  " + cells)
    if tally.destinations:
        lines.append("  to: " + ", ".join(f"{t} {n}" for t, n in sorted(tally.destinations.items())))
    if tally.earlier:
        lines.append(f"  already judged by an earlier redrive: {tally.earlier}")
    if tally.not_selected:
        lines.append("  other reasons, not selected: "
                     + ", ".join(f"{r} {n}" for r, n in sorted(tally.not_selected.items())))
    lines += _left(f"left in the DLQ, redriven --max-redrives {criteria.max_redrives} times already",
                   sum(tally.over_max.values()), tally.over_max_at)
    lines += _left("left in the DLQ, cannot be redriven", sum(tally.unreadable.values()), tally.unreadable_at)
    if tally.unknown_counts:
        lines.append("  redrive count unknown (not in the dead letter, and its source record not found or not read "
                     f"in time), counted as 0: {tally.unknown_counts}")
    if dry:
        if tally.shown:
            lines.append(f"  values that would be sent (health data; the first {len(tally.shown)}, cut at "
                         f"{SHOW_BYTES} bytes):")
            lines += [f"    {s}" for s in tally.shown]
        lines.append("  dry run: nothing written, no progress committed")
    else:
        lines.append("  progress kept in consumer groups "
                     + ", ".join(progress_group(criteria.dlq_topic, r) for r in sorted(criteria.reasons)))
    return "\n".join(lines)


def _left(what: str, count: int, positions: list[str]) -> list[str]:
    """Report lines for records left in the DLQ: how many, and the positions of the first ones."""
    if not count:
        return []
    lines = [f"  {what}: {count}", *(f"    {at}" for at in positions)]
    if count > len(positions):
        lines.append(f"    ... and {count - len(positions)} more")
    return lines


# --- the command line ---------------------------------------------------------------------------------------------


def redrive_parser() -> argparse.ArgumentParser:
    retryable = ", ".join(RETRYABLE)
    parser = argparse.ArgumentParser(
        prog="stream redrive",
        description="Send dead letters back into the flow after the cause is fixed (a producer bug, an API "
        "incident): read STREAM_DLQ_TOPIC up to its end as it is now, and write each selected record's value back "
        "to its source topic, keyed by its user_id, with stream.redrive.* headers. Kafka is reached with the "
        "same STREAM_* variables as `stream run`. Progress is kept per reason in consumer groups named "
        "{STREAM_DLQ_TOPIC}-redrive-{REASON}: a run stopped and started again neither skips nor repeats a record. "
        "Exit status: 0 done (also: no DLQ topic yet, or --follow stopped by a signal), 1 a failure or stopped "
        "before the end (run again to go on), 2 a usage or configuration error.",
    )
    parser.add_argument("--reason", action="append", default=None, metavar="REASON",
                        help=f"redrive dead letters of this reason (repeatable; default: {retryable}). "
                        f"{', '.join(ON_REQUEST)} only when named; the input reasons ({INPUT_REASONS[0]}, ...) "
                        "only with --force")
    parser.add_argument("--source-topic", action="append", default=None, metavar="TOPIC",
                        help="only dead letters read from this topic (repeatable)")
    parser.add_argument("--source-partition", action="append", type=int, default=None, metavar="N",
                        help="only dead letters read from this partition of their topic (repeatable)")
    parser.add_argument("--since", metavar="WHEN",
                        help="only dead letters written at or after WHEN: a duration back from now (30m, 2h, 1d) "
                        "or an ISO 8601 time with an offset (2026-11-29T10:00:00Z). Older ones of the selected "
                        "reasons are passed for good")
    parser.add_argument("--until", metavar="WHEN",
                        help="only dead letters written at or before WHEN; reading stops at the first later one, "
                        "which stays for a later run")
    parser.add_argument("--to", metavar="TOPIC",
                        help="write every record to TOPIC instead of its source topic (default: the source "
                        "topic; records parked in the pending topic go to the first STREAM_KAFKA_TOPICS)")
    parser.add_argument("--max-redrives", type=int, default=MAX_REDRIVES, metavar="N",
                        help=f"leave (and report) a dead letter redriven N times already (default {MAX_REDRIVES})")
    parser.add_argument("--force", action="store_true",
                        help="allow input reasons (after a change of the service's rules), and send a record "
                        "without a readable user_id unkeyed")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and commit nothing: print the counts by reason and the first --show values "
                        "that would be sent (they are health data)")
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="with --dry-run: values shown (default 3, 0: none)")
    parser.add_argument("--follow", action="store_true",
                        help="go on past the end of the DLQ, redriving new dead letters until stopped (SIGINT, "
                        "SIGTERM)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="stop after N records redriven (the next run goes on from there)")
    parser.add_argument("--from-beginning", action="store_true",
                        help="ignore the progress of the selected reasons and read the DLQ from its beginning (or "
                        "--since): records redriven before are sent again (with the sync ledger on, the API "
                        "still gets no sample twice); the progress kept is never moved back")
    return parser


def build_request(args: argparse.Namespace, settings, now: datetime) -> Request:
    """The run asked for; ValueError (a usage error) naming the problem."""
    reasons = list(dict.fromkeys(args.reason or RETRYABLE))
    problems = check_reasons(reasons, args.force)
    if problems:
        raise ValueError("\n".join(problems))
    since = parse_when(args.since, now) if args.since else None
    until = parse_when(args.until, now) if args.until else None
    if since is not None and since > now:
        raise ValueError(f"--since {args.since}: that is in the future (now is {now:%Y-%m-%dT%H:%M:%SZ}): "
                         "no dead letter is that recent yet")
    if since is not None and until is not None and since > until:
        raise ValueError("--since is later than --until")
    if args.max_redrives < 1:
        raise ValueError("--max-redrives: at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit: at least 1")
    if args.show < 0:
        raise ValueError("--show: 0 or more")
    if any(p < 0 for p in args.source_partition or ()):
        raise ValueError("--source-partition: 0 or more")
    if args.follow and args.dry_run:
        raise ValueError("--follow and --dry-run do not go together: a dry run counts what is there")
    internal = {settings.dlq_topic: "STREAM_DLQ_TOPIC", settings.pending_topic: "STREAM_PENDING_TOPIC",
                settings.ledger_topic: "STREAM_LEDGER_TOPIC"}
    if args.to in internal:
        raise ValueError(f"--to {args.to}: that is the service's {internal[args.to]}, not an input topic")
    criteria = Criteria(
        reasons=frozenset(reasons),
        dlq_topic=settings.dlq_topic,
        default_topic=settings.kafka_topics[0],
        pending_topic=settings.pending_topic,
        source_topics=frozenset(args.source_topic or ()),
        source_partitions=frozenset(args.source_partition or ()),
        since_ms=None if since is None else epoch_ms(since),
        until_ms=None if until is None else epoch_ms(until),
        max_redrives=args.max_redrives,
        to=args.to,
        force=args.force,
    )
    return Request(criteria, dry_run=args.dry_run, follow=args.follow, limit=args.limit, show=args.show,
                   from_beginning=args.from_beginning)


def main(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    from stream import config, logs
    from stream.cli import _check_kafka_files

    name = "stream redrive"
    try:
        args = redrive_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or argparse's own usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = config.load(os.environ if env is None else env)
        _check_kafka_files(settings)
    except config.ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        request = build_request(args, settings, datetime.now(UTC))
    except ValueError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    started = time.monotonic()
    try:
        outcome = asyncio.run(_main(settings, request))
    except RedriveError as exc:
        if exc.tally is not None:
            print(report(exc.tally, request, time.monotonic() - started))
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.status
    print(report(outcome.tally, request, time.monotonic() - started))
    if outcome.message:
        print(f"{name}: {outcome.message}", file=sys.stderr)
    for topic in sorted(set(outcome.tally.destinations) - set(settings.kafka_topics)):
        print(f"{name}: note: {topic} is not in STREAM_KAFKA_TOPICS: the service configured here does not read it",
              file=sys.stderr)
    return outcome.status


async def _main(settings, request: Request) -> Outcome:
    from stream.redrive_kafka import redrive

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await redrive(settings, request, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
