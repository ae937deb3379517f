"""The Kafka producer side: dead letters (with reason and source headers) and parked small buffers.

A write counts only once Kafka acknowledged it: `write` returns a future the pipeline acks offsets on.
A failed write is retried here, with backoff, for as long as the service runs; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from stream.config import Settings
from stream.kafka_options import kafka_client_options
from stream.retry import Backoff

log = logging.getLogger("stream.deadletter")

Headers = list[tuple[str, bytes]]


def dead_letter_headers(reason: str, message: str, topic: str, partition: int, offset: int) -> Headers:
    return [
        ("stream.error.reason", reason.encode()),
        ("stream.error.message", message.encode("utf-8", errors="replace")[:4000]),
        ("stream.source.topic", topic.encode()),
        ("stream.source.partition", str(partition).encode()),
        ("stream.source.offset", str(offset).encode()),
    ]


PARKED_BORN_HEADER = "stream.parked.born"  # when each parked sample was first seen: wall seconds, comma-separated
PARKED_GROUP_HEADER = "stream.parked.group"  # the consumer group that parked it: only that group reads it back
STOP_TIMEOUT_SECONDS = 5.0
DROP_VALUE_ABOVE = 256 * 1024  # bytes: a dead letter this large that Kafka refuses as too large loses its value


class KafkaWriter:
    def __init__(self, settings: Settings) -> None:
        self._producer = AIOKafkaProducer(
            **kafka_client_options(settings),
            acks="all",  # a dead letter or a parked sample must survive a broker loss before we commit past it
            enable_idempotence=True,  # retries inside the client do not duplicate records
            linger_ms=5,
        )
        self._backoff = Backoff(first=settings.retry_backoff_first_seconds, cap=settings.retry_backoff_max_seconds)
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        """Bounded: with Kafka away, unacknowledged writes are abandoned (their offsets were never committed,
        so their records are read again after a restart)."""
        flushing = asyncio.ensure_future(self._producer.flush())
        done, _ = await asyncio.wait({flushing}, timeout=STOP_TIMEOUT_SECONDS * 0.6)
        if not done or flushing.cancelled() or flushing.exception() is not None:
            flushing.cancel()
            log.warning("unacknowledged Kafka writes abandoned at stop", extra={"event": "write_abandoned",
                                                                              "writes": len(self._tasks)})
        for task in self._tasks:
            task.cancel()
        stopping = asyncio.ensure_future(self._producer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_SECONDS * 0.4)
        if not done:
            stopping.cancel()

    def write(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> asyncio.Future[None]:
        """Schedule a write; the future resolves once Kafka acknowledged it (after as many retries as needed)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._write(topic, key, value, headers, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return done

    async def _write(self, topic: str, key: bytes | None, value: bytes, headers: Headers, done) -> None:
        attempt = 0
        while True:
            try:
                sent = await self._producer.send(topic, value=value, key=key, headers=headers)
                await sent
            except KafkaError as exc:
                if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError) and len(value) >= DROP_VALUE_ABOVE:
                    # Kafka will never take it as it is: keep the reason and the source headers (they point
                    # at the original record), drop the value. Smaller records that failed only because they
                    # shared a request with such a one are retried as they are.
                    log.error("record too large for its topic: writing it without its value",
                              extra={"event": "write_value_dropped", "topic": topic, "error": type(exc).__name__})
                    headers = [*headers, ("stream.error.value_dropped", str(len(value)).encode())]
                    value = b""
                    continue
                delay = self._backoff.delay(attempt, None, self._rng)
                log.warning(
                    "kafka write failed, retrying",
                    extra={"event": "write_retry", "topic": topic, "error": type(exc).__name__, "delay": delay},
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if not done.done():
                done.set_result(None)
            return

