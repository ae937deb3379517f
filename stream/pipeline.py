"""The loop that wires source -> decode -> batcher -> sink -> offsets -> commit. Owns time, tasks and shutdown.

A record's way through:
    fetch -> decode_record -> (Rejection -> dead letter) | track offset -> batcher.add
          -> batcher.poll(now) -> deliver (POST, classify) -> ack offsets -> periodic commit
Offsets are acknowledged only when the API accepted a sample, or Kafka acknowledged its dead letter or
its parking in the pending topic; commits never pass an offset that is not done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from stream.batching import Batch, Batcher, Entry, Small
from stream.config import Settings
from stream.deadletter import PARKED_BORN_HEADER, KafkaWriter, dead_letter_headers
from stream.delivery import Delivery, Exhausted, Final
from stream.metrics import Metrics, observe_many
from stream.offsets import OffsetTracker, PartitionOffsets, TopicPartition
from stream.outcome import Partial, Rejected
from stream.retry import Backoff
from stream.schema import Rejection, as_single_event, batch_body, decode_record
from stream.sink import SamplesSink
from stream.source import KafkaSource
from stream.throttle import Gate, Throttle

log = logging.getLogger("stream.pipeline")

FETCH_TIMEOUT = 0.1  # seconds: also the tick at which windows and holds are checked
FETCH_RETRY_SECONDS = 1.0
RESUME_AT = 0.8  # fetching resumes when held samples fall below this share of STREAM_MAX_BUFFERED_SAMPLES


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        token: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._wall = wall
        self.tracker = OffsetTracker()
        self.batcher = Batcher(
            settings.batch_max_samples,
            settings.batch_window_seconds,
            settings.min_batch_hold_seconds,
            settings.min_batch_max_age_seconds,
        )
        self.source = KafkaSource(settings, self._on_assigned, self._on_revoked)
        self.writer = KafkaWriter(settings)
        self.sink = SamplesSink(
            settings.samples_url,
            token or settings.read_token,
            settings.api_timeout_seconds,
            settings.max_in_flight,
        )
        self.gate = Gate(Throttle(settings.max_in_flight, settings.max_requests_per_second), clock)
        self.delivery = Delivery(
            self.sink,
            self.gate,
            Backoff(settings.retry_backoff_first_seconds, settings.retry_backoff_max_seconds),
            self.metrics,
            settings.retry_max_seconds,
            clock,
            random.Random(),
        )
        self._deliveries: dict[asyncio.Task[None], Batch] = {}
        self._in_flight_samples = 0
        self._acks: set[asyncio.Future[None]] = set()  # dead-letter and parking writes not yet acknowledged
        self._next_commit = 0.0
        self._assigned = False
        self.metrics.oldest_buffered.set_function(self._oldest_buffered_age)
        self._stopping = asyncio.Event()
        self._closed = False  # set once the loop has ended: no new work may start

    # -- lifecycle ------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self._assigned:
            return False, "waiting for the consumer group to assign partitions"
        if not self.source.connected():
            return False, "cannot reach the Kafka group coordinator"
        if self.delivery.auth_failing:
            return False, "the API refuses the token (401/403)"
        return True, "ready"

    def stop(self) -> None:
        """Ask the loop to finish gracefully (signal handlers call this)."""
        self._stopping.set()

    async def run(self) -> None:
        await self.sink.start()
        await self.writer.start()
        await self.source.start()
        self._next_commit = self._clock() + self.settings.commit_interval_seconds
        log.info("consuming", extra={"event": "started", "topics": ",".join(self.settings.input_topics)})
        try:
            while not self._stopping.is_set():
                await self._step()
            await self._drain()
        finally:
            self._closed = True
            for task in list(self._deliveries):
                task.cancel()
            await self.source.stop()
            await self.writer.stop()
            await self.sink.close()
            log.info("stopped", extra={"event": "stopped"})

    async def _step(self) -> None:
        """One iteration: fetch, ingest, hand out due work, commit when it is time."""
        try:
            fetched = await self.source.fetch(FETCH_TIMEOUT)
        except KafkaError as exc:
            # A fetch error (a corrupt batch, an authorisation problem) must not end the service: log it,
            # keep delivering what is held, and try again shortly.
            log.error("fetch failed; retrying", extra={"event": "fetch_failed", "error": type(exc).__name__})
            self._dispatch()
            await asyncio.sleep(FETCH_RETRY_SECONDS)
            return
        now, wall = self._clock(), self._wall()
        for tp, records in fetched.items():
            state = self.tracker.get(tp)
            if state is None:
                # Fetched under an assignment that has since been revoked: the new owner reads them again.
                continue
            self.metrics.records.labels(tp.topic).inc(len(records))
            self._ingest(state, records, now, wall)
        self._dispatch()
        self._apply_backpressure()
        if now >= self._next_commit:
            await self._commit()
            self._next_commit = now + self.settings.commit_interval_seconds

    def _apply_backpressure(self) -> None:
        """Pause fetching while too many samples are held; polling goes on, so the group keeps us."""
        held = self.batcher.buffered_samples + self._in_flight_samples
        limit = self.settings.max_buffered_samples
        if held >= limit and not self.source.paused:
            # Send every buffer that can be sent now rather than at its window: while fetching is paused,
            # waiting for windows to close would only idle (the throughput would be limit / window).
            self.batcher.flush_keys(self.batcher.keys(), "pressure")
            self._dispatch()
            self.source.pause()
            self.metrics.paused.set(1)
            log.warning("fetching paused: too many samples held", extra={"event": "backpressure_on", "held": held})
        elif held < limit * RESUME_AT and self.source.paused:
            self.source.resume()
            self.metrics.paused.set(0)
            log.info("fetching resumed", extra={"event": "backpressure_off", "held": held})

    # -- intake ---------------------------------------------------------------------------------------

    def _ingest(self, state: PartitionOffsets, records: list[ConsumerRecord], now: float, wall: float) -> None:
        """Decode one partition's fetched records into the buffers (the hot path: kept flat on purpose)."""
        parked = state.tp.topic == self.settings.pending_topic
        track, add = state.track, self.batcher.add
        for record in records:
            offset = record.offset
            decoded = decode_record(record.value)
            if type(decoded) is Rejection:
                track(offset, 1)
                self._dead_letter(decoded, state, offset, None)
                continue
            samples, rejections = decoded.samples, decoded.rejections
            track(offset, len(samples) + len(rejections))
            for rejection in rejections:
                self._dead_letter(rejection, state, offset, decoded.data_type)
            if samples:
                born = (_parked_born(record) or wall) if parked else wall
                timestamp = record.timestamp / 1000
                entries = [Entry(s.start, s.body, state, offset, timestamp) for s in samples]
                add((decoded.user_id, decoded.data_type), entries, now, born)

    # -- handing out work -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._closed:
            return
        # A batch asleep in backoff holds no slot: a failing key never stops the others.
        slots = self.settings.max_in_flight - (len(self._deliveries) - self.delivery.backing_off)
        work = self.batcher.poll(self._clock(), self._wall(), slots)
        for batch in work.batches:
            task = asyncio.create_task(self._deliver(batch))
            self._deliveries[task] = batch
            self._in_flight_samples += len(batch.entries)
            task.add_done_callback(self._delivery_done)
        for small in work.park:
            self._park(small)
        for small in work.expire:
            self._expire(small)
        self._update_gauges()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        # Here, not in _deliver: a task cancelled before it first ran never runs its own `finally`, and its
        # key would stay "in flight" for good.
        batch = self._deliveries.pop(task)
        self._in_flight_samples -= len(batch.entries)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery failed unexpectedly", exc_info=task.exception(), extra={"event": "delivery_error"})
        self.batcher.done(batch.key, self._clock())
        self._dispatch()  # the key's next batch, or another key's, can take the freed slot now

    async def _deliver(self, batch: Batch) -> None:
        user_id, data_type = batch.key
        body = batch_body(user_id, data_type, [e.body for e in batch.entries])
        self.metrics.flushes.labels(batch.reason).inc()
        self.metrics.batch_size.observe(len(batch.entries))
        self._settle(batch, await self.delivery.send(body, data_type))

    def _settle(self, batch: Batch, outcome: Final) -> None:
        """Acknowledge a finished batch: accepted samples now, refused ones once their dead letter is written."""
        user_id, data_type = batch.key
        entries = batch.entries
        refused: dict[int, str] = {}
        reason = "api_rejected"
        if isinstance(outcome, Rejected):
            refused = dict.fromkeys(range(len(entries)), f"the API refused the batch: {outcome.detail}")
        elif isinstance(outcome, Exhausted):
            reason = "retry_exhausted"
            refused = dict.fromkeys(range(len(entries)), outcome.detail)
            log.error("batch dead-lettered after failing too long", extra={"event": "retry_exhausted",
                                                                           "data_type": data_type,
                                                                           "samples": len(entries)})
        elif isinstance(outcome, Partial):
            if outcome.refused is None:
                log.warning("207 without a list of refused samples", extra={"event": "partial_unlisted",
                                                                             "data_type": data_type})
            else:
                refused = {i: f"the API refused it: {r}" for i, r in outcome.refused.items() if 0 <= i < len(entries)}
        wall = self._wall()
        if refused:
            accepted = [e for i, e in enumerate(entries) if i not in refused]
        else:
            accepted = entries
        for entry in accepted:
            entry.source.ack(entry.offset)
        observe_many(self.metrics.e2e_latency, [wall - e.timestamp for e in accepted])
        self.metrics.samples.labels("accepted", data_type).inc(len(entries) - len(refused))
        for index, message in refused.items():
            entry = entries[index]
            if reason == "api_rejected":
                self.metrics.samples.labels("refused", data_type).inc()
            value = as_single_event(user_id, data_type, entry.body)
            self._dead_letter(Rejection(reason, message, value), entry.source, entry.offset, data_type)
    def _park(self, small: Small) -> None:
        """Write a buffer of 1-2 samples to the pending topic, to join the user's later samples."""
        user_id, data_type = small.key
        value = batch_body(user_id, data_type, [e.body for e in small.entries])
        headers = [(PARKED_BORN_HEADER, repr(small.born).encode())]
        written = self.writer.write(self.settings.pending_topic, user_id.encode(), value, headers)
        self.metrics.samples.labels("parked", data_type).inc(len(small.entries))
        self._ack_when_written(written, [(e.source, e.offset) for e in small.entries])

    def _expire(self, small: Small) -> None:
        user_id, data_type = small.key
        age = self._wall() - small.born
        for entry in small.entries:
            message = f"only {len(small.entries)} sample(s) of this user and data type in {age:.0f} s"
            value = as_single_event(user_id, data_type, entry.body)
            self._dead_letter(Rejection("below_min_batch", message, value), entry.source, entry.offset, data_type)

    def _dead_letter(self, rejection: Rejection, state: PartitionOffsets, offset: int, data_type: str | None) -> None:
        tp = state.tp
        headers = dead_letter_headers(rejection.reason, rejection.message, tp.topic, tp.partition, offset)
        written = self.writer.write(self.settings.dlq_topic, None, rejection.value, headers)
        self.metrics.dead_letters.labels(rejection.reason).inc()
        if data_type is not None:
            self.metrics.samples.labels("dead_lettered", data_type).inc()
        log.debug("dead letter", extra={"event": "dead_letter", "reason": rejection.reason, "topic": tp.topic,
                                        "partition": tp.partition, "offset": offset})
        self._ack_when_written(written, [(state, offset)])

    def _ack_when_written(self, written: asyncio.Future[None], parts: list[tuple[PartitionOffsets, int]]) -> None:
        self._acks.add(written)

        def ack(_: asyncio.Future[None]) -> None:
            self._acks.discard(written)
            if not written.cancelled():
                for state, offset in parts:
                    state.ack(offset)

        written.add_done_callback(ack)

    # -- offsets and rebalances -----------------------------------------------------------------------

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        offsets = self.tracker.to_commit(only)
        self._update_lag()
        if not offsets:
            return
        if await self.source.commit(offsets):
            self.tracker.mark_committed(offsets)
            self.metrics.commits.labels("ok").inc()
            self.metrics.last_commit.set(self._wall())
            for tp, offset in offsets.items():
                self.metrics.committed_offset.labels(tp.topic, str(tp.partition)).set(offset)
        else:
            self.metrics.commits.labels("failed").inc()

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self.tracker.assign(tp)
        if self.source.paused:
            self.source.pause()  # newly assigned partitions wait too while memory is full
        self._assigned = True
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"event": "assigned", "partitions": _names(assigned)})

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Send what can be sent for the revoked partitions, wait (bounded), commit, then forget them."""
        self.metrics.rebalances.labels("revoked").inc()
        states = {s for tp in revoked if (s := self.tracker.get(tp)) is not None}
        if states:
            self.batcher.flush_keys(self.batcher.keys_with_sources(states), "revoke")
            self._dispatch()
            # Bounded well below the rebalance timeout, so the group is not held up by a failing API.
            if not await self._wait_for_work(self.settings.drain_timeout_seconds / 2, only=states):
                # What was accepted above the commit is read again by the partitions' next owner.
                log.warning("revoke: in-flight work not finished in time; expect redelivery",
                            extra={"event": "revoke_timeout", "partitions": _names(revoked)})
            await self._commit(set(revoked))
            self.batcher.drop_sources(states)
            self._cancel_deliveries_of(states)
        for tp in revoked:
            self.tracker.revoke(tp)
        log.info("partitions revoked", extra={"event": "revoked", "partitions": _names(revoked)})

    def _cancel_deliveries_of(self, states: set[PartitionOffsets]) -> None:
        """Stop retrying batches whose samples all belong to revoked partitions: their new owner sends them."""
        for task, batch in list(self._deliveries.items()):
            if all(e.source in states for e in batch.entries):
                task.cancel()

    async def _wait_for_work(self, timeout: float, only: set[PartitionOffsets] | None = None) -> bool:
        """Hand out what is ready and wait until no delivery nor write is outstanding (of `only` these
        partitions, when given). False when the timeout came first, or when ready work cannot start."""
        deadline = self._clock() + timeout
        while True:
            self._dispatch()
            pending: set[asyncio.Future] = set(self._acks)
            pending.update(
                task for task, batch in self._deliveries.items()
                if only is None or any(e.source in only for e in batch.entries)
            )
            if not pending:
                return only is not None or not self.batcher.has_ready
            left = deadline - self._clock()
            if left <= 0:
                return False
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    async def _drain(self) -> None:
        """Graceful stop: send every buffer that can be sent, park the rest, wait (bounded), commit."""
        log.info("draining", extra={"event": "draining", "buffered": self.batcher.buffered_samples})
        deadline = self._clock() + self.settings.drain_timeout_seconds
        self.batcher.flush_all("shutdown")
        finished = await self._wait_for_work(deadline - self._clock())
        for small in self.batcher.take_small():
            self._park(small)
        finished = await self._wait_for_work(max(0.0, deadline - self._clock())) and finished
        if not finished:
            log.warning("drain timeout: unfinished work will be redelivered", extra={"event": "drain_timeout"})
        await self._commit()

    def _oldest_buffered_age(self) -> float:
        since = self.batcher.oldest_since()
        return 0.0 if since is None else self._clock() - since

    def _update_lag(self) -> None:
        """Records not yet done per partition: the end of the partition minus what is committable."""
        for tp in self.tracker.partitions():
            state = self.tracker.get(tp)
            end = self.source.highwater(tp)
            done = state.committable() if state is not None else None
            if end is not None and done is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - done))

    def _update_gauges(self) -> None:
        self.metrics.buffered_samples.set(self.batcher.buffered_samples)
        self.metrics.buffers.set(self.batcher.buffers)
        self.metrics.in_flight_batches.set(len(self._deliveries))
        self.metrics.retrying_batches.set(len(self.delivery.retrying))
        self.metrics.oldest_retry.set(self.delivery.oldest_retry_age())
        self.metrics.concurrency.set(self.gate.throttle.concurrency)


def _parked_born(record: ConsumerRecord) -> float | None:
    for name, value in record.headers or ():
        if name == PARKED_BORN_HEADER:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _names(tps: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}" for tp in sorted(tps))
