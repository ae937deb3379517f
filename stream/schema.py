"""Wire structs for input events and API bodies, and `decode_record`: Kafka bytes -> valid samples | rejections.

The Samples API rules (shared/seeds doc) live in the types where msgspec can check them in C, and in
`_cross_field_problem` where a rule spans fields. Every rejection carries a stable reason code (REASONS).
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Literal

import msgspec

DataType = Literal["steps", "bpm"]
Unit = Literal["count", "count/min", "count/s"]

# The doc: value > 0; <= 30000 for `count`; <= 300 for `count/min`; `count/s` has no maximum.
UNIT_MAX: dict[str, float] = {"count": 30000, "count/min": 300}

# Ints stay ints on the way out (steps are counts); a float must be finite (1e400 decodes to inf).
Value = Annotated[int, msgspec.Meta(gt=0)] | Annotated[float, msgspec.Meta(gt=0, le=sys.float_info.max)]
# ISO 8601 in its RFC 3339 profile, with a UTC offset required: a health sample without one is ambiguous.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

# Reason codes written to the `stream.error.reason` header of dead letters. Stable: alert on them.
REASONS: dict[str, str] = {
    "malformed_json": "the record value is not valid JSON (or not UTF-8)",
    "not_an_object": "the record value is JSON but not an object",
    "missing_field": "a required field is absent or null",
    "invalid_user_id": "user_id is not a non-empty string",
    "invalid_data_type": "data_type is not `steps` or `bpm`",
    "invalid_unit": "unit is not `count`, `count/min` or `count/s`",
    "invalid_value": "value is not a finite number greater than 0",
    "value_above_max": "value exceeds the unit's maximum (30000 for count, 300 for count/min)",
    "invalid_date": "start_date or end_date is not an ISO 8601 (RFC 3339) timestamp with a UTC offset",
    "end_before_start": "end_date is earlier than start_date",
    "invalid_field": "another field has the wrong type (device_name, device_version, data)",
    "empty_bundle": "a bundle event whose data array is empty",
    "below_min_batch": "fewer than 3 samples of a user and data type arrived before the maximum age",
    "api_rejected": "the Samples API refused the sample (400, or listed as refused in a 207)",
    "retry_exhausted": "the API kept failing this batch for STREAM_RETRY_MAX_SECONDS while accepting others",
    "api_partial_unknown": "the API answered 207 (some samples refused) without saying readably which: the whole "
    "batch is dead-lettered with the 207 body, since some of it may not have been accepted",
}

_FIELD_REASON = {
    "user_id": "invalid_user_id",
    "data_type": "invalid_data_type",
    "unit": "invalid_unit",
    "value": "invalid_value",
    "start_date": "invalid_date",
    "end_date": "invalid_date",
}


class Sample(msgspec.Struct, frozen=True, omit_defaults=True):
    """One sample exactly as the API takes it inside `data`."""

    device_name: NonEmpty
    start_date: Timestamp
    unit: Unit
    value: Value
    end_date: Timestamp | None = None
    device_version: str | None = None


class Event(msgspec.Struct, frozen=True):
    """A Kafka record: one sample (fields inline) or a bundle (`data`), shaped like the API's request body.

    Sample fields are optional here so that one decode serves both shapes; for a single-sample event
    `_single_sample` checks that the required ones are present.
    """

    user_id: NonEmpty
    data_type: DataType
    data: list[msgspec.Raw] | None = None
    device_name: NonEmpty | None = None
    device_version: str | None = None
    start_date: Timestamp | None = None
    end_date: Timestamp | None = None
    unit: Unit | None = None
    value: Value | None = None


class _Key(msgspec.Struct, frozen=True):
    """The routing fields of a record; `data` only tells a bundle from a single-sample event."""

    user_id: NonEmpty
    data_type: DataType
    data: msgspec.Raw | None = None


class Rejection(msgspec.Struct, frozen=True):
    """Why something cannot go to the API, and the bytes to dead-letter (replayable as input)."""

    reason: str
    message: str
    value: bytes


class ValidSample(msgspec.Struct, frozen=True, array_like=True):
    """A validated sample, already encoded for the API body; `start` (epoch seconds) orders a batch."""

    start: float
    body: bytes


class Decoded(msgspec.Struct, frozen=True):
    """What one Kafka record yields: its key's valid samples and the rejected parts."""

    user_id: str
    data_type: str
    samples: list[ValidSample]
    rejections: list[Rejection]


_event_decoder = msgspec.json.Decoder(Event)
_key_decoder = msgspec.json.Decoder(_Key)
_sample_decoder = msgspec.json.Decoder(Sample)
_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode
_REQUIRED = ("device_name", "start_date", "unit", "value")


def decode_record(value: bytes | None) -> Decoded | Rejection:
    """Decode and validate one record value. Never raises: bad input becomes a Rejection."""
    if value is None:
        return Rejection("malformed_json", "the record has no value (tombstone)", b"")
    # The common case, a valid single-sample event, is two decodes in C (the routing fields, then the
    # sample itself: unknown fields are ignored) and one encode. Bundles and anything invalid take the
    # general path, which also finds the precise reason.
    try:
        key = _key_decoder.decode(value)
        if key.data is None:
            sample = _sample_decoder.decode(value)
            if _cross_field_problem(sample) is None:
                valid = ValidSample(sample.start_date.timestamp(), _encode(sample))
                return Decoded(key.user_id, key.data_type, [valid], [])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        pass
    return _decode_in_detail(value)


