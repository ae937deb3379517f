"""`stream redrive`, the Kafka side: read the DLQ up to where it ended at the start (or on and on), judge each dead
letter (stream/redrive.py decides), write the chosen ones back, and commit progress per reason only once Kafka
acknowledged every write below it. Also where a dead letter's redrive count is looked up in its source record
when the dead letter does not carry it (one written by an older version: `SourceCounts`), and the progress line.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TextIO

from stream.redrive import (
    SHOW_BYTES,
    Decision,
    Outcome,
    RedriveError,
    Request,
    Tally,
    Verdict,
    count_of,
    prefilter,
    progress_group,
    read_letter,
    redrive_headers,
    select,
)

log = logging.getLogger("stream.redrive")

COMMIT_EVERY_SECONDS = 1.0  # progress is committed this often (and at the end): a crash repeats at most this much
COMMIT_TIMEOUT_SECONDS = 10.0
POLL_MS = 500
PROGRESS_EVERY_TERMINAL = 0.5
PROGRESS_EVERY_PLAIN = 10.0
LOOKUP_TIMEOUT_SECONDS = 30.0
LOOKUP_GAP = 20_000  # a wanted source offset this far past the read position is sought, not read up to
LOOKUP_RECORDS = 10_000


# --- reading, writing, committing -------------------------------------------------------------------------------------


def _admin_client(options: dict):
    import inspect

    from aiokafka.admin import AIOKafkaAdminClient

    accepted = set(inspect.signature(AIOKafkaAdminClient.__init__).parameters) - {"self", "loop"}
    return AIOKafkaAdminClient(**{k: v for k, v in options.items() if k in accepted})


async def _topic_partitions(options: dict) -> dict[str, int]:
    """Partitions of every topic, asked for all topics (naming a missing one may make the broker create it)."""
    admin = _admin_client(options)
    try:
        await admin.start()
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if t["partitions"]}
    finally:
        await admin.close()


async def _committed(options: dict, groups: Iterable[str], topic: str) -> dict[str, dict[int, int]]:
    admin = _admin_client(options)
    try:
        await admin.start()
        out: dict[str, dict[int, int]] = {}
        for group in groups:
            offsets = await admin.list_consumer_group_offsets(group)
            out[group] = {tp.partition: meta.offset for tp, meta in offsets.items()
                          if tp.topic == topic and meta.offset >= 0}
        return out
    finally:
        await admin.close()


class SourceCounts:
    """The redrive count of the records dead letters came from, read from their stream.redrive.count header:
    how a dead letter that does not carry the count itself (written by a service that does not copy it) is
    counted.

    The source partitions are read in ranges, each read once per run: what was read is remembered as offset
    ranges plus the few records that carry a count, so dead letters pointing at nearby offsets (an incident's)
    cost one sequential read, and a wanted offset far past what was read is sought. A record gone (retention, a
    deleted topic) or not read in time counts as unknown (None)."""

    def __init__(self, options: dict, timeout: float = LOOKUP_TIMEOUT_SECONDS) -> None:
        self._options = options
        self._timeout = timeout
        self._consumer = None
        self._topics: set[str] = set()
        self._bounds: dict = {}  # tp -> [first offset, end offset] when last asked
        self._assigned: set = set()
        self._position: dict = {}  # tp -> the consumer's position after our last read (None: seek first)
        self._read_ranges: dict = {}  # tp -> sorted, disjoint [start, end) ranges of offsets read
        self._counted: dict = {}  # (tp, offset) -> count, for the records read that carry one
        self.records_read = 0

    async def counts(self, wanted: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int, int], int | None]:
        from aiokafka import TopicPartition

        by_tp: dict = {}
        for topic, partition, offset in wanted:
            by_tp.setdefault(TopicPartition(topic, partition), set()).add(offset)
        found: dict[tuple[str, int, int], int | None] = {}
        if not by_tp:
            return found
        try:
            async with asyncio.timeout(self._timeout):
                consumer = await self._start()
                if any(tp.topic not in self._topics for tp in by_tp):
                    self._topics = set(await consumer.topics())
                tps = [tp for tp in by_tp if tp.topic in self._topics]
                await self._update_bounds(consumer, tps, by_tp)
                if not self._assigned.issuperset(tps):
                    self._assigned.update(tps)
                    consumer.assign(list(self._assigned))  # positions are lost: the next reads seek
                    consumer.pause(*self._assigned)
                    self._position.clear()
                for tp in tps:
                    first, end = self._bounds[tp]
                    inside = sorted(o for o in by_tp[tp] if first <= o < end)
                    await self._read(consumer, tp, inside, found)
        except TimeoutError:
            log.warning("source records not all read in time: their redrive counts are unknown",
                        extra={"event": "redrive_lookup_timeout"})
        for tp, offsets in by_tp.items():
            for offset in offsets:
                found.setdefault((tp.topic, tp.partition, offset), None)
        return found

    async def _update_bounds(self, consumer, tps: list, by_tp: dict) -> None:
        stale = [tp for tp in tps if tp not in self._bounds or max(by_tp[tp]) >= self._bounds[tp][1]]
        if stale:
            firsts = await consumer.beginning_offsets(stale)
            ends = await consumer.end_offsets(stale)
            for tp in stale:
                self._bounds[tp] = [firsts[tp], ends[tp]]

    def _covered(self, tp, offset: int) -> bool:
        ranges = self._read_ranges.get(tp, [])
        i = bisect.bisect_right(ranges, [offset, float("inf")]) - 1
        return i >= 0 and ranges[i][0] <= offset < ranges[i][1]

    def _add_range(self, tp, start: int, end: int) -> None:
        ranges = self._read_ranges.setdefault(tp, [])
        bisect.insort(ranges, [start, end])
        merged: list[list[int]] = []
        for low, high in ranges:
            if merged and low <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self._read_ranges[tp] = merged

    async def _read(self, consumer, tp, offsets: list[int], found: dict) -> None:
        consumer.resume(tp)
        try:
            for target in offsets:
                while not self._covered(tp, target):
                    position = self._position.get(tp)
                    if position is None or target < position or target - position > LOOKUP_GAP:
                        consumer.seek(tp, target)
                        position = self._position[tp] = target
                    batch = await consumer.getmany(tp, timeout_ms=POLL_MS, max_records=LOOKUP_RECORDS)
                    records = batch.get(tp, [])
                    if records:
                        self.records_read += len(records)
                        for record in records:
                            if record.headers and (count := count_of(record.headers)):
                                self._counted[tp, record.offset] = count
                        after = records[-1].offset + 1
                    else:  # nothing yet, or only offsets without records (a transaction marker, compaction)
                        after = await consumer.position(tp)
                    if after > position:
                        self._add_range(tp, position, after)
                        self._position[tp] = after
                found[tp.topic, tp.partition, target] = self._counted.get((tp, target), 0)
        finally:
            consumer.pause(tp)

    async def _start(self):
        if self._consumer is None:
            from aiokafka import AIOKafkaConsumer

            consumer = AIOKafkaConsumer(**self._options, group_id=None, enable_auto_commit=False,
                                        isolation_level="read_committed", auto_offset_reset="earliest",
                                        max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


class _Progress:
    """While a run goes: on a terminal a live line (twice a second), else a plain line every 10 s."""

    def __init__(self, tally: Tally, out: TextIO, dry_run: bool) -> None:
        self._tally = tally
        self._out = out
        self._dry_run = dry_run
        self._terminal = _isatty(out)
        self._started = time.monotonic()
        self._task: asyncio.Task | None = None
        self._shown = 0

    def line(self) -> str:
        t = self._tally
        total = f"/{t.total}" if t.total else ""
        verb = "would redrive" if self._dry_run else "redriven"
        return (f"redrive {time.monotonic() - self._started:5.1f} s  read {t.read}{total}  {verb} {t.sent_total}  "
                f"left {t.left_total}")

    def start(self) -> None:
        if self._terminal:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._clear_before_logging)
        self._task = asyncio.create_task(self._run())

    def _clear_before_logging(self, _record: logging.LogRecord) -> bool:
        """A log line starts at column 0: the live line is blanked first (the next frame comes back below)."""
        self._clear()
        return True

    def _clear(self) -> None:
        if self._shown:
            self._out.write("\r" + " " * self._shown + "\r")
            self._out.flush()
            self._shown = 0

    async def _run(self) -> None:
        while True:
            if self._terminal:
                await asyncio.sleep(PROGRESS_EVERY_TERMINAL)
                text = self.line()[: max(shutil.get_terminal_size().columns - 1, 0)]
                self._out.write("\r" + text.ljust(self._shown))
                self._out.flush()
                self._shown = len(text)
            else:
                await asyncio.sleep(PROGRESS_EVERY_PLAIN)
                print(self.line(), file=self._out, flush=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._clear()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._clear_before_logging)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


async def redrive(settings, request: Request, *, progress: TextIO | None = None,
                  stop: asyncio.Event | None = None) -> Outcome:
    """Run one redrive. Raises RedriveError when it cannot start or go on (what was acknowledged by then is
    committed); returns status 1 when stopped before the end of a batch run."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaConnectionError, KafkaError

    from stream.kafka_options import kafka_client_options

    criteria = request.criteria
    options = kafka_client_options(settings)
    dlq = criteria.dlq_topic
    stop = stop or asyncio.Event()
    tally = Tally()
    reasons = sorted(criteria.reasons)
    groups = {reason: progress_group(dlq, reason) for reason in reasons}
    try:
        topics = await _topic_partitions(options)
        if dlq not in topics:  # no dead letter yet: nothing to do, not a failure
            return Outcome(0, tally, f"nothing to redrive: {dlq} does not exist yet")
        if criteria.to and criteria.to not in topics:
            raise RedriveError(f"--to {criteria.to}: no such topic", status=2)
        committed = await _committed(options, groups.values(), dlq)
    except KafkaConnectionError:
        raise RedriveError(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}") from None
    except KafkaError as exc:
        raise RedriveError(f"Kafka error: {type(exc).__name__}: {exc}") from None
    tps = [TopicPartition(dlq, p) for p in range(topics[dlq])]
    reader = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                              auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
    committers: dict[str, AIOKafkaConsumer] = {}
    producer = None
    lookups = SourceCounts(options)
    reporter = _Progress(tally, progress or sys.stderr, request.dry_run)
    # cursor[reason][partition]: the next offset not yet judged by redrives of that reason
    # saved[reason][partition]: what the group holds; only a cursor past it is committed (--from-beginning reads
    # again from below it, but never moves a reason's progress back)
    saved = {r: dict(committed.get(groups[r], {})) for r in reasons}
    cursor = {r: {} if request.from_beginning else dict(saved[r]) for r in reasons}
    try:
        await reader.start()
        firsts = await reader.beginning_offsets(tps)
        ends = await reader.end_offsets(tps)
        since = {}
        if criteria.since_ms is not None:
            found = await reader.offsets_for_times({tp: criteria.since_ms for tp in tps})
            since = {tp: (ends[tp] if hit is None else hit.offset) for tp, hit in found.items()}
        starts = {}
        for tp in tps:
            low = min(cursor[r].get(tp.partition, 0) for r in reasons)
            starts[tp] = max(firsts[tp], low, since.get(tp, 0))
            for r in reasons:  # what lies below the start is passed: gone (retention) or before --since
                if cursor[r].get(tp.partition, 0) < starts[tp]:
                    cursor[r][tp.partition] = starts[tp]
        active = [tp for tp in tps if request.follow or starts[tp] < ends[tp]]
        tally.total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        if not request.dry_run:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True, linger_ms=10,
                                        compression_type="lz4", request_timeout_ms=30_000)
            await producer.start()
            for reason, group in groups.items():
                committer = AIOKafkaConsumer(**options, group_id=group, enable_auto_commit=False)
                committers[reason] = committer
                await committer.start()
                committer.assign(tps)
                committer.pause(*tps)
        if active:
            reader.assign(active)
            for tp in active:
                reader.seek(tp, starts[tp])
        reporter.start()
        run = _Run(request, tally, cursor, topics, options, lookups, producer, dlq)
        next_commit = time.monotonic() + COMMIT_EVERY_SECONDS
        while active and not stop.is_set() and not run.limit_reached:
            batch = await reader.getmany(*active, timeout_ms=POLL_MS, max_records=request.chunk)
            try:
                stopped = await run.process(batch, ends)
            except RedriveError:
                if committers:  # what Kafka acknowledged is committed before the error ends the run
                    await _commit(committers, cursor, saved, dlq)
                raise
            for tp in stopped:
                active.remove(tp)
                reader.pause(tp)
            if not request.follow and not run.limit_reached:
                for tp in list(active):
                    if await reader.position(tp) >= ends[tp]:
                        active.remove(tp)
                        reader.pause(tp)
                        for r in reasons:
                            cursor[r][tp.partition] = max(cursor[r].get(tp.partition, 0), ends[tp])
            if committers and time.monotonic() >= next_commit:
                await _commit(committers, cursor, saved, dlq)
                next_commit = time.monotonic() + COMMIT_EVERY_SECONDS
        if committers:
            await _commit(committers, cursor, saved, dlq)
        if active and not run.limit_reached:
            left = "" if request.follow else " before the end of the DLQ"
            return Outcome(0 if request.follow else 1, tally,
                           f"stopped{left}: run again to go on from there" if not request.follow else "")
        return Outcome(0, tally)
    except RedriveError as exc:
        exc.tally = tally  # what was done before, for the report
        raise
    except KafkaConnectionError:
        raise RedriveError(f"lost Kafka at {settings.kafka_bootstrap_servers}", tally=tally) from None
    except KafkaError as exc:
        raise RedriveError(f"Kafka error: {type(exc).__name__}: {exc}", tally=tally) from None
    finally:
        await reporter.stop()
        if committers:  # what was acknowledged is kept, whatever ended the run
            with contextlib.suppress(Exception):
                await _commit(committers, cursor, saved, dlq)
        for close in [lookups.close, reader.stop, *(c.stop for c in committers.values()),
                      *([producer.stop] if producer is not None else [])]:
            with contextlib.suppress(Exception):
                await close()


