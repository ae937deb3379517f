"""Delivery of one batch against a scripted API: retries, giving up on a poison batch only while the API
accepts others, auth failures pausing everyone, Retry-After pausing everyone. The clock is injected."""

from __future__ import annotations

import random

import pytest

from stream.delivery import AUTH_PAUSE_SECONDS, AcceptanceLog, Delivery, Exhausted
from stream.metrics import Metrics
from stream.outcome import Accepted, AuthFailed, Rejected, Retry
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
    original_send = sink.send

    async def send_while_others_succeed(body: bytes):
        delivery.acceptance.accepted(clock.now)  # another key's batch is accepted meanwhile
        return await original_send(body)

    sink.send = send_while_others_succeed
    outcome = await delivery.send(b"poison", "steps")
    assert isinstance(outcome, Exhausted)
    assert 10.0 <= clock.now - 1001.0 <= 12.0


async def test_retry_max_zero_means_retry_forever():
    delivery, _sink, _clock, _ = make([Retry("http_500")] * 50 + [Accepted()], retry_max=0.0)
    delivery.acceptance.accepted(10**9)  # even with others succeeding
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


async def test_a_batch_that_failed_through_a_long_outage_is_not_given_up_right_after_it():
    # The batch failed for an hour while nothing was accepted; then others are accepted again and it gets
    # one more 429: one second of failing while the API accepts others is not STREAM_RETRY_MAX_SECONDS.
    outage = [Retry("http_503")] * 3600
    delivery, sink, clock, _ = make([*outage, Retry("http_429"), Accepted()], retry_max=900.0)
    original_send = sink.send

    async def send(body: bytes):
        if len(sink.bodies) >= len(outage):
            delivery.acceptance.accepted(clock.now)  # the outage is over: other keys go through again
        return await original_send(body)

    sink.send = send
    assert await delivery.send(b"body", "steps") == Accepted()
    assert clock.now - 1000.0 > 3600


async def test_only_time_failing_while_others_are_accepted_counts_toward_giving_up():
    # The batch fails from 1001 on. Others are accepted until 1005 (4 s count), then an outage in which each
    # attempt takes 11 s (none of it counts) until the attempt at 1115, healthy again: 6 s more reach 10.
    delivery, sink, clock, _ = make([Retry("http_500")], retry_max=10.0)
    original_send = sink.send
    healthy = [(1000.0, 1005.0), (1105.0, 1200.0)]

    async def send(body: bytes):
        if any(a <= clock.now < b for a, b in healthy):
            delivery.acceptance.accepted(clock.now)
        if 1005.0 <= clock.now < 1105.0:
            clock.now += 10.0  # the outage: each attempt takes longer, none of it counts
        return await original_send(body)

    sink.send = send
    outcome = await delivery.send(b"poison", "steps")
    assert isinstance(outcome, Exhausted)
    assert 1120.0 <= clock.now <= 1122.5


async def test_refusals_of_other_batches_are_no_proof_that_the_api_is_healthy():
    # Only accepted samples (200, 207) count as the API working; an API that answers 400 to everyone
    # must not make a retrying batch give up.
    delivery, _sink, _clock, _ = make([Retry("http_500")] * 100 + [Accepted()], retry_max=10.0)
    delivery._on_answer(Rejected("bad"))
    assert delivery.last_success == float("-inf")
    assert await delivery.send(b"body", "steps") == Accepted()


def test_acceptance_log_counts_from_the_first_acceptance_after_a_failure():
    log = AcceptanceLog(resolution=1.0)
    assert log.accepting_between(0.0, 50.0) == 0.0
    log.accepted(10.0)
    log.accepted(10.5)  # within the resolution: not kept, but `last` moves
    log.accepted(30.0)
    assert log.accepting_between(0.0, 50.0) == 40.0
    assert log.accepting_between(10.0, 50.0) == 20.0  # strictly after the failure
    assert log.accepting_between(30.0, 50.0) == 0.0
    assert log.accepting_between(60.0, 70.0) == 0.0
