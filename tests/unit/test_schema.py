"""decode_record: the Samples API rules (shared/seeds doc) and the README's input contract, applied to Kafka
record values; what is forwarded is the producer's text."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

import pytest

from stream.schema import REASONS, Decoded, Rejection, as_single_event, batch_body, decode_record

USER = "85b4453a-46de-484c-bbc2-12666ebc7ed9"
DROP = object()  # a field value meaning "leave the field out"


# -- helpers -------------------------------------------------------------------------------------------


def sample(**changes: object) -> dict:
    """One sample like the doc's example; `field=DROP` leaves a field out."""
    fields: dict[str, object] = {
        "device_name": "iPhone",
        "device_version": "17.0.3",
        "start_date": "2023-11-01T08:04:51.000+04:00",
        "end_date": "2023-11-01T08:04:58.000+04:00",
        "value": 14,
        "unit": "count",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not DROP}


def event(user_id: object = USER, data_type: object = "steps", **changes: object) -> bytes:
    """A single-sample event: the sample's fields inline next to user_id and data_type."""
    head = {"user_id": user_id, "data_type": data_type}
    return json.dumps({k: v for k, v in head.items() if v is not DROP} | sample(**changes)).encode()


def bundle(*samples: dict, user_id: str = USER, data_type: str = "steps") -> bytes:
    """An event shaped like the API's request body."""
    return json.dumps({"user_id": user_id, "data_type": data_type, "data": list(samples)}).encode()


def raw_event(**raw_json: str) -> bytes:
    """A single-sample event whose given fields are spliced in as raw JSON text (e.g. value='1e400')."""
    value = event(**dict.fromkeys(raw_json, DROP))
    extra = ",".join(f'"{name}":{text}' for name, text in raw_json.items())
    return value[:-1] + b"," + extra.encode() + b"}"


def accepted(value: bytes) -> Decoded:
    result = decode_record(value)
    assert isinstance(result, Decoded), result
    assert result.rejections == []
    return result


def rejected(value: bytes | None) -> Rejection:
    result = decode_record(value)
    assert isinstance(result, Rejection), result
    assert result.reason in REASONS
    return result


def body_of(decoded: Decoded, index: int = 0) -> dict:
    return json.loads(decoded.samples[index].body)


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def epoch_ns(text: str) -> int:
    """An RFC 3339 timestamp's epoch nanoseconds, rounded down, worked out apart from the code under test."""
    match = re.fullmatch(r"(.{10}).(.{8})(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)", text)
    assert match is not None, text
    day, clock, fraction, zone = match.groups()
    whole = datetime.fromisoformat(f"{day}T{clock}{'+00:00' if zone in 'Zz' else zone}")
    return int(whole.timestamp()) * 10**9 + int((fraction or "")[:9].ljust(9, "0"))


def letter_of(decoded: Decoded | Rejection) -> Rejection:
    """The one dead letter a bundle record gave."""
    assert isinstance(decoded, Decoded), decoded
    (rejection,) = decoded.rejections
    return rejection


def replayed_reason(letter: bytes) -> str:
    """The reason a dead letter is refused for when it is fed back as input: the record's, or that of the one
    sample of a bundle of one (what a sample that is not an object or not text goes as)."""
    replay = decode_record(letter)
    if isinstance(replay, Rejection):
        assert replay.value == letter
        return replay.reason
    assert replay.samples == []
    (rejection,) = replay.rejections
    assert rejection.value == letter
    return rejection.reason


# -- the doc's example ---------------------------------------------------------------------------------


def test_the_docs_example_bundle_is_accepted_whole():
    first = sample()
    second = sample(start_date="2023-11-01T09:47:21.000+04:00", end_date="2023-11-01T09:47:34.000+04:00", value=24)
    decoded = accepted(bundle(first, second))

    assert (decoded.user_id, decoded.data_type) == (USER, "steps")
    assert [body_of(decoded, i)["value"] for i in range(2)] == [14, 24]
    assert decoded.samples[0].start == instant("2023-11-01T08:04:51+04:00").timestamp() * 10**9


def test_a_single_sample_event_gives_one_sample_for_its_user_and_type():
    decoded = accepted(event(data_type="bpm", unit="count/min", value=72))

    assert (decoded.user_id, decoded.data_type) == (USER, "bpm")
    assert len(decoded.samples) == 1
    assert body_of(decoded)["value"] == 72


# -- required fields -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["device_name", "start_date", "unit", "value"])
def test_a_single_event_without_a_required_sample_field_is_rejected(field):
    assert rejected(event(**{field: DROP})).reason == "missing_field"


@pytest.mark.parametrize("field", ["device_name", "start_date", "unit", "value"])
def test_a_single_event_with_a_null_required_sample_field_is_rejected(field):
    assert rejected(event(**{field: None})).reason == "missing_field"


@pytest.mark.parametrize("field", ["device_name", "start_date", "unit", "value"])
def test_a_bundle_sample_without_a_required_field_is_rejected_alone(field):
    decoded = decode_record(bundle(sample(), sample(**{field: DROP})))

    assert isinstance(decoded, Decoded)
    assert len(decoded.samples) == 1
    assert [r.reason for r in decoded.rejections] == ["missing_field"]


