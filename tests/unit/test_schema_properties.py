"""decode_record over generated records, against an oracle written from the README's input contract.

Records are joined from generated field texts (timestamps and numbers in many spellings, strings with and
without escapes, keys in any order, with whitespace, unknown fields, nulls, keys twice) and from hostile
bytes (invalid UTF-8, lone surrogates, truncation, nesting, shapes that are not samples). For each:

- decode_record never raises, and the fast path gives what the detailed path gives;
- the outcome is the oracle's: accepted exactly when every rule holds, else refused for the first rule broken;
- each accepted sample's body is the producer's text of each of its own fields, and every rule holds for it;
- every dead letter names the user and data type of its bundle, and replays with the reason it was given;
- the dead letters of a record are at most 10 and hardly larger than the record;
- a record takes at most 50 ms (these are small; the 1 MiB bound is a unit test).

Deterministic: hypothesis derandomized, a fixed number of examples.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import schema
from stream.schema import REASONS, Decoded, Rejection, decode_record

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SAMPLE_FIELDS = ("device_name", "device_version", "start_date", "end_date", "unit", "value")
REQUIRED = ("device_name", "start_date", "unit", "value")
UNIT_MAX = {"count": Decimal(30000), "count/min": Decimal(300)}
LONGEST = 256
EPOCH = date(1970, 1, 1).toordinal()
TIME_BOUND = 0.05


# -- the oracle: the README's rules, written apart from the code under test ---------------------------------------

PROFILE = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", re.ASCII)


def exact_instant(text: object) -> Fraction | None:
    """Seconds since the epoch of a timestamp in the README's profile (RFC 3339 with `T` and `Z`), or None."""
    match = PROFILE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        return None
    try:
        days = date(int(year), int(month), int(day)).toordinal() - EPOCH
    except ValueError:
        return None
    offset = 0
    if zone != "Z":
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            return None
        offset = (hours * 60 + minutes) * 60 * (1 if zone[0] == "+" else -1)
    seconds = Fraction(((days * 24 + int(hour)) * 60 + int(minute)) * 60 + int(second) - offset)
    return seconds + (Fraction(int(fraction), 10 ** len(fraction)) if fraction else 0)


def pairs(text: str) -> list[tuple[str, object]]:
    """An object's members in order, copies of a key included."""
    return json.loads(text, object_pairs_hook=lambda items: ("object", items))[1]


def sample_verdict(members: list[tuple[str, str]]) -> tuple[str | None, Fraction | None]:
    """(the reason a sample object is refused for, or None; its start) from its members' texts."""
    keys = [k for k, _ in members]
    if len(set(keys)) < len(keys):
        return "duplicate_field", None
    texts = {k: t for k, t in members if k in SAMPLE_FIELDS and json.loads(t) is not None}
    values = {k: json.loads(t) for k, t in texts.items()}
    for name in REQUIRED:
        if name not in values:
            return "missing_field", None
    for name in ("device_name", "device_version"):
        if name in values:
            if not isinstance(values[name], str) or (name == "device_name" and not values[name]):
                return "invalid_field", None
            if len(values[name]) > LONGEST:
                return "field_too_long", None
    if values["unit"] not in ("count", "count/min", "count/s"):
        return "invalid_unit", None
    number = values["value"]
    if isinstance(number, bool) or not isinstance(number, int | float):
        return "invalid_value", None
    exact = Decimal(texts["value"])
    if not (exact > 0 and 0 < float(texts["value"]) < math.inf):
        return "invalid_value", None
    start = exact_instant(values["start_date"])
    end = exact_instant(values["end_date"]) if "end_date" in values else None
    if start is None or ("end_date" in values and end is None):
        return "invalid_date", None
    if values["unit"] in UNIT_MAX and exact > UNIT_MAX[values["unit"]]:
        return "value_above_max", None
    if end is not None and end < start:
        return "end_before_start", None
    return None, start


def body_of(members: list[tuple[str, str]]) -> bytes:
    texts = {k: t for k, t in members if k in SAMPLE_FIELDS and t != "null"}
    return ("{" + ",".join(f'"{k}":{texts[k]}' for k in SAMPLE_FIELDS if k in texts) + "}").encode()


# -- generated texts ----------------------------------------------------------------------------------------------


