"""What an API response means for a batch: classify(status, headers, body) -> one typed outcome. Pure.

200 (and any other 2xx) accepted everything. 207 accepted some: the refused ones are listed in the body
when the API says which (`rejected: [{index, reason}]`). 400 refused the whole batch, and so do 413 and
422, which also speak of the request's content: its samples are dead-lettered, never retried. 401/403
mean the token is wrong, not the data: retried slowly, nothing dead-lettered. Everything else (408, 425,
429, 5xx, 3xx, other 4xx such as a 404 from a wrong URL, transport errors) is retried with backoff, so a
misconfiguration never turns good data into dead letters; nothing is dropped.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

BODY_EXCERPT = 300  # characters of a response body kept in a dead letter's message
RETRY_AFTER_MAX = 300.0  # seconds: a server asking for longer (or for "inf") is re-asked after this


class Accepted(NamedTuple):
    pass


class Partial(NamedTuple):
    """207: `refused` maps a sample's index in the batch to the API's reason; None when the body did not say."""

    refused: dict[int, str] | None


class Rejected(NamedTuple):
    """400: no sample was accepted; `detail` is the body, truncated."""

    detail: str


class AuthFailed(NamedTuple):
    status: int


class Retry(NamedTuple):
    reason: str  # e.g. "http_503", "ClientConnectorError", "timeout"
    retry_after: float | None = None  # seconds, from a Retry-After header


Outcome = Accepted | Partial | Rejected | AuthFailed | Retry


class _Refusal(msgspec.Struct):
    index: int
    reason: str = ""


class _PartialBody(msgspec.Struct):
    rejected: list[_Refusal] | None = None


_partial_decoder = msgspec.json.Decoder(_PartialBody)


def classify(status: int, headers: Mapping[str, str], body: bytes, now: float | None = None) -> Outcome:
    if status == 200:
        return Accepted()
    if status == 207:
        return Partial(_refused_samples(body))
    if status in (400, 413, 422):
        return Rejected(excerpt(body))
    if status in (401, 403):
        return AuthFailed(status)
    if 200 <= status < 300:
        return Accepted()
    return Retry(f"http_{status}", parse_retry_after(headers.get("Retry-After"), now))


def _refused_samples(body: bytes) -> dict[int, str] | None:
    try:
        parsed = _partial_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    if parsed.rejected is None:
        return None
    return {r.index: r.reason or "refused" for r in parsed.rejected}


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