@pytest.mark.parametrize("field", ["device_name", "start_date", "unit", "value"])
def test_a_bundle_sample_with_a_null_required_field_is_missing_field_like_its_replay(field):
    decoded = decode_record(bundle(sample(), sample(**{field: None})))

    assert isinstance(decoded, Decoded)
    assert [r.reason for r in decoded.rejections] == ["missing_field"]


@pytest.mark.parametrize("field", ["end_date", "device_version"])
@pytest.mark.parametrize("how", [DROP, None], ids=["absent", "null"])
def test_optional_fields_may_be_absent_or_null(field, how):
    decoded = accepted(event(**{field: how}))

    assert field not in body_of(decoded)


@pytest.mark.parametrize("field", ["user_id", "data_type"])
def test_an_event_without_user_id_or_data_type_is_rejected(field):
    assert rejected(event(**{field: DROP})).reason == "missing_field"
    assert rejected(bundle(sample()).replace(f'"{field}"'.encode(), b'"other"', 1)).reason == "missing_field"


@pytest.mark.parametrize("field", ["user_id", "data_type"])
def test_a_null_user_id_or_data_type_is_missing_field(field):
    assert rejected(event(**{field: None})).reason == "missing_field"


@pytest.mark.parametrize("user_id", ["", 42, ["u1"]])
def test_user_id_must_be_a_non_empty_string(user_id):
    assert rejected(event(user_id=user_id)).reason == "invalid_user_id"


@pytest.mark.parametrize("device_name", ["", 7])
def test_device_name_must_be_a_non_empty_string(device_name):
    assert rejected(event(device_name=device_name)).reason == "invalid_field"


# -- data_type and unit --------------------------------------------------------------------------------


@pytest.mark.parametrize("data_type", ["steps", "bpm"])
def test_steps_and_bpm_are_the_accepted_data_types(data_type):
    assert accepted(event(data_type=data_type)).data_type == data_type


@pytest.mark.parametrize("data_type", ["heart_rate", "Steps", "BPM", "", 1])
def test_any_other_data_type_is_rejected(data_type):
    assert rejected(event(data_type=data_type)).reason == "invalid_data_type"
    assert rejected(bundle(sample(), data_type=data_type)).reason == "invalid_data_type"


@pytest.mark.parametrize("unit", ["count", "count/min", "count/s"])
def test_the_three_documented_units_are_accepted(unit):
    assert body_of(accepted(event(unit=unit, value=10)))["unit"] == unit


@pytest.mark.parametrize("unit", ["Count", "counts", "count/h", "bpm", "", 1])
def test_any_other_unit_is_rejected(unit):
    assert rejected(event(unit=unit)).reason == "invalid_unit"


# -- value ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "value"),
    [
        ("count", 5e-324),  # the tiniest positive float
        ("count", 1),
        ("count", 30000),
        ("count", 30000.0),
        ("count/min", 0.001),
        ("count/min", 300),
        ("count/min", 300.0),
        ("count/s", 1e9),
        ("count/s", 10**12),
    ],
)
def test_values_within_the_units_limits_are_accepted(unit, value):
    assert body_of(accepted(event(unit=unit, value=value)))["value"] == value


@pytest.mark.parametrize(
    ("unit", "value", "reason"),
    [
        ("count", 0, "invalid_value"),
        ("count", 0.0, "invalid_value"),
        ("count", -1, "invalid_value"),
        ("count/s", -0.5, "invalid_value"),
        ("count", 30001, "value_above_max"),
        ("count", 30000.01, "value_above_max"),
        ("count/min", 301, "value_above_max"),
        ("count/min", 300.5, "value_above_max"),
        ("count", True, "invalid_value"),
        ("count", "14", "invalid_value"),
        ("count", [14], "invalid_value"),
    ],
)
def test_values_outside_the_rules_are_rejected(unit, value, reason):
    assert rejected(event(unit=unit, value=value)).reason == reason


@pytest.mark.parametrize("text", ["1e400", "-1e400"])
def test_a_value_too_large_for_a_float_is_rejected_not_sent_as_infinity(text):
    assert rejected(raw_event(value=text)).reason == "invalid_value"


@pytest.mark.parametrize("text", ["NaN", "Infinity"])
def test_non_finite_json_extensions_are_not_json(text):
    assert rejected(raw_event(value=text)).reason == "malformed_json"


def test_count_per_second_has_no_maximum():
    decoded = accepted(raw_event(unit='"count/s"', value="1000000000"))

    assert body_of(decoded)["value"] == 1_000_000_000


# -- dates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [
        "2023-11-01T08:04:51Z",
        "2023-11-01T08:04:51.000+04:00",
        "2023-11-01T08:04:51.123456-05:30",
        "2023-11-01T08:04:51+00:00",
    ],
)
def test_iso_8601_timestamps_with_an_offset_are_accepted_at_the_right_instant(start):
    decoded = accepted(event(start_date=start, end_date=DROP))

    assert decoded.samples[0].start == epoch_ns(start)
    assert body_of(decoded)["start_date"] == start


