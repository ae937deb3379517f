"""classify: what an API response means for a batch. Nothing may be dropped unless the API refused it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.outcome import (
    BODY_EXCERPT,
    REASON_EXCERPT,
    RETRY_AFTER_MAX,
    Accepted,
    AuthFailed,
    Partial,
    Rejected,
    Retry,
    classify,
    parse_retry_after,
)

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def test_200_accepts_every_sample():
    assert classify(200, {}, b"", NOW) == Accepted()


def refused_of(body: bytes) -> dict[int, str] | None:
    outcome = classify(207, {}, body, NOW)
    assert isinstance(outcome, Partial)
    return outcome.refused


def test_207_lists_the_refused_samples_by_index():
    body = b'{"rejected": [{"index": 1, "reason": "value out of range"}, {"index": 4}]}'

    assert classify(207, {}, body, NOW) == Partial({1: "value out of range", 4: "refused"}, body.decode())


def test_207_keeps_an_excerpt_of_its_body_whatever_it_says():
    assert classify(207, {}, b"<html>oops</html>", NOW) == Partial(None, "<html>oops</html>")
    assert classify(207, {}, b"x" * 1000, NOW).detail == "x" * BODY_EXCERPT + "…"


# Each odd entry is read on its own: one of them must not make the whole list unreadable (which the
# pipeline used to take as "nothing refused", acking refused samples as accepted).
@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        ([{"index": 0, "reason": None}, {"index": 2, "reason": "bad"}], {0: "refused", 2: "bad"}),
        ([{"index": 1, "reason": {"code": "x", "n": 2}}], {1: '{"code":"x","n":2}'}),
        ([{"index": 1, "reason": ["a", 1]}, {"index": 2, "reason": 17}], {1: '["a",1]', 2: "17"}),
        ([{"index": 1, "reason": True}, {"index": 2, "reason": 1.5}], {1: "true", 2: "1.5"}),
        ([{"index": "3", "reason": "r"}, {"index": "0"}], {3: "r", 0: "refused"}),
        ([{"index": 2.0, "reason": "r"}, {"index": 0.0}], {2: "r", 0: "refused"}),
        ([{"index": 1, "reason": "first"}, {"index": 1, "reason": "second"}], {1: "first"}),
        # entries that cannot be read are skipped, the others still count
        ([None, 3, "x", [1], {"index": 4}], {4: "refused"}),
        ([{"index": 2.5}, {"index": 1}], {1: "refused"}),
        ([{"index": "3a"}, {"index": " 3"}, {"index": "-3"}, {"index": "²"}, {"index": 6}], {6: "refused"}),
        ([{"index": True}, {"index": None}, {"index": [1]}, {"index": {"i": 1}}, {"index": 6}], {6: "refused"}),
        ([{"index": -1, "reason": "r"}, {"index": 2}], {2: "refused"}),
        ([{"sample": 1, "error": "e"}, {"index": 2}], {2: "refused"}),
    ],
)
def test_207_entries_are_read_one_by_one(entries: list[Any], refused: dict[int, str]):
    body = json.dumps({"accepted": 3, "rejected": entries, "request_id": "r-1"}).encode()

    assert refused_of(body) == refused


@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        ([{"index": 1, "reason": ""}], {1: "refused"}),
        ([{"index": 1, "reason": "r", "field": "value", "code": 7}], {1: "r"}),
        ([{"index": 5000, "reason": "r"}], {5000: "r"}),  # beyond the batch: kept, the pipeline filters
    ],
)
def test_207_plain_entries_are_read_as_before(entries: list[Any], refused: dict[int, str]):
    # Guards, not new behaviour: these were read correctly before the lenient reader and still are.
    assert refused_of(json.dumps({"accepted": 3, "rejected": entries}).encode()) == refused


def test_a_long_reason_is_truncated():
    body = json.dumps({"rejected": [{"index": 0, "reason": "r" * 1000}, {"index": 1, "reason": {"k": "v" * 1000}}]})

    refused = refused_of(body.encode())

    assert refused is not None
    assert refused[0] == "r" * REASON_EXCERPT + "…"
    assert len(refused[1]) == REASON_EXCERPT + 1 and refused[1].startswith('{"k":"vvv')


def test_a_number_too_large_for_msgspec_does_not_hide_the_other_entries():
    assert refused_of(b'{"rejected": [{"index": 1e400}, {"index": 2, "reason": 1e999}]}') == {2: "Infinity"}


def test_an_escaped_lone_surrogate_does_not_hide_the_entries_and_never_reaches_a_header():
    body = b'{"rejected": [{"index": 1, "reason": "bad \\ud800 text"}, {"index": 2, "reason": {"k": "\\udfff"}}]}'

    refused = refused_of(body)

    assert refused == {1: "bad ? text", 2: '{"k":"?"}'}
    for reason in refused.values():
        reason.encode("utf-8")  # would raise on a lone surrogate


@pytest.mark.parametrize("depth", [10, 900, 5000, 100_000])
def test_a_nested_reason_is_rendered_and_an_absurdly_nested_body_never_raises(depth):
    nested = b"[" * depth + b"]" * depth
    outcome = classify(207, {}, b'{"rejected": [{"index": 1, "reason": ' + nested + b"}]}", NOW)

    assert isinstance(outcome, Partial)
    if depth <= 900:
        assert outcome.refused == {1: _truncated(nested.decode())}
    else:  # beyond what a JSON reader takes: no answer, but no exception either
        assert outcome.refused in (None, {1: _truncated(nested.decode())})


def _truncated(text: str) -> str:
    return text if len(text) <= REASON_EXCERPT else text[:REASON_EXCERPT] + "…"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        b'{"rejected": null}',
        b"not json",
        b"<html><body>207 Multi-Status</body></html>",
        b"[]",
        b'[{"index": 1}]',
        b'{"rejected": "all"}',
        b'{"rejected": {"index": 1}}',
        b'{"rejected": []}',  # a 207 says some were refused: an empty list contradicts it
        b'{"rejected": [{"i": 1}]}',
        b'{"rejected": [{"sample": 1, "error": "x"}, {"sample": 2, "error": "y"}]}',
        b'{"rejected": [null, 1, "2"]}',
        b'{"rejected": [{"index": -1}, {"index": "-2"}]}',
        b'{"rejected": [{"index": 1.5}, {"index": "one"}]}',
        b'{"errors": [{"index": 1, "reason": "r"}]}',
        b'{"rejected": [{"index": 1}',
        b"\xff\xfe",
    ],
)
def test_207_without_a_usable_list_says_it_does_not_know_which(body):
    assert classify(207, {}, body, NOW) == Partial(None, body.decode("utf-8", errors="replace"))


# -- the property: whatever the list holds, classify answers, and no readable refusal is lost ----------

_any_text = st.text(st.characters(exclude_categories=()))  # lone surrogates too (JSON escapes them)
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _any_text
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_indices = (
    st.integers(min_value=-5, max_value=2000)
    | st.integers()
    | st.integers(min_value=-5, max_value=2000).map(float)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=0, max_value=2000).map(str)
    | st.text(max_size=4)
    | _json_values
)
_entries = st.one_of(
    st.fixed_dictionaries({"index": _indices}, optional={"reason": _json_values, "extra": _json_values}),
    st.fixed_dictionaries({}, optional={"reason": _json_values, "sample": _indices}),
    _json_values,
)


def readable_index(value: Any) -> int | None:
    """The test's own reading of "an index that can be read", written apart from the code under test."""
    if type(value) is int:
        return value
    if type(value) is float and value == int(value):
        return int(value)
    if type(value) is str and value and all(c in "0123456789" for c in value):
        return int(value)
    return None


