"""The throttle: the service slows down as a whole when the API says it is overloaded, and recovers."""

from __future__ import annotations

import asyncio

import pytest

from stream.throttle import Gate, Throttle


def test_starts_at_the_configured_concurrency():
    assert Throttle(ceiling=16).concurrency == 16


def test_overload_halves_the_limit_once_per_cooldown():
    t = Throttle(ceiling=16, cooldown=1.0)
    t.on_overload(now=10.0)
    t.on_overload(now=10.5)  # the same burst of 503s: counted once
    assert t.concurrency == 8
    t.on_overload(now=11.0)
    assert t.concurrency == 4


def test_the_limit_never_drops_below_one_request():
    t = Throttle(ceiling=4, cooldown=0.0)
    for i in range(20):
        t.on_overload(now=float(i))
    assert t.concurrency == 1


def test_successes_raise_the_limit_back_to_the_ceiling_and_not_beyond():
    t = Throttle(ceiling=8, cooldown=0.0)
    t.on_overload(now=0.0)
    t.on_overload(now=1.0)
    assert t.concurrency == 2
    for _ in range(200):
        t.on_success()
    assert t.concurrency == 8


def test_additive_increase_is_about_one_per_round_of_requests():
    t = Throttle(ceiling=100, cooldown=0.0)
    t.on_overload(now=0.0)  # 50
    for _ in range(50):  # one round at limit 50
        t.on_success()
    assert 50.5 <= t.limit <= 51.5  # about +1, not +50


def test_retry_after_pauses_every_request_until_then():
    t = Throttle(ceiling=4)
    t.on_overload(now=100.0, retry_after=2.0)
    assert t.wait_time(now=100.0, active=0) == pytest.approx(2.0)
    assert t.wait_time(now=101.5, active=0) == pytest.approx(0.5)
    assert t.wait_time(now=102.0, active=0) == 0.0


def test_a_later_shorter_pause_does_not_cut_a_longer_one_short():
    t = Throttle(ceiling=4)
    t.pause(now=0.0, seconds=10.0)
    t.pause(now=1.0, seconds=1.0)
    assert t.wait_time(now=5.0, active=0) == pytest.approx(5.0)


def test_at_the_concurrency_limit_a_request_waits_for_another_to_finish():
    t = Throttle(ceiling=2)
    assert t.wait_time(now=0.0, active=1) == 0.0
    assert t.wait_time(now=0.0, active=2) is None


def test_the_rate_ceiling_spaces_requests():
    t = Throttle(ceiling=100, rate=10.0)
    now = 0.0
    starts = []
    while len(starts) < 30:
        wait = t.wait_time(now, active=0)
        assert wait is not None
        if wait == 0.0:
            t.take(now)
            starts.append(now)
        else:
            now += wait
    # A burst of one second's worth, then 10 a second: 30 requests need at least 2 seconds.
    assert starts[-1] >= 1.9
    assert starts[-1] <= 2.1


async def test_the_gate_holds_requests_beyond_the_limit_and_releases_them_in_turn():
    loop = asyncio.get_running_loop()
    throttle = Throttle(ceiling=2)
    gate = Gate(throttle, loop.time)
    inside = 0
    most_inside = 0
    release = asyncio.Event()
    two_inside = asyncio.Event()

    async def request() -> None:
        nonlocal inside, most_inside
        async with gate:
            inside += 1
            most_inside = max(most_inside, inside)
            if inside == 2:
                two_inside.set()
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(request()) for _ in range(5)]
    await asyncio.wait_for(two_inside.wait(), timeout=5)
    for _ in range(10):  # let the other three try to get in
        await asyncio.sleep(0)
    assert inside == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert most_inside == 2
