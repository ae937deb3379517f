"""The Kafka consumer side: fetch, commit, and rebalance callbacks. The only module that imports the consumer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka import TopicPartition as KafkaTP
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from stream.config import Settings
from stream.kafka_options import kafka_client_options
from stream.offsets import TopicPartition

log = logging.getLogger("stream.source")

COMMIT_TIMEOUT_SECONDS = 10.0  # a commit that takes longer is abandoned and retried at the next interval

PartitionsCallback = Callable[[list[TopicPartition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTP]) -> None:
        await self._on_revoked([TopicPartition(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTP]) -> None:
        await self._on_assigned([TopicPartition(tp.topic, tp.partition) for tp in assigned])


class KafkaSource:
    def __init__(self, settings: Settings, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback):
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            **kafka_client_options(settings),
            group_id=settings.kafka_group_id,
            enable_auto_commit=False,  # offsets are committed only for done records, by the pipeline
            auto_offset_reset="earliest",  # a new group reads what is already waiting, not only new data
            isolation_level="read_committed",  # aborted transactional writes are never sent to the API
            max_poll_records=settings.kafka_max_poll_records,
        )
        self._listener = _Listener(on_assigned, on_revoked)
        self.paused = False

    async def start(self) -> None:
        self._consumer.subscribe(list(self._settings.input_topics), listener=self._listener)
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def fetch(self, timeout: float) -> dict[TopicPartition, list[ConsumerRecord]]:
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000))
        return {TopicPartition(tp.topic, tp.partition): records for tp, records in batches.items()}

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit the given next-offsets; False (logged) when the group moved on and refused it."""
        if not offsets:
            return True
        try:
            # aiokafka waits for the coordinator without limit; a commit must not stall the loop or a drain.
            await asyncio.wait_for(
                self._consumer.commit({KafkaTP(tp.topic, tp.partition): o for tp, o in offsets.items()}),
                timeout=COMMIT_TIMEOUT_SECONDS,
            )
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("commit failed", extra={"event": "commit_failed", "error": type(exc).__name__})
            return False
        return True

    def pause(self) -> None:
        """Stop fetching every assigned partition (getmany goes on, so heartbeats and the group go on)."""
        self.paused = True
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self.paused = False
        self._consumer.resume(*self._consumer.assignment())

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset as of the last fetch (None before one)."""
        try:
            return self._consumer.highwater(KafkaTP(tp.topic, tp.partition))
        except (AssertionError, KeyError, IllegalStateError):
            return None

    def connected(self) -> bool:
        """Whether the group coordinator is known: False while the brokers cannot be reached."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is not None and getattr(coordinator, "coordinator_id", None) is not None
