"""Retry delays as a frozen value: exponential backoff with full jitter, Retry-After honoured. Pure."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds before retry number `attempt` (0-based). A server's Retry-After is a floor, not a hint."""
        ceiling = min(self.cap, self.first * 2 ** min(attempt, 32))
        jittered = rng.uniform(0, ceiling)
        if retry_after is not None:
            return max(retry_after, jittered)
        return jittered
