"""Backoff: exponential with full jitter, capped, a server's Retry-After as a floor, deterministic per seed."""

from __future__ import annotations

import math
import random

import pytest

from stream.retry import Backoff

BACKOFF = Backoff(first=0.5, cap=30.0)


@pytest.mark.parametrize("attempt", range(12))
def test_each_delay_is_within_zero_and_the_capped_exponential_ceiling(attempt):
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2**attempt)

    delays = [BACKOFF.delay(attempt, None, rng) for _ in range(300)]

    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.8  # full jitter: the range is used, not a fixed value


def test_the_ceiling_grows_until_the_cap():
    rng = random.Random(1)
    top = [max(BACKOFF.delay(attempt, None, rng) for _ in range(200)) for attempt in range(10)]

    assert top[0] <= 0.5 < top[3]
    assert top[3] <= 4.0 < top[6]
    assert max(top) <= 30.0


def test_the_same_seed_gives_the_same_delays():
    first = [BACKOFF.delay(a, None, random.Random(42)) for a in range(20)]
    again = [BACKOFF.delay(a, None, random.Random(42)) for a in range(20)]

    assert first == again


@pytest.mark.parametrize("attempt", [64, 1024, 10**9, 2**63])
def test_a_huge_attempt_number_does_not_overflow_and_stays_capped(attempt):
    delay = BACKOFF.delay(attempt, None, random.Random(0))

    assert math.isfinite(delay)
    assert 0.0 <= delay <= 30.0


@pytest.mark.parametrize("retry_after", [0.0, 0.25, 2.0, 29.0])
def test_a_delay_is_never_below_the_servers_retry_after(retry_after):
    rng = random.Random(7)

    delays = [BACKOFF.delay(attempt, retry_after, rng) for attempt in range(10) for _ in range(50)]

    assert min(delays) >= retry_after
    assert max(delays) <= 30.0


def test_a_retry_after_beyond_the_cap_is_honoured():
    assert BACKOFF.delay(0, 120.0, random.Random(0)) == 120.0


def test_a_custom_first_delay_and_cap_are_used():
    backoff = Backoff(first=2.0, cap=5.0)
    rng = random.Random(3)

    assert all(0.0 <= backoff.delay(0, None, rng) <= 2.0 for _ in range(100))
    assert all(0.0 <= backoff.delay(5, None, rng) <= 5.0 for _ in range(100))
