"""While the service catches up on a backlog, buffers fill instead of leaving at their window: with many keys
each buffer gets a sample now and then, and a window of 1-5 s sent them as requests of a few samples each
(233,792 requests for 1M samples at 50,000 users). They leave when full, when memory is needed (the fullest
first) or at the catch-up window; once caught up, the normal window applies again at once. Pure: `now` passed."""

from __future__ import annotations

from stream.batching import Batcher

from .test_batching import entries, poll

KEY = ("user-1", "steps")
WINDOW, HOLD, MAX_AGE, CATCH_UP = 1.0, 30.0, 86400.0, 60.0


def batcher() -> Batcher:
    return Batcher(1000, WINDOW, HOLD, MAX_AGE, catch_up_window=CATCH_UP)


def test_while_catching_up_a_buffer_waits_past_its_window_and_fills():
    b = batcher()
    b.set_catching_up(True, 0.0)
    b.add(KEY, entries(3), 0.0)
    assert poll(b, 2 * WINDOW).batches == []
    for second in range(1, 50):  # the backlog brings the user's samples now and then
        b.add(KEY, entries(1, start=100 + second), float(second))
        assert poll(b, float(second)).batches == []
    batch, = poll(b, CATCH_UP).batches  # at the catch-up window, at the latest
    assert len(batch.entries) == 52


def test_once_caught_up_what_waited_past_the_window_leaves_at_once():
    b = batcher()
    b.set_catching_up(True, 0.0)
    b.add(KEY, entries(3), 0.0)
    assert poll(b, 10.0).batches == []
    b.set_catching_up(False, 10.0)
    batch, = poll(b, 10.0).batches
    assert batch.reason == "window" and len(batch.entries) == 3


def test_a_buffer_that_fills_up_leaves_at_once_even_while_catching_up():
    b = Batcher(10, WINDOW, HOLD, MAX_AGE, catch_up_window=CATCH_UP)
    b.set_catching_up(True, 0.0)
    b.add(KEY, entries(10), 0.0)
    batch, = poll(b, 0.0).batches
    assert batch.reason == "full"


def test_memory_pressure_still_takes_the_fullest_buffers_while_catching_up():
    b = batcher()
    b.set_catching_up(True, 0.0)
    for i, n in enumerate((3, 9, 5)):
        b.add((f"user-{i}", "steps"), entries(n), 0.0)
    b.flush_largest(9, "pressure")
    assert [len(batch.entries) for batch in poll(b, 0.5).batches] == [9]


def test_a_batch_back_from_the_api_does_not_send_the_rest_early_while_catching_up():
    b = batcher()
    b.add(KEY, entries(3), 0.0)
    _first, = poll(b, WINDOW).batches
    b.set_catching_up(True, 1.0)
    b.add(KEY, entries(3, start=50), 1.5)
    b.done(KEY, 2.0)  # the first batch is back: the second waits for the catch-up window, not the window
    assert poll(b, 2.0 + WINDOW).batches == []
    second, = poll(b, 1.5 + CATCH_UP).batches
    assert len(second.entries) == 3


def test_a_buffer_rechecked_while_catching_up_leaves_as_soon_as_it_is_caught_up():
    # Its batch came back during the backlog: it waits in the recheck heap for the catch-up window; once caught
    # up it must not wait there the rest of the 60 s.
    b = batcher()
    b.add(KEY, entries(3), 0.0)
    poll(b, WINDOW)
    b.set_catching_up(True, 1.0)
    b.add(KEY, entries(3, start=50), 1.5)
    b.done(KEY, 2.0)
    assert poll(b, 5.0).batches == []
    b.set_catching_up(False, 5.0)
    batch, = poll(b, 5.0).batches
    assert len(batch.entries) == 3


def test_with_a_window_of_a_minute_or_more_the_flag_still_follows_the_backlog():
    b = Batcher(1000, 120.0, HOLD, MAX_AGE, catch_up_window=CATCH_UP)
    b.set_catching_up(True, 0.0)
    assert b.catching_up
    b.set_catching_up(False, 1.0)
    assert not b.catching_up


def test_a_tail_still_is_parked_while_catching_up():
    b = batcher()
    b.set_catching_up(True, 0.0)
    b.add(KEY, entries(2), 0.0)
    assert poll(b, HOLD).park == []  # waits for the catch-up window too: more may come with the backlog
    parked, = poll(b, CATCH_UP).park
    assert len(parked.entries) == 2