@settings(max_examples=400, deadline=None)
@given(st.lists(_entries, max_size=8), st.dictionaries(st.text(max_size=5), _json_values, max_size=2))
def test_any_list_of_entries_is_read_without_raising_and_loses_no_readable_refusal(entries, extra):
    body = json.dumps({**extra, "rejected": entries}).encode()

    outcome = classify(207, {}, body, NOW)

    assert isinstance(outcome, Partial)
    expected: dict[int, Any] = {}
    for entry in entries:
        if isinstance(entry, dict):
            index = readable_index(entry.get("index"))
            if index is not None and index >= 0:
                expected.setdefault(index, entry.get("reason"))
    if not expected:
        assert outcome.refused is None
        return
    assert outcome.refused is not None
    assert set(outcome.refused) == set(expected)
    for index, reason in expected.items():
        got = outcome.refused[index]
        assert isinstance(got, str) and got
        got.encode("utf-8")  # fit for a Kafka header: no lone surrogate
        if isinstance(reason, str) and reason and not any("\ud800" <= c <= "\udfff" for c in reason):
            assert got == (reason if len(reason) <= REASON_EXCERPT else reason[:REASON_EXCERPT] + "…")


def test_400_refuses_the_whole_batch_with_the_body_as_detail():
    assert classify(400, {}, b'{"error": "data must have at least 3 elements"}', NOW) == Rejected(
        '{"error": "data must have at least 3 elements"}'
    )


