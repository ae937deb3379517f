"""The sync ledger in the running service: restore on assignment, screen batches before they are sent, record
what the API accepted (in memory and in the ledger topic) before the commit passes it.

The decisions and the state are stream.ledger's (pure); the topic's I/O is stream.ledger_store's. This module
holds the glue the pipeline calls: which partitions are restored, which wait, what a batch keeps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import msgspec

from stream.batching import Entry
from stream.config import Settings
from stream.ledger import BEYOND, DUPLICATE, KINDS, NEW, Ledger
from stream.ledger_format import LedgerRecord, decode_key, decode_record, encode_record
from stream.metrics import Metrics
from stream.offsets import TopicPartition
from stream.retry import Backoff

if TYPE_CHECKING:
    from stream.ledger_store import Restored, Tail

log = logging.getLogger("stream.ledger")

RESTORE_TIMEOUT_SECONDS = 120.0  # one partition's read; 1M remembered samples take ~0.2 s
RESTORE_CONCURRENCY = 2  # partitions read back at once: each holds its raw records in memory while it loads
RESTORE_CHUNK = 500  # ledger records decoded between two yields to the event loop (heartbeats, deliveries)
# How often a member asks for its ledger partitions' end offsets to learn whether anyone else wrote to them (a
# `stream ledger forget`, a member that held a partition too): a forget reaches running members within this.
FOLLOW_SECONDS = 5.0
END_OFFSETS_TIMEOUT_SECONDS = 30.0
# A revoked partition's state is kept for its return at most this long: far less than the ledger topic's
# delete.retention.ms (a day), past which a forget's tombstones may be gone.
PARKED_SECONDS = 300.0
ACK_WAIT_SECONDS = 2.0  # a follow waits this long at most for its own writes' acknowledgements
OWN_LIMIT = 100_000  # own writes remembered by offset past the position, per partition (a few follows' worth)

T = TypeVar("T")

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


class LedgerStore(Protocol):
    """The ledger topic, as the pipeline needs it (stream.ledger_store.KafkaLedgerStore; a fake in tests)."""

    async def ensure(self) -> int:
        """Create the topic if missing (or check it); its partition count."""
        ...

    async def read(self, partition: int) -> Restored:
        """The partition's live records (latest per key) up to its end as of now."""
        ...

    async def read_since(self, partition: int, start: int) -> Tail:
        """Every record of the partition from offset `start` to its end as of now, in order."""
        ...

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]: ...

    async def close(self) -> None: ...


class Holder(Protocol):
    """What the ledger needs of the consumer: hold back partitions while they restore."""

    def hold(self, tps: list[TopicPartition]) -> None: ...

    def release(self, tps: list[TopicPartition]) -> None: ...

    def forget(self, tps: list[TopicPartition]) -> None: ...


class Screened(msgspec.Struct, gc=False):
    send: list[Entry]
    duplicates: list[Entry]
    beyond: list[Entry]  # to dead-letter (STREAM_LEDGER_BEYOND_HORIZON=dead_letter)


