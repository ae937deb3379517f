"""What an API response means for a batch: classify(status, headers, body) -> one typed outcome. Pure.

200 (and any other 2xx) accepted everything. 207 accepted some: the refused ones are listed in the body
(`rejected: [{index, reason}]`). That list is read leniently, entry by entry, because a refused sample
must never pass for an accepted one: an entry counts when its index can be read (an integer, an integral
float such as 2.0, or a string of ASCII digits such as "3") and is not negative; its reason is optional
text (a string as is; null or absent: "refused"; anything else JSON-encoded), truncated; for a repeated
index the first reason is kept. Indices beyond the batch are kept (the caller filters them). When the
body says nothing usable about which samples were refused (not JSON, not an object, no `rejected` list,
an empty list - contradictory for a 207 - or no entry with a readable index) `Partial.refused` is None:
the caller must then not take the batch as accepted. `Partial.detail` always holds an excerpt of the
body for the dead letter's message.

400 refused the whole batch, and so do 413 and 422, which also speak of the request's content: its
samples are dead-lettered, never retried. 401/403 mean the token is wrong, not the data: retried slowly,
nothing dead-lettered. Any 3xx is a redirect, which is never followed (a 301/302/303 would turn the POST
into a body-less GET whose 200 is not an acceptance; a 307/308 to another origin drops the token): it is
retried as Retry("redirect", retry_after, location), so a misconfigured URL shows as its own retry
reason. Everything else (408, 425, 429, 5xx, other 4xx such as a 404 from a wrong URL, transport errors)
is retried with backoff, so a misconfiguration never turns good data into dead letters; nothing is
dropped.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

BODY_EXCERPT = 300  # characters of a response body kept in a dead letter's message
REASON_EXCERPT = 200  # characters of one refused sample's reason
RETRY_AFTER_MAX = 300.0  # seconds: a server asking for longer (or for "inf") is re-asked after this


class Accepted(NamedTuple):
    pass


class Partial(NamedTuple):
    """207: `refused` maps a sample's index in the batch to the API's reason; None when the body did not say
    usably which samples were refused. `detail` is an excerpt of the body (for a dead letter's message)."""

    refused: dict[int, str] | None
    detail: str = ""


class Rejected(NamedTuple):
    """400: no sample was accepted; `detail` is the body, truncated."""

    detail: str


class AuthFailed(NamedTuple):
    status: int


class Retry(NamedTuple):
    reason: str  # e.g. "http_503", "ClientConnectorError", "timeout", "redirect" (any 3xx)
    retry_after: float | None = None  # seconds, from a Retry-After header
    location: str | None = None  # a redirect's Location header, as sent (for the log); None when absent


Outcome = Accepted | Partial | Rejected | AuthFailed | Retry


def classify(status: int, headers: Mapping[str, str], body: bytes, now: float | None = None) -> Outcome:
    if status == 200:
        return Accepted()
    if status == 207:
        return Partial(_refused_samples(body), excerpt(body))
    if status in (400, 413, 422):
        return Rejected(excerpt(body))
    if status in (401, 403):
        return AuthFailed(status)
    if 200 <= status < 300:
        return Accepted()
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    if 300 <= status < 400:
        return Retry("redirect", retry_after, headers.get("Location"))
    return Retry(f"http_{status}", retry_after)


def _refused_samples(body: bytes) -> dict[int, str] | None:
    """index -> reason for every entry of `rejected` whose index can be read; None if nothing usable."""
    parsed = _decode_json(body)
    if not isinstance(parsed, dict):
        return None
    entries = parsed.get("rejected")
    if not isinstance(entries, list):
        return None
    refused: dict[int, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        index = _read_index(entry.get("index"))
        if index is None or index < 0:
            continue
        if index not in refused:  # a repeated index keeps its first reason
            refused[index] = _read_reason(entry.get("reason"))
    return refused or None  # an empty list from a 207 ("some were refused") is no answer either


def _decode_json(body: bytes) -> Any:
    """The JSON value of `body`, or None when it is not JSON."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
        pass
    # msgspec is strict about JSON that Python's reader takes: a number out of range (1e400), an escaped
    # lone surrogate ("\\ud800"). Such a detail must not hide the entries around it.
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _read_index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # 2.0 yes; 2.5, inf and nan no
    if isinstance(value, str) and value.isascii() and value.isdigit():  # "²".isdigit() is True too
        try:
            return int(value)
        except ValueError:  # more digits than int() converts: far beyond any batch anyway
            return None
    return None


def _read_reason(value: Any) -> str:
    if value is None or value == "":
        return "refused"
    if not isinstance(value, str):
        try:
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (ValueError, RecursionError):
            value = type(value).__name__
    value = value.encode("utf-8", errors="replace").decode("utf-8")  # a lone surrogate cannot go in a header
    return value if len(value) <= REASON_EXCERPT else value[:REASON_EXCERPT] + "…"


def excerpt(body: bytes, limit: int = BODY_EXCERPT) -> str:
    text = body.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "…"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when absent or garbage."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True too
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC).timestamp()
    return min(RETRY_AFTER_MAX, max(0.0, when.timestamp() - reference))