def spell_string(text: str, every: int = 0) -> str:
    """`text` as a JSON string, every `every`-th character written as an escape (none if 0)."""
    out = []
    for index, char in enumerate(text):
        escape = every > 0 and index % every == every - 1
        code = ord(char)
        if char in '"\\' or code < 0x20:
            out.append({'"': '\\"', "\\": "\\\\", "\n": "\\n"}.get(char, f"\\u{code:04x}"))
        elif not escape:
            out.append(char)
        elif char == "/":
            out.append("\\/")
        elif code > 0xFFFF:
            high, low = divmod(code - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04X}")
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


@st.composite
def strings(draw, text: st.SearchStrategy[str], plain: bool = False) -> str:
    return spell_string(draw(text), 0 if plain else draw(st.sampled_from([0, 0, 1, 2, 3])))


names = st.one_of(
    st.sampled_from(["iPhone", "Apple Watch", "J\u00fcrgen\u2019s \U0001f600", 'a "b" \\ c/d', "17.0.3"]),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["", "x" * 256, "\u00fc" * 256, "x" * 257]),
)


@st.composite
def timestamps(draw) -> str:
    """RFC 3339 spellings, and near misses."""
    year = draw(st.sampled_from([1, 1970, 2023, 2024, 9999]) | st.integers(1, 9999))
    month, day = draw(st.integers(1, 12)), draw(st.sampled_from([1, 9, 17, 28, 28, 28, 29, 30, 31]))
    hour, minute, second = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    fraction = draw(st.sampled_from(["", ".0", ".000", ".123", ".123456", ".1234567", ".999999999", ".9999999995"])
                    | st.text(alphabet="0123456789", min_size=1, max_size=14).map(lambda d: "." + d))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+04:00", "-05:30", "+23:59", "-23:59"]))
    separator = draw(st.sampled_from("TTTTTTt "))  # t and a space: RFC 3339 but not ISO 8601, refused
    text = f"{year:04d}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:{second:02d}{fraction}{zone}"
    miss = draw(st.sampled_from([None] * 40 + ["+0400", ":60", "24:", "no seconds", "comma", "year 0", "+24:00"]))
    if miss == "+0400" and len(zone) == 6:
        text = text[:-3] + text[-2:]
    elif miss == ":60":
        text = text[:17] + "60" + text[19:]
    elif miss == "24:":
        text = text[:11] + "24" + text[13:]
    elif miss == "no seconds":
        text = text[:16] + text[19 + len(fraction):]
    elif miss == "comma" and fraction:
        text = text[:19] + "," + text[20:]
    elif miss == "year 0":
        text = "0000" + text[4:]
    elif miss == "+24:00" and len(zone) == 6:
        text = text[:-5] + "24:00"
    return text


@st.composite
def numbers(draw) -> str:
    """JSON numbers in many spellings, many at the edges of the rules."""
    edges = ["14", "0", "-0", "0.0", "1", "3e4", "3E+4", "30000", "30000.0", "30000.000000000001",
             "29999.9999999999999", "300", "300.0000000000000001", "3.00e2", "1e-400", "5e-324", "1e308", "1e309",
             "-1", "0.001",
             "123456789012345678901234567890", "1" + "0" * 320, "2.5", "61.5", "1.7976931348623157e308"]
    if draw(st.integers(0, 2)) == 2:
        return draw(st.sampled_from(edges))
    sign = draw(st.sampled_from(["", "", "", "", "", "-"]))
    whole = draw(st.sampled_from(["14", "3", "0", "299", "300", "30000", "30001"])
                 | st.integers(1, 10**25).map(str))
    fraction = draw(st.sampled_from(["", "", ".0", ".5", ".000000000000001"])
                    | st.text(alphabet="0123456789", min_size=1, max_size=22).map(lambda d: "." + d))
    exponent = draw(st.sampled_from([""] * 8 + ["e0", "E+2", "e-3", "e4", "e-400", "e400"]))
    return sign + whole + fraction + exponent


ANY_JSON = ["null", "true", "false", "[]", "{}", '[1,"a"]', '{"a":{"b":null}}', '"x"', "7"]


@st.composite
def field_text(draw, name: str, plain: bool = False) -> str:
    """A text for a sample field: mostly right, sometimes of another kind or null."""
    if draw(st.integers(0, 40)) == 40:
        return draw(st.sampled_from(ANY_JSON))
    if name in ("device_name", "device_version"):
        return draw(strings(names, plain))
    if name in ("start_date", "end_date"):
        return draw(strings(timestamps(), plain))
    if name == "unit":
        units = st.sampled_from(["count"] * 4 + ["count/min"] * 2 + ["count/s"] * 3 + ["Count", ""])
        return draw(strings(units, plain))
    return draw(numbers())