@pytest.mark.parametrize(
    "start",
    [
        "2023-11-01T08:04:51",  # no offset: ambiguous, a documented decision to refuse it
        "2023-11-01T08:04:51.000",
        "2023-11-01",
        "08:04:51Z",
        "yesterday",
        "",
        "2023-13-01T08:04:51Z",
        "2023-11-01T25:04:51Z",
    ],
)
def test_timestamps_without_an_offset_or_not_iso_are_rejected(start):
    assert rejected(event(start_date=start, end_date=DROP)).reason == "invalid_date"


def test_a_numeric_timestamp_is_rejected():
    assert rejected(event(start_date=1698825891, end_date=DROP)).reason == "invalid_date"


def test_an_end_date_without_an_offset_is_rejected():
    assert rejected(event(end_date="2023-11-01T08:04:58")).reason == "invalid_date"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2023-11-01T08:30:00Z", "2023-11-01T08:30:00Z"),  # equal
        ("2023-11-01T08:30:00Z", "2023-11-01T08:30:00.001Z"),
        ("2023-11-01T10:30:00+02:00", "2023-11-01T08:30:00Z"),  # the same instant, other offsets
        ("2023-11-01T08:30:00Z", "2023-11-01T10:31:00+02:00"),  # 08:31Z
    ],
)
def test_an_end_date_not_earlier_than_the_start_is_accepted(start, end):
    accepted(event(start_date=start, end_date=end))


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2023-11-01T08:30:00Z", "2023-11-01T08:29:59.999Z"),
        ("2023-11-01T08:30:00Z", "2023-11-01T10:00:00+02:00"),  # 08:00Z: earlier, though 10:00 > 08:30
        ("2023-11-01T08:30:00-01:00", "2023-11-01T09:00:00Z"),  # start is 09:30Z
    ],
)
def test_an_end_date_earlier_than_the_start_is_rejected_comparing_instants(start, end):
    assert rejected(event(start_date=start, end_date=end)).reason == "end_before_start"
    assert [r.reason for r in decode_record(bundle(sample(start_date=start, end_date=end))).rejections] == [
        "end_before_start"
    ]


# -- values that are not a sample event ----------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b"{", b"not json", b'{"user_id": "u",}', b"\xff\xfe", event() + b" {}"])
def test_malformed_json_is_rejected_with_the_original_bytes(value):
    rejection = rejected(value)

    assert rejection.reason == "malformed_json"
    assert rejection.value == value


@pytest.mark.parametrize(
    "value",
    [
        event(user_id="u-LATIN1").replace(b"LATIN1", "ü".encode("latin-1")),
        event(device_name="LATIN1").replace(b"LATIN1", "ü".encode("latin-1")),
    ],
    ids=["user_id", "device_name"],
)
def test_latin_1_text_inside_a_string_is_malformed_json_not_an_exception(value):
    assert rejected(value).reason == "malformed_json"


def test_a_latin_1_sample_in_a_bundle_is_rejected_alone():
    value = bundle(sample(value=1), sample(device_name="LATIN1")).replace(b"LATIN1", "ü".encode("latin-1"))

    decoded = decode_record(value)

    assert isinstance(decoded, Decoded)
    assert [body_of(decoded)["value"]] == [1]
    (rejection,) = decoded.rejections
    assert rejection.reason == "malformed_json"
    assert rejection.value.startswith(b'{"user_id":"%s","data_type":"steps","data":[' % USER.encode())
    assert replayed_reason(rejection.value) == "malformed_json"


