"""Delivery of one batch against a scripted API: retries, giving up on a poison batch only while the API
accepts others, auth failures pausing everyone, Retry-After pausing everyone. The clock is injected."""

from __future__ import annotations

import random

import pytest

from stream.delivery import AUTH_PAUSE_SECONDS, Delivery, Exhausted
from stream.metrics import Metrics
from stream.outcome import Accepted, AuthFailed, Retry
from stream.retry import Backoff
from stream.throttle import Gate, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSink:
    """Answers with the scripted outcomes in turn; each request takes `step` seconds of the fake clock."""

    def __init__(self, clock: Clock, outcomes: list, step: float = 1.0) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.step = step
        self.bodies: list[bytes] = []
        self.sent_at: list[float] = []

    async def send(self, body: bytes):
        self.sent_at.append(self.clock.now)
        self.clock.now += self.step
        self.bodies.append(body)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        status = {Accepted: 200, AuthFailed: 401}.get(type(outcome), 500)
        return status, outcome


def make(outcomes: list, retry_max: float = 10.0, step: float = 1.0, ceiling: int = 8):
    clock = Clock()
    sink = ScriptedSink(clock, outcomes, step)
    async def wait(_event, timeout):  # waiting moves the fake clock instead of sleeping
        clock.now += timeout if timeout is not None else 0.0

    async def sleep(seconds):
        clock.now += seconds

    gate = Gate(Throttle(ceiling=ceiling), clock, wait)
    backoff = Backoff(first=0.0001, cap=0.0001)
    delivery = Delivery(sink, gate, backoff, Metrics(), retry_max, clock, random.Random(1), sleep)
    return delivery, sink, clock, gate


async def test_an_accepted_batch_is_sent_once():
    delivery, sink, _, _ = make([Accepted()])
    assert await delivery.send(b"body", "steps") == Accepted()
    assert len(sink.bodies) == 1


async def test_failures_are_retried_until_the_api_accepts():
    delivery, sink, _, _ = make([Retry("http_500"), Retry("ClientOSError"), Accepted()])
    assert await delivery.send(b"body", "bpm") == Accepted()
    assert len(sink.bodies) == 3
    assert delivery.retrying == {}


async def test_during_an_outage_a_batch_is_never_given_up():
    delivery, _sink, clock, _ = make([Retry("http_500")] * 200 + [Accepted()], retry_max=10.0)
    assert await delivery.send(b"body", "steps") == Accepted()
    assert clock.now - 1000.0 > 10.0 * 10  # it failed for far longer than retry_max, and still went through


async def test_a_batch_failing_while_others_succeed_is_given_up_after_retry_max():
    delivery, sink, clock, _ = make([Retry("http_500")], retry_max=10.0)
    delivery.last_success = float("-inf")
    original_send = sink.send

    async def send_while_others_succeed(body: bytes):
        result = await original_send(body)
        delivery.last_success = clock.now  # another key's batch was accepted meanwhile
        return result

    sink.send = send_while_others_succeed
    outcome = await delivery.send(b"poison", "steps")
    assert isinstance(outcome, Exhausted)
    assert 10.0 <= clock.now - 1001.0 <= 12.0


async def test_retry_max_zero_means_retry_forever():
    delivery, _sink, _clock, _ = make([Retry("http_500")] * 50 + [Accepted()], retry_max=0.0)
    delivery.last_success = 10**9  # even with others succeeding
    assert await delivery.send(b"body", "steps") == Accepted()


async def test_a_refused_token_pauses_everyone_and_probes_one_at_a_time_until_it_works():
    delivery, sink, _clock, gate = make([AuthFailed(401), Accepted()], step=AUTH_PAUSE_SECONDS + 0.1)
    assert await delivery.send(b"body", "steps") == Accepted()
    assert len(sink.bodies) == 2
    assert not delivery.auth_failing
    assert gate.throttle.concurrency == 2  # probing at 1, then it climbs back with each success


async def test_while_the_token_is_refused_the_service_reports_it():
    delivery, _, _, gate = make([AuthFailed(403)])
    delivery._on_auth_failure(AuthFailed(403), now=5.0)
    assert delivery.auth_failing
    assert gate.throttle.paused_until == pytest.approx(5.0 + AUTH_PAUSE_SECONDS)


async def test_retry_after_pauses_every_request_and_halves_concurrency():
    delivery, sink, _clock, gate = make([Retry("http_429", retry_after=3.0), Accepted()], step=3.5)
    assert await delivery.send(b"body", "steps") == Accepted()
    assert gate.throttle.concurrency == 4
    answered_429_at = sink.sent_at[0] + 3.5
    assert gate.throttle.paused_until == pytest.approx(answered_429_at + 3.0)
    assert sink.sent_at[1] >= answered_429_at + 3.0  # no attempt sooner than the server asked
