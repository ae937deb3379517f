"""classify: what an API response means for a batch. Nothing may be dropped unless the API refused it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stream.outcome import (
    BODY_EXCERPT,
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


def test_207_lists_the_refused_samples_by_index():
    body = b'{"rejected": [{"index": 1, "reason": "value out of range"}, {"index": 4}]}'

    assert classify(207, {}, body, NOW) == Partial({1: "value out of range", 4: "refused"})


def test_207_with_an_empty_list_refuses_nothing():
    assert classify(207, {}, b'{"rejected": []}', NOW) == Partial({})


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b'{"rejected": null}', b"not json", b"[]", b'{"rejected": "all"}', b'{"rejected": [{"i": 1}]}'],
)
def test_207_without_a_usable_list_says_it_does_not_know_which(body):
    assert classify(207, {}, body, NOW) == Partial(None)


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


@pytest.mark.parametrize("status", [100, 302, 404, 405, 418, 599])
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
