"""Prometheus metrics and the /metrics, /healthz, /readyz server. Labels are small fixed sets: never a user id."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from stream import __version__

log = logging.getLogger("stream.metrics")


class Metrics:
    """All of the service's series, on a registry of their own so tests can build several."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # The process's own series (resident memory, CPU seconds, open files, start time; the interpreter and its
        # garbage collector): memory is the documented sizing limit, and CPU what a replica is sized by.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build = Info("stream_build", "Version of the running service", registry=r)
        self.build.info({"version": __version__})
        self.records = Counter("stream_records_consumed_total", "Kafka records consumed", ["topic"], registry=r)
        self.samples = Counter(
            "stream_samples_total",
            "Samples by outcome: accepted, refused (by the API), dead_lettered, parked",
            ["outcome", "data_type"],
            registry=r,
        )
        self.dead_letters = Counter(
            "stream_dead_letters_total", "Records written to the dead-letter topic, by reason", ["reason"], registry=r
        )
        self.batches = Counter(
            "stream_batches_total", "Batches sent, by data type and HTTP status class", ["data_type", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "stream_batch_size_samples", "Samples per request", buckets=(3, 10, 50, 100, 250, 500, 750, 1000),
            registry=r,
        )
        self.flushes = Counter("stream_flushes_total", "Buffers sent, by reason", ["reason"], registry=r)
        self.request_seconds = Histogram(
            "stream_request_duration_seconds", "Duration of one POST to the API", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.retries = Counter("stream_retries_total", "Request retries, by reason", ["reason"], registry=r)
        self.in_flight = Gauge("stream_in_flight_requests", "Requests to the API in flight", registry=r)
        self.in_flight_batches = Gauge(
            "stream_in_flight_batches", "Batches taken from buffers and not yet finished (sent, retrying)", registry=r
        )
        self.oldest_buffered = Gauge(
            "stream_oldest_buffered_sample_age_seconds", "How long the oldest buffered sample has waited", registry=r
        )
        self.lag = Gauge(
            "stream_consumer_lag", "Records of a partition not yet done (end offset minus committable offset)",
            ["topic", "partition"], registry=r,
        )
        self.buffered_samples = Gauge("stream_buffered_samples", "Samples waiting in buffers", registry=r)
        self.buffers = Gauge("stream_buffers", "Buffers (user and data type pairs) holding samples", registry=r)
        self.commits = Counter("stream_commits_total", "Offset commits, by result", ["result"], registry=r)
        self.last_commit = Gauge(
            "stream_last_commit_timestamp_seconds", "Unix time of the last successful commit", registry=r
        )
        self.committed_offset = Gauge(
            "stream_committed_offset", "Last committed offset", ["topic", "partition"], registry=r
        )
        self.rebalances = Counter("stream_rebalances_total", "Partition assignments and revocations", ["kind"],
                                  registry=r)
        self.assigned_partitions = Gauge(
            "stream_assigned_partitions",
            "Partitions this member holds (input and pending topics); 0: an idle standby, ready but with nothing to do",
            registry=r,
        )
        self.backlog = Gauge(
            "stream_input_backlog_records",
            "Records of the input topics not fetched yet (the brokers' end offsets minus what was fetched)",
            registry=r,
        )
        self.catching_up = Gauge(
            "stream_catching_up",
            "1 while behind on the input by half the buffer bound or more: buffers fill rather than leave at their "
            "window",
            registry=r,
        )
        self.resting_tails = Gauge(
            "stream_resting_tails",
            "Tails of 1-2 samples read back from the pending topic, resting in memory until their user's next samples",
            registry=r,
        )
        self.kafka_clients_rebuilt = Counter(
            "stream_kafka_clients_rebuilt_total",
            "Times the Kafka clients were rebuilt in the process because their credential files changed",
            registry=r,
        )
        self.auth_failure = Gauge("stream_api_auth_failure", "1 while the API refuses the token (401/403)",
                                  registry=r)
        self.refusal_storm = Gauge(
            "stream_api_refusal_storm",
            "1 while the API refuses most samples (a refusal storm): refused batches are held, not dead-lettered, "
            "and one probe at a time is sent",
            registry=r,
        )
        self.refused_share = Gauge(
            "stream_api_refused_share",
            "Share of samples the API refused among those it answered in the refusal-storm guard's window "
            "(each batch counted once)",
            registry=r,
        )
        self.retrying_batches = Gauge("stream_retrying_batches", "Batches that failed and are being retried",
                                      registry=r)
        self.oldest_retry = Gauge("stream_oldest_retry_seconds", "How long the oldest retrying batch has been failing",
                                  registry=r)
        self.concurrency = Gauge("stream_request_concurrency_limit",
                                 "Requests allowed in flight now (lowered while the API is overloaded)", registry=r)
        self.paused = Gauge("stream_fetch_paused", "1 while fetching is paused because too many samples are held",
                            registry=r)
        self.e2e_latency = Histogram(
            "stream_end_to_end_latency_seconds", "From the record's Kafka timestamp to the API's acceptance",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )

        self.pending_writes = Gauge(
            "stream_pending_writes",
            "Dead letters and parked tails queued for Kafka or in flight, not yet acknowledged", registry=r,
        )
        self.pending_write_bytes = Gauge(
            "stream_pending_write_bytes", "Bytes of those writes (above 64 MiB fetching pauses)", registry=r,
        )
        self.partial_unknown = Counter(
            "stream_partial_unknown_total",
            "207 answers that did not say readably which samples were refused (the batch was dead-lettered)",
            registry=r,
        )
        self.foreign_parked = Counter(
            "stream_foreign_parked_records_total",
            "Pending-topic records parked by another consumer group, skipped", registry=r,
        )
        self.revoke_seconds = Histogram(
            "stream_revoke_duration_seconds", "How long a revoke took (send, wait, commit)",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 60), registry=r,
        )

        self.ledger_decisions = Counter(
            "stream_ledger_decisions_total",
            "Samples screened by the sync ledger before sending, by kind: new, duplicate (not sent), correction, "
            "late, beyond_horizon", ["kind"], registry=r,
        )
        self.ledger_entries = Gauge("stream_ledger_entries", "Accepted samples the ledger remembers", registry=r)
        self.ledger_bytes = Gauge(
            "stream_ledger_resident_bytes", "Memory the ledger's state holds (estimate)", registry=r
        )
        self.ledger_evictions = Counter(
            "stream_ledger_evictions_total",
            "Remembered samples forgotten for the memory budget or the per-device cap (a re-send of one would be "
            "sent again)", registry=r,
        )
        self.ledger_restore_seconds = Histogram(
            "stream_ledger_restore_seconds",
            "How long a partition was held back for its ledger state (restored, or caught up after a rebalance)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )
        self.ledger_restored = Counter(
            "stream_ledger_restored_samples_total", "Samples read back from the ledger topic at restores", registry=r
        )
        self.ledger_foreign = Counter(
            "stream_ledger_foreign_records_total",
            "Ledger records another writer added to a partition this member holds, applied: `record` (a member that "
            "held the partition meanwhile), `tombstone` (`stream ledger forget`)", ["kind"], registry=r,
        )
        self.ledger_held = Gauge(
            "stream_ledger_oldest_hold_seconds",
            "How long the partition held back the longest for its ledger (restore or catch-up) has waited; 0 when "
            "none is", registry=r,
        )
        self.ledger_kept = Counter(
            "stream_ledger_kept_partitions_total",
            "Partitions assigned back to this member after a rebalance whose ledger state was kept and caught up "
            "from the topic instead of restored whole", registry=r,
        )
        self.ledger_lateness = Histogram(
            "stream_ledger_lateness_seconds",
            "How far behind its device's newest accepted sample a sample starts (late, correction, beyond_horizon): "
            "to tune STREAM_LEDGER_HORIZON_SECONDS",
            buckets=(60, 600, 3600, 6 * 3600, 86400, 2 * 86400, 3 * 86400, 7 * 86400, 30 * 86400), registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """Histogram.observe for many values at once: one bucket search each, one lock per touched bucket.

    The end-to-end latency is observed for every accepted sample; observe() one by one took about 9 % of
    the service's CPU. This adds to the same (non-cumulative) bucket counters and sum that observe() does
    (prometheus-client stores them so since 2015); test_metrics checks the two agree.
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
        total += value
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class HealthServer:
    """/metrics; /healthz answers while the event loop turns (never depends on Kafka or the API);
    /readyz answers 200 only when `ready()` says so."""

    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]], port: int) -> None:
        self._metrics = metrics
        self._ready = ready
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        app.router.add_get("/readyz", self._serve_ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _serve_ready(self, _: web.Request) -> web.Response:
        ready, why = self._ready()
        return web.Response(text=why + "\n", status=200 if ready else 503)
