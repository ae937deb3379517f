"""`stream redrive` without Kafka: which reasons it redrives, how it reads times, what it selects, the headers and
key it writes, how its progress moves within a fetched batch, and its exit statuses on usage errors."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream import cli, config, redrive_kafka
from stream import redrive as rd
from stream.redrive import (
    COUNT_HEADER,
    FROM_HEADER,
    INPUT_REASONS,
    ON_REQUEST,
    REASON_HEADER,
    RETRYABLE,
    Criteria,
    Letter,
    Request,
    Tally,
    Verdict,
    build_request,
    check_reasons,
    parse_duration,
    parse_when,
    read_letter,
    redrive_headers,
    redrive_parser,
    routing_key,
    select,
)
from stream.schema import REASONS, as_single_event

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
T0 = int(NOW.timestamp() * 1000)
EVENT = b'{"user_id":"u-1","data_type":"steps","device_name":"iPhone","start_date":"2026-11-29T10:00:00Z",' \
        b'"unit":"count","value":12}'


def criteria(**changes: object) -> Criteria:
    values: dict = {"reasons": frozenset(RETRYABLE), "dlq_topic": "samples.dlq", "default_topic": "samples",
                    "pending_topic": "samples-sync-pending"}
    values.update(changes)
    return Criteria(**values)


def letter(reason: str = "api_rejected", **changes: object) -> Letter:
    values: dict = {"reason": reason, "source_topic": "samples", "source_partition": 2, "source_offset": 41}
    values.update(changes)
    return Letter(**values)


# --- which reasons ------------------------------------------------------------------------------------------------


def test_every_reason_is_classified_once():
    groups = [set(RETRYABLE), set(ON_REQUEST), set(INPUT_REASONS)]
    assert set().union(*groups) == set(REASONS)
    assert sum(len(g) for g in groups) == len(REASONS)
    assert set(RETRYABLE) == {"api_rejected", "retry_exhausted", "below_min_batch"}
    assert set(ON_REQUEST) == {"api_partial_unknown", "beyond_ledger_horizon"}
    assert {"malformed_json", "duplicate_field", "invalid_date", "many_invalid_samples"} <= set(INPUT_REASONS)


@pytest.mark.parametrize("reason", INPUT_REASONS)
def test_input_reasons_are_refused_without_force_saying_why(reason):
    [problem] = check_reasons([reason], force=False)
    assert reason in problem and "straight back" in problem and "--force" in problem
    assert check_reasons([reason], force=True) == []


@pytest.mark.parametrize("reason", [*RETRYABLE, *ON_REQUEST])
def test_reasons_that_can_succeed_need_no_force(reason):
    assert check_reasons([reason], force=False) == []


def test_an_unknown_reason_is_refused_with_the_list():
    [problem] = check_reasons(["api_refused"], force=True)
    assert "unknown reason 'api_refused'" in problem and "api_rejected" in problem


# --- times --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1.5h", timedelta(minutes=90)),
        ("1w", timedelta(days=7)),
        (" 3D ", timedelta(days=3)),
    ],
)
def test_durations(text, expected):
    assert parse_duration(text) == expected
    assert parse_when(text, NOW) == NOW - expected


@pytest.mark.parametrize("text", ["", "2", "h", "2x", "2h-", "-2h", "2 h", "yesterday"])
def test_not_durations(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-29T10:00:00Z", datetime(2026, 11, 29, 10, 0, tzinfo=UTC)),
        ("2026-11-29T11:00:00+01:00", datetime(2026, 11, 29, 10, 0, tzinfo=UTC)),
        ("2026-11-29T10:00:00.250Z", datetime(2026, 11, 29, 10, 0, 0, 250_000, tzinfo=UTC)),
        ("2026-11-28", datetime(2026, 11, 28, tzinfo=UTC)),
    ],
)
def test_iso_times(text, expected):
    assert parse_when(text, NOW) == expected


def test_a_time_without_offset_is_refused():
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_when("2026-11-29T10:00:00", NOW)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when("last tuesday", NOW)
    for far in ("105707w", "99999999999999999999d"):
        with pytest.raises(ValueError, match="before the year 1"):
            parse_when(far, NOW)


@given(st.integers(min_value=0, max_value=1000 * 365), st.sampled_from(["s", "m", "h", "d"]))
def test_a_duration_goes_back_from_now_exactly(number, unit):
    seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert parse_when(f"{number}{unit}", NOW) == NOW - timedelta(seconds=seconds)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                               timezone(timedelta(hours=-8))])))
def test_an_iso_time_reads_back_as_itself(moment):
    assert parse_when(moment.isoformat(), NOW) == moment


# --- what a dead letter says --------------------------------------------------------------------------------------


def test_read_letter_reads_the_dead_letter_headers():
    headers = [("stream.error.reason", b"retry_exhausted"), ("stream.error.message", b"gave up"),
               ("stream.source.topic", b"samples"), ("stream.source.partition", b"3"),
               ("stream.source.offset", b"1207"), (COUNT_HEADER, b"2")]
    assert read_letter(headers) == Letter("retry_exhausted", "samples", 3, 1207, 2, False)
    assert read_letter(None) == Letter()
    bad = read_letter([("stream.source.partition", b"x"), ("stream.source.offset", b"-1"), (COUNT_HEADER, b"\xff"),
                       ("stream.error.value_dropped", b"400000")])
    assert (bad.source_partition, bad.source_offset, bad.count, bad.value_dropped) == (None, None, None, True)


def test_the_dead_letter_headers_the_service_writes_are_read():
    from stream.deadletter import dead_letter_headers

    headers = dead_letter_headers("api_rejected", "device_refused", "samples", 1, 99)
    assert read_letter(headers) == letter("api_rejected", source_partition=1, source_offset=99, count=0)
    assert read_letter(dead_letter_headers("api_rejected", "m", "samples", 1, 99, 2)).count == 2


async def test_dead_letters_that_carry_their_count_need_no_lookup():
    lookups = FakeLookups({1000: 5})
    producer = FakeProducer()
    run, tally, _ = make_run(producer=producer, lookups=lookups)
    p0 = TP("samples.dlq", 0)
    await run.process({p0: [dead(0, count=0), dead(1, count=0)]}, {p0: 9})
    assert lookups.asked == [] and len(producer.sent) == 2 and tally.unknown_counts == 0


def test_an_unknown_count_is_not_called_gone():
    tally = Tally(unknown_counts=2)
    text = rd.report(tally, Request(criteria()), 1.0)
    assert "not found or not read in time" in text and "gone" not in text


# --- selection ----------------------------------------------------------------------------------------------------


def test_a_dead_letter_of_a_selected_reason_is_sent_back_to_its_source_keyed_by_user_id():
    decision = select(letter(), T0, EVENT, criteria())
    assert decision.verdict is Verdict.SEND
    assert (decision.destination, decision.key, decision.count) == ("samples", b"u-1", 0)


def test_other_reasons_are_not_selected():
    assert select(letter("malformed_json"), T0, EVENT, criteria()).verdict is Verdict.NOT_SELECTED
    assert select(letter(None), T0, EVENT, criteria()).verdict is Verdict.NOT_SELECTED
    only = criteria(reasons=frozenset({"retry_exhausted"}))
    assert select(letter("api_rejected"), T0, EVENT, only).verdict is Verdict.NOT_SELECTED


def test_source_topic_and_partition_filters():
    by_topic = criteria(source_topics=frozenset({"other"}))
    assert select(letter(), T0, EVENT, by_topic).verdict is Verdict.FILTERED
    assert select(letter(source_topic="other"), T0, EVENT, by_topic).verdict is Verdict.SEND
    by_partition = criteria(source_partitions=frozenset({0, 1}))
    assert select(letter(), T0, EVENT, by_partition).verdict is Verdict.FILTERED
    assert select(letter(source_partition=1), T0, EVENT, by_partition).verdict is Verdict.SEND
    assert select(letter(source_partition=None), T0, EVENT, by_partition).verdict is Verdict.FILTERED


def test_time_range_on_the_dead_letter_timestamp():
    window = criteria(since_ms=T0 - 1000, until_ms=T0 + 1000)
    assert select(letter(), T0 - 1001, EVENT, window).verdict is Verdict.FILTERED
    assert select(letter(), T0 - 1000, EVENT, window).verdict is Verdict.SEND
    assert select(letter(), T0 + 1000, EVENT, window).verdict is Verdict.SEND
    assert select(letter(), T0 + 1001, EVENT, window).verdict is Verdict.LATER  # stays for a later run


def test_max_redrives_from_the_header_or_from_the_source_record():
    limit = criteria(max_redrives=3)
    assert select(letter(count=2), T0, EVENT, limit).verdict is Verdict.SEND
    over = select(letter(count=3), T0, EVENT, limit)
    assert (over.verdict, over.count) == (Verdict.OVER_MAX, 3)
    assert select(letter(), T0, EVENT, limit, count=3).verdict is Verdict.OVER_MAX  # read from the source record
    assert select(letter(), T0, EVENT, limit, count=None).verdict is Verdict.SEND  # unknown counts as 0
    assert select(letter(count=1), T0, EVENT, limit, count=5).verdict is Verdict.SEND  # the header wins


def test_unreadable_values_are_left_unless_forced():
    assert select(letter(value_dropped=True), T0, b"", criteria()).why.startswith("written to the DLQ without")
    assert select(letter(), T0, b"", criteria()).verdict is Verdict.UNREADABLE
    assert select(letter(), T0, None, criteria(force=True)).verdict is Verdict.UNREADABLE  # nothing to send
    no_user = b'{"data_type":"steps","value":3}'
    assert select(letter(), T0, no_user, criteria()).verdict is Verdict.UNREADABLE
    forced = select(letter(), T0, no_user, criteria(force=True))
    assert (forced.verdict, forced.key) == (Verdict.SEND, None)


def test_destinations():
    assert select(letter(), T0, EVENT, criteria(to="samples-replay")).destination == "samples-replay"
    pending = letter(source_topic="samples-sync-pending")
    assert select(pending, T0, EVENT, criteria()).destination == "samples"  # the pending topic is the service's
    assert select(letter(source_topic=None), T0, EVENT, criteria()).destination == "samples"
    assert select(letter(source_topic="wearables"), T0, EVENT, criteria()).destination == "wearables"


letters = st.builds(
    Letter,
    reason=st.sampled_from([*REASONS, None, "something_else"]),
    source_topic=st.sampled_from(["samples", "wearables", "samples-sync-pending", None]),
    source_partition=st.one_of(st.none(), st.integers(0, 5)),
    source_offset=st.one_of(st.none(), st.integers(0, 10**9)),
    count=st.one_of(st.none(), st.integers(0, 6)),
    value_dropped=st.booleans(),
)
values = st.one_of(st.just(EVENT), st.just(b""), st.none(), st.binary(max_size=40),
                   st.text(max_size=20).map(lambda u: msgspec.json.encode({"user_id": u, "data_type": "bpm"})))


@given(letters, st.integers(T0 - 10_000, T0 + 10_000), values,
       st.frozensets(st.sampled_from(list(REASONS)), min_size=1), st.integers(1, 5), st.booleans(),
       st.one_of(st.none(), st.integers(0, 9)))
def test_selection_never_sends_what_it_must_not(letter_, timestamp, value, reasons, max_redrives, force, known):
    rules = criteria(reasons=reasons, max_redrives=max_redrives, force=force, since_ms=T0 - 5000, until_ms=T0 + 5000)
    decision = select(letter_, timestamp, value, rules, known)
    if decision.verdict is not Verdict.SEND:
        return
    assert letter_.reason in reasons
    assert T0 - 5000 <= timestamp <= T0 + 5000
    before = letter_.count if letter_.count is not None else (known or 0)
    assert decision.count == before < max_redrives
    assert value and not letter_.value_dropped
    assert decision.key == routing_key(value)
    assert decision.key is not None or force
    assert decision.destination not in (rules.pending_topic, rules.dlq_topic)


# --- key and headers ----------------------------------------------------------------------------------------------


def test_routing_key():
    assert routing_key(EVENT) == b"u-1"
    assert routing_key(b'{"user_id":"u-2","data_type":"bpm","data":[{"value":1}]}') == b"u-2"
    assert routing_key(as_single_event("\u00e9l\u00e8ve", "bpm", b'{"value":1}')) == "\u00e9l\u00e8ve".encode()
    for bad in (None, b"", b"{", b"[1]", b'{"user_id":7}', b'{"user_id":""}', b'{"user_id":null}', b"\xff\xfe",
                b'{"user_id":"u\\udc00"}'):
        assert routing_key(bad) is None, bad


@given(st.text(min_size=1, max_size=50))
def test_routing_key_is_the_user_id_as_producers_key_it(user_id):
    value = as_single_event(user_id, "steps", b'{"device_name":"x","value":1}')
    try:
        expected = user_id.encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 key can be made of it
        expected = None
    assert routing_key(value) == expected


def test_redrive_headers():
    headers = redrive_headers(2, "retry_exhausted", "samples.dlq", 3, 1207)
    assert headers == [(COUNT_HEADER, b"2"), (FROM_HEADER, b"samples.dlq/3/1207"), (REASON_HEADER, b"retry_exhausted")]
    assert rd.count_of(headers) == 2
    assert rd.count_of([]) == 0
    assert not any(name.startswith(("stream.error.", "stream.source.")) for name, _ in headers)


def test_progress_groups_are_named_from_the_dlq_topic_and_the_reason():
    assert rd.progress_group("samples.dlq", "api_rejected") == "samples.dlq-redrive-api_rejected"


# --- one fetched batch: writes, and how far progress moves ------------------------------------------------------

Record = namedtuple("Record", "offset timestamp headers value")
TP = namedtuple("TP", "topic partition")


def dead(offset: int, reason: str = "api_rejected", count: int | None = None, at: int = T0,
         value: bytes = EVENT) -> Record:
    from stream.deadletter import dead_letter_headers

    headers = dead_letter_headers(reason, "m", "samples", 0, 1000 + offset, count or 0)
    if count is None:  # written by an older version, without the count
        headers = [h for h in headers if h[0] != COUNT_HEADER]
    return Record(offset, at, headers, value)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list]] = []

    async def send(self, topic, value=None, key=None, headers=None):
        self.sent.append((topic, key, value, headers))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class FakeLookups:
    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self._counts = counts or {}
        self.asked: list = []

    async def counts(self, wanted):
        wanted = list(wanted)
        self.asked.extend(wanted)
        return {w: self._counts.get(w[2], 0) for w in wanted}


def make_run(rules: Criteria | None = None, cursor: dict | None = None, producer=None, lookups=None, **options):
    rules = rules or criteria()
    tally = Tally()
    cursor = cursor if cursor is not None else {r: {} for r in rules.reasons}
    run = redrive_kafka._Run(Request(rules, **options), tally, cursor, {"samples": 4, "samples.dlq": 2}, {},
                  lookups or FakeLookups(), producer, "samples.dlq")
    return run, tally, cursor


async def test_a_batch_is_written_and_progress_moves_past_it_for_every_selected_reason():
    producer = FakeProducer()
    run, tally, cursor = make_run(producer=producer)
    p0 = TP("samples.dlq", 0)
    batch = {p0: [dead(0), dead(1, "malformed_json"), dead(2, "retry_exhausted"), dead(3, count=3)]}
    assert await run.process(batch, {p0: 10}) == []
    assert [s[3][1] for s in producer.sent] == [(FROM_HEADER, b"samples.dlq/0/0"), (FROM_HEADER, b"samples.dlq/0/2")]
    assert all(s[0] == "samples" and s[1] == b"u-1" and s[2] == EVENT for s in producer.sent)
    assert tally.sent == {"api_rejected": 1, "retry_exhausted": 1}
    assert tally.over_max == {"api_rejected": 1} and tally.over_max_at == ["samples.dlq/0/3 api_rejected, redriven 3 "
                                                                           "times"]
    assert tally.not_selected == {"malformed_json": 1}
    assert cursor == {r: {0: 4} for r in RETRYABLE}


async def test_records_an_earlier_run_judged_are_not_sent_again():
    producer = FakeProducer()
    run, tally, cursor = make_run(producer=producer, cursor={"api_rejected": {0: 2}, "retry_exhausted": {0: 0},
                                                             "below_min_batch": {}})
    p0 = TP("samples.dlq", 0)
    await run.process({p0: [dead(0), dead(1, "retry_exhausted"), dead(2), dead(3)]}, {p0: 10})
    # api_rejected had judged offsets 0-1; retry_exhausted had not: its record at 1 goes now.
    assert [s[3][1][1] for s in producer.sent] == [b"samples.dlq/0/1", b"samples.dlq/0/2", b"samples.dlq/0/3"]
    assert tally.earlier == 1
    assert cursor["api_rejected"][0] == cursor["retry_exhausted"][0] == 4


async def test_the_limit_stops_progress_right_after_the_last_record_sent():
    producer = FakeProducer()
    run, _tally, cursor = make_run(producer=producer, limit=2)
    p0, p1 = TP("samples.dlq", 0), TP("samples.dlq", 1)
    await run.process({p0: [dead(0), dead(1, "malformed_json"), dead(2), dead(3)], p1: [dead(0)]}, {p0: 9, p1: 9})
    assert len(producer.sent) == 2 and run.limit_reached
    assert cursor == {r: {0: 3} for r in RETRYABLE}  # offset 3 of partition 0 and all of partition 1 stay


async def test_until_stops_the_partition_at_the_first_later_dead_letter():
    producer = FakeProducer()
    run, _tally, cursor = make_run(criteria(until_ms=T0), producer=producer)
    p0 = TP("samples.dlq", 0)
    stopped = await run.process({p0: [dead(0), dead(1, at=T0 + 1), dead(2)]}, {p0: 9})
    assert stopped == [p0]
    assert len(producer.sent) == 1
    assert cursor["api_rejected"] == {0: 1}


async def test_records_past_the_end_at_the_start_wait_for_the_next_run():
    producer = FakeProducer()
    run, _tally, cursor = make_run(producer=producer)
    p0 = TP("samples.dlq", 0)
    await run.process({p0: [dead(0), dead(1), dead(2)]}, {p0: 2})
    assert len(producer.sent) == 2 and cursor["api_rejected"] == {0: 2}


async def test_counts_are_read_from_the_source_record_only_when_the_dead_letter_lacks_them():
    lookups = FakeLookups({1001: 3})  # the record at samples/0/1001 was redriven 3 times
    producer = FakeProducer()
    run, tally, _ = make_run(producer=producer, lookups=lookups)
    p0 = TP("samples.dlq", 0)
    await run.process({p0: [dead(0), dead(1), dead(2, count=1), dead(3, "malformed_json")]}, {p0: 9})
    assert lookups.asked == [("samples", 0, 1000), ("samples", 0, 1001)]
    assert tally.over_max == {"api_rejected": 1}
    assert [h[0] for _, _, _, h in producer.sent] == [(COUNT_HEADER, b"1"), (COUNT_HEADER, b"2")]


async def test_a_dry_run_writes_nothing_and_shows_a_few_values():
    run, tally, _ = make_run(show=1)
    p0 = TP("samples.dlq", 0)
    await run.process({p0: [dead(0), dead(1)]}, {p0: 9})
    assert tally.sent == {"api_rejected": 2}
    assert tally.shown == ["samples.dlq/0/0 -> samples key u-1: " + EVENT.decode()]
    text = rd.report(tally, Request(criteria(), dry_run=True), 0.5)
    assert "would redrive" in text and "dry run: nothing written" in text and "health data" in text


async def test_a_missing_destination_topic_stops_the_run_before_writing():
    producer = FakeProducer()
    run, _, cursor = make_run(criteria(to="nowhere"), producer=producer)
    run.options = {"bootstrap_servers": "127.0.0.1:1"}

    async def no_such_topic(_options):
        return {"samples": 4}

    p0 = TP("samples.dlq", 0)
    original = redrive_kafka._topic_partitions
    redrive_kafka._topic_partitions = no_such_topic
    try:
        with pytest.raises(rd.RedriveError, match=r"'nowhere'.*does not exist"):
            await run.process({p0: [dead(0)]}, {p0: 9})
    finally:
        redrive_kafka._topic_partitions = original
    assert producer.sent == [] and cursor["api_rejected"] == {}


def test_the_report_names_what_was_left():
    tally = Tally(read=5)
    tally.sent["api_rejected"] = 2
    tally.over_max["api_rejected"] = 12
    tally.over_max_at = [f"samples.dlq/0/{i} api_rejected, redriven 3 times" for i in range(10)]
    tally.unreadable["retry_exhausted"] = 1
    tally.unreadable_at = ["samples.dlq/1/4 retry_exhausted: no readable user_id to key it by"]
    text = rd.report(tally, Request(criteria()), 1.0)
    assert "redriven --max-redrives 3 times already: 12" in text and "... and 2 more" in text
    assert "no readable user_id" in text
    assert "samples.dlq-redrive-api_rejected" in text


# --- the command line ---------------------------------------------------------------------------------------------

SETTINGS = config.Settings(kafka_topics=("samples",), dlq_topic="samples.dlq")


def request_of(*argv: str) -> Request:
    return build_request(redrive_parser().parse_args(list(argv)), SETTINGS, NOW)


def test_defaults():
    request = request_of()
    assert request.criteria.reasons == frozenset(RETRYABLE)
    assert request.criteria.max_redrives == 3 and request.criteria.default_topic == "samples"
    assert request.criteria.pending_topic == "samples-sync-pending"
    assert not request.dry_run and not request.follow and request.limit is None


def test_options():
    request = request_of("--reason", "api_partial_unknown", "--reason", "api_rejected", "--source-topic", "a",
                         "--source-partition", "2", "--since", "2h", "--until", "2026-11-29T11:30:00Z", "--to",
                         "replay", "--max-redrives", "5", "--limit", "10", "--dry-run", "--show", "0")
    c = request.criteria
    assert c.reasons == {"api_partial_unknown", "api_rejected"}
    assert (c.source_topics, c.source_partitions, c.to, c.max_redrives) == ({"a"}, {2}, "replay", 5)
    assert c.since_ms == T0 - 2 * 3600_000 and c.until_ms == T0 - 1800_000
    assert (request.limit, request.dry_run, request.show) == (10, True, 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "1h", "--until", "2h"], "--since is later than --until"),
        (["--max-redrives", "0"], "--max-redrives"),
        (["--limit", "0"], "--limit"),
        (["--to", "samples.dlq"], "STREAM_DLQ_TOPIC"),
        (["--to", "samples-sync-ledger"], "STREAM_LEDGER_TOPIC"),
        (["--follow", "--dry-run"], "do not go together"),
        (["--since", "soon"], "neither a duration"),
        (["--reason", "invalid_date"], "--force"),
        (["--source-partition", "-1"], "--source-partition"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        request_of(*argv)


def test_input_reasons_go_with_force():
    assert request_of("--reason", "malformed_json", "--force").criteria.reasons == {"malformed_json"}


@pytest.mark.parametrize(
    ("argv", "env", "status", "said"),
    [
        (["--reason", "malformed_json"], {}, 2, "would come straight back"),
        (["--reason", "nope"], {}, 2, "unknown reason"),
        (["--since", "2026-11-29T10:00"], {}, 2, "no UTC offset"),
        (["--limit", "ten"], {}, 2, "invalid int value"),
        (["--bogus"], {}, 2, "unrecognized arguments"),
        ([], {"STREAM_BATCH_MAX_SAMPLES": "1"}, 2, "configuration error: STREAM_BATCH_MAX_SAMPLES"),
        ([], {"STREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "STREAM_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, 2,
         "STREAM_KAFKA_SSL_CAFILE"),
    ],
)
def test_exit_status_2_for_usage_and_configuration_errors(argv, env, status, said, capsys):
    assert rd.main(argv, env=env) == status
    assert said in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert rd.main(["--help"]) == 0
    assert "health data" in capsys.readouterr().out


def test_exit_status_1_when_kafka_cannot_be_reached(capsys, monkeypatch):
    monkeypatch.setattr("stream.logs.configure", lambda level: None)
    assert rd.main([], env={"STREAM_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}) == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in capsys.readouterr().err


def test_the_stream_command_has_redrive(capsys):
    assert "redrive" in cli.COMMANDS
    assert "redrive" in cli._usage()
    assert cli.main(["redrive", "--reason", "nope"]) == 2
    assert "stream redrive: unknown reason" in capsys.readouterr().err


# --- a write that fails partway through a round ---------------------------------------------------------------


class FailingProducer(FakeProducer):
    """Fails the k-th record it is given (1-based): `send` raises (`how="send"`), or its ack fails (`"ack"`)."""

    def __init__(self, k: int, how: str) -> None:
        super().__init__()
        self.k, self.how, self.given, self.pending = k, how, 0, []

    async def send(self, topic, value=None, key=None, headers=None):
        self.given += 1
        if self.given == self.k and self.how == "send":
            raise RuntimeError("buffer full")
        done = asyncio.get_running_loop().create_future()
        self.pending.append(done)
        if self.given == self.k:
            done.set_exception(RuntimeError("not acknowledged"))
        else:
            self.sent.append((topic, key, value, headers))
            asyncio.get_running_loop().call_soon(done.set_result, None)  # acknowledged a bit later
        return done


def _from(sent) -> list[bytes]:
    return [dict(h)[FROM_HEADER] for _, _, _, h in sent]


@pytest.mark.parametrize("how", ["send", "ack"])
async def test_a_failed_write_keeps_what_was_acknowledged_and_the_next_run_repeats_nothing(how):
    p0, p1 = TP("samples.dlq", 0), TP("samples.dlq", 1)
    batch = {p0: [dead(0), dead(1), dead(2)], p1: [dead(0), dead(1)]}
    producer = FailingProducer(2, how)  # samples.dlq/0/1 fails
    run, tally, cursor = make_run(producer=producer)
    with pytest.raises(rd.RedriveError, match=r"failed.*acknowledged is committed"):
        await run.process(batch, {p0: 9, p1: 9})
    assert all(f.done() for f in producer.pending)  # nothing left in flight for producer.stop() to deliver
    first = _from(producer.sent)
    assert cursor["api_rejected"][0] == 1  # just before the failed record
    if how == "send":  # nothing after the failure went out: partition 1 stays where it was
        assert first == [b"samples.dlq/0/0"] and 1 not in cursor["api_rejected"]
    else:  # the others went out and were acknowledged
        assert cursor["api_rejected"][1] == 2
    assert tally.sent_total == len(first)
    again = FakeProducer()
    run2, _, cursor2 = make_run(producer=again, cursor={r: dict(c) for r, c in cursor.items()})
    await run2.process(batch, {p0: 9, p1: 9})
    both = first + _from(again.sent)
    assert set(both) == {f"samples.dlq/{p}/{o}".encode() for p, o in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]}
    twice = sorted(x for x in set(both) if both.count(x) > 1)
    # only a record acknowledged after the failed one of its own partition can go twice (a cursor is one offset)
    assert twice == ([] if how == "send" else [b"samples.dlq/0/2"])
    assert cursor2["api_rejected"] == {0: 3, 1: 2}


async def test_a_missing_destination_in_the_middle_of_a_round_writes_nothing_of_it(monkeypatch):
    async def topics(_options):
        return {"samples": 4}

    monkeypatch.setattr(redrive_kafka, "_topic_partitions", topics)
    producer = FakeProducer()
    run, _, cursor = make_run(producer=producer)
    p0 = TP("samples.dlq", 0)
    elsewhere = Record(1, T0, [(rd.ERROR_REASON, b"api_rejected"), (rd.SOURCE_TOPIC, b"gone-topic"),
                               (rd.SOURCE_PARTITION, b"0"), (rd.SOURCE_OFFSET, b"5")], EVENT)
    with pytest.raises(rd.RedriveError, match=r"'gone-topic'.*does not exist.*nothing of this round was written"):
        await run.process({p0: [dead(0), elsewhere, dead(2)]}, {p0: 9})
    assert producer.sent == [] and cursor["api_rejected"] == {}
    run2, _, _ = make_run(producer=producer, cursor=cursor)
    with pytest.raises(rd.RedriveError):
        await run2.process({p0: [dead(0), elsewhere, dead(2)]}, {p0: 9})
    assert producer.sent == []  # a run again fails at the same place without writing anything twice


class FakeCommitter:
    def __init__(self, held: dict[int, int] | None = None) -> None:
        self.commits: list[dict] = []
        self.held = dict(held or {})  # what the group holds

    async def committed(self, tp):
        return self.held.get(tp.partition)

    async def commit(self, offsets):
        self.commits.append({tp.partition: o for tp, o in offsets.items()})
        self.held.update(self.commits[-1])


async def test_progress_is_never_committed_backwards():
    committer = FakeCommitter({0: 50, 1: 5})
    saved = {"api_rejected": {0: 50, 1: 5}}  # what the group holds
    cursor = {"api_rejected": {0: 10, 1: 7, 2: 3}}  # a --from-beginning run after a few records
    await redrive_kafka._commit({"api_rejected": committer}, cursor, saved, "samples.dlq")
    assert committer.commits == [{1: 7, 2: 3}]
    assert saved == {"api_rejected": {0: 50, 1: 7, 2: 3}}
    await redrive_kafka._commit({"api_rejected": committer}, cursor, saved, "samples.dlq")
    assert len(committer.commits) == 1


# --- the command line: a --since in the future, the report on an error, a DLQ not there yet -----------------------


def test_a_since_in_the_future_is_a_usage_error(capsys):
    with pytest.raises(ValueError, match="in the future"):
        request_of("--since", "2026-11-29T13:00:00Z")
    assert request_of("--since", "2026-11-29T12:00:00Z").criteria.since_ms == T0
    assert rd.main(["--since", "2999-01-01"], env={}) == 2
    assert "in the future" in capsys.readouterr().err


def _fake_redrive(monkeypatch, behaviour):
    monkeypatch.setattr("stream.logs.configure", lambda level: None)

    async def fake(settings, request, *, progress=None, stop=None):
        return behaviour()

    monkeypatch.setattr(redrive_kafka, "redrive", fake)


def test_the_report_is_printed_before_the_error_that_ends_a_run(capsys, monkeypatch):
    def fails():
        tally = Tally(read=3)
        tally.sent["api_rejected"] = 2
        raise rd.RedriveError("writing redriven records failed (boom)", tally=tally)

    _fake_redrive(monkeypatch, fails)
    assert rd.main([], env={}) == 1
    out = capsys.readouterr()
    assert "read 3 records" in out.out and "writing redriven records failed" in out.err
    assert next(line for line in out.out.splitlines() if line.startswith("  total")).split()[1] == "2"


def test_a_dlq_that_does_not_exist_yet_is_nothing_to_redrive(capsys, monkeypatch):
    monkeypatch.setattr("stream.logs.configure", lambda level: None)

    async def topics(_options):
        return {"samples": 4}

    monkeypatch.setattr(redrive_kafka, "_topic_partitions", topics)
    assert rd.main([], env={"STREAM_DLQ_TOPIC": "samples.dlq"}) == 0
    assert "nothing to redrive: samples.dlq does not exist yet" in capsys.readouterr().err


def test_a_follow_stopped_by_a_signal_exits_0(capsys, monkeypatch):
    _fake_redrive(monkeypatch, lambda: rd.Outcome(0, Tally()))  # what redrive() returns for a stopped --follow
    assert rd.main(["--follow"], env={}) == 0


def test_shown_values_cannot_drive_the_terminal():
    decision = rd.Decision(Verdict.SEND, "api_rejected", 0, "samples", b"u\x1b[2J")
    text = redrive_kafka._shown("samples.dlq/0/1", decision, b'{"a":"\x1b]0;x\x07\x7f\xc2\x9b\n\xc3\xa9"}')
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in text)
    assert "\\x1b[2J" in text and "\\x07" in text and "\\x7f" in text and "\\x9b" in text and "\\x0a" in text
    assert "é" in text


async def test_another_redrive_of_the_same_reason_stops_this_one():
    committer = FakeCommitter({0: 5})
    saved = {"api_rejected": {0: 5}}
    cursor = {"api_rejected": {0: 8}}
    await redrive_kafka._commit({"api_rejected": committer}, cursor, saved, "samples.dlq")
    committer.held[0] = 20  # another run committed
    cursor["api_rejected"][0] = 12
    with pytest.raises(rd.RedriveError, match="another redrive of api_rejected is running"):
        await redrive_kafka._commit({"api_rejected": committer}, cursor, saved, "samples.dlq")
    assert committer.commits == [{0: 8}] and committer.held[0] == 20