def test_a_long_or_binary_400_body_is_truncated_and_never_raises():
    outcome = classify(400, {}, b"x" * 1000 + b"\xff", NOW)

    assert isinstance(outcome, Rejected)
    assert outcome.detail == "x" * BODY_EXCERPT + "…"


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_auth_failures_not_bad_data(status):
    assert classify(status, {}, b"", NOW) == AuthFailed(status)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status):
    assert classify(status, {}, b"", NOW) == Retry(f"http_{status}", None)


# -- redirects: never followed, never an acceptance -------------------------------------------------------


@pytest.mark.parametrize("status", [300, 301, 302, 303, 304, 305, 307, 308, 399])
def test_a_redirect_is_retried_as_redirect_with_its_location(status):
    headers = {"Location": "https://elsewhere.example/landing"}

    assert classify(status, headers, b"<html>Moved</html>", NOW) == Retry(
        "redirect", None, "https://elsewhere.example/landing"
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_without_location_is_still_a_redirect(status):
    assert classify(status, {}, b"", NOW) == Retry("redirect", None, None)


def test_a_redirect_keeps_its_retry_after():
    outcome = classify(308, {"Location": "/v3/samples", "Retry-After": "12"}, b"", NOW)

    assert outcome == Retry("redirect", 12.0, "/v3/samples")
    assert (outcome.reason, outcome.retry_after, outcome.location) == ("redirect", 12.0, "/v3/samples")


def test_retry_stays_positionally_compatible():
    assert Retry("http_503", 2.0) == ("http_503", 2.0, None)


@pytest.mark.parametrize("status", [100, 404, 405, 418, 599])
def test_an_unusual_status_is_retried_never_dropped(status):
    # A 404 or 405 means a wrong URL or proxy, not bad data: retrying keeps good samples out of the DLQ.
    outcome = classify(status, {}, b"", NOW)

    assert isinstance(outcome, Retry)
    assert outcome.reason == f"http_{status}"


@pytest.mark.parametrize("status", [201, 202, 204])
def test_another_success_status_counts_as_accepted_not_resent(status):
    assert classify(status, {}, b"", NOW) == Accepted()


@pytest.mark.parametrize("status", [413, 422])
def test_a_status_about_the_content_refuses_the_batch_without_retry(status):
    assert isinstance(classify(status, {}, b"too big", NOW), Rejected)


@pytest.mark.parametrize("value", ["86400", "9" * 400])
def test_a_huge_retry_after_is_capped_so_a_batch_is_not_held_for_a_day(value):
    assert parse_retry_after(value, NOW) == RETRY_AFTER_MAX


def test_429_carries_the_servers_retry_after():
    assert classify(429, {"Retry-After": "7"}, b"", NOW) == Retry("http_429", 7.0)


def test_503_retry_after_as_an_http_date_is_relative_to_now():
    outcome = classify(503, {"Retry-After": "Fri, 01 Mar 2024 12:00:30 GMT"}, b"", NOW)

    assert outcome == Retry("http_503", 30.0)


# -- parse_retry_after ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("7", 7.0), (" 120 ", 120.0), ("300", 300.0)])
def test_retry_after_in_seconds(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("Fri, 01 Mar 2024 12:01:00 GMT", 60.0),
        ("Fri, 01 Mar 2024 14:01:00 +0200", 60.0),
        ("Fri, 01 Mar 2024 12:00:00 GMT", 0.0),
    ],
)
def test_retry_after_as_an_http_date(value, seconds):
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


def test_retry_after_as_a_date_in_the_past_means_now():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5", "5s", "Fri, 32 Mar 2024 12:00:00 GMT", "12:00"])
def test_garbage_retry_after_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


def test_a_missing_retry_after_is_none():
    assert parse_retry_after(None, NOW) is None
    assert classify(503, {}, b"", NOW).retry_after is None


@pytest.mark.parametrize("value", ["²", "¹²"])
def test_non_ascii_digits_in_retry_after_are_garbage_not_an_exception(value):
    assert parse_retry_after(value, NOW) is None
