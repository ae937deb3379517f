"""Input records -> valid samples | rejections (`decode_record`), and the API bodies joined from them.

Each sample field goes to the API exactly as the producer wrote it: the rules (the Samples API's, shared/seeds
doc, and this service's limits, README "Input contract") are checked on each field's JSON text, and the body
of a sample is joined from those texts, never re-encoded. Every rejection carries a stable reason (REASONS).

Two paths, one set of rules. The fast path takes the common record (no escape, only the known fields, every
rule clearly met) in one or two msgspec decodes. On any doubt the record takes the detailed path, which
applies the rules in their documented order and names the precise reason.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal

import msgspec
from msgspec import Raw

# The doc: value > 0; <= 30000 for `count`; <= 300 for `count/min`; `count/s` has no maximum.
UNIT_MAX: dict[str, int] = {"count": 30000, "count/min": 300}
UNITS = ("count", "count/min", "count/s")
DATA_TYPES = ("steps", "bpm")

# This service's limits: far above what a health platform sends, they bound what one record can cost.
MAX_TEXT_LENGTH = 256  # characters of user_id, device_name, device_version
MAX_BUNDLE_SAMPLES = 10_000  # elements of `data`: 10x the API's batch maximum
MAX_SAMPLE_LETTERS = 10  # a bundle's refused samples go one dead letter each, up to this; more go as one
MAX_POISONED_STRINGS = 100  # strings with invalid UTF-8 or a lone surrogate that its samples can hold

# A sample's own fields, in the order its API body lists them.
SAMPLE_FIELDS = ("device_name", "device_version", "start_date", "end_date", "unit", "value")
_REQUIRED = ("device_name", "start_date", "unit", "value")
_ROUTING = ("user_id", "data_type", "data")  # the record's fields: copies inside a bundle sample are ignored

# Reason codes written to the `stream.error.reason` header of dead letters. Stable: alert on them.
REASONS: dict[str, str] = {
    "malformed_json": "the record value is not JSON: a syntax error, nesting deeper than 1000 levels, invalid "
    "UTF-8 or a lone surrogate escape (outside a bundle's samples), or no value (tombstone)",
    "not_an_object": "the record value is JSON but not an object (or a bundle sample is not an object)",
    "duplicate_field": "the record, or a bundle sample, has a key twice",
    "missing_field": "a required field is absent or null",
    "invalid_user_id": "user_id is not a non-empty string",
    "invalid_data_type": "data_type is not `steps` or `bpm`",
    "invalid_unit": "unit is not `count`, `count/min` or `count/s`",
    "invalid_value": "value is not a number, not greater than 0, or beyond a double (it would read as 0 or infinity)",
    "value_above_max": "value exceeds the unit's maximum (30000 for count, 300 for count/min), judged exactly",
    "invalid_date": "start_date or end_date is not an RFC 3339 timestamp with a UTC offset",
    "end_before_start": "end_date is earlier than start_date, however little",
    "invalid_field": "another field has the wrong type (device_name, device_version, data)",
    "field_too_long": f"user_id, device_name or device_version has more than {MAX_TEXT_LENGTH} characters",
    "empty_bundle": "a bundle event whose data array is empty",
    "bundle_too_large": f"a bundle event with more than {MAX_BUNDLE_SAMPLES:,} samples",
    "many_invalid_samples": f"more than {MAX_SAMPLE_LETTERS} samples of one bundle were refused: they go together "
    "in one dead letter (a bundle of just those samples), with a count per reason",
    "below_min_batch": "fewer than 3 samples of a user and data type arrived before the maximum age",
    "api_rejected": "the Samples API refused the sample (400, or listed as refused in a 207)",
    "retry_exhausted": "the API kept failing this batch for STREAM_RETRY_MAX_SECONDS while accepting others",
    "beyond_ledger_horizon": "older than its device's ledger horizon and unknown to the ledger, with "
    "STREAM_LEDGER_BEYOND_HORIZON=dead_letter (whether the API has it cannot be told)",
    "api_partial_unknown": "the API answered 207 (some samples refused) without saying readably which: the whole "
    "batch is dead-lettered with the 207 body, since some of it may not have been accepted",
}


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why something cannot go to the API, and the bytes to dead-letter (replayable as input)."""

    reason: str
    message: str
    value: bytes
    # Samples the dead letter stands for, as counted in stream_samples_total (the dead-letter ratio): the bundle's
    # elements for a whole bundle or its many refused samples; 1 for a record that cannot be read as samples.
    samples: int = 1