async def _commit(committers: dict, cursor: dict[str, dict[int, int]], saved: dict[str, dict[int, int]],
                  dlq: str) -> None:
    """Commit each reason's cursor where it is past what the group holds (never backwards)."""
    from aiokafka import TopicPartition

    for reason, committer in committers.items():
        moved = {p: o for p, o in cursor[reason].items() if o > saved[reason].get(p, -1)}
        if not moved:
            continue
        try:
            for p in moved:  # the group still holds what this run last read or committed: no other run moved it
                held = await asyncio.wait_for(committer.committed(TopicPartition(dlq, p)), COMMIT_TIMEOUT_SECONDS)
                if held is not None and held != saved[reason].get(p):
                    raise _Concurrent(p, held)
            await asyncio.wait_for(committer.commit({TopicPartition(dlq, p): o for p, o in moved.items()}),
                                   COMMIT_TIMEOUT_SECONDS)
        except _Concurrent as exc:
            raise RedriveError(f"another redrive of {reason} is running: the progress of {reason} on {dlq} "
                               f"partition {exc.partition} moved to {exc.held} meanwhile; stop one of them (records "
                               "written by both are sent twice; the sync ledger keeps them from reaching the API "
                               "twice)") from None
        except Exception as exc:  # a timeout, or a Kafka error
            raise RedriveError(f"cannot commit the progress of {reason} ({type(exc).__name__}): what was "
                               "written since the last commit will be written again by the next run") from None
        saved[reason].update(moved)