@pytest.mark.parametrize(
    "value",
    [
        b'{"a":' * 100_000,
        event()[:-1] + b',"extra":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        bundle(sample())[:-2] + b"," + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    ],
    ids=["unclosed", "deep_extra_field", "deep_bundle_element"],
)
def test_absurdly_deep_nesting_is_malformed_json_not_an_exception(value):
    assert rejected(value).reason == "malformed_json"


@pytest.mark.parametrize("value", [b"[1, 2]", json.dumps([json.loads(event())]).encode(), b'"steps"', b"3", b"null"])
def test_json_that_is_not_an_object_is_rejected(value):
    assert rejected(value).reason == "not_an_object"


def test_a_tombstone_is_rejected_with_an_empty_value():
    rejection = rejected(None)

    assert rejection.reason == "malformed_json"
    assert rejection.value == b""


def test_an_empty_bundle_is_rejected():
    assert rejected(bundle()).reason == "empty_bundle"


def test_a_bundle_whose_data_is_not_an_array_is_rejected():
    value = json.dumps({"user_id": USER, "data_type": "steps", "data": sample()}).encode()

    assert rejected(value).reason == "invalid_field"


def test_data_null_means_a_single_sample_event():
    value = json.dumps(json.loads(event()) | {"data": None}).encode()

    assert len(accepted(value).samples) == 1


# -- bundles: the valid go on, each invalid one is rejected alone ----------------------------------------

INVALID_SAMPLES = {
    "invalid_value": sample(value=0),
    "value_above_max": sample(value=30001),
    "end_before_start": sample(end_date="2023-11-01T08:00:00.000+04:00"),
    "invalid_date": sample(start_date="2023-11-01T08:04:51"),
    "invalid_unit": sample(unit="steps"),
    "missing_field": sample(unit=DROP),
    "invalid_field": sample(device_name=""),
}


def test_a_bundle_keeps_its_valid_samples_and_rejects_each_invalid_one():
    good = [sample(value=v) for v in (1, 2, 3)]
    bad = list(INVALID_SAMPLES.values())
    decoded = decode_record(bundle(good[0], bad[0], good[1], *bad[1:], good[2]))

    assert isinstance(decoded, Decoded)
    assert [body_of(decoded, i)["value"] for i in range(3)] == [1, 2, 3]
    assert [r.reason for r in decoded.rejections] == list(INVALID_SAMPLES)
    assert decoded.rejections[0].message.startswith("data[1]: ")
    assert decoded.rejections[1].message.startswith("data[3]: ")


def test_a_bundle_of_only_invalid_samples_yields_rejections_and_no_samples():
    decoded = decode_record(bundle(sample(value=0), sample(value=-1)))

    assert isinstance(decoded, Decoded)
    assert decoded.samples == []
    assert [r.reason for r in decoded.rejections] == ["invalid_value", "invalid_value"]


@pytest.mark.parametrize(("reason", "bad"), INVALID_SAMPLES.items(), ids=list(INVALID_SAMPLES))
def test_a_rejected_bundle_sample_replays_as_a_single_event_with_the_same_reason(reason, bad):
    decoded = decode_record(bundle(sample(), bad, user_id="user-7", data_type="bpm"))
    assert isinstance(decoded, Decoded)
    (rejection,) = decoded.rejections

    replayed = rejected(rejection.value)
    assert replayed.reason == reason
    assert json.loads(rejection.value)["user_id"] == "user-7"
    assert json.loads(rejection.value)["data_type"] == "bpm"


@pytest.mark.parametrize(("reason", "bad"), INVALID_SAMPLES.items(), ids=list(INVALID_SAMPLES))
def test_a_fixed_dead_letter_replays_into_an_accepted_sample(reason, bad):
    decoded = decode_record(bundle(bad))
    assert isinstance(decoded, Decoded)
    fixed = json.loads(decoded.rejections[0].value) | sample()

    assert len(accepted(json.dumps(fixed).encode()).samples) == 1


@pytest.mark.parametrize("element", [None, 1, "x", [1]])
def test_a_non_object_bundle_element_goes_as_a_bundle_of_one_with_its_user(element):
    decoded = decode_record(bundle(sample(), element, user_id="user-7"))  # type: ignore[arg-type]
    rejection = letter_of(decoded)

    assert rejection.reason == "not_an_object"
    assert json.loads(rejection.value) == {"user_id": "user-7", "data_type": "steps", "data": [element]}
    assert replayed_reason(rejection.value) == "not_an_object"


def test_a_stray_data_field_in_a_refused_sample_does_not_change_its_replay():
    decoded = decode_record(bundle(sample(value=30001, data=[])))
    assert isinstance(decoded, Decoded)
    (rejection,) = decoded.rejections

    assert rejected(rejection.value).reason == "value_above_max"


def test_a_stray_user_id_in_a_refused_sample_keeps_the_bundles_user_on_replay():
    decoded = decode_record(bundle(sample(value=0, user_id="someone-else"), user_id="owner"))
    assert isinstance(decoded, Decoded)
    fixed = re.sub(rb'"value": ?0', b'"value": 5', decoded.rejections[0].value)
    assert fixed != decoded.rejections[0].value

    assert accepted(fixed).user_id == "owner"


def test_a_refused_sample_with_an_out_of_range_number_still_names_its_user_in_the_dead_letter():
    value = bundle(sample(value=12345), user_id="user-7").replace(b"12345", b"1e400")
    decoded = decode_record(value)
    assert isinstance(decoded, Decoded)
    (rejection,) = decoded.rejections
    assert rejection.reason == "invalid_value"

    fixed = rejection.value.replace(b"1e400", b"5")

    assert accepted(fixed).user_id == "user-7"


def test_a_sample_the_api_refused_replays_from_its_encoded_bytes():
    original = accepted(event(user_id="user-9", data_type="bpm", unit="count/min", value=61.5))

    replay = accepted(as_single_event("user-9", "bpm", original.samples[0].body))

    assert replay.samples == original.samples
    assert (replay.user_id, replay.data_type) == ("user-9", "bpm")


@pytest.mark.parametrize("sample_json", [b"{}", b"  {  }  ", b' {"value": 0} '])
def test_as_single_event_always_produces_a_json_object(sample_json):
    value = json.loads(as_single_event('a "quoted" user', "steps", sample_json))

    assert value["user_id"] == 'a "quoted" user'
    assert value["data_type"] == "steps"


# -- the encoded sample bytes --------------------------------------------------------------------------


def test_the_body_holds_the_samples_own_fields_as_written():
    fields = sample(value=14.25, unit="count/s")
    decoded = accepted(bundle(fields))

    assert json.loads(decoded.samples[0].body) == fields


def test_integer_values_stay_integers_and_floats_stay_floats():
    ints = accepted(event(value=14))
    floats = accepted(event(value=14.5))

    assert b'"value":14.0' not in ints.samples[0].body
    assert type(body_of(ints)["value"]) is int
    assert type(body_of(floats)["value"]) is float


def test_unknown_fields_are_dropped_from_the_api_body():
    decoded = accepted(bundle(sample(heart="rate", extra={"nested": 1})))
    single = accepted(event(source="healthkit"))

    allowed = {"device_name", "device_version", "start_date", "end_date", "unit", "value"}
    assert set(body_of(decoded)) == allowed
    assert set(body_of(single)) == allowed


def test_the_sort_key_is_the_start_instant_whatever_the_offset():
    decoded = accepted(
        bundle(
            sample(start_date="2023-11-01T10:00:00+02:00", end_date=DROP),  # 08:00Z
            sample(start_date="2023-11-01T07:30:00Z", end_date=DROP),
        )
    )

    assert decoded.samples[0].start == int(datetime(2023, 11, 1, 8, tzinfo=UTC).timestamp()) * 10**9
    assert decoded.samples[1].start < decoded.samples[0].start


# -- batch_body ----------------------------------------------------------------------------------------


def test_batch_body_is_the_apis_request_shape():
    decoded = accepted(bundle(sample(value=1), sample(value=2), sample(value=3)))
    bodies = [s.body for s in decoded.samples]

    body = json.loads(batch_body(USER, "steps", bodies))

    assert body == {"user_id": USER, "data_type": "steps", "data": [json.loads(b) for b in bodies]}


def test_batch_body_escapes_the_user_id():
    user = 'quote " back \\ slash ünï'

    assert json.loads(batch_body(user, "bpm", []))["user_id"] == user


def test_a_parked_batch_body_decodes_back_to_the_same_samples():
    decoded = accepted(bundle(sample(value=1), sample(value=2.5, unit="count/s")))

    again = accepted(batch_body(decoded.user_id, decoded.data_type, [s.body for s in decoded.samples]))

    assert again == decoded


# -- issue 10 · fidelity: each field goes to the API as the producer wrote it --------------------------------


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("start_date", '"2023-11-01T08:04:51.000+04:00"'),  # ".000" kept
        ("start_date", '"2023-11-01T08:04:51.123+04:00"'),  # not ".123000"
        ("start_date", '"2023-11-01T08:04:51+00:00"'),  # not "Z"
        ("start_date", '"2023-11-01T08:04:51-00:00"'),
        ("start_date", '"2023-11-01T08:04:51.123456789Z"'),  # not rounded to microseconds
        ("start_date", '"2023-12-31T23:59:59.9999995Z"'),  # not the next day
        ("start_date", '"2023-11-01T08:04:5\\u0031Z"'),  # an escape stays an escape
        ("value", "3e4"),  # not 30000.0
        ("value", "30000.000"),
        ("value", "1.2345678901234567890123"),  # more digits than a double holds
        ("value", "14"),
        ("value", "1E+1"),
        ("device_name", '"J\\u00fcrgen\\u2019s \\ud83d\\ude00 Watch"'),  # escapes, a surrogate pair
        ("device_name", '"J\u00fcrgen\u2019s Watch"'),  # UTF-8, as is
        ("device_name", '"a \\"quoted\\" \\/ name"'),
        ("device_version", '""'),
        ("unit", '"count\\/s"'),  # the same unit, spelled with an escape
    ],
)
def test_each_field_is_forwarded_exactly_as_written(field, text):
    if field == "unit":
        value = raw_event(unit=text, value="5")
    elif field == "value":
        value = raw_event(value=text)
    else:
        value = raw_event(**{field: text, "end_date": '"2023-12-31T23:59:59.9999999Z"'} if field == "start_date"
                          else {field: text})
    decoded = accepted(value)

    assert f'"{field}":{text}'.encode() in decoded.samples[0].body
    assert accepted(bundle_of_bodies([decoded.samples[0].body])).samples == decoded.samples


