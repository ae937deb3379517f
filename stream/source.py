"""The Kafka consumer side: fetch, commit, and rebalance callbacks. The only module that imports the consumer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka import TopicPartition as KafkaTP
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from stream.assignor import assignment_strategy
from stream.config import COMMIT_TIMEOUT_SECONDS, Settings
from stream.kafka_options import kafka_client_options
from stream.offsets import TopicPartition

log = logging.getLogger("stream.source")

STOP_TIMEOUT_SECONDS = 5.0  # leaving the group is best effort: a coordinator that is away must not hold the exit

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
            # Explicit, not aiokafka's defaults (a rebalance timeout equal to a 10 s session timeout): the group
            # must wait for a revoke to finish (STREAM_REVOKE_TIMEOUT_SECONDS + the commit, checked at start),
            # or it moves on while this member still sends, and its commits are refused.
            session_timeout_ms=int(settings.kafka_session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_seconds * 1000),
            rebalance_timeout_ms=int(settings.kafka_rebalance_timeout_seconds * 1000),
            # Partitions by number (input N and pending N with ledger partition N, on one member), sticky: each
            # number that moves costs a ledger restore. See stream/assignor.py, and the README's "Scaling".
            partition_assignment_strategy=assignment_strategy(),
        )
        self._listener = _Listener(on_assigned, on_revoked)
        self.paused = False
        self._held: set[TopicPartition] = set()  # held back whatever `paused` says (their ledger is restoring)

    async def start(self) -> None:
        # Start first, subscribe after: started with a subscription, aiokafka waits for the first assignment
        # without limit, and a stop request could not end a service whose group never assigns (a frozen
        # member holding the join). Subscribed afterwards, the join happens in fetch(), which the loop races.
        await self._consumer.start()
        self._consumer.subscribe(list(self._settings.input_topics), listener=self._listener)

    async def stop(self) -> None:
        """Leave the group; bounded, since aiokafka first waits for a join in progress to end.

        Run as a task of its own: with the brokers away, aiokafka's stop lets a CancelledError of its own
        fetch tasks escape, which must not pass for a cancellation of the caller (it would cut its cleanup).
        """
        stopping = asyncio.ensure_future(self._consumer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_SECONDS)
        if not done:
            stopping.cancel()
            problem = "timeout"
        elif stopping.cancelled():
            problem = "cancelled"
        else:
            error = stopping.exception()
            problem = type(error).__name__ if error is not None else None
        if problem is not None:
            log.warning("the consumer did not stop cleanly; leaving anyway",
                        extra={"event": "consumer_stop_timeout", "error": problem})

    async def fetch(self, timeout: float) -> dict[TopicPartition, list[ConsumerRecord]]:
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000))
        return {TopicPartition(tp.topic, tp.partition): records for tp, records in batches.items()}

    async def commit(self, offsets: dict[TopicPartition, int], timeout: float = COMMIT_TIMEOUT_SECONDS) -> bool:
        """Commit the given next-offsets; False (logged) when the group moved on and refused it."""
        if not offsets:
            return True
        try:
            # aiokafka waits for the coordinator without limit; a commit must not stall the loop or a drain.
            await asyncio.wait_for(
                self._consumer.commit({KafkaTP(tp.topic, tp.partition): o for tp, o in offsets.items()}),
                timeout=timeout,
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
        held = {KafkaTP(tp.topic, tp.partition) for tp in self._held}
        self._consumer.resume(*(tp for tp in self._consumer.assignment() if tp not in held))

    def hold(self, tps: list[TopicPartition]) -> None:
        """Stop fetching these partitions until `release`, whatever pause/resume do meanwhile."""
        self._held.update(tps)
        self._consumer.pause(*(KafkaTP(tp.topic, tp.partition) for tp in tps))

    def release(self, tps: list[TopicPartition]) -> None:
        self._held.difference_update(tps)
        if not self.paused:
            assigned = self._consumer.assignment()
            self._consumer.resume(*(t for tp in tps if (t := KafkaTP(tp.topic, tp.partition)) in assigned))

    def forget(self, tps: list[TopicPartition]) -> None:
        """Revoked partitions are no longer held back (a later assignment decides afresh)."""
        self._held.difference_update(tps)

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