@dataclass
class Generated:
    """A record's text and what the oracle needs to know about it."""

    value: bytes
    kind: str  # single | bundle | hostile
    members: list[tuple[str, str]] = field(default_factory=list)  # the record's (key, value text)
    elements: list[str] = field(default_factory=list)  # a bundle's element texts
    poisoned: set[int] = field(default_factory=set)  # elements holding poison (-1: the record outside them)


@st.composite
def sample_members(draw, routing: bool, plain: bool) -> list[tuple[str, str]]:
    """The members of a sample object: its fields (some left out), maybe an unknown one, maybe a key twice."""
    members = []
    for name in SAMPLE_FIELDS:
        if draw(st.integers(0, 39)) < (20 if name in ("device_version", "end_date") else 39):
            members.append((name, draw(field_text(name, plain))))
    if routing:
        for name, texts in (("user_id", names), ("data_type", st.sampled_from(["steps"] * 5 + ["bpm"] * 5 + ["x"]))):
            if draw(st.integers(0, 39)) < 39:
                members.append((name, draw(strings(texts, plain))))
    extra = draw(st.sampled_from([None] * 16 + ["note", "note", "twice", "user_id", "data"]))
    if extra == "note":
        members.append(("note", draw(st.sampled_from(ANY_JSON))))
    elif extra == "twice" and members:
        members.append(draw(st.sampled_from(members)))
    elif extra is not None:
        members.append((extra, draw(st.sampled_from(['"other"', "[]", "null"]))))
    return draw(st.permutations(members))


@st.composite
def spelled_object(draw, members: list[tuple[str, str]], plain: bool = False) -> str:
    space = draw(st.sampled_from(["", " ", "\n  "]))
    keys = [spell_string(k, 0 if plain else draw(st.sampled_from([0, 0, 0, 1, 3]))) for k, _ in members]
    inside = ("," + space).join(f"{k}{space}:{space}{t}" for k, (_, t) in zip(keys, members, strict=True))
    return "{" + space + inside + space + "}"


@st.composite
def singles(draw) -> Generated:
    plain = draw(st.booleans())  # no escape anywhere: the fast path's kind of record
    members = draw(sample_members(routing=True, plain=plain))
    return Generated(draw(spelled_object(members, plain)).encode(), "single", members)


@st.composite
def bundles(draw) -> Generated:
    plain = draw(st.booleans())
    elements = []
    for _ in range(draw(st.sampled_from([3, 1, 2, 5, 8, 11, 14, 0]))):
        if draw(st.integers(0, 9)) == 9:
            elements.append(draw(st.sampled_from([*ANY_JSON[:-2], "7", '"x"'])))
        else:
            elements.append(draw(spelled_object(draw(sample_members(routing=False, plain=plain)), plain)))
    members = [("user_id", draw(strings(names, plain))),
               ("data_type", draw(strings(st.sampled_from(["steps", "bpm"]), plain)))]
    members.append(("data", "[" + ",".join(elements) + "]"))
    if draw(st.booleans()):
        members.append((draw(st.sampled_from(SAMPLE_FIELDS)), draw(field_text("value"))))  # ignored in a bundle
    members = draw(st.permutations(members))
    return Generated(draw(spelled_object(members, plain)).encode(), "bundle", members, elements)


POISONS = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\\udfff", b"\\ud800\\u0041"]
SYNTAX = [b"{", b"]", b",", b'"', b"\\", b"\x00", b"NaN", b'"k":1,']


@st.composite
def poisoned_bundles(draw) -> Generated:
    """A bundle with invalid UTF-8 or a lone surrogate inside some strings of some samples, or outside them."""
    generated = draw(bundles())
    poisons: list[bytes] = []
    marked = []
    for index, element in enumerate(generated.elements):
        if element.startswith("{") and '"' in element and draw(st.integers(0, 2)) == 0:
            poisons.append(draw(st.sampled_from(POISONS)))
            at = element.index('"') + 1  # inside the first key
            element = f"{element[:at]}\x00{len(poisons) - 1}\x00{element[at:]}"
            generated.poisoned.add(index)
        marked.append(element)
    members = [(k, "[" + ",".join(marked) + "]" if k == "data" else t) for k, t in generated.members]
    text = draw(spelled_object(members))
    if draw(st.integers(0, 3)) == 3:  # poison outside the samples too
        text = '{"note\\ud800":1,' + text[1:]
        generated.poisoned.add(-1)
    value = text.encode()
    for number, poison in enumerate(poisons):
        value = value.replace(b"\x00%d\x00" % number, poison)
    return Generated(value, "bundle", generated.members, marked, generated.poisoned)


