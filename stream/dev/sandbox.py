"""Local, strict sandbox of the partner's Samples API (``stream sandbox``).

The sandbox implements the documented contract of ``POST /samples`` ("Sending
Users Data", API v2.2) so that the demo, the integration tests and the
benchmarks can run without the partner.  It is written independently of the
service's own validation code on purpose: it is the check on the service, so it
must not share the service's mistakes.  Where the documentation is silent the
sandbox is *strict* (it refuses what a careful client would never send) and the
choice is listed below under "Strictness beyond the documentation".

Partner API
===========

``POST {prefix}/samples`` (``prefix`` defaults to ``""``, so the API URL is
``http://HOST:PORT``; ``--prefix /api/v2.2`` mimics the real path).

Request checks, in this order (the first failure answers):

1. ``Authorization`` must be exactly ``Bearer <token>`` -> else **401**
   ``{"error": "unauthorized"}``.
2. ``Content-Type`` must be ``application/json`` (parameters are allowed; a
   ``charset`` other than UTF-8 is not, JSON is UTF-8) -> else **415**
   ``{"error": "unsupported_media_type"}``.
3. The body must be a JSON object with exactly ``user_id`` (non-empty string),
   ``data_type`` (``"steps"`` or ``"bpm"``) and ``data`` (array of 3..1000
   elements) -> else **400** ``{"error": CODE, "detail": "..."}`` and nothing is
   accepted.  CODE is one of ``invalid_json``, ``not_an_object``,
   ``unknown_field``, ``missing_user_id``, ``invalid_user_id``,
   ``missing_data_type``, ``invalid_data_type``, ``missing_data``,
   ``invalid_data``, ``batch_too_small``, ``batch_too_large``.  A body over
   ``MAX_BODY_BYTES`` answers **413** ``{"error": "body_too_large"}``.

Each element of ``data`` (a Sample) is then judged on its own:

==================  =========  ==============================================
field               required   rule
==================  =========  ==============================================
``device_name``     yes        non-empty string
``device_version``  no         string
``start_date``      yes        ISO 8601 string
``end_date``        no         ISO 8601 string, not earlier than ``start_date``
``unit``            yes        ``count``, ``count/min`` or ``count/s``
``value``           yes        number (not a boolean), ``> 0``; ``<= 30000``
                               for ``count``; ``<= 300`` for ``count/min``; no
                               maximum for ``count/s``
==================  =========  ==============================================

"ISO 8601" means what :meth:`datetime.datetime.fromisoformat` of Python 3.11
accepts.  A date without a UTC offset is accepted (the documentation does not
require one) but counted in the ``naive_dates`` statistic so a test can insist
on zero.  ``end_date`` and ``start_date`` are compared as instants (equal is
fine); if exactly one of them is naive it is read as UTC for the comparison.

Responses (``index`` is the position in ``data``):

* every sample valid -> **200** ``{"accepted": n}``
* some valid         -> **207** ``{"accepted": n, "rejected": [{"index": i, "reason": R}, ...]}``
* none valid         -> **400** ``{"accepted": 0, "rejected": [...]}``

Rejection reasons R (short, stable): ``not_an_object``, ``unknown_field``,
``missing_<field>``, ``invalid_<field>`` (wrong type, empty ``device_name``,
unknown ``unit``, unparsable date, non-finite ``value``),
``value_out_of_range``, ``end_before_start``, ``device_refused`` and
``partial_refused`` (fault injection, see below) and ``invalid_sample`` (the
strict decoder refused the sample for a reason the classifier does not name,
e.g. a duplicated key).
A sample gets one reason, for the first broken rule in this order: object,
unknown field, missing required fields, ``device_name``, ``device_version``,
``unit``, ``value``, ``start_date``, ``end_date``, ``end_before_start``,
``device_refused``.

Strictness beyond the documentation
-----------------------------------

* Unknown fields are refused, in the envelope (400 ``unknown_field``) and in a
  Sample (reason ``unknown_field``): a misspelt optional field would otherwise
  be dropped silently.
* Optional fields may be omitted but not ``null`` (the documented type is
  String).
* ``Bearer`` is case-sensitive and followed by exactly one space.

Control endpoints (not part of the partner API, never authenticated)
====================================================================

* ``GET /_sandbox/stats`` -> ``{"requests", "status_counts": {"200": n, ...},
  "accepted_samples", "rejected_samples", "accepted_batches", "min_batch",
  "max_batch", "naive_dates", "hung", "faults_injected": {kind: n},
  "rejected_reasons": {reason: n}, "request_errors": {code: n},
  "landing_requests": {method: n}, "fast"}``.
  ``requests`` counts every ``POST /samples``; ``rejected_samples`` counts
  samples refused individually (in 207/400 answers); ``min_batch`` and
  ``max_batch`` range over every request whose ``data`` was an array (even one
  refused for its size or hit by a fault), ``null`` before the first;
  ``landing_requests`` counts requests to ``/_sandbox/landing`` by method (a
  client that follows a redirect shows here).
* ``GET /_sandbox/accepted`` -> ``[{"user_id", "data_type", <sample fields as
  sent>}, ...]`` in acceptance order (normal mode only; 409 in fast mode).
* ``GET /_sandbox/requests`` -> ``[{"t", "status", "user_id", "data_type",
  "size", "accepted", "fault", "digest"}, ...]``, oldest first, bounded (the
  newest ``request_log_size`` requests).  ``t`` is the arrival time on the
  monotonic clock (seconds; compare differences), ``status`` is ``null`` until
  the answer is decided (so a hung request shows ``null``), ``fault`` names the injected
  fault or is ``null``, ``digest`` is the CRC-32 of the body (hex) so retries of
  one batch can be matched.
* ``POST /_sandbox/reset`` -> 204.  Clears counters, accepted samples and the
  request log and re-seeds the fault RNG; keeps the token and the faults.
* ``GET /_sandbox/faults`` -> the :class:`Faults` as JSON; ``PUT`` replaces it
  (fields left out take their defaults) and answers the new value; 400 on an
  invalid value.
* ``PUT /_sandbox/token`` with ``{"token": "..."}`` -> 204; the old token is
  refused from then on (for token-rotation tests).  400 if the token is empty
  or contains whitespace.
* ``GET`` and ``POST /_sandbox/landing`` -> 200 with a small HTML page: where
  the ``redirect_status`` fault points.  It accepts nothing; requests to it are
  counted in ``landing_requests``.

Fault injection
===============

:class:`Faults` (CLI flags in brackets) is read once per request, so a change
at run time affects the requests that arrive afterwards:

* ``latency_ms`` [--latency-ms]: added to every ``/samples`` request.
* ``fail_all_status`` [--fail-all-status]: when set, every authenticated
  request answers that status (an outage).
* ``poison_user_ids`` [--poison-user-id, repeatable]: requests for these users
  always answer 500.
* ``hang_rate``, ``hang_seconds`` [--hang-rate, --hang-seconds]: that share of
  requests does not answer until the client gives up (the handler waits
  ``hang_seconds``, then answers 504; on server shutdown it answers 503 at
  once so stopping is quick).
* ``error_rate``, ``error_status`` [--error-rate, --error-status]: that share
  of requests answers ``error_status`` (default 503).
* ``throttle_rate``, ``retry_after`` [--throttle-rate, --retry-after]: that
  share answers 429 with ``Retry-After: <retry_after>`` (seconds).
* ``refuse_device_names`` [--refuse-device-name, repeatable]: otherwise-valid
  samples with that ``device_name`` are refused individually with reason
  ``device_refused`` (the documentation's "bugs with platform health APIs"),
  so the 207 and 400 paths can be driven with valid data.
* ``redirect_status``, ``redirect_rate`` [--redirect-status, --redirect-rate]:
  when ``redirect_status`` is one of 301, 302, 303, 307, 308 (0, the default,
  is off), that share of requests (default 1: all) answers that status with
  ``Location: <root URL>/_sandbox/landing`` and a small HTML body; the landing
  page answers 200 to GET and POST and accepts nothing.  A client that follows
  the redirect sees a 200 although nothing was accepted.
* ``partial_rate`` [--partial-rate]: that share of batches whose samples are
  all valid refuses one of them, chosen at random, with reason
  ``partial_refused`` (a 207 from valid input, without choosing device names).
* ``odd_207`` [--odd-207 SHAPE]: every 207 the sandbox answers (from invalid
  or refused samples, or ``partial_rate``) gets its body reshaped; the refused
  samples are the same.  SHAPE is one of ``reason_null`` (every ``reason`` is
  ``null``), ``reason_object`` (``reason`` is ``{"code": R, "message":
  "..."}``), ``index_string`` (``"index": "3"``), ``index_float``
  (``"index": 3.0``), ``unknown_shape`` (entries ``{"sample": i, "error":
  R}``, no ``index``), ``not_json`` (an HTML page), ``empty_list``
  (``"rejected": []``), ``extra_fields`` (unknown fields in every entry and
  at the top level).  The first four and the last still say which samples
  were refused; ``unknown_shape``, ``not_json`` and ``empty_list`` do not.

Order of a request: latency, 401, 415, body parsed, then the faults in the
order listed (fail-all, poison, hang, error, throttle, redirect), then the
request-level 400, then per-sample judgement, ``partial_rate``, acceptance
and ``odd_207``.  A faulted request (fail-all to redirect) accepts nothing.
The request log's ``fault`` names the last fault applied (``partial`` and
``odd_207`` included); ``faults_injected`` counts each.  Random draws use
``random.Random(seed)`` (``--seed``) and happen only for enabled faults with
rates above zero, in the order hang, error, throttle, redirect, partial (the
partial fault draws twice: whether, then which sample), so a run with one
client is reproducible.

The defaults inject nothing: the sandbox is faithful to the documentation
unless a fault is set.

Fast mode
=========

``--fast`` (for benchmarks with millions of samples) keeps counters and the
bounded request log but not the accepted samples (``/_sandbox/accepted``
answers 409).  It still checks, for every sample, everything msgspec checks
while decoding: the envelope, the batch size, required fields, field types,
non-empty ``device_name``, ``unit`` and the range of ``value``, unknown fields;
and it still applies ``refuse_device_names``.  It checks the *dates* (ISO 8601,
``end_date >= start_date``, ``naive_dates``) of the first and last sample of
each batch only, which still catches a systematic date bug.  Why: parsing and
comparing two dates per sample is the sandbox's largest cost; measured on a
1000-sample batch, server CPU per request is about 1.0 ms with the spot check
and 2.2 ms with every date checked (about 1M against 0.45M samples per
CPU-second), and the benchmark shares two cores with the service and Kafka.
Correctness runs should use normal mode.

Use from Python
===============

``create_app(token, faults=None, fast=False, prefix="", *, seed=None,
request_log_size=100_000)`` builds the aiohttp application (its
:class:`SandboxState` is ``app[STATE_KEY]``); :class:`SandboxServer` runs it on
a port (0 picks a free one) and exposes ``url``, ``root_url`` and ``state``.
``SandboxState.wait_for(predicate, timeout)`` waits, without polling, until a
condition on the state holds (it is re-checked after every request)::

    async with SandboxServer(token="t") as sandbox:
        api_url = sandbox.url            # the service's API URL
        ...
        await sandbox.state.wait_for(lambda s: s.accepted_samples >= 3000, timeout=30)
        assert sandbox.state.status_counts[200] == 3

``main(argv)`` is the ``stream sandbox`` command; it runs until SIGINT or
SIGTERM and logs one line when listening (never the token or sample data).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import logging
import os
import random
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

import msgspec
from aiohttp import web
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

log = logging.getLogger(__name__)

DEFAULT_TOKEN = "sandbox-token"
TOKEN_ENV = "STREAM_SANDBOX_TOKEN"
DEFAULT_PORT = 8080

# --- The documented contract -------------------------------------------------

MIN_BATCH = 3
MAX_BATCH = 1000
DATA_TYPES = ("steps", "bpm")
# unit -> inclusive maximum of `value` (None: no maximum).  The minimum is "> 0" for all.
UNIT_MAX: dict[str, float | None] = {"count": 30000, "count/min": 300, "count/s": None}
SAMPLE_FIELDS = frozenset({"device_name", "device_version", "start_date", "end_date", "unit", "value"})
ENVELOPE_FIELDS = frozenset({"user_id", "data_type", "data"})

# Not documented: the sandbox's own limit, far above 1000 realistic samples (~200 kB).
MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_REQUEST_LOG_SIZE = 100_000

NonEmptyStr = Annotated[str, Meta(min_length=1)]


def _positive_number(maximum: float | None) -> Any:
    """`value`: a JSON number (msgspec refuses booleans), > 0 and <= maximum.

    int and float are kept apart so an accepted sample is recorded as sent (14 stays 14).
    """
    if maximum is None:
        return Annotated[int, Meta(gt=0)] | Annotated[float, Meta(gt=0)]
    return Annotated[int, Meta(gt=0, le=int(maximum))] | Annotated[float, Meta(gt=0, le=maximum)]


# One Struct per unit, tagged by `unit`: this lets msgspec enforce the unit-dependent
# maximum of `value` during decoding, so a fully valid batch needs no per-field Python.
# Dates stay strings: "ISO 8601" is defined here as datetime.fromisoformat, which accepts
# more forms than msgspec's RFC 3339 parser, so they are checked in `_date_verdict`.
# gc=False: samples hold only str/int/float, so they cannot form cycles.  Normal mode keeps
# every accepted sample; as GC-tracked dicts they made each collection walk them all and
# roughly doubled the CPU per request (measured), as untracked Structs they cost nothing.
class _SampleBase(Struct, tag_field="unit", forbid_unknown_fields=True, kw_only=True, gc=False):
    device_name: NonEmptyStr
    start_date: str
    device_version: str | UnsetType = UNSET
    end_date: str | UnsetType = UNSET


_CountValue = _positive_number(UNIT_MAX["count"])
_CountPerMinuteValue = _positive_number(UNIT_MAX["count/min"])
_CountPerSecondValue = _positive_number(UNIT_MAX["count/s"])


class _CountSample(_SampleBase, tag="count"):
    value: _CountValue


class _CountPerMinuteSample(_SampleBase, tag="count/min"):
    value: _CountPerMinuteValue


class _CountPerSecondSample(_SampleBase, tag="count/s"):
    value: _CountPerSecondValue


_Sample = _CountSample | _CountPerMinuteSample | _CountPerSecondSample


class _Batch(Struct, forbid_unknown_fields=True):
    user_id: NonEmptyStr
    data_type: Literal["steps", "bpm"]
    data: Annotated[list[_Sample], Meta(min_length=MIN_BATCH, max_length=MAX_BATCH)]


_BATCH_DECODER = msgspec.json.Decoder(_Batch)
_SAMPLE_DECODER = msgspec.json.Decoder(_Sample)
_OBJECT_DECODER = msgspec.json.Decoder(dict[str, Raw])
_ARRAY_DECODER = msgspec.json.Decoder(list[Raw])
_ANY_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


# --- Fault configuration -----------------------------------------------------

Rate = Annotated[float, Meta(ge=0.0, le=1.0)]
ErrorStatus = Annotated[int, Meta(ge=400, le=599)]
RedirectStatus = Literal[0, 301, 302, 303, 307, 308]  # 0: off
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# How the `odd_207` fault reshapes a 207's body (see the module docstring).
Odd207 = Literal[
    "reason_null",
    "reason_object",
    "index_string",
    "index_float",
    "unknown_shape",
    "not_json",
    "empty_list",
    "extra_fields",
]
ODD_207_SHAPES: tuple[str, ...] = get_args(Odd207)
LANDING_PATH = "/_sandbox/landing"


class Faults(Struct, forbid_unknown_fields=True, kw_only=True):
    """Faults to inject into ``POST /samples``; see the module docstring for semantics."""

    latency_ms: Annotated[float, Meta(ge=0.0)] = 0.0
    error_rate: Rate = 0.0
    error_status: ErrorStatus = 503
    throttle_rate: Rate = 0.0
    retry_after: Annotated[int, Meta(ge=0)] = 1
    hang_rate: Rate = 0.0
    hang_seconds: Annotated[float, Meta(gt=0.0)] = 3600.0
    fail_all_status: ErrorStatus | None = None
    poison_user_ids: list[str] = []
    refuse_device_names: list[str] = []
    redirect_status: RedirectStatus = 0
    redirect_rate: Rate = 1.0
    partial_rate: Rate = 0.0
    odd_207: Odd207 | None = None


def validated_faults(faults: Faults) -> Faults:
    """Return a checked copy of ``faults`` (Struct construction does not check constraints).

    Raises ``ValueError`` (``msgspec.ValidationError``) when a field is out of range.
    """
    return msgspec.convert(msgspec.to_builtins(faults), Faults)


# --- Request parsing and judgement -------------------------------------------

_MISSING = object()


class _RequestError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


@dataclass(slots=True)
class _Parsed:
    """What could be read of a request body; `error` set means a request-level 400."""

    user_id: str | None = None
    data_type: str | None = None
    size: int | None = None
    # Per element of `data`: the decoded sample, or the reason it was refused.
    items: list[_SampleBase | str] = field(default_factory=list)
    error: _RequestError | None = None


def _parse_body(body: bytes) -> _Parsed:
    # Fast path: one msgspec pass validates the envelope and every sample's structure.
    try:
        batch = _BATCH_DECODER.decode(body)
    except msgspec.DecodeError:
        return _parse_body_slowly(body)
    return _Parsed(batch.user_id, batch.data_type, len(batch.data), batch.data)


def _parse_body_slowly(body: bytes) -> _Parsed:
    """Find out what is wrong: a request-level error, or which samples are malformed and why."""
    parsed = _Parsed()
    try:
        raws = _parse_envelope(body, parsed)
    except _RequestError as exc:
        parsed.error = exc
        return parsed
    parsed.items = [_decode_sample(raw) for raw in raws]
    return parsed


def _parse_envelope(body: bytes, parsed: _Parsed) -> list[Raw]:
    """Check the envelope field by field, filling `parsed` as far as it gets (for the log)."""
    try:
        fields = _OBJECT_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise _RequestError("not_an_object", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise _RequestError("invalid_json", str(exc)) from None
    user_id = _field(fields, "user_id")
    if isinstance(user_id, str) and user_id:
        parsed.user_id = user_id
    data_type = _field(fields, "data_type")
    if data_type in DATA_TYPES:
        parsed.data_type = data_type
    raws = None
    if "data" in fields:
        try:
            raws = _ARRAY_DECODER.decode(fields["data"])
            parsed.size = len(raws)
        except msgspec.DecodeError:
            pass

    unknown = sorted(set(fields) - ENVELOPE_FIELDS)
    if unknown:
        raise _RequestError("unknown_field", f"unknown field(s): {', '.join(unknown)}")
    if user_id is _MISSING:
        raise _RequestError("missing_user_id", "user_id is required")
    if parsed.user_id is None:
        raise _RequestError("invalid_user_id", "user_id must be a non-empty string")
    if data_type is _MISSING:
        raise _RequestError("missing_data_type", "data_type is required")
    if parsed.data_type is None:
        raise _RequestError("invalid_data_type", f"data_type must be one of {', '.join(DATA_TYPES)}")
    if "data" not in fields:
        raise _RequestError("missing_data", "data is required")
    if raws is None:
        raise _RequestError("invalid_data", "data must be an array")
    if len(raws) < MIN_BATCH:
        raise _RequestError("batch_too_small", f"data has {len(raws)} elements, the minimum is {MIN_BATCH}")
    if len(raws) > MAX_BATCH:
        raise _RequestError("batch_too_large", f"data has {len(raws)} elements, the maximum is {MAX_BATCH}")
    return raws


def _field(fields: dict[str, Raw], name: str) -> Any:
    """The JSON value of `name`, `_MISSING` if absent, or a Raw if it cannot be decoded."""
    raw = fields.get(name)
    if raw is None:
        return _MISSING
    try:
        return _ANY_DECODER.decode(raw)
    except msgspec.DecodeError:  # e.g. a number too large for a float
        return raw


def _decode_sample(raw: Raw) -> _SampleBase | str:
    # Validity is always decided by the same strict decoder as the fast path, so the two
    # paths cannot disagree; the classifier only names the reason.
    try:
        return _SAMPLE_DECODER.decode(raw)
    except msgspec.DecodeError:
        return _classify_sample(raw)


def _classify_sample(raw: Raw) -> str:
    """Name the first broken rule of a sample the strict decoder refused."""
    try:
        fields = _OBJECT_DECODER.decode(raw)
    except msgspec.DecodeError:
        return "not_an_object"
    if not SAMPLE_FIELDS.issuperset(fields):
        return "unknown_field"
    values = {name: _field(fields, name) for name in SAMPLE_FIELDS}
    for name in ("device_name", "start_date", "unit", "value"):
        if values[name] is _MISSING:
            return f"missing_{name}"
    device_name = values["device_name"]
    if not isinstance(device_name, str) or not device_name:
        return "invalid_device_name"
    if values["device_version"] is not _MISSING and not isinstance(values["device_version"], str):
        return "invalid_device_version"
    unit = values["unit"]
    if not isinstance(unit, str) or unit not in UNIT_MAX:
        return "invalid_unit"
    value = values["value"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "invalid_value"
    maximum = UNIT_MAX[unit]
    if not value > 0 or (maximum is not None and value > maximum):
        return "value_out_of_range"
    # Dates last, as in `_judge`: a sample's reason does not depend on which path judged it.
    for name in ("start_date", "end_date"):
        if values[name] is not _MISSING and not isinstance(values[name], str):
            return f"invalid_{name}"
    return "invalid_sample"


def _date_verdict(start_text: str, end_text: str | UnsetType) -> tuple[str | None, int]:
    """(reason or None, number of naive dates) for a sample's dates."""
    try:
        start = datetime.fromisoformat(start_text)
    except ValueError:
        return "invalid_start_date", 0
    naive = start.tzinfo is None
    if end_text is UNSET:
        return None, naive
    try:
        end = datetime.fromisoformat(end_text)
    except ValueError:
        return "invalid_end_date", 0
    end_naive = end.tzinfo is None
    if naive != end_naive:  # naive and aware cannot be compared: read the naive one as UTC
        if naive:
            start = start.replace(tzinfo=UTC)
        else:
            end = end.replace(tzinfo=UTC)
    if end < start:
        return "end_before_start", 0
    return None, naive + end_naive