# -- in the pipeline: a backlog of many keys, on a virtual clock ------------------------------------------------

USERS, PER_USER, PARTITIONS = 20_000, 8, 4


async def backlog_run(loop) -> tuple[int, int, list[str]]:
    """20,000 users' 8 samples each, in random order, read at 5,000 records a (virtual) second with a 1 s window:
    (requests, samples accepted, the catch-up log events)."""
    import asyncio
    import logging
    import random

    import msgspec

    from stream import config
    from stream.pipeline import Pipeline

    from .fakes import Cycle, FakeKafka, FakeLedgerStore, FakeSource, FakeWriter, WriteDelay
    from .test_waiting_tails_at_scale import DLQ, LEDGER, PENDING, TOPIC, WALL0, CountingSink, event

    def wall() -> float:
        return WALL0 + loop.time()

    settings = msgspec.convert({"api_token": "t", "metrics_port": 0, "kafka_topics": [TOPIC], "dlq_topic": DLQ,
                                "batch_window_seconds": 1.0, "max_buffered_samples": 200_000}, config.Settings)
    kafka = FakeKafka({TOPIC: PARTITIONS, PENDING: PARTITIONS, DLQ: 1, LEDGER: PARTITIONS}, wall)
    order = [(user, k) for user in range(USERS) for k in range(PER_USER)]
    random.Random(16).shuffle(order)
    for user, k in order:
        kafka.append(TOPIC, None, f"user-{user}".encode(), event(user, k))
    source = FakeSource(kafka, "m0", settings.input_topics, max_records=500, slow=0.1)  # 5,000 records/s
    sink = CountingSink(USERS * PER_USER)
    pipeline = Pipeline(settings, clock=loop.time, wall=wall, source=source, sink=sink,  # type: ignore[arg-type]
                        writer=FakeWriter(kafka, "m0", Cycle([], WriteDelay())), sleep=asyncio.sleep,
                        ledger_store=FakeLedgerStore(kafka, LEDGER))
    events: list[str] = []

    class Events(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", "") in ("catching_up", "caught_up"):
                events.append(record.event)  # type: ignore[attr-defined]

    handler = Events(logging.INFO)
    logger = logging.getLogger("stream.pipeline")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    source.bind(pipeline._on_assigned, pipeline._on_revoked)
    task = asyncio.create_task(pipeline.run())
    try:
        await source.started.wait()
        await kafka.rebalance()
        inputs = [tp for tp in kafka.tps(TOPIC)]
        for _ in range(600):  # virtual seconds: until the input is committed to its end (tails parked, the rest sent)
            if all(kafka.committed.get(tp) == kafka.end_offset(tp) for tp in inputs):
                break
            await asyncio.sleep(1)
    finally:
        pipeline.stop()
        await task
        logger.removeHandler(handler)
        logger.setLevel(level)
    return sink.requests, sink.samples.total(), events


def run_backlog(monkeypatch, catch_up_window: float | None = None) -> tuple[int, int, list[str]]:
    import stream.pipeline

    from .fakes import VirtualTimeLoop

    if catch_up_window is not None:
        monkeypatch.setattr(stream.pipeline, "CATCH_UP_WINDOW_SECONDS", catch_up_window)
    loop = VirtualTimeLoop(start=1000.0, real_budget=120.0)
    try:
        return loop.run_until_complete(backlog_run(loop))
    finally:
        loop.close()


def test_a_backlog_of_many_keys_goes_out_in_fuller_requests(monkeypatch):
    requests, samples, events = run_backlog(monkeypatch)
    # The same backlog sent at the window: a sample of each user now and then, requests of 3-4.
    requests_at_window, samples_at_window, _ = run_backlog(monkeypatch, catch_up_window=1.0)
    print(f"catching up: {samples:,} samples in {requests:,} requests ({samples / requests:.2f} a request); "
          f"at the window: {samples_at_window:,} in {requests_at_window:,} "
          f"({samples_at_window / requests_at_window:.2f})")
    assert events == ["catching_up", "caught_up"]
    assert samples == USERS * PER_USER  # no user left with a tail: each user's samples met in memory
    assert samples / requests >= 6, f"{samples / requests:.1f} samples a request"
    assert requests_at_window > 1.5 * requests