class LedgerSync:
    """Which ledger partitions this member holds, and how their state follows the topic.

    Per partition number held: the state (in `ledger`), the ledger offset up to which it reflects the topic
    (`_position`), this member's own writes at or past it that are already in the state (`_own`, by offset,
    with their records) and its writes not acknowledged yet (`_unacked`, by key). Every FOLLOW_SECONDS the end
    offsets tell whether anyone else wrote: when the offsets between the position and the end are all ours,
    nothing to read; otherwise the records from the position on are read and applied (tombstones forget the
    user, others' records are merged). A partition revoked is kept (`_parked`) until the next assignment says
    whether it comes back (within PARKED_SECONDS): then only what was written since is read.
    """

    def __init__(self, settings: Settings, metrics: Metrics, store: LedgerStore, holder: Holder,
                 clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.holder = holder
        self.clock = clock
        self.wall = wall
        self.partition_count: int | None = None  # the ledger topic's, once ensured
        self.uncovered: set[int] = set()  # assigned partition numbers the ledger topic has no partition for
        self.shadow = settings.ledger == "shadow"
        self.ledger = Ledger(
            int(settings.ledger_horizon_seconds * 1e9),
            settings.ledger_max_memory_bytes,
            settings.ledger_max_samples_per_device,
        )
        self.ready: set[int] = set()  # partition numbers whose ledger state is restored
        self._restoring: dict[int, asyncio.Task[None]] = {}
        self._held_since: dict[int, float] = {}  # partition numbers held back for their ledger, since when
        self._assigned: set[TopicPartition] = set()
        self._parked: dict[int, float] = {}  # revoked, state kept until the next assignment: since when
        self._position: dict[int, int] = {}
        self._own: dict[int, dict[int, LedgerRecord]] = {}
        self._unacked: dict[int, dict[bytes, tuple[LedgerRecord, asyncio.Future]]] = {}
        self._states = 0  # a new number for each state built (own writes acknowledged later name the one they fed)
        self._state_of: dict[int, int] = {}
        self._next_follow = 0.0
        self._following: asyncio.Task[int] | None = None
        self._evicted = 0
        self._restores = asyncio.Semaphore(RESTORE_CONCURRENCY)
        self._rng = random.Random()
        metrics.ledger_entries.set_function(lambda: self.ledger.entries)
        metrics.ledger_bytes.set_function(lambda: self.ledger.resident_bytes)
        metrics.ledger_held.set_function(self._oldest_hold)

    async def ensure(self) -> None:
        self.partition_count = await self.store.ensure()

    def _oldest_hold(self) -> float:
        now = self.clock()
        return max((now - since for since in self._held_since.values()), default=0.0)

    # -- assignment -------------------------------------------------------------------------------------------

    def assigned(self, tps: list[TopicPartition]) -> None:
        """Hold back newly assigned partitions whose ledger state is not restored, and restore it (or, for one
        this member held before the rebalance, read what was written since)."""
        self._stop_following()
        self._assigned.update(tps)
        count = self.partition_count
        beyond = sorted({tp.partition for tp in tps if count is not None and tp.partition >= count})
        if beyond:
            # An input topic grew (or a pending topic was created wider) after the start checked the ledger
            # topic: these partitions cannot be remembered; they are sent at least once, never held for good.
            self.uncovered.update(beyond)
            log.error("the ledger topic has fewer partitions than an input topic: no ledger for some partitions",
                      extra={"event": "ledger_uncovered", "partitions": ",".join(map(str, beyond)),
                             "ledger_partitions": count})
        # A rebalance revokes everything, then assigns the new set: what did not come back is let go now, and so
        # is what was away too long (the tombstones of a forget meanwhile may be compacted away by now).
        numbers = {tp.partition for tp in self._assigned}
        now = self.clock()
        for number, since in list(self._parked.items()):
            if number not in numbers or now - since > PARKED_SECONDS:
                self._drop(number)
        waiting = [tp for tp in tps if tp.partition not in self.ready and tp.partition not in self.uncovered]
        if not waiting:
            return
        self.holder.hold(waiting)
        for number in sorted({tp.partition for tp in waiting} - set(self._restoring)):
            kept = self._parked.pop(number, None) is not None
            self._held_since[number] = now
            self._restoring[number] = asyncio.ensure_future(self._catch_up(number) if kept else self._restore(number))

    def revoked(self, tps: list[TopicPartition]) -> None:
        """Partition numbers no longer assigned in any topic: their state is kept until the next assignment
        (most come back to the same member), or forgotten if it was not restored yet."""
        self._stop_following()
        self._assigned.difference_update(tps)
        self.holder.forget(tps)
        kept = {tp.partition for tp in self._assigned}
        for number in {tp.partition for tp in tps} - kept:
            task = self._restoring.pop(number, None)
            if task is not None:
                task.cancel()
                self._drop(number)
            elif number in self.ready:
                self.ready.discard(number)
                self._parked[number] = self.clock()

    def _stop_following(self) -> None:
        """A follow in progress reads for an assignment that is changing: it stops (what it applied is applied
        again by the next one, or by the catch-up of a partition that comes back)."""
        if self._following is not None and not self._following.done():
            self._following.cancel()
        self._following = None

    def _drop(self, number: int) -> None:
        self.ready.discard(number)
        self._parked.pop(number, None)
        self._held_since.pop(number, None)
        self._position.pop(number, None)
        self._own.pop(number, None)
        self._unacked.pop(number, None)
        self._state_of.pop(number, None)
        self.ledger.drop(number)

    async def close(self) -> None:
        self._stop_following()
        tasks = list(self._restoring.values())
        for task in tasks:
            task.cancel()
        self._restoring.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(5.0):
                await self.store.close()
        except Exception as exc:  # leaving is best effort
            log.warning("the ledger's client did not stop cleanly", extra={"event": "ledger_close_error",
                                                                           "error": type(exc).__name__})

    async def _restore(self, number: int) -> None:
        async with self._restores:
            await self._restore_one(number)

    async def _restore_one(self, number: int) -> None:
        restored = await self._retrying(number, lambda: self.store.read(number))
        started = self.clock()
        values = restored.values
        self.ledger.drop(number)  # whatever a cancelled follow or catch-up may have left
        self._new_state(number, restored.end_offset)
        samples = unreadable = 0
        try:
            for first in range(0, len(values), RESTORE_CHUNK):
                records = []
                for value in values[first : first + RESTORE_CHUNK]:
                    try:
                        records.append(decode_record(value))
                    except _DECODE_ERRORS:
                        unreadable += 1
                samples += self.ledger.restore(number, records)
                await asyncio.sleep(0)  # a large restore must not stall deliveries or the group's heartbeats
        except Exception:  # a bug or a record nobody foresaw: what is restored stays, the partition goes on
            log.exception("ledger restore failed part-way; going on with what was read",
                          extra={"event": "ledger_restore_error", "partition": number})
        self.metrics.ledger_restored.inc(samples)
        if unreadable:
            log.warning("unreadable ledger records skipped", extra={"event": "ledger_unreadable",
                                                                    "partition": number, "records": unreadable})
        log.info("ledger restored", extra={"event": "ledger_restored", "partition": number, "records": len(values),
                                           "samples": samples, "seconds": round(self.clock() - started, 3),
                                           "held_seconds": round(self.clock() - self._held_since[number], 3)})
        self._ready(number)

    async def _catch_up(self, number: int) -> None:
        """A partition that comes back after a rebalance: its state stayed; read only what others wrote since."""
        async with self._restores:
            tail = await self._retrying(number, lambda: self.store.read_since(number, self._position[number]))
            if self._records_gone(number, tail):
                # Retention took records this state has not seen (a forget's tombstones among them, perhaps).
                log.info("ledger records gone since the partition was held: restored whole",
                         extra={"event": "ledger_catch_up_gap", "partition": number})
                await self._restore_one(number)
                return
            try:
                records = await self._apply_tail(number, tail)
            except Exception:  # as for a restore: what is applied stays, the partition goes on
                log.exception("ledger catch-up failed part-way; going on with what was read",
                              extra={"event": "ledger_restore_error", "partition": number})
                records = 0
            self.metrics.ledger_kept.inc()
            log.info("ledger kept and caught up", extra={"event": "ledger_caught_up", "partition": number,
                                                         "records": records,
                                                         "held_seconds": round(self.clock() -
                                                                               self._held_since[number], 3)})
            self._ready(number)

    async def _retrying(self, number: int, read: Callable[[], Awaitable[T]]) -> T:
        """A read of the ledger topic, until it succeeds (the partition waits meanwhile)."""
        backoff = Backoff(self.settings.retry_backoff_first_seconds, self.settings.retry_backoff_max_seconds)
        attempt = 0
        while True:
            try:
                return await read()
            except Exception as exc:  # any failure to read: the partition waits, retried
                attempt += 1
                log.warning("ledger restore failed; retrying", extra={"event": "ledger_restore_failed",
                                                                      "partition": number,
                                                                      "error": type(exc).__name__})
                await asyncio.sleep(backoff.delay(attempt, None, self._rng))

    def _new_state(self, number: int, position: int) -> None:
        self._states += 1
        self._state_of[number] = self._states
        self._position[number] = position
        self._own[number] = {}
        self._unacked[number] = {}

    def _ready(self, number: int) -> None:
        self._count_evictions()
        self.ready.add(number)
        del self._restoring[number]
        # How long the partition waited, from its assignment (a queue for the restore slots included).
        self.metrics.ledger_restore_seconds.observe(self.clock() - self._held_since.pop(number))
        self.holder.release([tp for tp in self._assigned if tp.partition == number])

    def _restart(self, number: int) -> None:
        """Read a held partition's ledger again, whole, holding it back meanwhile."""
        self._drop(number)
        self._held_since[number] = self.clock()
        self.holder.hold([tp for tp in self._assigned if tp.partition == number])
        self._restoring[number] = asyncio.ensure_future(self._restore(number))

    # -- following the topic ----------------------------------------------------------------------------------

    def follow_due(self, now: float) -> None:
        """Called at every step of the pipeline: every FOLLOW_SECONDS, look for others' writes (in the background)."""
        if now < self._next_follow or (self._following is not None and not self._following.done()):
            return
        self._next_follow = now + FOLLOW_SECONDS
        self._following = asyncio.ensure_future(self.follow())

    async def follow(self) -> int:
        """Apply what others wrote to the ledger partitions held since the last look; returns the records read."""
        numbers = sorted(self.ready - self.uncovered)
        if not numbers:
            return 0
        try:
            async with asyncio.timeout(END_OFFSETS_TIMEOUT_SECONDS):
                ends = await self.store.end_offsets(numbers)
        except Exception as exc:  # the next look tries again
            log.warning("cannot read the ledger's end offsets", extra={"event": "ledger_follow_failed",
                                                                        "error": type(exc).__name__})
            return 0
        # Our own writes in flight when the end offsets were read may be below them: their acknowledgements (a
        # few milliseconds) tell their offsets, so that they are walked past rather than read back.
        acks = [ack for n in numbers for _, ack in self._unacked.get(n, {}).values()]
        if acks:
            await asyncio.wait(acks, timeout=ACK_WAIT_SECONDS)
        read = 0
        for number in numbers:
            if number not in self.ready or number not in ends or self._caught_up(number, ends[number]):
                continue
            try:
                tail = await self.store.read_since(number, self._position[number])
            except Exception as exc:
                log.warning("cannot read the ledger", extra={"event": "ledger_follow_failed", "partition": number,
                                                             "error": type(exc).__name__})
                continue
            if number not in self.ready:
                continue
            if self._records_gone(number, tail):
                log.warning("ledger records gone before this member read them: restoring the partition whole",
                            extra={"event": "ledger_follow_gap", "partition": number})
                self._restart(number)
                continue
            try:
                read += await self._apply_tail(number, tail)
            except Exception:
                log.exception("applying others' ledger records failed", extra={"event": "ledger_follow_error",
                                                                               "partition": number})
        return read

    def _records_gone(self, number: int, tail: Tail) -> bool:
        """Whether retention took records past the partition's position before they were read: the tail began
        above it (a forget's tombstones may be among them), so only a whole restore is sure."""
        return tail.first is not None and tail.first > self._position[number]

    def _caught_up(self, number: int, end: int) -> bool:
        """Whether the offsets from the position up to `end` are all this member's own writes (moves past them)."""
        own, position = self._own[number], self._position[number]
        while position < end and position in own:
            del own[position]
            position += 1
        self._position[number] = position
        return position >= end

    async def _apply_tail(self, number: int, tail: Tail) -> int:
        """Apply records read from the position on: tombstones forget their user (and data type), others'
        records are merged. This member's own records are in the state already, unless a tombstone comes
        first: then everything is applied in order (a write after the forget is remembered, one before it
        not), and so are this member's writes not in the tail (acknowledged past its end, or not yet)."""
        own, unacked = self._own[number], self._unacked[number]
        seen: set[bytes | None] = set()
        state = self._state_of[number]
        forgotten: set[tuple[str, str]] = set()
        foreign = tombstones = unreadable = 0
        for at, (offset, key, value) in enumerate(tail.records):
            if at % RESTORE_CHUNK == RESTORE_CHUNK - 1:
                await asyncio.sleep(0)
                if self._state_of.get(number) != state:
                    return at  # dropped meanwhile (revoked, restored again): nothing more goes into it
            seen.add(key)
            mine = offset in own or (key is not None and key in unacked)
            if mine and not forgotten:
                continue
            try:
                if value is None:
                    ledger_key = decode_key(key or b"")
                    # An empty data type: `stream ledger forget` without --data-type (every type of the user).
                    self.ledger.forget(number, ledger_key.user_id, ledger_key.data_type or None)
                    forgotten.add((ledger_key.user_id, ledger_key.data_type))
                    tombstones += 1
                else:
                    self.ledger.restore(number, [decode_record(value)])
                    foreign += not mine
            except _DECODE_ERRORS:
                unreadable += 1
        if forgotten:
            # Ours that the tail did not hold (those it held were applied in their place, before or after the
            # tombstone): acknowledged past its end, or on their way.
            later = [record for offset, record in own.items() if offset >= tail.end_offset]
            later += [record for key, (record, _) in unacked.items() if key not in seen]
            self.ledger.restore(number, [record for record in later if (record.user_id, record.data_type)
                                         in forgotten or (record.user_id, "") in forgotten])
        self._position[number] = max(self._position[number], tail.end_offset)
        self._own[number] = {offset: record for offset, record in own.items() if offset >= tail.end_offset}
        self._count_evictions()
        if foreign:
            self.metrics.ledger_foreign.labels("record").inc(foreign)
        if tombstones:
            self.metrics.ledger_foreign.labels("tombstone").inc(tombstones)
            log.info("ledger tombstones applied", extra={"event": "ledger_forgotten", "partition": number,
                                                         "tombstones": tombstones})
        if unreadable:
            log.warning("unreadable ledger records skipped", extra={"event": "ledger_unreadable",
                                                                    "partition": number, "records": unreadable})
        return len(tail.records)

    def pending_partition(self, entries: list[Entry]) -> int | None:
        """Where to park samples: the pending partition of their source partition's number, so that they are
        screened and recorded against the ledger partition that knows their device when they come back (with
        the co-partitioning assignor this member holds it whenever the pending topic has one); None (the
        user id's hash) when this member does not hold it."""
        number = entries[0].source.tp.partition
        return number if TopicPartition(self.settings.pending_topic, number) in self._assigned else None

    # -- before sending ---------------------------------------------------------------------------------------

    def screen(self, user_id: str, data_type: str, entries: list[Entry], count: bool = True) -> Screened:
        """What of a batch goes to the API: not the samples it already accepted (in shadow mode: everything).
        `count=False`: decide without counting (samples that will be screened again before they are sent)."""
        ledger = self.ledger
        if not entries:
            return Screened([], [], [])
        # A batch is mostly one device's samples from one source partition, newer than its watermark: the
        # ledger looks the device up once and says so (None) without a verdict per sample.
        verdicts = ledger.verdicts_of(user_id, data_type, [e.source.tp.partition for e in entries],
                                      [e.start for e in entries], [e.body for e in entries])
        shadow = self.shadow
        lateness: list[float] = []  # seconds behind the watermark of the samples neither NEW nor DUPLICATE
        if verdicts is None:
            out = Screened(list(entries), [], [])
            counts = {NEW: len(entries)}
        else:
            kinds = [kind for kind, _ in verdicts]
            new, duplicate = kinds.count(NEW), kinds.count(DUPLICATE)
            counts = {NEW: new, DUPLICATE: duplicate}
            if new + duplicate == len(kinds):  # nothing late (a re-sync, the newest samples after it): no more ado
                if shadow or not duplicate:
                    out = Screened(list(entries), [], [])
                elif not new:
                    out = Screened([], list(entries), [])
                else:
                    out = Screened([e for e, kind in zip(entries, kinds, strict=True) if kind == NEW],
                                   [e for e, kind in zip(entries, kinds, strict=True) if kind == DUPLICATE], [])
            else:
                out = Screened([], [], [])
                send, duplicates, beyond = out.send.append, out.duplicates.append, out.beyond.append
                counts = dict.fromkeys(KINDS, 0)
                dead_letter_beyond = self.settings.ledger_beyond_horizon == "dead_letter"
                for entry, (kind, behind) in zip(entries, verdicts, strict=True):
                    counts[kind] += 1
                    if kind == NEW:
                        send(entry)
                    elif kind == DUPLICATE:
                        (send if shadow else duplicates)(entry)
                    else:
                        lateness.append(behind / 1e9)
                        if kind == BEYOND and dead_letter_beyond and not shadow:
                            beyond(entry)
                        else:
                            send(entry)
        if not count:
            return out
        for kind, samples in counts.items():
            if samples:
                self.metrics.ledger_decisions.labels(kind).inc(samples)
        for seconds in lateness:
            self.metrics.ledger_lateness.observe(seconds)
        return out

    # -- after acceptance -------------------------------------------------------------------------------------

    def record(self, writer, user_id: str, data_type: str,
               accepted: list[Entry]) -> list[tuple[asyncio.Future[None], list[Entry]]]:
        """Remember accepted samples and write them to the ledger topic, one record per source partition
        number; returns each write with its entries, whose offsets are done once Kafka acknowledged it."""
        numbers = [entry.source.tp.partition for entry in accepted]
        by_partition: dict[int, list[Entry]] = {}
        if numbers and numbers.count(numbers[0]) == len(numbers):  # the common case: one source partition
            by_partition[numbers[0]] = list(accepted)
        else:
            for number, entry in zip(numbers, accepted, strict=True):
                by_partition.setdefault(number, []).append(entry)
        writes = []
        now = int(self.wall() * 1e9)
        for number, entries in by_partition.items():
            if number in self.uncovered:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                writes.append((done, entries))
                continue
            # A partition revoked meanwhile is not remembered here (its next owner restores it from the
            # topic), but still written: the API has these samples.
            remember = number in self.ready
            record = self.ledger.record_run(number, user_id, data_type, [e.start for e in entries],
                                            [e.body for e in entries], now, remember=remember)
            key, value = encode_record(record)
            written = writer.write(self.settings.ledger_topic, key, value, [], partition=number)
            if remember:  # in the state already: its offset is ours (a follow need not read it back)
                self._unacked[number][key] = (record, written)
                written.add_done_callback(functools.partial(self._written, number, self._state_of.get(number), key,
                                                            record))
            writes.append((written, entries))
        self._count_evictions()
        return writes

    def _written(self, number: int, state: int | None, key: bytes, record: LedgerRecord,
                 written: asyncio.Future) -> None:
        if self._state_of.get(number) != state:
            return  # the state it fed was dropped since
        self._unacked[number].pop(key, None)
        if written.cancelled() or written.exception() is not None:
            return
        offset = written.result()
        if isinstance(offset, int) and offset >= self._position[number]:
            own = self._own[number]
            own[offset] = record
            if len(own) > OWN_LIMIT:  # follows keep failing: the oldest are read back one day, applied again
                del own[min(own)]

    def _count_evictions(self) -> None:
        evicted = self.ledger.evicted
        if evicted > self._evicted:
            self.metrics.ledger_evictions.inc(evicted - self._evicted)
            self._evicted = evicted


class KafkaLedgerStore:
    """The ledger topic on the service's Kafka cluster (stream.ledger_store does the I/O)."""

    def __init__(self, settings: Settings) -> None:
        from stream.kafka_options import kafka_client_options
        from stream.ledger_store import EndOffsets

        self._settings = settings
        self._options = kafka_client_options(settings)
        self._ends = EndOffsets(self._options, settings.ledger_topic)

    async def ensure(self) -> int:
        from stream.ledger_store import ensure_ledger_topic

        s = self._settings
        return await ensure_ledger_topic(self._options, s.ledger_topic, list(s.input_topics), s.ledger_horizon_seconds)

    async def read(self, partition: int) -> Restored:
        from stream.ledger_store import read_partition

        # Bounded: a read that hangs (a partition without a leader) is retried rather than holding it for good.
        return await read_partition(self._options, self._settings.ledger_topic, partition,
                                    timeout=RESTORE_TIMEOUT_SECONDS)

    async def read_since(self, partition: int, start: int) -> Tail:
        from stream.ledger_store import read_since

        return await read_since(self._options, self._settings.ledger_topic, partition, start,
                                timeout=RESTORE_TIMEOUT_SECONDS)

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        return await self._ends.ends(partitions, timeout=END_OFFSETS_TIMEOUT_SECONDS)

    async def close(self) -> None:
        await self._ends.close()