BASES = [
    b'{"user_id":"u1","data_type":"steps","device_name":"iPhone","start_date":"2023-11-01T08:04:51.000+04:00",'
    b'"end_date":"2023-11-01T08:04:58.000+04:00","value":14,"unit":"count"}',
    b'{"user_id": "u2", "data_type": "bpm", "data": [{"device_name": "Band", "start_date": "2023-11-01T08:00:00Z",'
    b' "unit": "count/min", "value": 61}, {"device_name": "Band", "start_date": "2023-11-01T08:01:00Z",'
    b' "unit": "count/min", "value": 0}, 7, {"device_name": "J\\u00fcrgen", "start_date": "2023-11-01 08:02:00z",'
    b' "unit": "count/min", "value": 6.2e1, "note": [1, {"a": "b"}]}]}',
    '{"user_id":"\u00fc","data_type":"steps","device_name":"\u2019\U0001f600","start_date":"2023-11-01T08:04:51Z",'
    '"value":3e4,"unit":"count","extra":null}'.encode(),
]


@st.composite
def hostile(draw) -> Generated:
    """Bytes that are not a well-formed sample event: truncated, with bad bytes, nested, not objects."""
    value = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["insert", "truncate", "wrap", "nest", "replace", "double"]))
        at = draw(st.integers(0, len(value)))
        if how == "insert":
            value = value[:at] + draw(st.sampled_from([*POISONS, *SYNTAX])) + value[at:]
        elif how == "truncate":
            value = value[:at]
        elif how == "wrap":
            value = b"[" + value + b"]"
        elif how == "nest":
            depth = draw(st.sampled_from([10, 999, 1000, 5000]))
            value = value[:at] + b"[" * depth + b"]" * depth + value[at:]
        elif how == "replace":
            value = value.replace(b":", b":" + draw(st.sampled_from([b"0x1", b"-", b"Infinity", b"1.", b".5"])), 1)
        else:
            value = value + value
    return Generated(value, "hostile")


# -- what must hold, whatever the record --------------------------------------------------------------------------


def decode_checked(value: bytes) -> Decoded | Rejection:
    started = time.perf_counter()
    result = decode_record(value)
    assert time.perf_counter() - started < TIME_BOUND or min(_timings(value)) < TIME_BOUND
    assert result == schema._decode_in_detail(value), "the fast path and the detailed path disagree"
    return result


def _timings(value: bytes) -> list[float]:
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        decode_record(value)
        timings.append(time.perf_counter() - started)
    return timings


def check_always(value: bytes, result: Decoded | Rejection) -> None:
    letters = [result] if isinstance(result, Rejection) else result.rejections
    assert len(letters) <= 10
    assert all(letter.reason in REASONS for letter in letters)
    # Each of a bundle's letters repeats its user_id and data_type: at most 256 characters, ~1.5 KB encoded.
    assert sum(len(letter.value) for letter in letters) <= len(value) + 10 * 1600
    if isinstance(result, Rejection):
        assert result.value == value
        assert replay(result.value) == result.reason
        return
    routing = json.loads(value.decode("utf-8", "replace"), object_pairs_hook=dict)
    for letter in result.rejections:
        replayed = json.loads(letter.value.decode("utf-8", "replace"))
        assert (replayed["user_id"], replayed["data_type"]) == (routing["user_id"], routing["data_type"])
        assert replay(letter.value) == letter.reason
    for sample in result.samples:
        check_forwarded(sample)


def replay(letter: bytes) -> str:
    again = decode_record(letter)
    if isinstance(again, Rejection):
        return again.reason
    assert again.samples == [] and len(again.rejections) == 1 and again.rejections[0].value == letter
    return again.rejections[0].reason


def check_forwarded(sample: schema.ValidSample) -> None:
    """Every rule holds for what goes to the API."""
    members = pairs(sample.body.decode())
    assert len({k for k, _ in members}) == len(members) and {k for k, _ in members} <= set(SAMPLE_FIELDS)
    texts = [(k, json.dumps(v)) for k, v in members]
    assert sample_verdict(texts)[0] is None, sample.body
    start = exact_instant(dict(members)["start_date"])
    assert start is not None and sample.start == math.floor(start * 10**9)


def member_texts(obj: str) -> list[tuple[str, str]]:
    """An object's members as (decoded key, value text), the way they are written (copies included)."""
    decoder = json.JSONDecoder()
    out, position = [], 1
    while True:
        position = _skip(obj, position)
        if obj[position] == "}":
            return out
        key, position = decoder.raw_decode(obj, position)
        position = _skip(obj, _skip(obj, position) + 1)  # past ":"
        _, end = decoder.raw_decode(obj, position)
        out.append((key, obj[position:end]))
        position = _skip(obj, end)
        position += 1 if obj[position] == "," else 0


