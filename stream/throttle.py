"""How hard the service may press the API: adaptive concurrency, a shared pause, an optional rate ceiling.

`Throttle` is the pure arithmetic (time passed in): additive increase / multiplicative decrease of the
concurrency limit in the manner of TCP and Vector's adaptive request concurrency: each accepted request
raises the limit by 1/limit (about +1 per round of requests), each sign of overload (429, 503, a
timeout) halves it, at most once per `cooldown` so one burst of failures counts once. A 429 or 503 with
Retry-After also pauses everyone until then: no request leaves before the server asked. A refused token or
a refusal storm pauses everyone and then probes with one request at a time (`probe`). A token bucket caps
requests per second when a ceiling is set.

`Gate` is the asyncio side: requests wait in it until the Throttle lets them go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Throttle:
    ceiling: int  # STREAM_MAX_IN_FLIGHT: the limit never grows past it
    rate: float = 0.0  # requests per second; 0 means no ceiling
    cooldown: float = 1.0  # seconds during which further overload signals do not halve again
    limit: float = field(init=False)
    paused_until: float = field(default=0.0, init=False)
    _last_decrease: float = field(default=float("-inf"), init=False)
    _tokens: float = field(default=0.0, init=False)
    _refilled: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.limit = float(self.ceiling)
        self._tokens = max(1.0, self.rate)

    @property
    def concurrency(self) -> int:
        return max(1, int(self.limit))

    def on_success(self) -> None:
        self.limit = min(float(self.ceiling), self.limit + 1.0 / max(1.0, self.limit))

    def on_overload(self, now: float, retry_after: float | None = None) -> None:
        if retry_after is not None:
            self.pause(now, retry_after)
        if now - self._last_decrease >= self.cooldown:
            self._last_decrease = now
            self.limit = max(1.0, self.limit / 2)

    def pause(self, now: float, seconds: float) -> None:
        self.paused_until = max(self.paused_until, now + seconds)

    def probe(self, now: float, seconds: float) -> None:
        """The API refuses everything for a reason of its own (a refused token, a refusal storm): pause
        everyone for `seconds`, then let one request at a time through. The limit climbs back from 1, by
        about one per round of accepted requests, once the API accepts again."""
        self.pause(now, seconds)
        self.limit = 1.0

    def wait_time(self, now: float, active: int) -> float | None:
        """Seconds until a request may start (0: now), or None while the concurrency limit is reached."""
        if now < self.paused_until:
            return self.paused_until - now
        if active >= self.concurrency:
            return None
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        # A hair's tolerance: float error must not leave a wait too small to move the clock.
        return 0.0 if self._tokens >= 1.0 - 1e-9 else (1.0 - self._tokens) / self.rate

    def take(self, now: float) -> None:
        """A request starts now (after wait_time said 0)."""
        if self.rate > 0:
            self._refill(now)
            self._tokens -= 1.0

    def _refill(self, now: float) -> None:
        if self._refilled is not None:
            # A bucket of one second's worth: a short burst is fine, a long idle does not bank requests.
            self._tokens = min(max(1.0, self.rate), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now


async def _wait_for_change(changed: asyncio.Event, timeout: float | None) -> None:
    try:
        await asyncio.wait_for(changed.wait(), timeout=timeout)
    except TimeoutError:
        pass


class Gate:
    """Requests pass one by one as the Throttle allows; `async with gate:` around each request.

    `wait(event, timeout)` is how a request waits (injected so tests can run on a fake clock).
    """

    def __init__(
        self,
        throttle: Throttle,
        clock: Callable[[], float],
        wait: Callable[[asyncio.Event, float | None], Awaitable[None]] = _wait_for_change,
    ) -> None:
        self.throttle = throttle
        self._clock = clock
        self._wait = wait
        self._active = 0
        self._changed = asyncio.Event()

    @property
    def active(self) -> int:
        return self._active

    async def __aenter__(self) -> None:
        while True:
            wait = self.throttle.wait_time(self._clock(), self._active)
            if wait == 0.0:
                break
            self._changed.clear()
            # Wake on the earliest of: the computed wait, or any request finishing / the throttle changing.
            await self._wait(self._changed, wait)
        self.throttle.take(self._clock())
        self._active += 1

    async def __aexit__(self, *exc: object) -> None:
        self._active -= 1
        self.notify()

    def notify(self) -> None:
        """The throttle changed (or a request finished): waiting requests look again."""
        self._changed.set()