class ValidSample(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A valid sample: its start in epoch nanoseconds (orders a batch) and its JSON object for the API's `data`,
    joined from the producer's field texts (two copies of a sample have equal starts and bodies)."""

    start: int
    body: bytes


class Decoded(msgspec.Struct, frozen=True, gc=False):
    """What one Kafka record yields: its key's valid samples and the rejected parts."""

    user_id: str
    data_type: str
    samples: list[ValidSample]
    rejections: list[Rejection]


def decode_record(value: bytes | None) -> Decoded | Rejection:
    """Decode and validate one record value. Never raises: bad input becomes a Rejection."""
    if value is None:
        return Rejection("malformed_json", "the record has no value (tombstone)", b"")
    # Without a backslash (92), the text msgspec decodes is the text it encodes again, and no key hides behind
    # an escape; with no unknown field, a decoder checks every byte (UTF-8 included). Any doubt, and every
    # refusal, goes to the detailed path.
    if 92 not in value:
        try:
            if 91 not in value:  # no "[": not a bundle
                single = _single_decoder.decode(value)
                user_id, data_type = single.user_id, single.data_type
                # The quotes prove that no key is there twice or null: a pair per key and per string value.
                quotes = 22 + (4 if single.end_date else 0) + (0 if single.device_version is None else 4)
                if user_id is not None and data_type is not None and value.count(b'"') == quotes:
                    single.user_id = single.data_type = None  # not the sample's own: left out of its body
                    valid = _fast_sample(single)
                    if valid is not None:
                        return Decoded(user_id, data_type, [valid], [])
            else:
                bundle = _bundle_decoder.decode(value)
                samples = _fast_samples(bundle.data, value.count(b'"') - 10)
                if samples is not None:
                    return Decoded(bundle.user_id, bundle.data_type, samples, [])
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass
    return _decode_in_detail(value)


def as_single_event(user_id: str, data_type: str, sample_body: bytes) -> bytes:
    """The single-sample input event for a sample this service encoded (ValidSample.body): what the DLQ
    holds for a sample the API refused or that expired, replayable as input unchanged."""
    return _splice(b'{"user_id":' + _encode(user_id) + b',"data_type":' + _encode(data_type), sample_body)


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


# -- the fast path --------------------------------------------------------------------------------------------

Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
NonEmptyText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]
_ABSENT = Raw()


