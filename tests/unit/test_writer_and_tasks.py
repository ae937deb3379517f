"""Two failure paths that must not stop progress: a dead letter too large for Kafka, and a delivery task
cancelled before it ever ran (a revoke can do that)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec
from aiokafka.errors import MessageSizeTooLargeError

from stream import config
from stream.batching import Entry
from stream.deadletter import DROP_VALUE_ABOVE, KafkaWriter
from stream.offsets import PartitionOffsets, TopicPartition
from stream.pipeline import Pipeline

SETTINGS = msgspec.convert({"api_token": "t", "metrics_port": 0, "retry_backoff_first_seconds": 0.001,
                            "retry_backoff_max_seconds": 0.001}, config.Settings)


class TooLargeForKafka:
    """A producer whose topic takes nothing over 1000 bytes."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, list]] = []

    async def send(self, topic, value, key, headers, partition=None):
        if len(value) > 1000:
            raise MessageSizeTooLargeError()
        self.written.append((value, headers))
        done = asyncio.get_running_loop().create_future()
        done.set_result(SimpleNamespace(offset=len(self.written) - 1))  # aiokafka's RecordMetadata, as read
        return done


async def test_a_dead_letter_too_large_for_kafka_is_written_without_its_value():
    writer = KafkaWriter(SETTINGS)
    writer._producer = TooLargeForKafka()
    big = b"x" * DROP_VALUE_ABOVE
    await asyncio.wait_for(writer.write("dlq", None, big, [("stream.error.reason", b"malformed_json")]), 5)
    ((value, headers),) = writer._producer.written
    assert value == b""
    assert ("stream.error.reason", b"malformed_json") in headers
    assert ("stream.error.value_dropped", str(len(big)).encode()) in headers


async def test_a_delivery_cancelled_before_it_ran_frees_its_key():
    pipeline = Pipeline(SETTINGS)
    state = PartitionOffsets(TopicPartition("samples", 0))
    key = ("user-1", "steps")
    pipeline.batcher.add(key, [Entry(i, b"{}", state, i, 0.0) for i in range(5)], now=0.0)
    pipeline.batcher.flush_keys({key}, "revoke")
    pipeline._dispatch()
    (task,) = list(pipeline._deliveries)
    task.cancel()  # before the event loop ever ran it
    await asyncio.wait([task])
    await asyncio.sleep(0)  # its done callbacks run
    assert pipeline.batcher.in_flight == 0
    # The key can send again: a later full buffer leaves.
    pipeline.batcher.add(key, [Entry(i, b"{}", state, i, 0.0) for i in range(1000)], now=1.0)
    work = pipeline.batcher.poll(1.0, 1.0, slots=1)
    assert [b.key for b in work.batches] == [key]
    await pipeline.source._consumer.stop()
    await pipeline.writer._producer.stop()
