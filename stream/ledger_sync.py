"""The sync ledger in the running service: restore on assignment, screen batches before they are sent, record
what the API accepted (in memory and in the ledger topic) before the commit passes it.

The decisions and the state are stream.ledger's (pure); the topic's I/O is stream.ledger_store's. This module
holds the glue the pipeline calls: which partitions are restored, which wait, what a batch keeps.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Protocol

import msgspec

from stream.batching import Entry
from stream.config import Settings
from stream.ledger import BEYOND, DUPLICATE, KINDS, NEW, Ledger, device_of
from stream.ledger_format import decode_record, encode_record
from stream.metrics import Metrics
from stream.offsets import TopicPartition
from stream.retry import Backoff

log = logging.getLogger("stream.ledger")

RESTORE_TIMEOUT_SECONDS = 120.0  # one partition's read; 1M remembered samples take ~0.2 s
RESTORE_CONCURRENCY = 2  # partitions read back at once: each holds its raw records in memory while it loads
RESTORE_CHUNK = 500  # ledger records decoded between two yields to the event loop (heartbeats, deliveries)


class LedgerStore(Protocol):
    """The ledger topic, as the pipeline needs it (stream.ledger_store.KafkaLedgerStore; a fake in tests)."""

    async def ensure(self) -> int:
        """Create the topic if missing (or check it); its partition count."""
        ...

    async def read(self, partition: int) -> list[bytes]: ...


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
        self._assigned: set[TopicPartition] = set()
        self._evicted = 0
        self._restores = asyncio.Semaphore(RESTORE_CONCURRENCY)
        self._rng = random.Random()
        metrics.ledger_entries.set_function(lambda: self.ledger.entries)
        metrics.ledger_bytes.set_function(lambda: self.ledger.resident_bytes)

    async def ensure(self) -> None:
        self.partition_count = await self.store.ensure()

    # -- assignment -------------------------------------------------------------------------------------------

    def assigned(self, tps: list[TopicPartition]) -> None:
        """Hold back newly assigned partitions whose ledger state is not restored, and restore it."""
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
        waiting = [tp for tp in tps if tp.partition not in self.ready and tp.partition not in self.uncovered]
        if not waiting:
            return
        self.holder.hold(waiting)
        for number in sorted({tp.partition for tp in waiting} - set(self._restoring)):
            self._restoring[number] = asyncio.ensure_future(self._restore(number))

    def revoked(self, tps: list[TopicPartition]) -> None:
        """Forget the state of partition numbers no longer assigned in any topic (their next owner restores)."""
        self._assigned.difference_update(tps)
        self.holder.forget(tps)
        kept = {tp.partition for tp in self._assigned}
        for number in {tp.partition for tp in tps} - kept:
            task = self._restoring.pop(number, None)
            if task is not None:
                task.cancel()
            self.ready.discard(number)
            self.ledger.drop(number)

    def close(self) -> None:
        for task in self._restoring.values():
            task.cancel()
        self._restoring.clear()

    async def _restore(self, number: int) -> None:
        async with self._restores:
            await self._restore_one(number)

    async def _restore_one(self, number: int) -> None:
        backoff = Backoff(self.settings.retry_backoff_first_seconds, self.settings.retry_backoff_max_seconds)
        attempt = 0
        while True:
            started = self.clock()
            try:
                values = await self.store.read(number)
                break
            except Exception as exc:  # any failure to read: the partition waits, retried
                attempt += 1
                log.warning("ledger restore failed; retrying", extra={"event": "ledger_restore_failed",
                                                                      "partition": number,
                                                                      "error": type(exc).__name__})
                await asyncio.sleep(backoff.delay(attempt, None, self._rng))
        samples = unreadable = 0
        try:
            for first in range(0, len(values), RESTORE_CHUNK):
                records = []
                for value in values[first : first + RESTORE_CHUNK]:
                    try:
                        records.append(decode_record(value))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        unreadable += 1
                samples += self.ledger.restore(number, records)
                await asyncio.sleep(0)  # a large restore must not stall deliveries or the group's heartbeats
        except Exception:  # a bug or a record nobody foresaw: what is restored stays, the partition goes on
            log.exception("ledger restore failed part-way; going on with what was read",
                          extra={"event": "ledger_restore_error", "partition": number})
        seconds = self.clock() - started
        self._count_evictions()
        self.ready.add(number)
        del self._restoring[number]
        self.metrics.ledger_restore_seconds.observe(seconds)
        self.metrics.ledger_restored.inc(samples)
        if unreadable:
            log.warning("unreadable ledger records skipped", extra={"event": "ledger_unreadable",
                                                                    "partition": number, "records": unreadable})
        log.info("ledger restored", extra={"event": "ledger_restored", "partition": number, "records": len(values),
                                           "samples": samples, "seconds": round(seconds, 3)})
        self.holder.release([tp for tp in self._assigned if tp.partition == number])

    # -- before sending ---------------------------------------------------------------------------------------

    def screen(self, user_id: str, data_type: str, entries: list[Entry]) -> Screened:
        """What of a batch goes to the API: not the samples it already accepted (in shadow mode: everything)."""
        ledger = self.ledger
        counts = dict.fromkeys(KINDS, 0)
        out = Screened([], [], [])
        lateness = []
        dead_letter_beyond = self.settings.ledger_beyond_horizon == "dead_letter"
        for entry in entries:
            key = (user_id, data_type, device_of(entry.body))
            kind, behind = ledger.decide(entry.source.tp.partition, key, entry.start, entry.body)
            counts[kind] += 1
            if kind != NEW and kind != DUPLICATE:
                lateness.append(behind / 1e9)
            if self.shadow:
                out.send.append(entry)
            elif kind == DUPLICATE:
                out.duplicates.append(entry)
            elif kind == BEYOND and dead_letter_beyond:
                out.beyond.append(entry)
            else:
                out.send.append(entry)
        for kind, count in counts.items():
            if count:
                self.metrics.ledger_decisions.labels(kind).inc(count)
        for seconds in lateness:
            self.metrics.ledger_lateness.observe(seconds)
        return out

    # -- after acceptance -------------------------------------------------------------------------------------

    def record(self, writer, user_id: str, data_type: str,
               accepted: list[Entry]) -> list[tuple[asyncio.Future[None], list[Entry]]]:
        """Remember accepted samples and write them to the ledger topic, one record per source partition
        number; returns each write with its entries, whose offsets are done once Kafka acknowledged it."""
        by_partition: dict[int, list[Entry]] = {}
        for entry in accepted:
            by_partition.setdefault(entry.source.tp.partition, []).append(entry)
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
            record = self.ledger.record_of(number, user_id, data_type, [(e.start, e.body) for e in entries],
                                           now, remember=number in self.ready)
            key, value = encode_record(record)
            writes.append((writer.write(self.settings.ledger_topic, key, value, [], partition=number), entries))
        self._count_evictions()
        return writes

    def _count_evictions(self) -> None:
        evicted = self.ledger.evicted
        if evicted > self._evicted:
            self.metrics.ledger_evictions.inc(evicted - self._evicted)
            self._evicted = evicted


class KafkaLedgerStore:
    """The ledger topic on the service's Kafka cluster (stream.ledger_store does the I/O)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def ensure(self) -> int:
        from stream.kafka_options import kafka_client_options
        from stream.ledger_store import ensure_ledger_topic

        s = self._settings
        return await ensure_ledger_topic(kafka_client_options(s), s.ledger_topic, list(s.input_topics),
                                  s.ledger_horizon_seconds)

    async def read(self, partition: int) -> list[bytes]:
        from stream.kafka_options import kafka_client_options
        from stream.ledger_store import read_partition

        s = self._settings
        # Bounded: a read that hangs (a partition without a leader) is retried rather than holding it for good.
        return (await read_partition(kafka_client_options(s), s.ledger_topic, partition,
                                     timeout=RESTORE_TIMEOUT_SECONDS)).values