class _Sample(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """A sample as the fast path reads it and the API takes it: names checked by msgspec, the rest as text.
    Encoded, it is the sample's body: the same bytes the detailed path joins."""

    device_name: NonEmptyText
    device_version: Text | None = None
    start_date: Raw
    end_date: Raw = _ABSENT
    unit: Literal["count", "count/min", "count/s"]
    value: Raw


class _Single(_Sample, kw_only=True, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """A single-sample event in one decode; its routing fields are cleared before the sample is encoded."""

    user_id: NonEmptyText | None = None
    data_type: Literal["steps", "bpm"] | None = None


class _Bundle(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    user_id: NonEmptyText
    data_type: Literal["steps", "bpm"]
    data: Annotated[list[_Sample], msgspec.Meta(min_length=1, max_length=MAX_BUNDLE_SAMPLES)]


_single_decoder = msgspec.json.Decoder(_Single)
_sample_decoder = msgspec.json.Decoder(_Sample)
_bundle_decoder = msgspec.json.Decoder(_Bundle)
_decode_datetime = msgspec.json.Decoder(Annotated[datetime, msgspec.Meta(tz=True)]).decode
_decode_float = msgspec.json.Decoder(float).decode
_encode = msgspec.json.Encoder().encode
# Values the fast path keeps clear of, wide enough for any float parser: near 0, near a unit's maximum, near
# the largest double. The detailed path judges those on their exact text.
_TINY, _HUGE = 1e-300, 1e300
_FAST_MAX = {unit: limit * (1 - 1e-12) for unit, limit in UNIT_MAX.items()}
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCHS: dict[tzinfo, datetime] = {}  # UTC offset -> the Unix epoch written at that offset


def _fast_samples(samples: list[_Sample], quotes: int) -> list[ValidSample] | None:
    """The samples if each is valid beyond doubt and their objects hold `quotes` quotes (no key twice or null)."""
    valid = []
    for sample in samples:
        quotes -= 14 + (4 if sample.end_date else 0) + (0 if sample.device_version is None else 4)
        one = _fast_sample(sample)
        if one is None:
            return None
        valid.append(one)
    return valid if quotes == 0 else None


def _fast_sample(sample: _Sample) -> ValidSample | None:
    """The sample if it is valid beyond doubt: timestamps of at most microseconds, a value clear of its bounds."""
    start_text, end_text = sample.start_date, sample.end_date
    try:
        start = _decode_datetime(start_text)
        end = _decode_datetime(end_text) if end_text else start
        number = _decode_float(sample.value)
    except msgspec.ValidationError:
        return None
    if end < start or not _TINY < number < _FAST_MAX.get(sample.unit, _HUGE):
        return None
    # Inlined _in_profile (this is the hot path).
    text = b"" + start_text
    if text[11] != 84 or ((len(text) > 34 or text[-4] != 58) and (len(text) > 29 or text[-2] != 90)):
        return None
    if end_text:
        text = b"" + end_text
        if text[11] != 84 or ((len(text) > 34 or text[-4] != 58) and (len(text) > 29 or text[-2] != 90)):
            return None
    return ValidSample(_nanoseconds(start), _encode(sample))


def _in_profile(text: bytes) -> bool:
    """Whether a quoted timestamp that msgspec parsed is in the profile with at most six fraction digits.
    msgspec also takes `t`, a space, `z` and `+0400`, and rounds finer fractions; its other forms are the
    profile's. The separator is the 12th byte (with the quote), `T` (84); a `Z` (90) form has at most 29 bytes,
    a `+hh:mm` form at most 34 with its ":" (58) the fourth byte from the end."""
    return text[11] == 84 and ((len(text) <= 34 and text[-4] == 58) or (len(text) <= 29 and text[-2] == 90))


def _nanoseconds(moment: datetime) -> int:
    """Epoch nanoseconds of an aware datetime, exactly. The epoch written at the datetime's own offset makes
    the difference plain arithmetic (no offset to apply: Python subtracts two datetimes of one tzinfo as is)."""
    epoch = _EPOCHS.get(moment.tzinfo)  # type: ignore[arg-type]
    if epoch is None:  # one per UTC offset seen: at most 2,879 (-23:59..+23:59)
        epoch = _EPOCHS[moment.tzinfo] = _UNIX_EPOCH.astimezone(moment.tzinfo)  # type: ignore[index]
    delta = moment - epoch
    return delta.days * 86_400_000_000_000 + delta.seconds * 1_000_000_000 + delta.microseconds * 1000


# -- the detailed path ----------------------------------------------------------------------------------------

_object_decoder = msgspec.json.Decoder(dict[str, Raw])
_list_decoder = msgspec.json.Decoder(list[Raw])
_raw_decoder = msgspec.json.Decoder(Raw)
_str_decoder = msgspec.json.Decoder(str)
_STRINGS = re.compile(rb'"[^"\\]*+(?:\\[\x00-\xff][^"\\]*+)*+"')
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T([01]\d|2[0-3]):([0-5]\d):([0-5]\d)(?:\.(\d+))?"
    r"(?:Z|([+-])([01]\d|2[0-3]):([0-5]\d))",
    re.ASCII,
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_INFINITY = float("inf")
_NUMBER_STARTS = frozenset(b"-0123456789"[i : i + 1] for i in range(11))
_FIELD_PREFIX = {name: b'"' + name.encode() + b'":' for name in SAMPLE_FIELDS}

Problem = tuple[str, str]  # (reason, message)


def _decode_in_detail(value: bytes) -> Decoded | Rejection:
    """The rules in their documented order: the record's, then each sample's."""
    read = _read(value)
    if isinstance(read, Rejection):
        return read
    text, top, poison = read
    data = top.get("data")
    data_text = None if data is None else bytes(data)
    elements = _list_decoder.decode(data_text) if data_text is not None and data_text[:1] == b"[" else None
    if poison is not None:
        held = sum(e.count(poison.prefix) for e in map(bytes, elements or ()))
        if held < poison.count:
            message = "invalid UTF-8 or a lone surrogate escape (outside a bundle's samples)"
            return Rejection("malformed_json", message, value)
    if _has_duplicate_key(text, top):
        return Rejection("duplicate_field", "the record has a key twice", value)
    user_id = _routing_text(top, "user_id")
    if isinstance(user_id, tuple):
        return Rejection(user_id[0], user_id[1], value)
    data_type = _routing_text(top, "data_type")
    if isinstance(data_type, tuple):
        return Rejection(data_type[0], data_type[1], value)
    if data_text is None or data_text == b"null":
        outcome = _judge(top)
        if isinstance(outcome, ValidSample):
            return Decoded(user_id, data_type, [outcome], [])
        return Rejection(outcome[0], outcome[1], value)
    # A bundle is judged by its `data` alone: sample fields next to it are ignored.
    if elements is None:
        return Rejection("invalid_field", "data is not an array", value)
    if not elements:
        return Rejection("empty_bundle", "the bundle's `data` array is empty", value)
    if len(elements) > MAX_BUNDLE_SAMPLES:
        message = f"data has {len(elements):,} samples; the limit is {MAX_BUNDLE_SAMPLES:,}"
        return Rejection("bundle_too_large", message, value, len(elements))
    # Re-encoded, not as written: a dead letter's user_id is at most 256 characters in ~1.5 KB, whatever the
    # escapes its producer spelled it with (it is copied into each of the bundle's dead letters).
    head = b'{"user_id":' + _encode(user_id) + b',"data_type":' + _encode(data_type)
    return _bundle(value, head, user_id, data_type, [bytes(e) for e in elements], poison)


# -- reading the record: JSON, UTF-8 and poison ------------------------------------------------------------------


class _Poison(msgspec.Struct, frozen=True, gc=False):
    """The strings of a record that hold invalid UTF-8 or a lone surrogate escape, swapped for markers."""

    prefix: bytes  # every marker starts with it, and nothing in the record does
    originals: list[bytes]  # marker i stands for originals[i]

    @property
    def count(self) -> int:
        return len(self.originals)

    def restore(self, text: bytes) -> bytes:
        return re.sub(re.escape(self.prefix) + rb'(\d+)"', lambda m: self.originals[int(m.group(1))], text)


def _read(value: bytes) -> tuple[bytes, dict[str, Raw], _Poison | None] | Rejection:
    """The record's top-level members, the text they were read from, and its poison; or why it is not JSON.

    Poison is a string with invalid UTF-8 or a lone surrogate escape in a record that is JSON apart from it.
    Such strings are swapped for marker strings so that the rest can be read; where the markers land decides
    between refusing the record and refusing only the bundle samples that hold them.
    """
    try:
        top = _object_decoder.decode(value)
    except msgspec.ValidationError as exc:  # not an object; but first it must be JSON at all
        try:
            _raw_decoder.decode(value)
        except (msgspec.DecodeError, RecursionError) as error:
            return Rejection("malformed_json", f"not valid JSON: {error}", value)
        if not (value.isascii() or _is_utf8(value)):
            return Rejection("malformed_json", "not valid JSON: invalid UTF-8", value)
        return Rejection("not_an_object", f"the record is JSON but not an object: {exc}", value)
    except RecursionError:
        return Rejection("malformed_json", "not valid JSON: nested deeper than 1000 levels", value)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON: {exc}"
    else:
        if value.isascii() or _is_utf8(value):  # msgspec checks the UTF-8 of the keys it decodes only
            return value, top, None
        problem = "not valid JSON: invalid UTF-8"
    neutralized = _neutralize(value)
    if isinstance(neutralized, str):
        return Rejection("malformed_json", neutralized or problem, value)
    text, poison = neutralized
    try:
        return text, _object_decoder.decode(text), poison
    except (msgspec.DecodeError, RecursionError):
        return Rejection("malformed_json", problem, value)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_CLEAN_STRING = (
    rb'"(?:[\x00-\x21\x23-\x5b\x5d-\x7f]++'  # ASCII but '"' and '\'
    rb"|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"  # UTF-8
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
    rb'|\\(?:["\\/bfnrt]|u(?![dD][89a-fA-F])[0-9a-fA-F]{4}'  # escapes, surrogates in pairs
    rb'|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}))*+"'
)
# A stretch of text outside strings and of clean strings, consumed by the regex engine; or one suspect string.
_SUSPECTS = re.compile(rb'(?:[^"]++|' + _CLEAN_STRING + rb')++|("[^"\\]*+(?:\\[\x00-\xff][^"\\]*+)*+")')


def _neutralize(value: bytes) -> tuple[bytes, _Poison] | str:
    """The record with each poisoned string swapped for a marker; or why not: "" when a string is broken
    otherwise or none is poisoned (the record is just not JSON), or that there are too many."""
    number = 0
    while b'"\\u0000stream-poison-%d-' % number in value:
        number += 1
    poison = _Poison(b'"\\u0000stream-poison-%d-' % number, [])
    parts = []
    for match in _SUSPECTS.finditer(value):
        token = match.group(1)
        if token is None:
            parts.append(match.group(0))
        elif not _is_poisoned(token):
            return ""
        elif poison.count == MAX_POISONED_STRINGS:
            return f"more than {MAX_POISONED_STRINGS} strings with invalid UTF-8 or a lone surrogate escape"
        else:
            parts.append(poison.prefix + b"%d" % poison.count + b'"')
            poison.originals.append(token)
    return (b"".join(parts), poison) if poison.originals else ""


def _is_poisoned(token: bytes) -> bool:
    """A string token broken only by invalid UTF-8 or a lone surrogate escape: with every bad byte as "?" and
    every surrogate escape as U+FFFD (same lengths; an escape's hex digits never change what is an escape),
    it is a JSON string."""
    neutral = token.decode("utf-8", "surrogateescape").encode("utf-8", "replace")
    try:
        _str_decoder.decode(_SURROGATE_ESCAPE.sub(rb"\\ufffd", neutral))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False
    return True


def _has_duplicate_key(text: bytes, members: dict[str, Raw]) -> bool:
    """Whether the JSON object `text` has a key twice; `members` is its decoding (where the last copy wins).

    Its members are its commas + 1, less the commas inside its values and strings: with its nested values cut
    out (longest first, as they nest) and its strings, the count equals len(members) exactly when no key is
    there twice, since a losing copy is not in `members` and its commas stay.
    """
    if text.count(b",") + 1 == len(members) or not members:
        return False  # commas in values and strings only add to the count: equal is the answer already
    nested = sorted((raw for raw in map(bytes, members.values()) if raw[:1] in (b"[", b"{")), key=len, reverse=True)
    for raw in nested:
        text = text.replace(raw, b"")
    return _STRINGS.sub(b"", text).count(b",") + 1 != len(members)


# -- the rules on field texts --------------------------------------------------------------------------------------


def _string(raw: bytes) -> str | None:
    try:
        return _str_decoder.decode(raw)
    except msgspec.ValidationError:
        return None


def _quoted(text: bytes) -> str:
    """A field's text for a message, cut short: a message never carries a large field."""
    return text[:40].decode("utf-8", "replace") + ("…" if len(text) > 40 else "")


def _routing_text(top: dict[str, Raw], name: str) -> str | Problem:
    raw = top.get(name)
    text = None if raw is None else bytes(raw)
    if text is None or text == b"null":
        return "missing_field", f"required field `{name}` is missing or null"
    decoded = _string(text)
    if name == "data_type":
        if decoded not in DATA_TYPES:
            return "invalid_data_type", f"data_type {_quoted(text)} is not `steps` or `bpm`"
        return decoded  # type: ignore[return-value]
    if not decoded:
        return "invalid_user_id", "user_id is not a non-empty string"
    if len(decoded) > MAX_TEXT_LENGTH:
        return "field_too_long", f"user_id has {len(decoded):,} characters; the limit is {MAX_TEXT_LENGTH}"
    return decoded


def _judge(members: dict[str, Raw]) -> ValidSample | Problem:
    """A sample's rules, in order, on its fields' JSON texts (`members`: an object without a key twice)."""
    texts: dict[str, bytes] = {}  # the sample's own fields, not null, in their body order
    for name in SAMPLE_FIELDS:
        raw = members.get(name)
        if raw is not None and (text := bytes(raw)) != b"null":
            texts[name] = text
    for name in _REQUIRED:
        if name not in texts:
            return "missing_field", f"required field `{name}` is missing or null"
    for name in ("device_name", "device_version"):
        if name in texts:
            decoded = _string(texts[name])
            if decoded is None or (not decoded and name == "device_name"):
                return "invalid_field", f"{name} is not a{' non-empty' if name == 'device_name' else ''} string"
            if len(decoded) > MAX_TEXT_LENGTH:
                return "field_too_long", f"{name} has {len(decoded):,} characters; the limit is {MAX_TEXT_LENGTH}"
    unit = _string(texts["unit"])
    if unit not in UNITS:
        return "invalid_unit", f"unit {_quoted(texts['unit'])} is not `count`, `count/min` or `count/s`"
    value = texts["value"]
    number = _number(value)
    if number is None:
        return "invalid_value", f"value {_quoted(value)} is not a number"
    if not 0 < number < _INFINITY:
        return "invalid_value", _value_problem(value, number)
    start = _instant(texts["start_date"])
    end = None if "end_date" not in texts else _instant(texts["end_date"])
    for name, instant in (("start_date", start), ("end_date", end)):
        if instant is None and name in texts:
            return "invalid_date", f"{name} {_quoted(texts[name])} is not an RFC 3339 timestamp with a UTC offset"
    limit = UNIT_MAX.get(unit)  # type: ignore[arg-type]
    if limit is not None and (number > limit or (number == limit and _exceeds(value, limit))):
        return "value_above_max", f"value {_quoted(value)} is above {limit} for unit `{unit}`"
    if end is not None and end < start:  # type: ignore[operator]
        return "end_before_start", "end_date is earlier than start_date"
    return ValidSample(start[0], b"{" + b",".join([_FIELD_PREFIX[n] + t for n, t in texts.items()]) + b"}")  # type: ignore[index]


def _number(raw: bytes) -> float | None:
    """The double nearest to a JSON number (None if not a number). Rounding to nearest is monotonic: compared
    with 0 or a limit that a double holds, it compares as the exact value does, except where it equals it."""
    return float(raw) if raw[:1] in _NUMBER_STARTS else None


def _value_problem(text: bytes, number: float) -> str:
    if number > 0:
        return f"value {_quoted(text)} is too large for a double (it would reach the API as infinity)"
    if text.startswith(b"-") or not text.lower().partition(b"e")[0].strip(b"0."):
        return f"value {_quoted(text)} is not greater than 0"
    return f"value {_quoted(text)} is too small for a double (it would reach the API as 0)"


def _exceeds(text: bytes, limit: int) -> bool:
    """Whether a number whose nearest double is `limit` is above it: judged on its exact decimal text."""
    try:
        return Decimal(text.decode()) > limit
    except InvalidOperation:  # an exponent beyond Decimal's range is not this close to the limit
        return True


def _instant(raw: bytes) -> tuple[int, str] | None:
    """An RFC 3339 timestamp's exact instant: (epoch nanoseconds rounded down, its fraction digits beyond).

    The profile, what RFC 3339 and ISO 8601 (the API's word) share: `YYYY-MM-DDThh:mm:ss` with any number of
    fraction digits after a `.`, then `Z`, `+hh:mm` or `-hh:mm`. Not the `t`, `z` and space RFC 3339 also
    allows (ISO 8601 does not: forwarded as written, they could be refused by the API's parser), not the leap
    second `:60` (a POSIX clock never shows it), not the year 0.
    """
    try:  # msgspec's parser where it is exact
        moment = _decode_datetime(raw)
        if _in_profile(raw):
            return _nanoseconds(moment), ""
    except msgspec.ValidationError:
        pass
    text = _string(raw)
    match = None if text is None else _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    seconds = ((days * 24 + int(hour)) * 60 + int(minute)) * 60 + int(second)
    if sign is not None:
        offset = (int(offset_hours) * 60 + int(offset_minutes)) * 60
        seconds += -offset if sign == "+" else offset
    digits = fraction or ""
    # Fraction digits without trailing zeros compare as the fractions they write.
    return seconds * 1_000_000_000 + int(digits[:9].ljust(9, "0")), digits[9:].rstrip("0")


# -- bundles and their dead letters ----------------------------------------------------------------------------


def _bundle(
    value: bytes, head: bytes, user_id: str, data_type: str, elements: list[bytes], poison: _Poison | None
) -> Decoded | Rejection:
    """Each sample stands alone; the refused ones are dead-lettered one by one, or past a few, together once."""
    samples: list[ValidSample] = []
    refused: list[tuple[int, str, str, bytes]] = []  # (index, reason, message, the sample as written)
    for index, element in enumerate(elements):
        if poison is not None and poison.prefix in element:
            outcome: ValidSample | Problem = ("malformed_json", "invalid UTF-8 or a lone surrogate escape")
            element = poison.restore(element)
        else:
            outcome = _element(element)
        if isinstance(outcome, ValidSample):
            samples.append(outcome)
        else:
            refused.append((index, outcome[0], outcome[1], element))
    if len(refused) <= MAX_SAMPLE_LETTERS:
        rejections = [
            Rejection(reason, f"data[{index}]: {message}", _sample_letter(head, reason, element))
            for index, reason, message, element in refused
        ]
        return Decoded(user_id, data_type, samples, rejections)
    summary = _summary(refused, len(elements))
    if not samples:
        return Rejection("many_invalid_samples", summary, value, len(refused))
    letter = head + b',"data":[' + b",".join(element for *_, element in refused) + b"]}"
    return Decoded(user_id, data_type, samples, [Rejection("many_invalid_samples", summary, letter, len(refused))])


def _element(element: bytes) -> ValidSample | Problem:
    if element[:1] != b"{":
        return "not_an_object", f"a bundle sample is not an object: {_quoted(element)}"
    if 92 not in element:
        try:
            sample = _sample_decoder.decode(element)
        except msgspec.ValidationError:
            pass
        else:
            quotes = 14 + (4 if sample.end_date else 0) + (0 if sample.device_version is None else 4)
            valid = _fast_sample(sample) if element.count(b'"') == quotes else None
            if valid is not None:
                return valid
    members = _object_decoder.decode(element)
    if _has_duplicate_key(element, members):
        return "duplicate_field", "the sample has a key twice"
    return _judge(members)


def _sample_letter(head: bytes, reason: str, element: bytes) -> bytes:
    """The dead letter of one refused bundle sample: replayed as input, it is refused for the same reason.

    A single-sample event: the bundle's user_id and data_type, then the sample's fields, without its copies of
    user_id, data_type or data (the replay would read them); unless the sample has a key twice, then as it is
    (the replay has a key twice too). A sample that is not an object or holds poison cannot be spliced: it
    goes as a bundle of that one sample.
    """
    if reason in ("not_an_object", "malformed_json"):
        return head + b',"data":[' + element + b"]}"
    if reason != "duplicate_field":
        members = _object_decoder.decode(element)
        if any(name in members for name in _ROUTING):
            kept = [_encode(k) + b":" + bytes(raw) for k, raw in members.items() if k not in _ROUTING]
            return head + b"".join(b"," + member for member in kept) + b"}"
    return _splice(head, element)


def _splice(head: bytes, obj: bytes) -> bytes:
    """`head` (an object's opening, unclosed) continued with the members of the JSON object `obj`."""
    rest = obj.strip()[1:].lstrip()
    return head + (rest if rest.startswith(b"}") else b"," + rest)


def _summary(refused: list[tuple[int, str, str, bytes]], total: int) -> str:
    """A count per reason and the first refusal of each: a bounded message, whatever the bundle."""
    counts: dict[str, int] = {}
    first: dict[str, tuple[int, str]] = {}
    for index, reason, message, _ in refused:
        counts[reason] = counts.get(reason, 0) + 1
        first.setdefault(reason, (index, message))
    parts = [f"{reason} x{counts[reason]} (first data[{index}]: {message[:120]})" for reason, (index, message)
             in first.items()]
    return f"{len(refused)} of {total} samples refused: " + "; ".join(parts)