class _Concurrent(Exception):
    def __init__(self, partition: int, held: int) -> None:
        super().__init__(partition, held)
        self.partition, self.held = partition, held


class _Run:
    """One run's judging and writing, a fetched batch at a time."""

    def __init__(self, request: Request, tally: Tally, cursor: dict[str, dict[int, int]], topics: dict[str, int],
                 options: dict, lookups: SourceCounts, producer, dlq: str) -> None:
        self.request = request
        self.criteria = request.criteria
        self.tally = tally
        self.cursor = cursor
        self.topics = topics
        self.options = options
        self.lookups = lookups
        self.producer = producer
        self.dlq = dlq
        self.limit_reached = False
        self._warned: set[str] = set()

    async def process(self, batch: Mapping, ends: Mapping) -> list:
        """Judge and write one fetched batch; the cursors move once Kafka acknowledged its writes. Returns the
        partitions that stop here (--until met)."""
        criteria, tally = self.criteria, self.tally
        reasons = criteria.reasons
        stopped = []
        # (tp, record, letter) of candidates, in order; positions reached per partition
        todo: list[tuple] = []
        reached: dict = {}
        for tp, records in batch.items():
            for record in records:
                if not self.request.follow and record.offset >= ends[tp]:
                    break
                letter = read_letter(record.headers)
                reason = letter.reason
                if reason in reasons and record.offset < self.cursor[reason].get(tp.partition, 0):
                    tally.earlier += 1
                    tally.read += 1
                    reached[tp] = record.offset + 1
                    continue
                verdict = prefilter(letter, record.timestamp, criteria)
                if verdict is Verdict.LATER:
                    stopped.append(tp)
                    break
                todo.append((tp, record, letter, verdict))
                reached[tp] = record.offset + 1
        counts = await self._counts(todo)
        decisions = [self._decide(tp, record, letter, verdict, counts) for tp, record, letter, verdict in todo]
        # Every destination of the chunk is checked before anything of it is written.
        planned = 0
        for decision in decisions:
            if decision is not None and decision.verdict is Verdict.SEND:
                if self.request.limit is not None and tally.sent_total + planned >= self.request.limit:
                    break
                planned += 1
                assert decision.destination is not None
                await self._check_topic(decision.destination)
        sends: list[tuple] = []  # (tp, offset, reason, destination, future)
        unsent: dict = {}  # tp -> first offset not judged (limit) or not written (a send failed)
        failure: BaseException | None = None
        for index, (tp, record, letter, verdict) in enumerate(todo):
            if self.limit_reached or failure is not None:
                unsent.setdefault(tp, record.offset)
                continue
            decision = decisions[index]
            if verdict is Verdict.NOT_SELECTED:
                tally.read += 1
                tally.not_selected[letter.reason or "(none)"] += 1
                continue
            if verdict is Verdict.FILTERED:
                tally.read += 1
                tally.filtered[letter.reason] += 1
                continue
            assert decision is not None
            if letter.count is None and counts.get((letter.source_topic, letter.source_partition,
                                                    letter.source_offset)) is None:
                tally.unknown_counts += 1
            where = f"{self.dlq}/{tp.partition}/{record.offset}"
            if decision.verdict is Verdict.OVER_MAX:
                tally.leave(tally.over_max, tally.over_max_at, decision.reason,
                            f"{where} {decision.reason}, redriven {decision.count} times")
                continue
            if decision.verdict is Verdict.UNREADABLE:
                tally.leave(tally.unreadable, tally.unreadable_at, decision.reason,
                            f"{where} {decision.reason}: {decision.why}")
                continue
            assert decision.destination is not None
            headers = redrive_headers(decision.count + 1, decision.reason, self.dlq, tp.partition, record.offset)
            if self.producer is None:
                if len(tally.shown) < self.request.show:
                    tally.shown.append(_shown(where, decision, record.value))
                tally.sent[decision.reason] += 1
                tally.destinations[decision.destination] += 1
            else:
                try:
                    future = await self.producer.send(decision.destination, value=record.value, key=decision.key,
                                                      headers=headers)
                except Exception as exc:  # nothing of this record went out: it and all after it stay
                    failure = exc
                    unsent.setdefault(tp, record.offset)
                    continue
                sends.append((tp, record.offset, decision.reason, decision.destination, future))
            tally.read += 1
            if self.request.limit is not None and tally.sent_total + len(sends) >= self.request.limit:
                self.limit_reached = True
        if sends:  # every write that went out is awaited, whatever failed: none is left for producer.stop()
            results = await asyncio.gather(*(s[4] for s in sends), return_exceptions=True)
            for (tp, offset, reason, destination, _), result in zip(sends, results, strict=True):
                if isinstance(result, BaseException):
                    failure = failure or result
                    unsent[tp] = min(unsent.get(tp, offset), offset)
                    tally.read -= 1
                else:
                    tally.sent[reason] += 1
                    tally.destinations[destination] += 1
        for tp, position in reached.items():
            if tp in unsent:
                position = min(position, unsent[tp])
            for reason in reasons:
                if self.cursor[reason].get(tp.partition, 0) < position:
                    self.cursor[reason][tp.partition] = position
        if failure is not None:
            raise RedriveError(f"writing redriven records failed ({type(failure).__name__}: {failure}); what Kafka "
                               "acknowledged is committed, and the next run goes on from the first record not "
                               "written") from None
        return stopped

    def _decide(self, tp, record, letter, verdict, counts: dict) -> Decision | None:
        if verdict is not None:
            return None
        known = counts.get((letter.source_topic, letter.source_partition, letter.source_offset))
        return select(letter, record.timestamp, record.value, self.criteria, known)

    async def _counts(self, todo: list) -> dict:
        wanted = [(letter.source_topic, letter.source_partition, letter.source_offset)
                  for _, _, letter, verdict in todo
                  if verdict is None and letter.count is None and letter.source_topic is not None
                  and letter.source_partition is not None and letter.source_offset is not None]
        if not wanted:
            return {}
        return await self.lookups.counts(wanted)

    async def _check_topic(self, topic: str) -> None:
        if topic in self.topics:
            return
        self.topics.update(await _topic_partitions(self.options))
        if topic not in self.topics:
            raise RedriveError(f"topic {topic!r}, where dead letters are to go back, does not exist: create it, or "
                               "send them elsewhere with --to (nothing of this round was written; what was "
                               "written before is committed)")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Control characters (C0, DEL, C1) as \\xNN: a shown value cannot move the cursor or recolour a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _shown(where: str, decision: Decision, value: bytes) -> str:
    text = value[:SHOW_BYTES].decode("utf-8", errors="replace")
    more = f"... ({len(value)} bytes)" if len(value) > SHOW_BYTES else ""
    key = decision.key.decode("utf-8", errors="replace") if decision.key is not None else "(none)"
    return _printable(f"{where} -> {decision.destination} key {key}: {text}{more}")


