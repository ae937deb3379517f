"""The Kafka producer side: dead letters (with reason and source headers) and parked small buffers.

A write counts only once Kafka acknowledged it: `write` returns a future the pipeline acks offsets on.
Writes go through one bounded pipeline, whatever their number (an incident can make a hundred thousand
dead letters at once): `write` only queues; one pump task hands queued records to the producer, keeping
at most MAX_IN_FLIGHT records and MAX_IN_FLIGHT_BYTES in its hands, so they leave in the producer's
batches; a failed record goes back to the front of the queue and the pump pauses with backoff (one pause
for all that failed together, not a timer per record). Nothing is dropped; what is queued is counted
(`pending`, `pending_bytes`) so that the pipeline pauses fetching while Kafka does not keep up. Ongoing
trouble is logged at most once a minute per kind, with the count of what was left out.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from stream.config import Settings
from stream.kafka_options import kafka_client_options
from stream.logs import RateLimited
from stream.retry import Backoff

log = logging.getLogger("stream.deadletter")

Headers = list[tuple[str, bytes]]


# A dead letter's headers (README "Dead-letter topic"); `stream redrive` reads them.
ERROR_REASON_HEADER = "stream.error.reason"
ERROR_MESSAGE_HEADER = "stream.error.message"
SOURCE_TOPIC_HEADER = "stream.source.topic"
SOURCE_PARTITION_HEADER = "stream.source.partition"
SOURCE_OFFSET_HEADER = "stream.source.offset"
VALUE_DROPPED_HEADER = "stream.error.value_dropped"  # the value was too large for the DLQ: its size, value dropped


def dead_letter_headers(reason: str, message: str, topic: str, partition: int, offset: int,
                        redrive_count: int = 0) -> Headers:
    """The headers of a dead letter. stream.redrive.count is always written (0: never redriven), so that
    `stream redrive` needs to read the source record only for dead letters of older versions."""
    return [
        (ERROR_REASON_HEADER, reason.encode()),
        (ERROR_MESSAGE_HEADER, message.encode("utf-8", errors="replace")[:4000]),
        (SOURCE_TOPIC_HEADER, topic.encode()),
        (SOURCE_PARTITION_HEADER, str(partition).encode()),
        (SOURCE_OFFSET_HEADER, str(offset).encode()),
        (REDRIVE_COUNT_HEADER, str(redrive_count).encode()),
    ]


# Written by `stream redrive` on the records it sends back (how many times the record has been redriven); the
# service carries it to the record's dead letters and parked tails, so that the next redrive can count.
REDRIVE_COUNT_HEADER = "stream.redrive.count"
PARKED_BORN_HEADER = "stream.parked.born"  # when each parked sample was first seen: wall seconds, comma-separated
PARKED_GROUP_HEADER = "stream.parked.group"  # the consumer group that parked it: only that group reads it back
STOP_TIMEOUT_SECONDS = 5.0
DROP_VALUE_ABOVE = 256 * 1024  # bytes: a dead letter this large that Kafka refuses as too large loses its value
# Handed to the producer and not yet acknowledged: enough to fill its batches for every partition many times
# over, small enough that a broker that stops answering holds little (the rest waits, counted, in the queue).
MAX_IN_FLIGHT = 5000
MAX_IN_FLIGHT_BYTES = 16 * 1024 * 1024
# Queued and unacknowledged writes beyond this many bytes pause fetching (with the samples' own bound).
MAX_PENDING_BYTES = 64 * 1024 * 1024
LOG_EVERY = 60.0
_OVERHEAD = 64  # bytes counted per write beyond its key, value and headers (the record's framing)


class _Write:
    __slots__ = ("done", "headers", "key", "partition", "size", "topic", "value")

    def __init__(self, topic: str, key: bytes | None, value: bytes, headers: Headers, done: asyncio.Future,
                 partition: int | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.key = key
        self.value = value
        self.headers = headers
        self.done = done
        self.size = len(value) + len(key or b"") + sum(len(k) + len(v) for k, v in headers) + _OVERHEAD


class KafkaWriter:
    def __init__(self, settings: Settings, clock=time.monotonic) -> None:
        self._producer = AIOKafkaProducer(
            **kafka_client_options(settings),
            acks="all",  # a dead letter or a parked sample must survive a broker loss before we commit past it
            enable_idempotence=True,  # retries inside the client do not duplicate records
            # Dead letters come in bursts (an incident makes thousands at once) and nobody waits for them by the
            # millisecond: let them gather into large batches (fewer requests, less CPU on both sides)...
            linger_ms=20,
            max_batch_size=256 * 1024,
            # ...compressed: they are JSON with repetitive headers, and lz4 costs little CPU.
            compression_type="lz4",
            # A batch not acknowledged in this time fails its records, which the pump retries with backoff:
            # bounded, so a broker that stopped answering is noticed and logged, never waited on silently.
            request_timeout_ms=30_000,
        )
        self._backoff = Backoff(first=settings.retry_backoff_first_seconds, cap=settings.retry_backoff_max_seconds)
        self._rng = random.Random()
        self._clock = clock
        self._queue: deque[_Write] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._failures = 0  # consecutive rounds of failed records, for the backoff
        self._retry_at = 0.0
        self._pausing = False  # a round of failures is open: more failures join it until the pump resumes
        self.pending = 0  # writes queued or in flight, not yet acknowledged
        self.pending_bytes = 0
        self.retried = 0  # records handed to the producer again after a failure
        self._logs: dict[str, RateLimited] = {}

    async def start(self) -> None:
        await self._producer.start()
        self._ensure_pump()

    async def stop(self) -> None:
        """Bounded: with Kafka away, unacknowledged writes are abandoned (their offsets were never committed,
        so their records are read again after a restart)."""
        if self._pump_task is not None:
            self._pump_task.cancel()
        flushing = asyncio.ensure_future(self._producer.flush())
        done, _ = await asyncio.wait({flushing}, timeout=STOP_TIMEOUT_SECONDS * 0.6)
        if not done or flushing.cancelled() or flushing.exception() is not None:
            flushing.cancel()
        if self.pending:
            log.warning("unacknowledged Kafka writes abandoned at stop; their records are read again after a "
                        "restart", extra={"event": "write_abandoned", "writes": self.pending})
        stopping = asyncio.ensure_future(self._producer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_SECONDS * 0.4)
        if not done:
            stopping.cancel()

    def write(self, topic: str, key: bytes | None, value: bytes, headers: Headers,
              partition: int | None = None) -> asyncio.Future[int]:
        """Queue a write (to `partition`, or the key's); the future resolves to the record's offset once Kafka
        acknowledged it (after as many retries as needed)."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        write = _Write(topic, key, value, headers, done, partition)
        self._queue.append(write)
        self.pending += 1
        self.pending_bytes += write.size
        self._wake.set()
        self._ensure_pump()
        return done

    # -- the pump -------------------------------------------------------------------------------------

    def _ensure_pump(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._retry_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._pausing = False
            if self._in_flight >= MAX_IN_FLIGHT or self._in_flight_bytes >= MAX_IN_FLIGHT_BYTES:
                self._room.clear()
                await self._room.wait()
                continue
            write = queue.popleft()
            try:
                # Returns once the record is in the producer's batch (waits while that batch is full).
                delivery = await self._producer.send(write.topic, value=write.value, key=write.key,
                                                     headers=write.headers, partition=write.partition)
            except KafkaError as exc:
                self._failed(write, exc)
                continue
            self._in_flight += 1
            self._in_flight_bytes += write.size
            delivery.add_done_callback(lambda d, w=write: self._delivered(w, d))

    def _delivered(self, write: _Write, delivery: asyncio.Future) -> None:
        self._in_flight -= 1
        self._in_flight_bytes -= write.size
        self._room.set()
        error = None if delivery.cancelled() else delivery.exception()
        if delivery.cancelled() or error is not None:
            self._failed(write, error if isinstance(error, KafkaError) else None)
            return
        self._failures = 0
        self.pending -= 1
        self.pending_bytes -= write.size
        if not write.done.done():
            write.done.set_result(delivery.result().offset)

    def _failed(self, write: _Write, error: KafkaError | None) -> None:
        """Back to the front of the queue; the pump pauses once for everything that failed together."""
        if isinstance(error, MessageSizeTooLargeError | RecordTooLargeError) and len(write.value) >= DROP_VALUE_ABOVE:
            # Kafka will never take it as it is: keep the reason and the source headers (they point at the
            # original record), drop the value. Smaller records that failed only because they shared a batch
            # with such a one are retried as they are.
            self._log("write_value_dropped", "record too large for its topic: writing it without its value",
                      write.topic, error, logging.ERROR)
            dropped = _Write(write.topic, write.key, b"",
                             [*write.headers, (VALUE_DROPPED_HEADER, str(len(write.value)).encode())],
                             write.done)
            self.pending_bytes += dropped.size - write.size
            self._queue.appendleft(dropped)
            self._wake.set()
            return
        self.retried += 1
        self._queue.appendleft(write)
        now = self._clock()
        if not self._pausing:  # the first failure of a round sets the pause; the others share it
            self._pausing = True
            self._failures += 1
            self._retry_at = now + self._backoff.delay(self._failures - 1, None, self._rng)
        self._log("write_retry", "Kafka writes fail; retrying with backoff", write.topic, error, logging.WARNING)
        self._wake.set()

    def _log(self, event: str, message: str, topic: str, error: KafkaError | None, level: int) -> None:
        kind = type(error).__name__ if error is not None else "cancelled"
        limiter = self._logs.setdefault(f"{event}:{kind}", RateLimited(LOG_EVERY, self._clock))
        if (suppressed := limiter.take()) is not None:
            log.log(level, message, extra={"event": event, "topic": topic, "error": kind, "suppressed": suppressed,
                                           "pending": self.pending, "retry_in": round(max(0.0, self._retry_at -
                                                                                          self._clock()), 3)})