def bundle_of_bodies(bodies: list[bytes]) -> bytes:
    return b'{"user_id":"u","data_type":"steps","data":[' + b",".join(bodies) + b"]}"


def test_the_body_is_the_field_texts_in_a_fixed_order_without_unknown_fields_or_nulls():
    value = (b'{ "value" : 14 , "unit":"count","note":{"a":[1,"x"]},"end_date":null, "device_name" : "iPhone",'
             b'"user_id":"u","start_date":"2023-11-01T08:04:51.000+04:00","data_type":"steps","device_version":null}')

    (valid,) = accepted(value).samples

    assert valid.body == (
        b'{"device_name":"iPhone","start_date":"2023-11-01T08:04:51.000+04:00","unit":"count","value":14}'
    )


def test_the_fast_and_the_detailed_way_give_the_same_bytes():
    plain = accepted(event()).samples[0]
    with_unknown_field = accepted(event(note="x")).samples[0]

    assert plain == with_unknown_field


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2023-11-01T08:04:51.000000001Z", "2023-11-01T08:04:51Z"),  # a nanosecond earlier
        ("2023-11-01T08:04:51.0000000001Z", "2023-11-01T08:04:51Z"),  # a tenth of one
        ("2023-11-01T08:04:51.1234567Z", "2023-11-01T08:04:51.123456Z"),
        ("2023-11-01T08:04:51.0000005+00:00", "2023-11-01T08:04:51-00:00"),
    ],
)
def test_an_end_date_earlier_by_less_than_a_microsecond_is_end_before_start(start, end):
    assert rejected(event(start_date=start, end_date=end)).reason == "end_before_start"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2023-11-01T08:04:51.1Z", "2023-11-01T08:04:51.100000000000Z"),  # equal, written longer
        ("2023-11-01T08:04:51.0000000001Z", "2023-11-01T08:04:51.0000000002Z"),
        ("2023-11-01T12:04:51.5+04:00", "2023-11-01T08:04:51.5Z"),
    ],
)
def test_an_end_date_not_earlier_by_any_amount_is_accepted(start, end):
    accepted(event(start_date=start, end_date=end))


