"""decode_record: the Samples API rules (shared/seeds doc) applied to Kafka record values."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import msgspec
import pytest

from stream.schema import REASONS, Decoded, Rejection, Sample, as_single_event, batch_body, decode_record

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


# -- the doc's example ---------------------------------------------------------------------------------


def test_the_docs_example_bundle_is_accepted_whole():
    first = sample()
    second = sample(start_date="2023-11-01T09:47:21.000+04:00", end_date="2023-11-01T09:47:34.000+04:00", value=24)
    decoded = accepted(bundle(first, second))

    assert (decoded.user_id, decoded.data_type) == (USER, "steps")
    assert [body_of(decoded, i)["value"] for i in range(2)] == [14, 24]
    assert decoded.samples[0].start == instant("2023-11-01T08:04:51+04:00").timestamp()


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

    assert decoded.samples[0].start == pytest.approx(instant(start).timestamp(), abs=1e-6)
    assert instant(body_of(decoded)["start_date"]) == instant(start)


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
    assert rejected(rejection.value).reason == "malformed_json"


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
def test_a_non_object_bundle_element_replays_with_the_same_reason(element):
    decoded = decode_record(bundle(sample(), element))  # type: ignore[arg-type]
    assert isinstance(decoded, Decoded)
    (rejection,) = decoded.rejections

    assert rejected(rejection.value).reason == rejection.reason


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


def test_the_encoded_sample_decodes_back_to_the_same_sample():
    fields = sample(value=14.25, unit="count/s")
    decoded = accepted(bundle(fields))

    again = msgspec.json.decode(decoded.samples[0].body, type=Sample)

    assert again == msgspec.convert(fields, Sample)


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

    assert decoded.samples[0].start == datetime(2023, 11, 1, 8, tzinfo=UTC).timestamp()
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