def _decode_in_detail(value: bytes) -> Decoded | Rejection:
    try:
        event = _event_decoder.decode(value)
    except msgspec.ValidationError as exc:
        return _rejection_from_error(str(exc), value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # Invalid UTF-8 inside a string and absurd nesting surface as Python errors, not DecodeError.
        return Rejection("malformed_json", f"not valid JSON: {exc}", value)
    if event.data is None:
        return _single_sample(event, value)
    return _bundle(event, value)


def _single_sample(event: Event, value: bytes) -> Decoded | Rejection:
    missing = [f for f in _REQUIRED if getattr(event, f) is None]
    if missing:
        return Rejection("missing_field", f"required field `{missing[0]}` is missing or null", value)
    sample = Sample(
        device_name=event.device_name,  # type: ignore[arg-type]
        start_date=event.start_date,  # type: ignore[arg-type]
        unit=event.unit,  # type: ignore[arg-type]
        value=event.value,  # type: ignore[arg-type]
        end_date=event.end_date,
        device_version=event.device_version,
    )
    problem = _cross_field_problem(sample)
    if problem is not None:
        return Rejection(problem[0], problem[1], value)
    valid = ValidSample(sample.start_date.timestamp(), _encode(sample))
    return Decoded(event.user_id, event.data_type, [valid], [])


def _bundle(event: Event, value: bytes) -> Decoded | Rejection:
    if not event.data:
        return Rejection("empty_bundle", "the bundle's `data` array is empty", value)
    samples: list[ValidSample] = []
    rejections: list[Rejection] = []
    for index, raw in enumerate(event.data):
        outcome = _bundle_sample(raw)
        if isinstance(outcome, ValidSample):
            samples.append(outcome)
        else:
            reason, message = outcome
            value_out = _replayable(event.user_id, event.data_type, raw)
            rejections.append(Rejection(reason, f"data[{index}]: {message}", value_out))
    return Decoded(event.user_id, event.data_type, samples, rejections)


def _bundle_sample(raw: msgspec.Raw) -> ValidSample | tuple[str, str]:
    try:
        sample = _sample_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        rejection = _rejection_from_error(str(exc), b"")
        return rejection.reason, rejection.message
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return "malformed_json", f"not valid JSON: {exc}"
    problem = _cross_field_problem(sample)
    if problem is not None:
        return problem
    return ValidSample(sample.start_date.timestamp(), _encode(sample))


def _cross_field_problem(sample: Sample) -> tuple[str, str] | None:
    """The rules that span fields: per-unit maxima and end_date >= start_date."""
    limit = UNIT_MAX.get(sample.unit)
    if limit is not None and sample.value > limit:
        return "value_above_max", f"value {sample.value} is above {limit:g} for unit `{sample.unit}`"
    if sample.end_date is not None and sample.end_date < sample.start_date:
        return "end_before_start", "end_date is earlier than start_date"
    return None


def _rejection_from_error(message: str, value: bytes) -> Rejection:
    # msgspec messages look like "Expected `float` > 0.0 - at `$.value`" or
    # "Object missing required field `unit` - at `$.data[0]`"; the field names the reason.
    if message.startswith("Object missing required field"):
        return Rejection("missing_field", message, value)
    if " - at `$" not in message:  # the top level itself has the wrong type
        return Rejection("not_an_object", message, value)
    if "got `null`" in message:  # a required field given as null is as good as missing
        return Rejection("missing_field", message, value)
    field = message.rpartition("- at `$")[2].strip("`.").split(".")[-1].split("[")[0]
    return Rejection(_FIELD_REASON.get(field, "invalid_field"), message, value)


def as_single_event(user_id: str, data_type: str, sample_body: bytes) -> bytes:
    """The single-sample input event for a sample this service encoded (ValidSample.body): what the DLQ
    holds for a sample the API refused or that expired, replayable as input unchanged."""
    head = b'{"user_id":' + _encode(user_id) + b',"data_type":' + _encode(data_type)
    rest = sample_body.strip()[1:].lstrip()
    return head + (rest if rest.startswith(b"}") else b"," + rest)


def _replayable(user_id: str, data_type: str, raw: msgspec.Raw) -> bytes:
    """The dead letter of one invalid bundle element: a single-sample event that replays with the same reason.

    The bundle's user_id and data_type win over stray copies inside the element, and a stray `data` field
    is dropped so the replay is not read as a bundle. An element that is not an object is kept as it is.
    """
    try:
        # Field values stay raw: a value that cannot be decoded (1e400) is kept as it was written.
        element = _object_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return bytes(raw)
    element.pop("data", None)
    element.pop("user_id", None)
    element.pop("data_type", None)
    return _encode({"user_id": user_id, "data_type": data_type, **element})


def batch_body(user_id: str, data_type: str, bodies: list[bytes]) -> bytes:
    """The POST /samples request body, joined from the samples' pre-encoded bytes (no re-encoding)."""
    return (
        b'{"user_id":'
        + _encode(user_id)
        + b',"data_type":'
        + _encode(data_type)
        + b',"data":['
        + b",".join(bodies)
        + b"]}"
    )