@dataclass(frozen=True, slots=True)
class _ActiveFaults:
    """The faults plus the sets derived from them for O(1) lookups."""

    faults: Faults
    poison_user_ids: frozenset[str]
    refused_devices: frozenset[str]


@dataclass(slots=True)
class _Judgement:
    accepted: list[_SampleBase]
    rejected: list[tuple[int, str]]
    naive_dates: int


def _judge(items: list[_SampleBase | str], refused_devices: frozenset[str], fast: bool) -> _Judgement:
    """Apply the per-sample rules msgspec cannot express (dates, fault-refused devices).

    `fast`: check the dates of the first and last sample only (see "Fast mode").
    """
    accepted: list[_SampleBase] = []
    rejected: list[tuple[int, str]] = []
    naive_dates = 0
    fromisoformat = datetime.fromisoformat
    last = len(items) - 1
    for index, item in enumerate(items):
        if type(item) is str:
            rejected.append((index, item))
            continue
        if fast and 0 < index < last:
            if item.device_name in refused_devices:
                rejected.append((index, "device_refused"))
            else:
                accepted.append(item)
            continue
        # The common case (both dates parse and carry an offset) is inline because this loop
        # is the sandbox's hottest code; anything unusual goes to `_date_verdict`.
        try:
            start = fromisoformat(item.start_date)
            end = start if item.end_date is UNSET else fromisoformat(item.end_date)
        except ValueError:
            start = end = None
        if start is None or start.tzinfo is None or end.tzinfo is None:
            reason, naive = _date_verdict(item.start_date, item.end_date)
        else:
            reason, naive = ("end_before_start" if end < start else None), 0
        if reason is None and item.device_name in refused_devices:
            reason = "device_refused"
        if reason is None:
            accepted.append(item)
            naive_dates += naive
        else:
            rejected.append((index, reason))
    return _Judgement(accepted, rejected, naive_dates)


