"""KafkaWriter: one bounded pump for every Kafka write, however many come at once; failures retried per
round with one backoff, logged once a minute; nothing dropped, nothing acknowledged twice."""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import msgspec
import pytest
from aiokafka.errors import KafkaTimeoutError

from stream import config
from stream.deadletter import MAX_IN_FLIGHT, KafkaWriter

SETTINGS = msgspec.convert({"api_token": "t", "metrics_port": 0, "retry_backoff_first_seconds": 0.01,
                            "retry_backoff_max_seconds": 0.01}, config.Settings)


class Delivered(NamedTuple):
    """What aiokafka's send future resolves to (RecordMetadata), as far as the writer reads it."""

    offset: int


class Producer:
    """Takes records into a batch at once; acknowledges (or fails) them only when the test says so."""

    def __init__(self) -> None:
        self.unacknowledged: list[tuple[bytes, asyncio.Future]] = []
        self.sent: list[bytes] = []
        self.most_in_hand = 0
        self.acknowledged = 0  # the next offset

    async def send(self, topic, value, key, headers, partition=None):
        delivery = asyncio.get_running_loop().create_future()
        self.unacknowledged.append((value, delivery))
        self.sent.append(value)
        self.most_in_hand = max(self.most_in_hand, len(self.unacknowledged))
        return delivery

    def acknowledge(self, error: Exception | None = None) -> int:
        taken, self.unacknowledged = self.unacknowledged, []
        for _, delivery in taken:
            if error is None:
                delivery.set_result(Delivered(self.acknowledged))
                self.acknowledged += 1
            else:
                delivery.set_exception(error)
        return len(taken)


async def settle(writer: KafkaWriter, producer: Producer, until) -> None:
    """Acknowledge whatever the pump hands over until `until()` holds (the pump runs between rounds; the
    short sleep paces the loop, the condition is what is waited for)."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        if until():
            return
        await asyncio.sleep(0.001)
        producer.acknowledge()
    raise AssertionError("the writer did not settle")


@pytest.fixture
async def writer():
    writer = KafkaWriter(SETTINGS)
    writer._producer = Producer()
    yield writer
    if writer._pump_task is not None:
        writer._pump_task.cancel()


async def test_a_burst_goes_through_one_task_with_a_bounded_number_in_the_producers_hands(writer):
    tasks_before = len(asyncio.all_tasks())
    done = [writer.write("dlq", None, b"letter %d" % i, [("stream.error.reason", b"invalid_value")])
            for i in range(3 * MAX_IN_FLIGHT)]
    assert len(asyncio.all_tasks()) <= tasks_before + 1  # the pump, not a task per write
    assert writer.pending == 3 * MAX_IN_FLIGHT and writer.pending_bytes > 0
    await settle(writer, writer._producer, lambda: all(d.done() for d in done))
    assert writer._producer.most_in_hand <= MAX_IN_FLIGHT
    assert writer.pending == 0 and writer.pending_bytes == 0
    assert sorted(writer._producer.sent) == sorted(b"letter %d" % i for i in range(3 * MAX_IN_FLIGHT))


async def test_a_failed_round_is_retried_once_with_one_backoff_and_logged_once(writer, caplog):
    producer = writer._producer
    done = [writer.write("dlq", None, b"letter %d" % i, []) for i in range(1000)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert producer.acknowledge(KafkaTimeoutError()) == 1000  # the whole round fails (a broker away)
    await asyncio.sleep(0)  # the deliveries' callbacks run
    assert writer._failures == 1  # one pause for all of them, not a timer each
    assert not any(d.done() for d in done)
    with caplog.at_level(logging.WARNING, logger="stream.deadletter"):
        await settle(writer, producer, lambda: all(d.done() for d in done))
    assert writer.retried == 1000
    assert len([r for r in caplog.records if r.event == "write_retry"]) <= 1
    assert len(producer.sent) == 2000  # each sent again once ...
    assert writer.pending == 0  # ... and acknowledged once


async def test_a_record_refused_at_send_is_kept_and_retried(writer):
    producer = writer._producer
    refusals = [KafkaTimeoutError()]
    send = producer.send

    async def refuse_once(*args, **kwargs):
        if refusals:
            raise refusals.pop()
        return await send(*args, **kwargs)

    producer.send = refuse_once
    done = writer.write("pending", b"user", b"tail", [])
    await settle(writer, producer, done.done)
    assert producer.sent == [b"tail"]
