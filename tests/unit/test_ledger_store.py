"""The ledger store's pure parts: topic configs, the partition check, the per-device summary and its times."""

from __future__ import annotations

import msgspec
import pytest

from stream.ledger_format import DeviceSamples, LedgerRecord, encode_record, pack
from stream.ledger_store import (
    DAY_MS,
    LedgerTopicError,
    _user_filter,
    check_partitions,
    format_table,
    iso_utc,
    ledger_topic_configs,
    summarise,
)

SECOND = 10**9


def test_configs_keep_records_a_day_beyond_the_horizon():
    configs = ledger_topic_configs(3 * 86400)
    assert configs == {
        "cleanup.policy": "compact,delete",
        "retention.ms": str(4 * DAY_MS),
        "segment.ms": "3600000",
        "delete.retention.ms": str(DAY_MS),
    }
    with pytest.raises(ValueError):
        ledger_topic_configs(0)


def test_partition_check_names_every_wider_input_topic_and_the_count_to_alter_to():
    check_partitions("l", 4, {"a": 4, "b": 2})  # as many, or fewer: fine
    with pytest.raises(LedgerTopicError) as refused:
        check_partitions("l", 4, {"a": 6, "b": 12, "c": 4})
    message = str(refused.value)
    assert "'a' has 6" in message and "'b' has 12" in message and "'c'" not in message
    assert "--alter --topic l --partitions 12" in message


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_500_000, "1970-01-01T00:00:00.001500Z"),
        (SECOND + 1, "1970-01-01T00:00:01.000000001Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
        (1_714_000_000 * SECOND + 120_000_000, "2024-04-24T23:06:40.120Z"),
    ],
)
def test_iso_utc_shows_as_many_fraction_digits_as_needed(nanos, text):
    assert iso_utc(nanos) == text


def value(user: str, data_type: str, devices: dict[str, list[tuple[int, int]]]) -> bytes:
    packed = [DeviceSamples(d, pack([s for s, _ in p]), pack([f for _, f in p])) for d, p in devices.items()]
    record = LedgerRecord(user, data_type, packed)
    return encode_record(record)[1]


def test_summary_counts_distinct_samples_and_records_per_data_type_and_device():
    values = [
        value("u", "steps", {'"W"': [(5, 1), (9, 2)], '"P"': [(7, 1)]}),
        value("u", "steps", {'"W"': [(9, 2), (3, 2)], '"E"': []}),  # (9, 2) again: one sample; "E" holds none
        value("u", "hr", {'"W"': [(1, 1)]}),
    ]
    summaries = summarise(values)
    assert [(s.data_type, s.device, s.records, s.samples, s.oldest, s.watermark) for s in summaries] == [
        ("hr", '"W"', 1, 1, iso_utc(1), iso_utc(1)),
        ("steps", '"P"', 1, 1, iso_utc(7), iso_utc(7)),
        ("steps", '"W"', 2, 3, iso_utc(3), iso_utc(9)),
    ]
    table = format_table(summaries).splitlines()
    assert table[0].split() == ["DATA", "TYPE", "DEVICE", "RECORDS", "SAMPLES", "OLDEST", "WATERMARK"]
    assert table[3].split() == ["steps", '"W"', "2", "3", iso_utc(3), iso_utc(9)]


def test_user_filter_matches_user_and_data_type_exactly_and_skips_foreign_keys():
    key = encode_record(LedgerRecord("ann", "steps", []))[0]
    assert _user_filter("ann", None)(key) and _user_filter("ann", "steps")(key)
    assert not _user_filter("an", None)(key) and not _user_filter("ann", "hr")(key)
    assert not _user_filter("ann", None)(None)
    assert not _user_filter("ann", None)(b"not msgpack \xc1")
    assert not _user_filter("ann", None)(msgspec.msgpack.encode({"user_id": "ann"}))
