"""One batch body to a final outcome: throttled requests, retries with backoff, auth failures, giving up.

Final outcomes are Accepted, Partial, Rejected (the API decided) and Exhausted (this batch kept failing
for STREAM_RETRY_MAX_SECONDS *counted only while the API accepted other batches*: a poison batch, not an
outage). Until then every failure is retried: 401/403 pause all requests and probe slowly with one at a time; 429, 503,
504 and timeouts lower the concurrency for everyone and honour Retry-After for everyone; a batch that
sleeps in backoff does not hold a request slot, so other keys keep flowing.

A batch the API refused whole (400/413/422) is Rejected only once the refusal-storm guard (stream/refusals.py)
says it is isolated: until then it is held and sent again with backoff (safe: nothing of it was accepted).
While the guard is tripped (a refusal storm: an API incident, not bad data) every refused batch is held, one
probe request at a time goes out every STORM_PROBE_SECONDS, /readyz answers 503, and the first probe the API
accepts (or refuses at most the guard's share of) ends it: sending resumes at concurrency 1 and climbs back.
A 207 is returned as it is; while the guard is tripped the caller holds its refused samples (`storm`).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from stream.logs import RateLimited
from stream.metrics import Metrics
from stream.outcome import Accepted, AuthFailed, Partial, Rejected, Retry
from stream.refusals import Change, RefusalGuard, Verdict
from stream.retry import Backoff
from stream.sink import SamplesSink
from stream.throttle import Gate

log = logging.getLogger("stream.delivery")

AUTH_PAUSE_SECONDS = 5.0  # between probes while the token is refused: slow, yet a rotated token is seen soon
STORM_PROBE_SECONDS = 5.0  # between probes during a refusal storm: slow, yet the API's recovery is seen soon
# Signs that the API (or the way to it) is overloaded: everyone slows down, not just this batch.
OVERLOAD_REASONS = frozenset(
    {"http_429", "http_503", "http_504", "timeout", "ClientConnectorError", "ServerDisconnectedError"}
)
LOG_EVERY = 60.0  # seconds between two log lines about the same ongoing trouble


class Exhausted(NamedTuple):
    """Given up after STREAM_RETRY_MAX_SECONDS; `detail` says what the last failure was."""

    detail: str


Final = Accepted | Partial | Rejected | Exhausted


class AcceptanceLog:
    """When the API last accepted samples, coarsely: enough to tell, for a batch that failed at `since`
    and again at `now`, how much of that interval the API spent accepting other batches. Pure.

    Proof that the API is healthy is an accepted sample: a 200, or a 207 (it accepted some). A 400 or
    a 401 is an answer, not health: an API that refuses everything must not make a retrying batch give up.
    One time is kept per `resolution` seconds (the first acceptance in it), so the log stays small; the
    first acceptance after a moment is then known to within `resolution`, always late rather than early,
    which can only delay giving up, never hasten it.
    """

    def __init__(self, resolution: float = 1.0, keep: int = 4096) -> None:
        self._resolution = resolution
        self._times: deque[float] = deque(maxlen=keep)
        self.last = float("-inf")

    def accepted(self, now: float) -> None:
        if not self._times or now - self._times[-1] >= self._resolution:
            self._times.append(now)
        self.last = now

    def accepting_between(self, since: float, now: float) -> float:
        """Seconds of (since, now] from the first acceptance after `since` (0 when there was none)."""
        if self.last <= since:
            return 0.0
        times = self._times
        i = bisect.bisect_right(times, since)
        first = times[i] if i < len(times) else self.last
        return max(0.0, now - first)


class Delivery:
    def __init__(
        self,
        sink: SamplesSink,
        gate: Gate,
        backoff: Backoff,
        metrics: Metrics,
        retry_max_seconds: float,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        guard: RefusalGuard | None = None,
    ) -> None:
        self._sink = sink
        self._gate = gate
        self._backoff = backoff
        self._metrics = metrics
        self._retry_max = retry_max_seconds
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.backing_off = 0  # batches asleep between two attempts (they hold no request slot)
        self.sleeping: set[asyncio.Task] = set()  # the tasks of those batches (a revoke cancels them at once)
        self.retrying: dict[int, float] = {}  # id of a failing batch -> when it first failed
        self.auth_failing = False
        self.acceptance = AcceptanceLog()
        self.guard = guard if guard is not None else RefusalGuard(60.0, 10, 0.5)
        self._tickets = itertools.count()  # one per batch: its re-sends are the same batch to the guard
        self._metrics.refused_share.set_function(lambda: self.guard.window_share(self._clock()))
        self._auth_log = RateLimited(LOG_EVERY, clock)
        self._retry_log = RateLimited(LOG_EVERY, clock)
        self._storm_log = RateLimited(LOG_EVERY, clock)
        self._storm_since: float | None = None
        self._held_log = RateLimited(LOG_EVERY, clock)

    @property
    def last_success(self) -> float:
        """When the API last accepted samples (monotonic clock)."""
        return self.acceptance.last

    @property
    def storm(self) -> bool:
        """True during a refusal storm: refused samples are held, not dead-lettered."""
        return self.guard.tripped

    async def send(self, body: bytes, data_type: str, samples: int) -> Final:
        """POST `body` (a batch of `samples` samples) until the API decides, or the batch is given up."""
        last_failure: float | None = None
        failing = 0.0  # seconds this batch has failed while the API accepted others
        attempt = 0
        ticket = next(self._tickets)
        refused_since: float | None = None  # when the API first refused the whole batch (since the last storm)
        try:
            while True:
                outcome, status = await self._attempt(body)
                self._metrics.batches.labels(data_type, _status_class(status)).inc()
                if not isinstance(outcome, Retry | AuthFailed):
                    now = self._clock()
                    self._on_answer(outcome, ticket, samples, now)
                    if not isinstance(outcome, Rejected) or not self.guard.enabled:
                        return outcome
                    if refused_since is None or refused_since < self.guard.reset_at:
                        refused_since = now
                    if self.guard.verdict(ticket, refused_since, now) is Verdict.DEAD_LETTER:
                        return outcome
                    # Held: nothing of it was accepted, so sending it again is safe.
                    self.retrying.setdefault(ticket, now)
                    self._metrics.retries.labels("refused").inc()
                    if self.guard.tripped:
                        continue  # the gate lets one probe through every STORM_PROBE_SECONDS
                    self._log_held(data_type, samples, now)
                    await self._sleep_between(self._backoff.delay(attempt, None, self._rng))
                    attempt += 1
                    if self.guard.verdict(ticket, refused_since, self._clock()) is Verdict.DEAD_LETTER:
                        return outcome
                    continue
                now = self._clock()
                if isinstance(outcome, AuthFailed):
                    self._on_auth_failure(outcome, now)
                    continue  # the gate holds every request until the pause is over
                if last_failure is None:
                    self.retrying.setdefault(ticket, now)
                else:
                    failing += self.acceptance.accepting_between(last_failure, now)
                last_failure = now
                if self._retry_max > 0 and failing >= self._retry_max:
                    return Exhausted(
                        f"gave up after failing for {failing:.0f} s while the API accepted other batches; "
                        f"last failure: {outcome.reason}"
                    )
                await self._back_off(outcome, attempt, now)
                attempt += 1
        finally:
            self.retrying.pop(ticket, None)

    async def _attempt(self, body: bytes):
        async with self._gate:
            self._metrics.in_flight.inc()
            started = self._clock()
            try:
                status, outcome = await self._sink.send(body)
            finally:
                self._metrics.in_flight.dec()
                self._metrics.request_seconds.observe(self._clock() - started)
        return outcome, status

    def _on_answer(self, outcome: Final, ticket: int, samples: int, now: float) -> None:
        """The API answered this batch for good (accepted, partly accepted or refused)."""
        if isinstance(outcome, Accepted | Partial):
            self.acceptance.accepted(now)
        refused = refused_count(outcome, samples)
        change = self.guard.answered(ticket, samples, refused, now)
        if change is Change.TRIPPED:
            self._storm_since = now
            self._metrics.refusal_storm.set(1)
        elif change is Change.ENDED:
            self._metrics.refusal_storm.set(0)
            log.warning(
                "the API accepts samples again: the refusal storm is over; held samples go out again",
                extra={"event": "refusal_storm_over", "storm_seconds": round(now - (self._storm_since or now), 1)},
            )
        if self.guard.tripped and self.guard.refuses_most(samples, refused):
            self._on_storm_refusal(now, samples, refused)
        else:
            self._gate.throttle.on_success()
        if self.auth_failing:
            self.auth_failing = False
            self._metrics.auth_failure.set(0)
            log.warning("the API accepts the token again", extra={"event": "auth_recovered"})
        self._gate.notify()

    def _on_storm_refusal(self, now: float, samples: int, refused: int) -> None:
        """A refusal during a storm (the one that tripped it, or a failed probe): one probe at a time, slowly."""
        self._gate.throttle.probe(now, STORM_PROBE_SECONDS)
        if (suppressed := self._storm_log.take(now)) is not None:
            guard = self.guard
            log.error(
                "refusal storm: the API refuses most samples of most batches; nothing refused is dead-lettered "
                f"or committed, one probe every {STORM_PROBE_SECONDS:.0f} s until the API accepts again",
                extra={"event": "refusal_storm", "refused": refused, "samples": samples,
                       "window_share": round(guard.window_share(now), 3),
                       "window_batches": guard.window_batches(now), "suppressed": suppressed},
            )

    def _log_held(self, data_type: str, samples: int, now: float) -> None:
        if (suppressed := self._held_log.take(now)) is not None:
            log.warning(
                "the API refused a whole batch; held until the batches answered after it tell an isolated "
                "refusal (dead-lettered) from an API incident (a refusal storm)",
                extra={"event": "refusal_held", "data_type": data_type, "samples": samples,
                       "batches_retrying": len(self.retrying), "suppressed": suppressed},
            )

    def _on_auth_failure(self, outcome: AuthFailed, now: float) -> None:
        self.auth_failing = True
        self._metrics.auth_failure.set(1)
        self._metrics.retries.labels("auth").inc()
        self._gate.throttle.probe(now, AUTH_PAUSE_SECONDS)  # one request at a time until the token works again
        if (suppressed := self._auth_log.take(now)) is not None:
            log.error(
                "the API refuses the token; nothing is dead-lettered or committed, retrying every "
                f"{AUTH_PAUSE_SECONDS:.0f} s",
                extra={"event": "auth_failed", "status": outcome.status, "suppressed": suppressed},
            )
        self._gate.notify()

    async def _back_off(self, outcome: Retry, attempt: int, now: float) -> None:
        self._metrics.retries.labels(outcome.reason).inc()
        if outcome.reason in OVERLOAD_REASONS:
            self._gate.throttle.on_overload(now, outcome.retry_after)
            self._gate.notify()
        delay = self._backoff.delay(attempt, outcome.retry_after, self._rng)
        if (suppressed := self._retry_log.take(now)) is not None:
            log.warning(
                "requests to the API fail; retrying with backoff",
                extra={"event": "retrying", "reason": outcome.reason, "attempt": attempt + 1,
                       "delay": round(delay, 3), "batches_retrying": len(self.retrying),
                       "concurrency": self._gate.throttle.concurrency, "suppressed": suppressed},
            )
        await self._sleep_between(delay)

    async def _sleep_between(self, delay: float) -> None:
        """Sleep between two attempts of a batch, holding no request slot (a revoke cancels it at once)."""
        self.backing_off += 1
        task = asyncio.current_task()
        if task is not None:
            self.sleeping.add(task)
        try:
            await self._sleep(delay)
        finally:
            self.backing_off -= 1
            self.sleeping.discard(task)

    def oldest_retry_age(self) -> float:
        if not self.retrying:
            return 0.0
        return self._clock() - min(self.retrying.values())


def refused_count(outcome: Final, samples: int) -> int:
    """Samples of the batch the API refused, for the refusal-storm guard: all of a 400/413/422; a 207's listed
    ones (indices within the batch); all of a 207 that does not say readably which."""
    if isinstance(outcome, Rejected):
        return samples
    if isinstance(outcome, Partial):
        listed = outcome.refused
        count = sum(1 for i in listed if 0 <= i < samples) if listed else 0
        return count or samples
    return 0


def _status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"