# --- State -------------------------------------------------------------------


class SandboxState:
    """Everything the sandbox recorded, plus its run-time configuration.

    In-process tests may read the attributes directly; change the configuration only
    through `set_token` / `set_faults` (they keep derived lookups in step).
    """

    def __init__(
        self,
        token: str,
        faults: Faults | None = None,
        fast: bool = False,
        seed: int | None = None,
        request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
    ) -> None:
        self.fast = fast
        self.seed = seed
        self.rng = random.Random(seed)
        self.set_token(token)
        self.set_faults(faults or Faults())
        self.request_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=request_log_size)
        self._waiters: list[tuple[Callable[[SandboxState], bool], asyncio.Future[None]]] = []
        # Set on server shutdown so hung requests answer at once instead of delaying the stop.
        self.closing = asyncio.Event()
        self._clear_records()

    def _clear_records(self) -> None:
        self.requests = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self.accepted_samples = 0
        self.rejected_samples = 0
        self.accepted_batches = 0
        self.min_batch: int | None = None
        self.max_batch: int | None = None
        self.naive_dates = 0
        self.hung = 0
        self.faults_injected: collections.Counter[str] = collections.Counter()
        self.rejected_reasons: collections.Counter[str] = collections.Counter()
        self.request_errors: collections.Counter[str] = collections.Counter()
        self.landing_requests: collections.Counter[str] = collections.Counter()
        # Normal mode only: (user_id, data_type, samples) per accepted batch, in order.
        self._accepted_batches: list[tuple[str, str, list[_SampleBase]]] = []
        self.request_log.clear()

    def reset(self) -> None:
        """Forget everything recorded and re-seed the RNG; keep the token and the faults."""
        self._clear_records()
        self.rng = random.Random(self.seed)
        self._notify()

    # Configuration

    def set_token(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("token must be non-empty and contain no whitespace")
        self.token = token
        self._expected_authorization = f"Bearer {token}".encode()

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults (validated; ``ValueError`` if a field is out of range)."""
        faults = validated_faults(faults)
        # One object swapped at once, so a request sees either the old faults or the new ones.
        self._active_faults = _ActiveFaults(
            faults, frozenset(faults.poison_user_ids), frozenset(faults.refuse_device_names)
        )

    @property
    def faults(self) -> Faults:
        return self._active_faults.faults

    def token_matches(self, authorization: str | None) -> bool:
        if authorization is None:
            return False
        return hmac.compare_digest(authorization.encode(), self._expected_authorization)

    # Records

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "status_counts": {str(status): n for status, n in sorted(self.status_counts.items())},
            "accepted_samples": self.accepted_samples,
            "rejected_samples": self.rejected_samples,
            "accepted_batches": self.accepted_batches,
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "naive_dates": self.naive_dates,
            "hung": self.hung,
            "faults_injected": dict(self.faults_injected),
            "rejected_reasons": dict(self.rejected_reasons),
            "request_errors": dict(self.request_errors),
            "landing_requests": dict(self.landing_requests),
            "fast": self.fast,
        }

    @property
    def accepted(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(user_id, data_type, sample as sent) for every accepted sample, in acceptance order.

        Built on each access (samples are stored as compact Structs); empty in fast mode.
        """
        return [
            (user_id, data_type, sample)
            for user_id, data_type, samples in self._accepted_batches
            for sample in msgspec.to_builtins(samples)
        ]

    def accepted_records(self) -> list[dict[str, Any]]:
        """`accepted` as the JSON of ``GET /_sandbox/accepted``."""
        return [{"user_id": u, "data_type": d, **sample} for u, d, sample in self.accepted]

    def _open_request(self) -> dict[str, Any]:
        self.requests += 1
        entry = {
            "t": time.monotonic(),
            "status": None,
            "user_id": None,
            "data_type": None,
            "size": None,
            "accepted": 0,
            "fault": None,
            "digest": None,
        }
        self.request_log.append(entry)
        return entry

    def _note_batch(self, entry: dict[str, Any], parsed: _Parsed, body: bytes) -> None:
        entry["user_id"] = parsed.user_id
        entry["data_type"] = parsed.data_type
        entry["size"] = parsed.size
        entry["digest"] = f"{zlib.crc32(body):08x}"
        if parsed.size is not None:
            self.min_batch = parsed.size if self.min_batch is None else min(self.min_batch, parsed.size)
            self.max_batch = parsed.size if self.max_batch is None else max(self.max_batch, parsed.size)

    def _record_judgement(self, entry: dict[str, Any], parsed: _Parsed, judgement: _Judgement) -> None:
        n = len(judgement.accepted)
        entry["accepted"] = n
        self.accepted_samples += n
        self.accepted_batches += n > 0
        self.naive_dates += judgement.naive_dates
        self.rejected_samples += len(judgement.rejected)
        self.rejected_reasons.update(reason for _, reason in judgement.rejected)
        if n and not self.fast:
            assert parsed.user_id is not None and parsed.data_type is not None
            self._accepted_batches.append((parsed.user_id, parsed.data_type, judgement.accepted))

    def _close_request(self, entry: dict[str, Any], status: int) -> None:
        entry["status"] = status
        self.status_counts[status] += 1
        self._notify()

    # Waiting (lets tests wait for an outcome without sleeping)

    async def wait_for(self, predicate: Callable[[SandboxState], bool], timeout: float | None = None) -> None:
        """Return once ``predicate(state)`` holds; it is re-checked after each request.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        if predicate(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            predicate, future = waiter
            if future.done():
                continue
            try:
                satisfied = predicate(self)
            except Exception as exc:  # the waiting test should see its own bug, not the handler
                future.set_exception(exc)
                satisfied = False
            if satisfied:
                future.set_result(None)


STATE_KEY = web.AppKey("sandbox_state", SandboxState)


# --- Handlers ----------------------------------------------------------------


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode(payload), content_type="application/json", headers=headers)


def _is_json(request: web.Request) -> bool:
    if request.content_type != "application/json":
        return False
    charset = request.charset
    return charset is None or charset.lower().replace("-", "") == "utf8"


def _html(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    page = f"<!doctype html><html><head><title>{text}</title></head><body><h1>{text}</h1></body></html>\n"
    return web.Response(status=status, text=page, content_type="text/html", headers=headers)


class _Html(Struct):
    """An answer that is an HTML page, not JSON (redirects, the odd 207 ``not_json``)."""

    text: str


async def _samples_handler(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    active = state._active_faults  # one snapshot per request: a PUT mid-request does not half-apply
    entry = state._open_request()
    status, payload, headers = await _handle_samples(request, state, active, entry)
    state._close_request(entry, status)
    log.debug("POST /samples -> %s (size=%s, accepted=%s)", status, entry["size"], entry["accepted"])
    if isinstance(payload, _Html):
        return _html(status, payload.text, headers)
    return _json(status, payload, headers)


async def _handle_samples(
    request: web.Request, state: SandboxState, active: _ActiveFaults, entry: dict[str, Any]
) -> tuple[int, Any, dict[str, str] | None]:
    if active.faults.latency_ms > 0:
        await asyncio.sleep(active.faults.latency_ms / 1000)
    if not state.token_matches(request.headers.get("Authorization")):
        return 401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"}
    if not _is_json(request):
        return 415, {"error": "unsupported_media_type"}, None
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return 413, {"error": "body_too_large"}, None

    parsed = _parse_body(body)
    state._note_batch(entry, parsed, body)

    fault = _choose_fault(state, active, parsed.user_id, request)
    if fault is not None:
        name, answer = fault
        entry["fault"] = name
        state.faults_injected[name] += 1
        return answer if answer is not None else await _hang(state, active.faults.hang_seconds)

    if parsed.error is not None:
        state.request_errors[parsed.error.code] += 1
        return 400, {"error": parsed.error.code, "detail": parsed.error.detail}, None

    judgement = _judge(parsed.items, active.refused_devices, state.fast)
    faults = active.faults
    if faults.partial_rate > 0 and not judgement.rejected and state.rng.random() < faults.partial_rate:
        _note_fault(state, entry, "partial")
        # Every sample was accepted, so position in `accepted` is position in `data`.
        index = state.rng.randrange(len(judgement.accepted))
        del judgement.accepted[index]
        judgement.rejected.append((index, "partial_refused"))
    state._record_judgement(entry, parsed, judgement)
    status, payload, headers = _samples_answer(judgement)
    if status == 207 and faults.odd_207 is not None:
        _note_fault(state, entry, "odd_207")
        payload = _odd_207(faults.odd_207, payload)
    return status, payload, headers


def _note_fault(state: SandboxState, entry: dict[str, Any], name: str) -> None:
    entry["fault"] = name
    state.faults_injected[name] += 1


def _samples_answer(judgement: _Judgement) -> tuple[int, Any, None]:
    n = len(judgement.accepted)
    if not judgement.rejected:
        return 200, {"accepted": n}, None
    rejected = [{"index": index, "reason": reason} for index, reason in judgement.rejected]
    return (207 if n else 400), {"accepted": n, "rejected": rejected}, None


def _odd_207(shape: str, payload: dict[str, Any]) -> Any:
    """A 207's body reshaped by the `odd_207` fault; it names the same refused samples where it can."""
    accepted, rejected = payload["accepted"], payload["rejected"]
    entries: list[dict[str, Any]]
    if shape == "not_json":
        return _Html("207 Multi-Status")
    if shape == "empty_list":
        return {"accepted": accepted, "rejected": []}
    if shape == "reason_null":
        entries = [{"index": r["index"], "reason": None} for r in rejected]
    elif shape == "reason_object":
        entries = [
            {"index": r["index"], "reason": {"code": r["reason"], "message": f"sample {r['index']} refused"}}
            for r in rejected
        ]
    elif shape == "index_string":
        entries = [{"index": str(r["index"]), "reason": r["reason"]} for r in rejected]
    elif shape == "index_float":
        entries = [{"index": float(r["index"]), "reason": r["reason"]} for r in rejected]
    elif shape == "unknown_shape":
        entries = [{"sample": r["index"], "error": r["reason"]} for r in rejected]
    elif shape == "extra_fields":
        entries = [{**r, "severity": "error", "field": None, "details": {"retry": False}} for r in rejected]
        return {"accepted": accepted, "rejected": entries, "request_id": "sandbox", "warnings": []}
    else:  # pragma: no cover - Faults validation admits only the shapes above
        raise ValueError(f"unknown odd_207 shape {shape!r}")
    return {"accepted": accepted, "rejected": entries}


def _choose_fault(
    state: SandboxState, active: _ActiveFaults, user_id: str | None, request: web.Request
) -> tuple[str, tuple[int, Any, dict[str, str] | None] | None] | None:
    """(fault name, answer) if a fault applies to this request, else None; a hang has no answer."""
    faults = active.faults
    if faults.fail_all_status is not None:
        return "fail_all", (faults.fail_all_status, {"error": "outage"}, None)
    if user_id is not None and user_id in active.poison_user_ids:
        return "poison", (500, {"error": "internal_error"}, None)
    # Draw only for enabled faults so one fault's rate does not shift another's sequence.
    if faults.hang_rate > 0 and state.rng.random() < faults.hang_rate:
        return "hang", None
    if faults.error_rate > 0 and state.rng.random() < faults.error_rate:
        return "error", (faults.error_status, {"error": "injected_error"}, None)
    if faults.throttle_rate > 0 and state.rng.random() < faults.throttle_rate:
        headers = {"Retry-After": str(faults.retry_after)}
        return "throttle", (429, {"error": "rate_limited"}, headers)
    if faults.redirect_status and faults.redirect_rate > 0 and state.rng.random() < faults.redirect_rate:
        headers = {"Location": f"{request.url.origin()}{LANDING_PATH}"}
        return "redirect", (faults.redirect_status, _Html("Moved"), headers)
    return None


async def _hang(state: SandboxState, seconds: float) -> tuple[int, Any, None]:
    state.hung += 1
    state._notify()
    try:
        await asyncio.wait_for(state.closing.wait(), seconds)
    except TimeoutError:
        return 504, {"error": "hang_timeout"}, None
    return 503, {"error": "shutting_down"}, None


async def _landing(request: web.Request) -> web.Response:
    """Where the redirect fault points: a page that answers 200 to anything and accepts nothing."""
    state = request.app[STATE_KEY]
    state.landing_requests[request.method] += 1
    await request.read()
    state._notify()
    return _html(200, "Welcome")


async def _stats(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE_KEY].stats())


