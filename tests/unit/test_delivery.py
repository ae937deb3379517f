"""Delivery of one batch against a scripted API: retries, giving up on a poison batch only while the API
accepts others, auth failures pausing everyone, Retry-After pausing everyone, refused batches held through a
refusal storm and probed one at a time, a lone refused batch still dead-lettered. The clock is injected."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from stream.delivery import AUTH_PAUSE_SECONDS, STORM_PROBE_SECONDS, AcceptanceLog, Delivery, Exhausted, refused_count
from stream.metrics import Metrics
from stream.outcome import Accepted, AuthFailed, Partial, Rejected, Retry
from stream.refusals import RefusalGuard
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
    assert await delivery.send(b"body", "steps", 3) == Accepted()
    assert len(sink.bodies) == 1


async def test_failures_are_retried_until_the_api_accepts():
    delivery, sink, _, _ = make([Retry("http_500"), Retry("ClientOSError"), Accepted()])
    assert await delivery.send(b"body", "bpm", 3) == Accepted()
    assert len(sink.bodies) == 3
    assert delivery.retrying == {}


async def test_during_an_outage_a_batch_is_never_given_up():
    delivery, _sink, clock, _ = make([Retry("http_500")] * 200 + [Accepted()], retry_max=10.0)
    assert await delivery.send(b"body", "steps", 3) == Accepted()
    assert clock.now - 1000.0 > 10.0 * 10  # it failed for far longer than retry_max, and still went through


async def test_a_batch_failing_while_others_succeed_is_given_up_after_retry_max():
    delivery, sink, clock, _ = make([Retry("http_500")], retry_max=10.0)
    original_send = sink.send

    async def send_while_others_succeed(body: bytes):
        delivery.acceptance.accepted(clock.now)  # another key's batch is accepted meanwhile
        return await original_send(body)

    sink.send = send_while_others_succeed
    outcome = await delivery.send(b"poison", "steps", 3)
    assert isinstance(outcome, Exhausted)
    assert 10.0 <= clock.now - 1001.0 <= 12.0


async def test_retry_max_zero_means_retry_forever():
    delivery, _sink, _clock, _ = make([Retry("http_500")] * 50 + [Accepted()], retry_max=0.0)
    delivery.acceptance.accepted(10**9)  # even with others succeeding
    assert await delivery.send(b"body", "steps", 3) == Accepted()


async def test_a_refused_token_pauses_everyone_and_probes_one_at_a_time_until_it_works():
    delivery, sink, _clock, gate = make([AuthFailed(401), Accepted()], step=AUTH_PAUSE_SECONDS + 0.1)
    assert await delivery.send(b"body", "steps", 3) == Accepted()
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
    assert await delivery.send(b"body", "steps", 3) == Accepted()
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
    assert await delivery.send(b"body", "steps", 3) == Accepted()
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
    outcome = await delivery.send(b"poison", "steps", 3)
    assert isinstance(outcome, Exhausted)
    assert 1120.0 <= clock.now <= 1122.5


async def test_refusals_of_other_batches_are_no_proof_that_the_api_is_healthy():
    # Only accepted samples (200, 207) count as the API working; an API that answers 400 to everyone
    # must not make a retrying batch give up.
    delivery, _sink, _clock, _ = make([Retry("http_500")] * 100 + [Accepted()], retry_max=10.0)
    delivery._on_answer(Rejected("bad"), ticket=-1, samples=3, now=1000.0)
    assert delivery.last_success == float("-inf")
    assert await delivery.send(b"body", "steps", 3) == Accepted()


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


# -- refusal storms -------------------------------------------------------------------------------------
# Several batches at once on a virtual clock: a wait or a sleep moves the clock to its deadline (concurrent
# waiters do not add up), and every request yields, so requests overlap as they would on the wire.


class StormSink:
    """Answers by a rule of (clock, body); records each request's time, how many requests held the gate,
    and whether a refusal storm was on when it left."""

    def __init__(self, clock: Clock, answer, step: float = 0.5) -> None:
        self.clock = clock
        self.answer = answer
        self.step = step
        self.sent: list[tuple[float, int, bool, bytes]] = []
        self.delivery: Delivery | None = None
        self.gate: Gate | None = None

    async def send(self, body: bytes):
        self.sent.append((self.clock.now, self.gate.active, self.delivery.storm, body))
        deadline = self.clock.now + self.step
        await asyncio.sleep(0)
        self.clock.now = max(self.clock.now, deadline)
        outcome = self.answer(self.clock.now, body)
        status = {Accepted: 200, Partial: 207, Rejected: 400}[type(outcome)]
        return status, outcome


def make_storm(answer, *, window=60.0, min_batches=3, share=0.5, enabled=True, ceiling=8, step=0.5):
    clock = Clock()
    sink = StormSink(clock, answer, step)

    async def wait(event, timeout):
        if timeout is None:
            await event.wait()
            return
        deadline = clock.now + timeout
        await asyncio.sleep(0)
        clock.now = max(clock.now, deadline)

    async def sleep(seconds):
        deadline = clock.now + seconds
        await asyncio.sleep(0)
        clock.now = max(clock.now, deadline)

    gate = Gate(Throttle(ceiling=ceiling), clock, wait)
    guard = RefusalGuard(window, min_batches, share, enabled=enabled)
    metrics = Metrics()
    delivery = Delivery(sink, gate, Backoff(first=0.2, cap=2.0), metrics, 900.0, clock, random.Random(1), sleep,
                        guard)
    sink.delivery, sink.gate = delivery, gate
    return delivery, sink, clock, gate, metrics


def gauge(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name)


async def test_a_refusal_storm_holds_refused_batches_and_probes_one_at_a_time_until_the_api_accepts():
    recovers_at = 1060.0
    states: list[float] = []

    def answer(now, _body):
        states.append(gauge(metrics, "stream_api_refusal_storm"))
        return Accepted() if now >= recovers_at else Rejected('{"error": "outage"}')

    delivery, sink, _clock, gate, metrics = make_storm(answer)
    bodies = [b"batch-%d" % i for i in range(8)]
    outcomes = await asyncio.gather(*(delivery.send(b, "steps", 10) for b in bodies))

    assert outcomes == [Accepted()] * 8  # nothing given up: every batch was held, then accepted
    assert delivery.guard.storms == 1 and not delivery.storm
    assert 1.0 in states and gauge(metrics, "stream_api_refusal_storm") == 0.0
    storm = [(t, active) for t, active, on, _ in sink.sent if on]
    assert len(storm) >= 5  # probes went out through the storm
    assert all(active == 1 for _, active in storm), "more than one request at a time during the storm"
    times = [t for t, _ in storm]
    assert all(b - a >= STORM_PROBE_SECONDS for a, b in itertools.pairwise(times)), times
    # Sending resumes at concurrency 1 and climbs back: the ceiling is not reached at once.
    assert gate.throttle.concurrency < 8
    assert {b for *_, b in sink.sent} == set(bodies)
    assert delivery.retrying == {}


async def test_a_lone_refused_batch_in_a_quiet_system_is_dead_lettered_after_one_window():
    delivery, sink, clock, _gate, metrics = make_storm(lambda now, body: Rejected("bad"), window=60.0)
    outcome = await delivery.send(b"lonely", "steps", 10)
    assert outcome == Rejected("bad")
    assert 1060.0 <= clock.now <= 1065.0  # held for one window, then given its fate; no endless loop
    assert 3 <= len(sink.sent) <= 80  # re-sent with backoff (up to 2 s here) meanwhile, not in a tight loop
    assert not delivery.storm and delivery.guard.storms == 0
    assert gauge(metrics, "stream_api_refusal_storm") == 0.0
    assert delivery.retrying == {}


async def test_a_refused_batch_among_accepted_ones_is_dead_lettered_once_enough_batches_follow_it():
    delivery, _sink, clock, _gate, _ = make_storm(
        lambda now, body: Rejected("bad sample") if body == b"bad" else Accepted(), min_batches=5
    )
    bad = asyncio.create_task(delivery.send(b"bad", "steps", 10))
    await asyncio.sleep(0)
    goods = []
    for i in range(6):
        goods.append(await delivery.send(b"good-%d" % i, "steps", 10))
    assert goods == [Accepted()] * 6
    assert await bad == Rejected("bad sample")
    assert clock.now < 1030.0  # judged by the batches after it, long before a whole window
    assert not delivery.guard.storms


async def test_a_refusal_right_after_healthy_traffic_waits_for_the_batches_after_it():
    # A minute of accepted batches says nothing about a refusal that comes after it: the API may have just
    # broken. The refused batches are held, and the storm that follows them is recognised.
    def answer(now, body):
        return Rejected("outage") if body.startswith(b"late") and now < 1200.0 else Accepted()

    delivery, _sink, clock, _gate, _ = make_storm(answer)
    n = 0
    while clock.now < 1100.0:
        assert await delivery.send(b"healthy-%d" % n, "steps", 10) == Accepted()
        n += 1
    outcomes = await asyncio.gather(*(delivery.send(b"late-%d" % i, "steps", 10) for i in range(6)))
    assert outcomes == [Accepted()] * 6
    assert delivery.guard.storms == 1


async def test_with_the_guard_off_a_refused_batch_is_dead_lettered_at_once():
    delivery, sink, _clock, _gate, metrics = make_storm(lambda now, body: Rejected("bad"), enabled=False)
    outcomes = await asyncio.gather(*(delivery.send(b"b%d" % i, "steps", 10) for i in range(20)))
    assert outcomes == [Rejected("bad")] * 20
    assert len(sink.sent) == 20
    assert gauge(metrics, "stream_api_refusal_storm") == 0.0


async def test_a_207_during_a_storm_comes_back_for_its_refused_samples_to_be_held():
    # The first probe after the trip is answered 207, refusing 2 of 3: a failed probe, the storm goes on,
    # and the 207 goes back to the caller, which holds the 2 refused samples (the accepted one is done).
    answered_207_at = []

    def answer(now, body):
        if delivery.storm:
            answered_207_at.append(now)
            return Partial({0: "x", 1: "y"})
        return Rejected("outage")

    delivery, _sink, _clock, gate, _ = make_storm(answer)
    tasks = [asyncio.create_task(delivery.send(b"r%d" % i, "steps", 3)) for i in range(4)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result() for t in done] == [Partial({0: "x", 1: "y"})]
    assert delivery.storm
    assert gate.throttle.paused_until == pytest.approx(answered_207_at[0] + STORM_PROBE_SECONDS)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def test_a_probe_that_refuses_little_ends_the_storm_and_the_held_batches_go_out():
    partial = []

    def answer(now, body):
        if not delivery.storm:
            return Accepted() if partial else Rejected("outage")
        partial.append(body)
        return Partial({0: "x"}, "")  # 1 of 10 refused: the API works again

    delivery, _sink, _clock, _gate, metrics = make_storm(answer)
    outcomes = await asyncio.gather(*(delivery.send(b"r%d" % i, "steps", 10) for i in range(4)))
    assert len(partial) == 1
    assert sorted(outcomes, key=repr) == sorted([Partial({0: "x"}, "")] + [Accepted()] * 3, key=repr)
    assert not delivery.storm and delivery.guard.storms == 1
    assert gauge(metrics, "stream_api_refusal_storm") == 0.0


def test_refused_count_reads_every_kind_of_answer():
    assert refused_count(Accepted(), 10) == 0
    assert refused_count(Rejected("x"), 10) == 10
    assert refused_count(Partial({1: "a", 3: "b", 99: "c"}), 10) == 2  # indices outside the batch ignored
    assert refused_count(Partial(None), 10) == 10  # unreadable: as if all were refused
    assert refused_count(Partial({99: "c"}), 10) == 10