def test_samples_a_nanosecond_apart_are_ordered():
    texts = ["2023-11-01T08:04:51.000000002Z", "2023-11-01T08:04:51.000000001Z", "2023-11-01T12:04:51+04:00"]
    decoded = accepted(bundle(*(sample(start_date=t, end_date=DROP) for t in texts)))

    assert [s.start for s in decoded.samples] == [epoch_ns(t) for t in texts]
    assert decoded.samples[2].start < decoded.samples[1].start < decoded.samples[0].start


def test_the_start_is_exact_where_a_double_or_a_microsecond_is_not():
    decoded = accepted(event(start_date="2023-12-31T23:59:59.999999999Z", end_date=DROP))

    assert decoded.samples[0].start == 1_704_067_199_999_999_999


# -- issue 10 · the right reason, and a dead letter that replays as the same problem ------------------------


@pytest.mark.parametrize(
    "value",
    [
        b'{"user_id":"","data_type":"ste',  # an earlier field breaks a rule: still not JSON
        raw_event(value="0x10"),
        raw_event(value="-"),
        raw_event(value="01"),
        raw_event(device_name='"unterminated'),
        event(user_id="") + b"}",
    ],
)
def test_not_json_is_malformed_json_whatever_else_is_wrong(value):
    assert rejected(value).reason == "malformed_json"