async def _accepted(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.fast:
        return _json(409, {"error": "fast_mode", "detail": "fast mode keeps counters only"})
    return _json(200, state.accepted_records())


async def _requests(request: web.Request) -> web.Response:
    return _json(200, list(request.app[STATE_KEY].request_log))


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.Response(status=204)


async def _get_faults(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE_KEY].faults)


async def _put_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        faults = msgspec.json.decode(await request.read(), type=Faults)
    except msgspec.DecodeError as exc:
        return _json(400, {"error": "invalid_faults", "detail": str(exc)})
    state.set_faults(faults)
    log.info("sandbox faults replaced: %s", msgspec.json.encode(state.faults).decode())
    return _json(200, state.faults)


class _TokenChange(Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(min_length=1, pattern=r"^\S+$")]


async def _put_token(request: web.Request) -> web.Response:
    try:
        change = msgspec.json.decode(await request.read(), type=_TokenChange)
    except msgspec.DecodeError as exc:
        return _json(400, {"error": "invalid_token", "detail": str(exc)})
    request.app[STATE_KEY].set_token(change.token)
    log.info("sandbox token changed")
    return web.Response(status=204)


async def _release_hangs(app: web.Application) -> None:
    app[STATE_KEY].closing.set()


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"prefix must start with '/': {prefix!r}")
    return prefix


