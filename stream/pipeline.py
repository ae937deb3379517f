"""The loop that wires source -> decode -> batcher -> sink -> offsets -> commit. Owns time, tasks and shutdown.

A record's way through:
    fetch -> decode_record -> (Rejection -> dead letter) | track offset -> batcher.add
          -> batcher.poll(now) -> deliver (POST, classify) -> ack offsets -> periodic commit
Offsets are acknowledged only when the API accepted a sample, or Kafka acknowledged its dead letter or
its parking in the pending topic; commits never pass an offset that is not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from stream.batching import MIN_SAMPLES, Batch, Batcher, Entry, Small, Twins
from stream.config import COMMIT_TIMEOUT_SECONDS, Settings
from stream.deadletter import (
    MAX_PENDING_BYTES,
    PARKED_BORN_HEADER,
    PARKED_GROUP_HEADER,
    REDRIVE_COUNT_HEADER,
    KafkaWriter,
    dead_letter_headers,
)
from stream.delivery import Delivery, Exhausted, Final
from stream.kafka_credentials import CredentialsChanged, CredentialWatch, fingerprints, try_login
from stream.kafka_tls import tls_problem, wait_for_tls
from stream.ledger_sync import KafkaLedgerStore, LedgerStore, LedgerSync
from stream.metrics import Metrics, observe_many
from stream.offsets import OffsetTracker, PartitionOffsets, TopicPartition
from stream.outcome import Partial, Rejected
from stream.redrive_counts import RedriveCounts
from stream.refusals import RefusalGuard
from stream.retry import Backoff
from stream.schema import Rejection, as_single_event, batch_body, decode_record
from stream.sink import SamplesSink
from stream.source import KafkaSource
from stream.throttle import Gate, Throttle

log = logging.getLogger("stream.pipeline")

FETCH_TIMEOUT = 0.1  # seconds: also the tick at which windows and holds are checked
# A fetch can wait far longer than FETCH_TIMEOUT (aiokafka waits without limit while the group rebalances, or
# before the first assignment): the loop then goes on ticking (timers, commits, a stop request) meanwhile.
TICK = 0.25
FETCH_RETRY_SECONDS = 1.0
CATCH_UP_WINDOW_SECONDS = 60.0  # while behind on a backlog, buffers wait this long (at most) instead of the window
CATCH_UP_CHECK_SECONDS = 1.0
CREDENTIALS_RETRY_SECONDS = 30.0  # changed Kafka credential files the brokers refused: tried again this often
CREDENTIALS_SPREAD_SECONDS = 30.0  # rebuilds for a changed Secret start at a random moment within this
RESUME_AT = 0.8  # fetching resumes when held samples fall below this share of STREAM_MAX_BUFFERED_SAMPLES
PRESSURE_FLUSH_TO = 0.7  # at the memory bound, the fullest buffers are sent until this share would be left


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        token: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        *,
        source: KafkaSource | None = None,
        writer: KafkaWriter | None = None,
        sink: SamplesSink | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        ledger_store: LedgerStore | None = None,
    ) -> None:
        # source, writer, sink and sleep are for tests that drive the loop without a network (fakes with
        # the same methods); the service builds the real ones from the settings.
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._wall = wall
        self.tracker = OffsetTracker()
        pending = settings.pending_topic
        self.batcher = Batcher(
            settings.batch_max_samples,
            settings.batch_window_seconds,
            settings.min_batch_hold_seconds,
            settings.min_batch_max_age_seconds,
            # A tail read back from the pending topic rests in memory instead of going round it once per hold;
            # resting tails take at most half the buffer bound (the ones resting longest are parked beyond it).
            # Only with the ledger on: a crash replays the pending topic from the oldest resting tail, and the
            # ledger is what keeps the samples accepted since from going out again.
            rests=lambda state: state.tp.topic == pending,
            max_resting=settings.max_buffered_samples // 2 if settings.ledger == "on" else 0,
            catch_up_window=CATCH_UP_WINDOW_SECONDS,
        )
        self._next_catch_up_check = 0.0
        self._sleep = sleep
        # What the clients below load from the credential files: a change is watched for, and rebuilds them.
        self._credentials = CredentialWatch.of(settings)
        self.credentials_changed: CredentialsChanged | None = None  # why run() ended, when it ended for new clients
        self._try_login = try_login
        self._random = random.Random()
        self.source = source or KafkaSource(settings, self._on_assigned, self._on_revoked)
        self.writer = writer or KafkaWriter(settings)
        self.sink = sink or SamplesSink(
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
            sleep,
            RefusalGuard(
                settings.refusal_storm_window_seconds,
                settings.refusal_storm_min_batches,
                settings.refusal_storm_share,
                enabled=settings.refusal_storm_guard,
            ),
        )
        # What the API already accepted, per device (STREAM_LEDGER): screened before sending, recorded after.
        self.ledger: LedgerSync | None = None
        if settings.ledger != "off":
            store = ledger_store or KafkaLedgerStore(settings)
            self.ledger = LedgerSync(settings, self.metrics, store, self.source, clock, wall)
        self._deliveries: dict[asyncio.Task[None], Batch] = {}
        self._in_flight_samples = 0
        self._acks: set[asyncio.Future[None]] = set()  # dead-letter and parking writes not yet acknowledged
        self._writing_samples = 0  # samples (and records) behind those writes: they count as held memory
        self._fetch: asyncio.Task | None = None
        # Bumped at every revoke and assignment: a fetch's records belong to the assignment under which the
        # fetch returned, and are dropped if it changed before they were read (see _fetched).
        self._generation = 0
        self._draining = False
        self._next_commit = 0.0
        self._assigned = False
        self._rebalancing = False  # between a revoke and the next assignment: every member holds nothing then
        # A pipeline built after another in this process (new Kafka clients) starts holding no partition and with
        # no failure: what the old one left in these series would stay frozen (its partitions' lag counted twice,
        # alerts that never clear). aiokafka's stop does not call the revoke callback that removes them.
        for series in (self.metrics.lag, self.metrics.committed_offset):
            series.clear()
        for flag in (self.metrics.paused, self.metrics.auth_failure, self.metrics.refusal_storm,
                     self.metrics.catching_up):
            flag.set(0)
        self.metrics.oldest_buffered.set_function(self._oldest_buffered_age)
        self.metrics.assigned_partitions.set_function(lambda: len(self.tracker.partitions()))
        self.metrics.resting_tails.set_function(lambda: self.batcher.resting_tails)
        self.metrics.pending_writes.set_function(lambda: getattr(self.writer, "pending", 0))
        self.metrics.pending_write_bytes.set_function(lambda: getattr(self.writer, "pending_bytes", 0))
        self._stopping = asyncio.Event()
        self._closed = False  # set once the loop has ended: no new work may start
        # Records `stream redrive` sent back, (partition, offset) -> their redrive count: carried to their dead
        # letters and parked tails (a poison record must not go round for ever). Dropped once committed or revoked.
        self._redrive_counts = RedriveCounts()

    # -- lifecycle ------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._closed:
            return False, "stopped"
        tls = tls_problem(self.settings)  # first: it is why the rest below fails, and it names the setting to fix
        if tls is not None:
            return False, tls
        if not self._assigned:
            return False, "waiting for the consumer group to assign partitions"
        if not self.source.connected():
            return False, "cannot reach the Kafka group coordinator"
        if self.delivery.auth_failing:
            return False, "the API refuses the token (401/403)"
        if self.delivery.storm:
            return False, ("refusal storm: the API refuses most samples; refused batches are held (not "
                           "dead-lettered), one probe at a time")
        if self._rebalancing:
            return True, "ready (rebalancing: partitions revoked, waiting for the new assignment)"
        if not self.tracker.partitions():
            # More members than partitions: a healthy member all the same, which takes partitions at the next
            # rebalance (a member leaving, partitions added). Unready, it would stall every rollout and page.
            return True, "ready (standby: the group assigned no partition to this member)"
        return True, "ready"

    def stop(self) -> None:
        """Ask the loop to finish gracefully (signal handlers call this)."""
        self._stopping.set()

    async def run(self) -> None:
        # SSL/SASL_SSL: no client starts while TLS fails.
        if not await wait_for_tls(self.settings, self._stopping, self._credentials.loaded):
            await self._close()  # stopped while waiting: the clients built in __init__ never started
            return
        # Raced against a stop request: against brokers that do not answer, a client's start can take longer than
        # the pod's grace period, and a stop is honoured in every state (a rebuild after a rotation included).
        starting = asyncio.ensure_future(self._start_clients())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
        if starting.cancelled():
            self._closed = True
            with contextlib.suppress(Exception):  # clients half started: closing is all that is left to do
                await self._close()
            return
        starting.result()  # a failed start ends run() with its error (stream run says what it means)
        self._next_commit = self._clock() + self.settings.commit_interval_seconds
        log.info("consuming", extra={"event": "started", "topics": ",".join(self.settings.input_topics)})
        stop = asyncio.ensure_future(self._stopping.wait())
        watch = None
        if self._credentials.watching and self.settings.kafka_credentials_check_seconds:
            watch = asyncio.ensure_future(self._watch_credentials(self.settings.kafka_credentials_check_seconds))
        try:
            while not self._stopping.is_set():
                await self._step(stop)
            await self._drain()
        finally:
            self._closed = True
            stop.cancel()
            if watch is not None:
                watch.cancel()
            if self._fetch is not None:
                self._fetch.cancel()
            for task in list(self._deliveries):
                task.cancel()
            await self._close()
            log.info("stopped", extra={"event": "stopped"})

    async def _start_clients(self) -> None:
        await self.sink.start()
        await self.writer.start()
        if self.ledger is not None:
            await self.ledger.ensure()  # before joining the group: a missing or too small topic ends the start
        await self.source.start()

    async def _watch_credentials(self, every: float) -> None:
        """Look at the Kafka credential files every `every` seconds. Once a change has settled and the brokers
        accept the new files (a trial login), stop as for a shutdown (drain, commit): `stream run` then builds new
        clients with them (stream/cli.py). Until the brokers accept them, the clients built from the old files go
        on: the connections they hold stay logged in."""
        said: list[str] = []
        next_try = 0.0
        while True:
            await self._sleep(every)
            variables = self._credentials.look(fingerprints(self.settings))
            if not variables or self._clock() < next_try:
                continue
            why = await self._try_login(self.settings)
            if why is not None:
                if variables != said:  # once per change: the brokers may take a while to get the new password
                    log.warning("Kafka credential files changed, but the brokers do not accept them (yet): going on "
                                "with the clients built from the old ones; trying again every 30 s",
                                extra={"event": "kafka_credentials_not_accepted", "variables": ",".join(variables),
                                       "reason": why})
                    said = variables
                next_try = self._clock() + CREDENTIALS_RETRY_SECONDS
                continue
            # Every pod sees the same Secret change within the kubelet's sync: spread the rebuilds (each one is a
            # member leaving and joining) so that the group does not rebalance for all of them at once.
            await self._sleep(self._random.uniform(0.0, min(CREDENTIALS_SPREAD_SECONDS, 3 * every)))
            self.credentials_changed = CredentialsChanged(variables)
            log.warning("Kafka credential files changed: draining, then rebuilding the Kafka clients",
                        extra={"event": "kafka_credentials_changed", "variables": ",".join(variables)})
            self.stop()
            return

    async def _close(self) -> None:
        # Each bounded (5 s), side by side: the whole stop stays within the drain timeout + ~10 s.
        await asyncio.gather(self.source.stop(), self.writer.stop(),
                             *([self.ledger.close()] if self.ledger is not None else []))
        await self.sink.close()

    async def _step(self, stop: asyncio.Future) -> None:
        """One iteration: fetch, ingest, hand out due work, commit when it is time."""
        fetched = await self._fetch_or_tick(stop)
        now, wall = self._clock(), self._wall()
        for tp, records in fetched.items():
            state = self.tracker.get(tp)
            if state is None:
                # Fetched under an assignment that has since been revoked: the new owner reads them again.
                continue
            self.metrics.records.labels(tp.topic).inc(len(records))
            self._ingest(state, records, now, wall)
        if now >= self._next_catch_up_check:
            self._judge_catch_up()
            self._next_catch_up_check = now + CATCH_UP_CHECK_SECONDS
        self._dispatch()
        self._apply_backpressure()
        if self.ledger is not None:
            self.ledger.follow_due(now)  # what others wrote to the ledger partitions held (a forget, a member)
        if now >= self._next_commit:
            # Raced against a stop request: with the coordinator away a commit can wait its whole timeout,
            # and the drain (which commits at its end anyway) must not wait behind it.
            commit = asyncio.ensure_future(self._commit())
            await asyncio.wait((commit, stop), return_when=asyncio.FIRST_COMPLETED)
            if not commit.done():
                commit.cancel()
            self._next_commit = now + self.settings.commit_interval_seconds

    async def _fetch_or_tick(self, stop: asyncio.Future) -> dict:
        """The next fetched records, or nothing when a tick or a stop request comes first.

        The fetch runs as a task of its own that a later step picks up where this one left it: while the group
        rebalances aiokafka's getmany waits without limit, and timers, commits and a SIGTERM must not.
        """
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(self._fetched())
        fetch = self._fetch
        if not fetch.done():
            await asyncio.wait((fetch, stop), timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                return {}
        self._fetch = None
        try:
            generation, fetched = fetch.result()
        except KafkaError as exc:
            # A fetch error (a corrupt batch, an authorisation problem) must not end the service: log it,
            # keep delivering what is held, and try again shortly.
            log.error("fetch failed; retrying", extra={"event": "fetch_failed", "error": type(exc).__name__})
            self._dispatch()
            sleep = asyncio.ensure_future(self._sleep(FETCH_RETRY_SECONDS))
            await asyncio.wait((sleep, stop), return_when=asyncio.FIRST_COMPLETED)
            sleep.cancel()
            return {}
        if generation != self._generation:
            # Fetched under an assignment that has changed since (a rebalance ran while these records waited,
            # e.g. behind a slow commit). Handed to the new assignment's offsets they would let a commit pass
            # the records before them that the revoke dropped; the new assignment read from the committed
            # offset again anyway, so they come back.
            return {}
        return fetched

    async def _fetched(self) -> tuple[int, dict]:
        fetched = await self.source.fetch(FETCH_TIMEOUT)
        return self._generation, fetched  # read in the same step as the fetch returned: no rebalance between

    def _apply_backpressure(self) -> None:
        """Pause fetching while too many samples are held; polling goes on, so the group keeps us.

        Held: samples buffered, in flight to the API, and behind Kafka writes not yet acknowledged (dead
        letters, parked tails): when the DLQ or the pending topic cannot be written, those pile up too.
        """
        held = self.batcher.buffered_samples + self._in_flight_samples + self._writing_samples
        limit = self.settings.max_buffered_samples
        waiting = getattr(self.writer, "pending_bytes", 0)  # bytes of dead letters and tails waiting for Kafka
        if (held >= limit or waiting >= MAX_PENDING_BYTES) and not self.source.paused:
            # Send the fullest buffers now rather than at their window, as many as it takes to resume: while
            # fetching is paused, waiting for windows to close would only idle (the throughput would be limit /
            # window), and sending every buffer would make many small requests of the ones just started.
            self.batcher.flush_largest(held - int(limit * PRESSURE_FLUSH_TO), "pressure")
            self._dispatch()
            self.source.pause()
            self.metrics.paused.set(1)
            log.warning("fetching paused: too many samples held", extra={"event": "backpressure_on", "held": held,
                                                                         "pending_write_bytes": waiting})
        elif held < limit * RESUME_AT and waiting < MAX_PENDING_BYTES * RESUME_AT and self.source.paused:
            self.source.resume()
            self.metrics.paused.set(0)
            log.info("fetching resumed", extra={"event": "backpressure_off", "held": held})

    def _judge_catch_up(self) -> None:
        """Behind on the input topics by half the buffer bound or more (a backlog: a restart after an outage, a
        new deployment reading a topic from its start): buffers fill instead of leaving at their window, since
        with many keys each gets a sample now and then and the window made requests of a few samples
        (Batcher.catching_up). Caught up below a sixteenth of the bound (at least a poll's worth): the window
        applies at once."""
        backlog = 0
        for tp in self.tracker.partitions():
            if tp.topic == self.settings.pending_topic:
                continue
            state, end = self.tracker.get(tp), self.source.highwater(tp)
            fetched = state.fetched if state is not None else None
            if end is not None and fetched is not None:
                backlog += max(0, end - fetched)
        self.metrics.backlog.set(backlog)
        bound = self.settings.max_buffered_samples
        if not self.batcher.catching_up and backlog >= bound // 2:
            self.batcher.set_catching_up(True, self._clock())
            self.metrics.catching_up.set(1)
            log.info("catching up on a backlog: buffers fill up to the catch-up window",
                     extra={"event": "catching_up", "backlog": backlog})
        elif self.batcher.catching_up and backlog <= max(self.settings.kafka_max_poll_records, bound // 16):
            self.batcher.set_catching_up(False, self._clock())
            self.metrics.catching_up.set(0)
            log.info("caught up: buffers leave at their window again", extra={"event": "caught_up",
                                                                               "backlog": backlog})

    # -- intake ---------------------------------------------------------------------------------------

    def _ingest(self, state: PartitionOffsets, records: list[ConsumerRecord], now: float, wall: float) -> None:
        """Decode one partition's fetched records into the buffers (the hot path: kept flat on purpose)."""
        parked = state.tp.topic == self.settings.pending_topic
        group = self.settings.kafka_group_id.encode()
        track, add = state.track, self.batcher.add_samples
        for record in records:
            offset = record.offset
            if record.headers and (count := _redrive_count(record.headers)) is not None:
                self._redrive_counts.add(state.tp, offset, count)
            births = None
            if parked:
                births = _parked_births(record, group)
                if births is None:  # parked by another consumer group sharing the topic: not ours to send
                    track(offset, 0)
                    self.metrics.foreign_parked.inc()
                    continue
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
                if births and len(births) != len(samples):  # cannot be matched one to one: the oldest for all
                    births = [min(births)] * len(samples)
                add((decoded.user_id, decoded.data_type), samples, state, offset, record.timestamp / 1000,
                    births or wall, now)

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
        if self._draining:  # a tail the batch left behind is parked at once, like every other at a drain
            for small in self.batcher.take_small({batch.key}):
                self._park(small)
        self._dispatch()  # the key's next batch, or another key's, can take the freed slot now

    async def _deliver(self, batch: Batch) -> None:
        if self.ledger is not None:
            screened = self._screen(batch)
            if screened is None:
                return
            batch = screened
        user_id, data_type = batch.key
        body = batch_body(user_id, data_type, [e.body for e in batch.entries])
        self.metrics.flushes.labels(batch.reason).inc()
        self.metrics.batch_size.observe(len(batch.entries))
        self._settle(batch, await self.delivery.send(body, data_type, len(batch.entries)))

    def _screen(self, batch: Batch) -> Batch | None:
        """The batch without the samples the API already accepted (done at once, with their copies), nor those
        beyond the ledger's horizon when they are to be dead-lettered; None when nothing is left to send now.

        Here, at the last moment, not at intake: a key's batches leave one at a time, so every earlier batch of
        the same device has been settled and recorded by now, copies that arrived while it was in flight too.
        """
        assert self.ledger is not None
        user_id, data_type = batch.key
        screened = self.ledger.screen(user_id, data_type, batch.entries)
        if len(screened.send) == len(batch.entries):
            return batch
        copies = self._done_as_duplicates(screened.duplicates, batch.twins, data_type)
        for entry in screened.beyond:
            message = (f"older than STREAM_LEDGER_HORIZON_SECONDS ({self.settings.ledger_horizon_seconds:g} s) "
                       "behind its device's newest accepted sample, and unknown to the ledger")
            rejection = Rejection("beyond_ledger_horizon", message, as_single_event(user_id, data_type, entry.body))
            also = [(c.source, c.offset) for c in copies.get(id(entry), ())]
            self._dead_letter(rejection, entry.source, entry.offset, data_type, also)
        send = screened.send
        kept = {id(e) for e in send}
        twins = [(original, copy) for original, copy in batch.twins if id(original) in kept]
        if len(send) >= MIN_SAMPLES:
            return Batch(batch.key, send, batch.reason, twins)
        if send:  # too few for a request: back into their buffer, to leave with the key's later samples
            entries = send + [copy for _, copy in twins]
            live = [e for e in entries if self.tracker.get(e.source.tp) is e.source]
            if live:
                self.batcher.add(batch.key, live, self._clock())
        return None

    def _done_as_duplicates(self, duplicates: list[Entry], twins: Twins, data_type: str) -> dict[int, list[Entry]]:
        """Samples the API already has are done at once, with their copies; returns the copies by original."""
        copies: dict[int, list[Entry]] = {}
        for original, copy in twins:
            copies.setdefault(id(original), []).append(copy)
        for entry in duplicates:
            entry.source.ack(entry.offset)
            for copy in copies.get(id(entry), ()):
                copy.source.ack(copy.offset)
        if duplicates:
            self.metrics.samples.labels("duplicate", data_type).inc(len(duplicates))
        return copies

    def _without_duplicates(self, small: Small) -> Small | None:
        """A small buffer about to be parked or dead-lettered, without the samples the API already has (a
        re-sync's 1-2 leftovers): those are done, not parked again and again, nor dead-lettered below_min_batch."""
        if self.ledger is None or self.ledger.shadow:
            return small
        user_id, data_type = small.key
        duplicates = self.ledger.screen(user_id, data_type, small.entries, count=False).duplicates
        if not duplicates:
            return small
        self.metrics.ledger_decisions.labels("duplicate").inc(len(duplicates))
        self._done_as_duplicates(duplicates, small.twins, data_type)
        gone = {id(e) for e in duplicates}
        rest = [e for e in small.entries if id(e) not in gone]
        return Small(small.key, rest, [t for t in small.twins if id(t[0]) not in gone]) if rest else None

    def _settle(self, batch: Batch, outcome: Final) -> None:
        """Acknowledge a finished batch: accepted samples now, refused ones once their dead letter is written.

        No silent path: a sample is acknowledged only as accepted (200, or absent from a 207's readable list
        of refusals) or once its dead letter is written; a 207 that does not say readably which samples it
        refused dead-letters the whole batch (`api_partial_unknown`), since some of it was not accepted.
        During a refusal storm a 207's refused samples are held instead: they go back into their buffer,
        unacknowledged, and leave again with the key's later samples (or are parked).
        """
        user_id, data_type = batch.key
        entries = batch.entries
        refused: dict[int, str] = {}
        held: list[int] = []
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
            listed = outcome.refused
            if listed is not None:
                listed = {i: r for i, r in listed.items() if 0 <= i < len(entries)}
            if not listed:
                # Nothing readable (or only indices outside the batch): the API says it refused some samples
                # without saying which. Counting the batch as accepted would silently drop those.
                reason = "api_partial_unknown"
                detail = f"the API answered 207 without a readable list of refused samples: {outcome.detail}"
                refused = dict.fromkeys(range(len(entries)), detail)
                self.metrics.partial_unknown.inc()
                log.error("207 without a readable list of refused samples: the whole batch is dead-lettered",
                          extra={"event": "partial_unknown", "data_type": data_type, "samples": len(entries)})
            elif self.delivery.storm:
                held = sorted(listed)  # an API incident, not bad data: they go out again later
            else:
                refused = {i: f"the API refused it: {r}" for i, r in listed.items()}
        if held:
            self._hold(batch, held)
        wall = self._wall()
        not_accepted = refused.keys() | held if held else refused
        accepted = [e for i, e in enumerate(entries) if i not in not_accepted] if not_accepted else entries
        observe_many(self.metrics.e2e_latency, [wall - e.timestamp for e in accepted])
        self.metrics.samples.labels("accepted", data_type).inc(len(accepted))
        # A copy shares its original's fate: acknowledged with it, or once its original's dead letter is written
        # (a held sample's copies went back into the buffer with it).
        copies: dict[int, list[tuple[PartitionOffsets, int]]] = {}
        for original, copy in batch.twins:
            copies.setdefault(id(original), []).append((copy.source, copy.offset))
        for index in held:
            copies.pop(id(entries[index]), None)
        for index, message in refused.items():
            entry = entries[index]
            if reason == "api_rejected":
                self.metrics.samples.labels("refused", data_type).inc()
            value = as_single_event(user_id, data_type, entry.body)
            also = copies.pop(id(entry), ()) if copies else ()
            self._dead_letter(Rejection(reason, message, value), entry.source, entry.offset, data_type, also)
        self._acknowledge(batch.key, accepted, copies)

    def _acknowledge(self, key: tuple[str, str], accepted: list[Entry],
                     copies: dict[int, list[tuple[PartitionOffsets, int]]]) -> None:
        """Accepted samples (and the copies that rode with them) are done: at once, or with the ledger on, once
        Kafka acknowledged their ledger record (a commit passing them before would forget them at a restart)."""
        writes = []
        if self.ledger is not None and accepted:
            try:
                writes = self.ledger.record(self.writer, key[0], key[1], accepted)
            except Exception:  # never let the ledger hold back what the API accepted: at worst a later duplicate
                log.exception("recording accepted samples in the ledger failed",
                              extra={"event": "ledger_record_error"})
        if not writes:
            for entry in accepted:
                entry.source.ack(entry.offset)
            for parts in copies.values():
                for state, offset in parts:
                    state.ack(offset)
        for written, entries in writes:
            parts = [(e.source, e.offset) for e in entries]
            for entry in entries:
                parts.extend(copies.get(id(entry), ()))
            self._ack_when_written(written, parts)

    def _hold(self, batch: Batch, indices: list[int]) -> None:
        """Put a 207's refused samples (and their copies) back into their buffer during a refusal storm: not
        acknowledged, not dead-lettered; they leave again with the key's later samples, or are parked. Samples of
        a partition revoked meanwhile are dropped (its new owner reads them again from the committed offset)."""
        entries = [batch.entries[i] for i in indices]
        ids = {id(e) for e in entries}
        entries += [copy for original, copy in batch.twins if id(original) in ids]
        entries = [e for e in entries if self.tracker.get(e.source.tp) is e.source]
        if entries:
            self.batcher.add(batch.key, entries, self._clock())
        self.metrics.retries.labels("refused").inc()

    def _park(self, small: Small) -> None:
        """Write a buffer of 1-2 samples to the pending topic, to join the user's later samples."""
        if (unsent := self._without_duplicates(small)) is None:
            return
        small = unsent
        if self.ledger is not None and len(numbers := {e.source.tp.partition for e in small.entries}) > 1:
            # One user's samples from partitions of different numbers (input topics of different partition
            # counts): each parked with its own number, to come back to the ledger partition that knows it.
            for number in sorted(numbers):
                part = [e for e in small.entries if e.source.tp.partition == number]
                ids = {id(e) for e in part}
                self._park(Small(small.key, part, [twin for twin in small.twins if id(twin[0]) in ids]))
            return
        user_id, data_type = small.key
        value = batch_body(user_id, data_type, [e.body for e in small.entries])
        headers = [
            (PARKED_BORN_HEADER, ",".join(repr(e.born) for e in small.entries).encode()),
            (PARKED_GROUP_HEADER, self.settings.kafka_group_id.encode()),
        ]
        if self._redrive_counts:
            counts = [self._redrive_counts.get(e.source.tp, e.offset) or 0 for e in small.entries]
            if max(counts):
                headers.append((REDRIVE_COUNT_HEADER, str(max(counts)).encode()))
        # With the ledger, in the pending partition of the samples' own partition number (the ledger partition
        # that knows their device), when this member holds it; otherwise where the user id hashes to.
        partition = self.ledger.pending_partition(small.entries) if self.ledger is not None else None
        written = self.writer.write(self.settings.pending_topic, user_id.encode(), value, headers, partition=partition)
        self.metrics.samples.labels("parked", data_type).inc(len(small.entries))
        self._ack_when_written(written, [(e.source, e.offset) for e in small.entries] + _copies(small.twins))

    def _expire(self, small: Small) -> None:
        if (unsent := self._without_duplicates(small)) is None:
            return
        small = unsent
        user_id, data_type = small.key
        wall = self._wall()
        copies: dict[int, list[tuple[PartitionOffsets, int]]] = {}
        for original, copy in small.twins:
            copies.setdefault(id(original), []).append((copy.source, copy.offset))
        for entry in small.entries:
            message = f"only {len(small.entries)} sample(s) of this user and data type in {wall - entry.born:.0f} s"
            value = as_single_event(user_id, data_type, entry.body)
            rejection = Rejection("below_min_batch", message, value)
            self._dead_letter(rejection, entry.source, entry.offset, data_type, copies.get(id(entry), ()))

    def _dead_letter(
        self,
        rejection: Rejection,
        state: PartitionOffsets,
        offset: int,
        data_type: str | None,
        also: Iterable[tuple[PartitionOffsets, int]] = (),
    ) -> None:
        """Write one dead letter; its offset (and those of its copies, `also`) is done once Kafka has it."""
        tp = state.tp
        count = (self._redrive_counts.get(tp, offset) or 0) if self._redrive_counts else 0
        headers = dead_letter_headers(rejection.reason, rejection.message, tp.topic, tp.partition, offset, count)
        written = self.writer.write(self.settings.dlq_topic, None, rejection.value, headers)
        self.metrics.dead_letters.labels(rejection.reason).inc()
        # Counted as samples even when the record could not be read as any (data type "unknown"): a producer whose
        # every record is refused must show in the dead-letter ratio (dead-lettered samples over samples).
        self.metrics.samples.labels("dead_lettered", data_type or "unknown").inc(rejection.samples)
        log.debug("dead letter", extra={"event": "dead_letter", "reason": rejection.reason, "topic": tp.topic,
                                        "partition": tp.partition, "offset": offset})
        self._ack_when_written(written, [(state, offset), *also])

    def _ack_when_written(self, written: asyncio.Future[None], parts: list[tuple[PartitionOffsets, int]]) -> None:
        self._acks.add(written)
        self._writing_samples += len(parts)

        def ack(_: asyncio.Future[None]) -> None:
            self._acks.discard(written)
            self._writing_samples -= len(parts)
            if not written.cancelled():
                for state, offset in parts:
                    state.ack(offset)

        written.add_done_callback(ack)

    # -- offsets and rebalances -----------------------------------------------------------------------

    async def _commit(self, only: set[TopicPartition] | None = None, timeout: float = COMMIT_TIMEOUT_SECONDS) -> None:
        offsets = self.tracker.to_commit(only)
        self._update_lag()
        if not offsets:
            return
        if await self.source.commit(offsets, timeout):
            self.tracker.mark_committed(offsets)
            if self._redrive_counts:
                self._redrive_counts.committed(offsets)
            self.metrics.commits.labels("ok").inc()
            self.metrics.last_commit.set(self._wall())
            for tp, offset in offsets.items():
                self.metrics.committed_offset.labels(tp.topic, str(tp.partition)).set(offset)
        else:
            self.metrics.commits.labels("failed").inc()

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in assigned:
            self.tracker.assign(tp)
        if self.ledger is not None:
            self.ledger.assigned(assigned)  # held back until their ledger state is restored
        if self.source.paused:
            self.source.pause()  # newly assigned partitions wait too while memory is full
        self._assigned = True
        self._rebalancing = False
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"event": "assigned", "partitions": _names(assigned)})

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Send what can be sent for the revoked partitions, wait (bounded), commit, then forget them.

        Bounded by STREAM_REVOKE_TIMEOUT_SECONDS plus the commit's timeout, which the settings check fits
        inside the group's rebalance timeout: past it the group would move on without this member.
        """
        if not revoked:  # the client also calls this, with nothing, before its first join
            return
        self._generation += 1
        self._rebalancing = True
        self.metrics.rebalances.labels("revoked").inc()
        states = {s for tp in revoked if (s := self.tracker.get(tp)) is not None}
        if states:
            started = self._clock()
            # Batches of theirs asleep in backoff would not finish in time anyway: the new owner sends them.
            self._cancel_deliveries_of(states, sleeping_only=True)
            keys = self.batcher.keys_with_sources(states)
            # Resting tails hold their pending partition's commit back: parked anew, so that the commit moves on
            # and the partition's next owner does not read again what was done since.
            for small in self.batcher.take_small(keys, resting_only=True):
                self._park(small)
            self.batcher.flush_keys(keys, "revoke")
            self._dispatch()
            if not await self._wait_for_work(self.settings.revoke_timeout_seconds, only=states):
                # What was accepted above the commit is read again by the partitions' next owner.
                log.warning("revoke: in-flight work not finished in time; expect redelivery",
                            extra={"event": "revoke_timeout", "partitions": _names(revoked)})
            await self._commit(set(revoked))
            self.batcher.drop_sources(states, self._clock())
            self._cancel_deliveries_of(states)
            self.metrics.revoke_seconds.observe(self._clock() - started)
        for tp in revoked:
            self.tracker.revoke(tp)
            # Their series go with them: frozen values would count twice in the group's lag and, with no more
            # commits, page as a partition whose commits stalled while its new owner commits.
            for gauge in (self.metrics.lag, self.metrics.committed_offset):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))
        if self._redrive_counts:
            self._redrive_counts.revoked(revoked)
        if self.ledger is not None:
            self.ledger.revoked(revoked)
        log.info("partitions revoked", extra={"event": "revoked", "partitions": _names(revoked)})

    def _cancel_deliveries_of(self, states: set[PartitionOffsets], sleeping_only: bool = False) -> None:
        """Stop batches whose samples (copies included) all belong to revoked partitions: their new owner
        sends them. With `sleeping_only`, only those asleep in backoff."""
        sleeping = self.delivery.sleeping
        for task, batch in list(self._deliveries.items()):
            if sleeping_only and task not in sleeping:
                continue
            if all(e.source in states for e in batch.entries) and all(c.source in states for _, c in batch.twins):
                task.cancel()

    async def _wait_for_work(
        self, timeout: float, only: set[PartitionOffsets] | None = None, commit_every: float | None = None
    ) -> bool:
        """Hand out what is ready and wait until no delivery nor write is outstanding (of `only` these
        partitions, when given). False when the timeout came first, or when ready work cannot start.
        With `commit_every`, done offsets are committed that often meanwhile."""
        deadline = self._clock() + timeout
        next_commit = self._clock() + (commit_every or 0.0)
        while True:
            if commit_every is not None and self._clock() >= next_commit:
                await self._commit(timeout=max(1.0, min(COMMIT_TIMEOUT_SECONDS, deadline - self._clock())))
                next_commit = self._clock() + commit_every
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
            if commit_every is not None:
                left = min(left, max(0.01, next_commit - self._clock()))
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    async def _drain(self) -> None:
        """Graceful stop: park every tail and send every buffer that can be sent at once, wait (bounded),
        commit. Parking comes first: a tail parked after the wait would have no time left to be acknowledged
        and committed, yet its write would still reach Kafka, and the tail would come back twice."""
        log.info("draining", extra={"event": "draining", "buffered": self.batcher.buffered_samples})
        deadline = self._clock() + self.settings.drain_timeout_seconds
        self._draining = True
        self.batcher.flush_all("shutdown")
        for small in self.batcher.take_small():
            self._park(small)
        self._dispatch()
        # Deliveries of what the last committed offsets already hold back are waited for; parking writes are
        # short. Commits go on meanwhile, so what is done is committed even if the wait runs out.
        every = self.settings.commit_interval_seconds
        finished = await self._wait_for_work(deadline - self._clock(), commit_every=every)
        if not finished:
            log.warning("drain timeout: unfinished work will be redelivered", extra={"event": "drain_timeout"})
        await self._commit(timeout=max(1.0, min(COMMIT_TIMEOUT_SECONDS, deadline - self._clock() + 2.0)))

    def _oldest_buffered_age(self) -> float:
        since = self.batcher.oldest_since()
        return 0.0 if since is None else self._clock() - since

    def _update_lag(self) -> None:
        """Records not yet done per partition: the end of the partition minus what is committable."""
        for tp in self.tracker.partitions():
            state = self.tracker.get(tp)
            end = self.source.highwater(tp)
            if state is None:
                continue
            # The pending topic's commit waits for tails resting in memory (up to their max age): its lag is what
            # has not been read yet, or it would count every resting tail's record and all those after it.
            done = state.fetched if tp.topic == self.settings.pending_topic else state.committable()
            if end is not None and done is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - done))

    def _update_gauges(self) -> None:
        self.metrics.buffered_samples.set(self.batcher.buffered_samples)
        self.metrics.buffers.set(self.batcher.buffers)
        self.metrics.in_flight_batches.set(len(self._deliveries))
        self.metrics.retrying_batches.set(len(self.delivery.retrying))
        self.metrics.oldest_retry.set(self.delivery.oldest_retry_age())
        self.metrics.concurrency.set(self.gate.throttle.concurrency)


def _parked_births(record: ConsumerRecord, group: bytes) -> list[float] | None:
    """When each sample of a parked record was first seen; None when another consumer group parked it.

    A record without a group header was parked before groups were recorded: it is taken (the pending topic
    was shared only when configured so). Unreadable births count as now (`[]`): the sample waits longer.
    """
    births: list[float] = []
    owner = None
    for name, value in record.headers or ():
        if name == PARKED_GROUP_HEADER:
            owner = value
        elif name == PARKED_BORN_HEADER:
            try:
                births = [float(v) for v in value.split(b",")]
            except ValueError:
                births = []
    if owner is not None and owner != group:
        return None
    return births


def _redrive_count(headers) -> int | None:
    """The redrive count of a record `stream redrive` sent back (its stream.redrive.count header), else None."""
    for name, value in headers:
        if name == REDRIVE_COUNT_HEADER:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return None
    return None


def _copies(twins: Twins) -> list[tuple[PartitionOffsets, int]]:
    return [(copy.source, copy.offset) for _, copy in twins]


def _names(tps: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}-{tp.partition}" for tp in sorted(tps))