def _skip(text: str, position: int) -> int:
    while text[position] in " \n\t\r":
        position += 1
    return position


def expected(generated: Generated) -> tuple[str | None, list[tuple[str | None, bytes, Fraction | None]]]:
    """The oracle: (the record's reason, or None and per element: (reason, body, start))."""
    if -1 in generated.poisoned:
        return "malformed_json", []
    text = generated.value.decode("utf-8", "replace")
    top = member_texts(text) if generated.kind == "single" else member_texts(
        "{" + ",".join(f"{json.dumps(k)}:{t}" for k, t in generated.members) + "}")
    keys = [k for k, _ in top]
    if len(set(keys)) < len(keys):
        return "duplicate_field", []
    fields = dict(top)
    for name, kinds in (("user_id", None), ("data_type", ("steps", "bpm"))):
        if name not in fields or json.loads(fields[name]) is None:
            return "missing_field", []
        routed = json.loads(fields[name])
        if kinds is None and (not isinstance(routed, str) or not routed):
            return "invalid_user_id", []
        if kinds is None and len(routed) > LONGEST:
            return "field_too_long", []
        if kinds is not None and routed not in kinds:
            return "invalid_data_type", []
    data = json.loads(fields.get("data", "null"))
    if generated.kind == "single" and data is not None:
        return ("empty_bundle" if data == [] else "invalid_field"), []
    if generated.kind == "single":
        reason, start = sample_verdict([m for m in top if m[0] in SAMPLE_FIELDS or m[0] == "note"])
        return reason, [(reason, body_of(top), start)] if reason is None else []
    if not generated.elements:
        return "empty_bundle", []
    outcomes = []
    for index, element in enumerate(generated.elements):
        if index in generated.poisoned:
            outcomes.append(("malformed_json", b"", None))
        elif not element.startswith("{"):
            outcomes.append(("not_an_object", b"", None))
        else:
            members = member_texts(element)
            reason, start = sample_verdict(members)
            outcomes.append((reason, body_of(members), start))
    refused = sum(reason is not None for reason, _, _ in outcomes)
    if refused > 10 and refused == len(outcomes):
        return "many_invalid_samples", []
    return None, outcomes


def check_against_oracle(generated: Generated, result: Decoded | Rejection) -> None:
    reason, outcomes = expected(generated)
    if reason is not None:
        assert isinstance(result, Rejection) and result.reason == reason, (generated.value, result)
        return
    if generated.kind == "single":
        assert isinstance(result, Decoded), (generated.value, result)
    assert isinstance(result, Decoded), (generated.value, result)
    valid = [(body, start) for why, body, start in outcomes if why is None]
    assert [(s.body, s.start) for s in result.samples] == [(b, math.floor(t * 10**9)) for b, t in valid]  # type: ignore
    refusals = [why for why, _, _ in outcomes if why is not None]
    if len(refusals) > 10:
        assert [r.reason for r in result.rejections] == ["many_invalid_samples"]
    else:
        assert [r.reason for r in result.rejections] == refusals


# -- the properties -----------------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=600)
@given(singles())
def test_single_sample_events_follow_the_contract(generated):
    result = decode_checked(generated.value)

    check_always(generated.value, result)
    check_against_oracle(generated, result)


@settings(SETTINGS, max_examples=400)
@given(bundles() | poisoned_bundles())
def test_bundles_follow_the_contract_sample_by_sample(generated):
    result = decode_checked(generated.value)

    check_always(generated.value, result)
    check_against_oracle(generated, result)


@settings(SETTINGS, max_examples=400)
@given(hostile())
def test_hostile_records_are_refused_or_read_without_harm(generated):
    result = decode_checked(generated.value)

    check_always(generated.value, result)


@settings(SETTINGS, max_examples=1500)
@given(strings(timestamps()))
def test_the_fast_timestamp_parser_agrees_with_the_documented_profile(text):
    """The fast path uses msgspec's parser where `_in_profile` says it is exact: never outside the profile."""
    raw = text.encode()
    try:
        moment = schema._decode_datetime(raw)
    except msgspec.ValidationError:  # msgspec refusing is fine: the detailed path decides then
        return
    if schema._in_profile(raw):
        exact = exact_instant(json.loads(text))
        assert exact is not None, text
        assert schema._nanoseconds(moment) == math.floor(exact * 10**9)
