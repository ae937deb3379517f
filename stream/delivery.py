"""One batch body to a final outcome: throttled requests, retries with backoff, auth failures, giving up.

Final outcomes are Accepted, Partial, Rejected (the API decided) and Exhausted (this batch kept failing
for STREAM_RETRY_MAX_SECONDS *counted only while the API accepted other batches*: a poison batch, not an
outage). Until then every failure is retried: 401/403 pause all requests and probe slowly with one at a time; 429, 503,
504 and timeouts lower the concurrency for everyone and honour Retry-After for everyone; a batch that
sleeps in backoff does not hold a request slot, so other keys keep flowing.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from stream.logs import RateLimited
from stream.metrics import Metrics
from stream.outcome import Accepted, AuthFailed, Partial, Rejected, Retry
from stream.retry import Backoff
from stream.sink import SamplesSink
from stream.throttle import Gate

log = logging.getLogger("stream.delivery")

AUTH_PAUSE_SECONDS = 5.0  # between probes while the token is refused: slow, yet a rotated token is seen soon
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
        self._auth_log = RateLimited(LOG_EVERY, clock)
        self._retry_log = RateLimited(LOG_EVERY, clock)

    @property
    def last_success(self) -> float:
        """When the API last accepted samples (monotonic clock)."""
        return self.acceptance.last

    async def send(self, body: bytes, data_type: str) -> Final:
        last_failure: float | None = None
        failing = 0.0  # seconds this batch has failed while the API accepted others
        attempt = 0
        ticket = id(body)
        try:
            while True:
                outcome, status = await self._attempt(body)
                self._metrics.batches.labels(data_type, _status_class(status)).inc()
                if not isinstance(outcome, Retry | AuthFailed):
                    self._on_answer(outcome)
                    return outcome
                now = self._clock()
                if isinstance(outcome, AuthFailed):
                    self._on_auth_failure(outcome, now)
                    continue  # the gate holds every request until the pause is over
                if last_failure is None:
                    self.retrying[ticket] = now
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

    def _on_answer(self, outcome: Final) -> None:
        """The API answered this batch for good (accepted, partly accepted or refused)."""
        if isinstance(outcome, Accepted | Partial):
            self.acceptance.accepted(self._clock())
        self._gate.throttle.on_success()
        if self.auth_failing:
            self.auth_failing = False
            self._metrics.auth_failure.set(0)
            log.warning("the API accepts the token again", extra={"event": "auth_recovered"})
        self._gate.notify()

    def _on_auth_failure(self, outcome: AuthFailed, now: float) -> None:
        self.auth_failing = True
        self._metrics.auth_failure.set(1)
        self._metrics.retries.labels("auth").inc()
        throttle = self._gate.throttle
        throttle.pause(now, AUTH_PAUSE_SECONDS)
        throttle.limit = 1.0  # probe with one request at a time until the token works again
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


def _status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"