@pytest.mark.parametrize("where", ["unknown field", "key", "nested unknown field", "user_id"])
@pytest.mark.parametrize("poison", [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\\ud800", b"\\udc00", b"\\udc00\\ud800"])
def test_invalid_utf8_and_lone_surrogates_anywhere_are_malformed_json(where, poison):
    if where == "unknown field":
        value = event()[:-1] + b',"note":"a' + poison + b'"}'
    elif where == "key":
        value = event()[:-1] + b',"n' + poison + b'":1}'
    elif where == "nested unknown field":
        value = event()[:-1] + b',"note":{"a":["' + poison + b'"]}}'
    else:
        value = event(user_id="u-POISON").replace(b"POISON", poison)

    rejection = rejected(value)

    assert rejection.reason == "malformed_json"
    assert rejection.value == value


def test_a_surrogate_pair_is_text_not_poison():
    decoded = accepted(raw_event(device_name='"\\ud83d\\ude00"'))

    assert json.loads(decoded.samples[0].body)["device_name"] == "😀"


@pytest.mark.parametrize(
    "value",
    [
        raw_event(value="40000")[:-1] + b',"value":1}',  # value given twice: the last copy is valid
        event()[:-1] + b',"value":14}',  # twice, the same
        event()[:-1] + b',"v\\u0061lue":1}',  # the same key, spelled with an escape
        event()[:-1] + b',"user_id":"other"}',
        event()[:-1] + b',"note":1,"note":2}',  # even a key the service ignores
        event()[:-1] + b',"end_date":null}',
    ],
)
def test_a_key_given_twice_is_duplicate_field(value):
    assert rejected(value).reason == "duplicate_field"


def test_a_bundle_sample_with_a_key_twice_is_refused_alone_and_replays_so():
    element = b'{"device_name":"d","start_date":"2023-11-01T08:04:51Z","unit":"count","value":40000,"value":1}'
    value = bundle(sample()).replace(b"]}", b"," + element + b"]}")

    decoded = decode_record(value)

    assert isinstance(decoded, Decoded)
    assert len(decoded.samples) == 1
    rejection = letter_of(Decoded(decoded.user_id, decoded.data_type, [], decoded.rejections))
    assert rejection.reason == "duplicate_field"
    assert replayed_reason(rejection.value) == "duplicate_field"


def test_the_top_level_sample_fields_of_a_bundle_are_ignored():
    value = json.dumps({"user_id": "u", "data_type": "steps", "value": -1, "unit": "bananas",
                        "data": [sample(value=7)]}).encode()

    decoded = accepted(value)

    assert [body_of(decoded)["value"]] == [7]


def test_a_sample_with_a_lone_surrogate_does_not_sink_its_siblings():
    value = bundle(sample(value=1), sample(device_name="POISON"), sample(value=2)).replace(b"POISON", b"\\ud800")

    decoded = decode_record(value)

    assert isinstance(decoded, Decoded)
    assert [body_of(decoded, i)["value"] for i in range(2)] == [1, 2]
    assert [r.reason for r in decoded.rejections] == ["malformed_json"]
    assert replayed_reason(decoded.rejections[0].value) == "malformed_json"


def test_poison_outside_the_samples_sinks_the_bundle():
    value = bundle(sample(), user_id="u-POISON").replace(b"POISON", b"\\ud800")

    assert rejected(value).reason == "malformed_json"


def test_more_than_a_hundred_poisoned_strings_make_the_record_malformed():
    poisoned = [sample(device_name=f"POISON{i}") for i in range(101)]
    value = re.sub(rb"POISON\d+", b"\\\\ud800", bundle(sample(), *poisoned))

    assert rejected(value).reason == "malformed_json"


@pytest.mark.parametrize(
    "start",
    [
        "2023-11-01T08:04:51+0400",  # outside RFC 3339: refused, not rewritten
        "2023-11-01T08:04:51.000+0400",
        "2023-11-01t08:04:51Z",  # RFC 3339 allows lower case and a space; ISO 8601, the API's word, does not
        "2023-11-01T08:04:51z",
        "2023-11-01 08:04:51Z",
        "2023-11-01T08:04:51+04",
        "2023-11-01T08:04:51+04:00:00",
        "2023-11-01T08:04:51,5Z",
        "2023-11-01T08:04Z",
        "2023-12-31T23:59:60Z",  # a leap second: no POSIX clock shows it
        "2023-11-01T24:00:00Z",
        "2023-11-01T08:04:51+24:00",
        "2023-02-29T08:04:51Z",
        "0000-01-01T00:00:00Z",
        "20231101T080451Z",
        "2023-W44-3T08:04:51Z",
        "2023-11-01T08:04:51.Z",
        "2023-11-01T08:04:\uff151Z",  # a digit, but not an ASCII one
        " 2023-11-01T08:04:51Z",
    ],
)
def test_timestamps_outside_the_rfc_3339_profile_are_invalid_date(start):
    assert rejected(event(start_date=start, end_date=DROP)).reason == "invalid_date"
    assert rejected(event(end_date=start)).reason == "invalid_date"


@pytest.mark.parametrize("start", ["2024-02-29T00:00:00Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59"])
def test_timestamps_at_the_edges_of_the_calendar_are_accepted(start):
    assert accepted(event(start_date=start, end_date=DROP)).samples[0].start == epoch_ns(start)


@pytest.mark.parametrize(
    ("element", "reason"),
    [
        ({"start_date": None, "value": -1}, "missing_field"),  # the same reason in a bundle and alone
        ({"device_name": "d", "start_date": None, "unit": "count", "value": -1}, "missing_field"),
        ({"device_name": "d", "start_date": "x", "unit": "count", "value": -1}, "invalid_value"),
        ({"device_name": "d", "start_date": "x", "unit": "count", "value": 40000}, "invalid_date"),
    ],
)
def test_the_same_sample_gets_the_same_reason_in_a_bundle_and_alone(element, reason):
    rejection = letter_of(decode_record(bundle(element, user_id="user-3", data_type="bpm")))
    alone = json.dumps({"user_id": "user-3", "data_type": "bpm", **element}).encode()

    assert rejection.reason == reason
    assert rejected(alone).reason == reason
    assert json.loads(rejection.value) == json.loads(alone)
    assert replayed_reason(rejection.value) == reason


def test_a_sample_unreadable_as_text_keeps_its_user_in_its_dead_letter():
    value = b'{"user_id":"user-5","data_type":"bpm","data":[{"\xff":1}]}'

    rejection = letter_of(decode_record(value))

    assert rejection.reason == "malformed_json"
    assert rejection.value == value  # a bundle of that one sample: here, the record itself
    assert replayed_reason(rejection.value) == "malformed_json"


def test_copies_of_the_routing_fields_inside_a_refused_sample_are_dropped_from_its_letter():
    element = sample(value=0) | {"user_id": "other", "data_type": "sleep", "data": [1]}
    rejection = letter_of(decode_record(bundle(element, user_id="owner")))

    letter = json.loads(rejection.value)
    assert (letter["user_id"], letter["data_type"], "data" in letter) == ("owner", "steps", False)
    assert replayed_reason(rejection.value) == "invalid_value"


# -- issue 10 · numbers at the edges: judged on the text that is forwarded ---------------------------------------


@pytest.mark.parametrize(
    ("unit", "text", "reason"),
    [
        ("count", "1e-400", "invalid_value"),  # above 0, but any double parser reads 0
        ("count/s", "1e309", "invalid_value"),  # reads as infinity
        ("count/s", "1" + "0" * 400, "invalid_value"),
        ("count", "-0", "invalid_value"),
        ("count", "0e10", "invalid_value"),
        ("count", "0.000", "invalid_value"),
        ("count", "true", "invalid_value"),
        ("count", "null", "missing_field"),
        ("count", '"14"', "invalid_value"),
        ("count", "30000.000000000001", "value_above_max"),  # a double rounds it to 30000: the text is above
        ("count", "30000.0000000000000000000000000000001", "value_above_max"),
        ("count", "3.0000000000000001e4", "value_above_max"),
        ("count/min", "300.00000000000001", "value_above_max"),
        ("count", "30001", "value_above_max"),
    ],
)
def test_values_are_judged_exactly(unit, text, reason):
    assert rejected(raw_event(unit=f'"{unit}"', value=text)).reason == reason


@pytest.mark.parametrize(
    ("unit", "text"),
    [
        ("count", "30000.0000000000000000000"),
        ("count", "3e4"),
        ("count", "29999.999999999999999"),
        ("count/min", "300e0"),
        ("count", "5e-324"),  # the smallest double above 0
        ("count/s", "1e308"),  # count/s has no maximum but the double range
        ("count/s", "123456789012345678901234567890"),
    ],
)
def test_values_within_the_rules_to_the_last_digit_are_accepted(unit, text):
    decoded = accepted(raw_event(unit=f'"{unit}"', value=text))

    assert decoded.samples[0].body.endswith(b'"value":' + text.encode() + b"}")


# -- issue 10 · limits: one record costs a bounded time and a bounded dead-letter volume -------------------------


@pytest.mark.parametrize("field", ["user_id", "device_name", "device_version"])
def test_texts_of_up_to_256_characters_are_accepted_and_longer_ones_refused(field):
    assert accepted(event(**{field: "ü" * 256}))
    assert rejected(event(**{field: "ü" * 257})).reason == "field_too_long"
    assert rejected(event(**{field: "x" * 900_000})).reason == "field_too_long"


def test_a_bundle_of_ten_thousand_samples_is_accepted_and_one_more_is_too_large():
    assert len(accepted(bundle(*[sample()] * 10_000)).samples) == 10_000

    rejection = rejected(bundle(*[sample()] * 10_001))

    assert rejection.reason == "bundle_too_large"


def test_up_to_ten_refused_samples_of_a_bundle_go_one_dead_letter_each():
    decoded = decode_record(bundle(sample(), *[sample(value=0)] * 10))

    assert isinstance(decoded, Decoded)
    assert [r.reason for r in decoded.rejections] == ["invalid_value"] * 10


def test_more_refused_samples_go_together_once_and_the_valid_ones_go_on():
    bad = [sample(value=0)] * 8 + [sample(unit="x")] * 3 + [1]
    decoded = decode_record(bundle(sample(value=1), *bad, sample(value=2)))

    assert isinstance(decoded, Decoded)
    assert [body_of(decoded, i)["value"] for i in range(2)] == [1, 2]
    rejection = letter_of(Decoded(decoded.user_id, decoded.data_type, [], decoded.rejections))
    assert rejection.reason == "many_invalid_samples"
    assert "invalid_value x8" in rejection.message and "invalid_unit x3" in rejection.message
    assert json.loads(rejection.value) == {"user_id": USER, "data_type": "steps", "data": bad}
    assert replayed_reason(rejection.value) == "many_invalid_samples"


def test_a_bundle_of_only_many_refused_samples_is_dead_lettered_once_as_it_is():
    value = bundle(*[sample(value=0)] * 11)

    rejection = rejected(value)

    assert (rejection.reason, rejection.value) == ("many_invalid_samples", value)


def test_a_huge_user_id_is_never_copied_into_many_dead_letters():
    value = b'{"user_id":"' + b"u" * 900_000 + b'","data_type":"steps","data":[' + b",".join([b"{}"] * 200) + b"]}"

    rejection = rejected(value)

    assert rejection.reason == "field_too_long"
    assert len(rejection.message) < 200


def _mib_of(prefix: bytes, unit: bytes, suffix: bytes) -> bytes:
    count = ((1 << 20) - len(prefix) - len(suffix)) // (len(unit) + 1)
    return prefix + b",".join([unit] * count) + suffix


HEAD = b'{"user_id":"u","data_type":"steps",'
ELEMENT = b'{"device_name":"d","start_date":"2023-11-01T08:04:51Z","unit":"count","value":14}'
HOSTILE = {
    "900 KB user_id, 200 empty samples": (
        b'{"user_id":"' + b"u" * 900_000 + b'","data_type":"steps","data":[' + b",".join([b"{}"] * 200) + b"]}"
    ),
    "a bundle of numbers": _mib_of(HEAD + b'"data":[', b"1", b"]}"),
    "50k-deep nesting": HEAD + b'"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "10,000 refused samples": HEAD + b'"data":[' + b",".join([ELEMENT.replace(b"14", b"0")] * 10_000) + b"]}",
    "10,000 samples with a null": HEAD + b'"data":[' + b",".join([ELEMENT[:-1] + b',"end_date":null}'] * 10_000)
    + b"]}",
    "10,000 samples with escapes": HEAD + b'"data":[' + b",".join([ELEMENT.replace(b'"d"', b'"\\u00fc"')] * 10_000)
    + b"]}",
    "poison among 10,000 samples": HEAD + b'"data":[' + b",".join([ELEMENT] * 9_999 + [b'"\xff"']) + b"]}",
    "a million invalid bytes": _mib_of(HEAD + b'"data":[', b'"\xff"', b"]}"),
    "many strings and one poison": HEAD + b'"data":[{"a":[' + b",".join([b'"x"'] * 200_000) + b']},"\xff"]}',
    "many keys with escapes": _mib_of(HEAD, b'"\\u0061":[[1],[2]]', b"}"),
    "a value of a million digits": HEAD + b'"device_name":"d","start_date":"2023-11-01T08:04:51Z","unit":"count",'
    b'"value":30000.' + b"0" * 1_000_000 + b"1}",
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_record_of_up_to_a_mib_decodes_in_under_100_ms_with_bounded_dead_letters(value):
    timings = []
    for _ in range(3):  # the best of three: the bound is for the code, not for a busy machine
        started = time.perf_counter()
        result = decode_record(value)
        timings.append(time.perf_counter() - started)

    assert min(timings) < 0.1
    letters = [result] if isinstance(result, Rejection) else result.rejections
    assert len(letters) <= 10
    assert sum(len(letter.value) for letter in letters) <= len(value) + 10 * 100