def create_app(
    token: str,
    faults: Faults | None = None,
    fast: bool = False,
    prefix: str = "",
    *,
    seed: int | None = None,
    request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
) -> web.Application:
    """The sandbox as an aiohttp application; its state is ``app[STATE_KEY]``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE_KEY] = SandboxState(token, faults, fast=fast, seed=seed, request_log_size=request_log_size)
    app.router.add_post(f"{_normalise_prefix(prefix)}/samples", _samples_handler)
    app.router.add_get("/_sandbox/stats", _stats)
    app.router.add_get("/_sandbox/accepted", _accepted)
    app.router.add_get("/_sandbox/requests", _requests)
    app.router.add_post("/_sandbox/reset", _reset)
    app.router.add_get("/_sandbox/faults", _get_faults)
    app.router.add_put("/_sandbox/faults", _put_faults)
    app.router.add_put("/_sandbox/token", _put_token)
    app.router.add_get(LANDING_PATH, _landing)  # also answers HEAD
    app.router.add_post(LANDING_PATH, _landing)
    app.on_shutdown.append(_release_hangs)
    return app


class SandboxServer:
    """Run the sandbox on ``host:port`` (port 0 picks a free port) inside the current loop."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: Faults | None = None,
        fast: bool = False,
        prefix: str = "",
        seed: int | None = None,
        request_log_size: int = DEFAULT_REQUEST_LOG_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = _normalise_prefix(prefix)
        self.app = create_app(token, faults, fast, self.prefix, seed=seed, request_log_size=request_log_size)
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> SandboxState:
        return self.app[STATE_KEY]

    @property
    def root_url(self) -> str:
        """Base URL without the prefix (the control endpoints live under ``/_sandbox/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API URL to give the service: ``POST {url}/samples``."""
        return self.root_url + self.prefix

    async def start(self) -> SandboxServer:
        # No access log: one line per request would dominate the benchmark's cost.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SandboxServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# --- Command line ------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stream sandbox",
        description="Run a local, strict implementation of the partner's Samples API.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--token", default=None, help=f"accepted bearer token (env {TOKEN_ENV}, default {DEFAULT_TOKEN})")
    p.add_argument("--prefix", default="", help="path before /samples, e.g. /api/v2.2")
    p.add_argument("--fast", action="store_true", help="keep counters only, not the accepted samples")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault RNG")
    p.add_argument("--request-log-size", type=int, default=DEFAULT_REQUEST_LOG_SIZE)
    f = p.add_argument_group("fault injection")
    f.add_argument("--latency-ms", type=float, default=0.0)
    f.add_argument("--error-rate", type=float, default=0.0)
    f.add_argument("--error-status", type=int, default=503)
    f.add_argument("--throttle-rate", type=float, default=0.0)
    f.add_argument("--retry-after", type=int, default=1, help="seconds, sent in Retry-After with 429")
    f.add_argument("--hang-rate", type=float, default=0.0)
    f.add_argument("--hang-seconds", type=float, default=3600.0)
    f.add_argument("--fail-all-status", type=int, default=None)
    f.add_argument("--poison-user-id", action="append", default=[], dest="poison_user_ids")
    f.add_argument("--refuse-device-name", action="append", default=[], dest="refuse_device_names")
    f.add_argument(
        "--redirect-status",
        type=int,
        default=0,
        help=f"answer POST /samples with this redirect ({', '.join(map(str, REDIRECT_STATUSES))}; 0: off) "
        f"to {LANDING_PATH}, a page that answers 200 and accepts nothing",
    )
    f.add_argument("--redirect-rate", type=float, default=1.0, help="share of requests redirected (default 1)")
    f.add_argument(
        "--partial-rate",
        type=float,
        default=0.0,
        help="share of all-valid batches that refuse one random sample (207, reason partial_refused)",
    )
    f.add_argument(
        "--odd-207",
        choices=ODD_207_SHAPES,
        default=None,
        metavar="SHAPE",
        help=f"reshape the body of every 207: {', '.join(ODD_207_SHAPES)}",
    )
    return p


def faults_from_args(args: argparse.Namespace) -> Faults:
    return msgspec.convert({name: getattr(args, name) for name in Faults.__struct_fields__}, Faults)


async def _serve(args: argparse.Namespace, token: str, faults: Faults) -> int:
    server = SandboxServer(
        token,
        args.host,
        args.port,
        faults=faults,
        fast=args.fast,
        prefix=args.prefix,
        seed=args.seed,
        request_log_size=args.request_log_size,
    )
    try:
        await server.start()
    except OSError as exc:
        log.error("sandbox cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "sandbox listening: API URL %s, fast=%s, faults=%s",
        server.url,
        args.fast,
        msgspec.json.encode(faults).decode(),
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``stream sandbox``: serve until SIGINT/SIGTERM; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or DEFAULT_TOKEN
    try:
        faults = faults_from_args(args)
        _normalise_prefix(args.prefix)
        if not token or any(c.isspace() for c in token):
            raise ValueError("token must be non-empty and contain no whitespace")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args, token, faults))
