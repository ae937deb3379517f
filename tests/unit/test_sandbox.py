"""The sandbox against the documented Samples API contract, plus its fault injection and control endpoints.

Every rule is tested at its boundaries through HTTP (aiohttp's in-process test server, loopback only).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream.dev.sandbox import (
    STATE_KEY,
    Faults,
    SandboxServer,
    SandboxState,
    create_app,
    faults_from_args,
    main,
)
from stream.dev.sandbox import _parser as sandbox_parser

TOKEN = "test-token"


def sample(**overrides: Any) -> dict[str, Any]:
    """A valid sample (the documentation's example); `name=DROP` removes a field."""
    s: dict[str, Any] = {
        "device_name": "iPhone",
        "device_version": "17.0.3",
        "start_date": "2023-11-01T08:04:51.000+04:00",
        "end_date": "2023-11-01T08:04:58.000+04:00",
        "value": 14,
        "unit": "count",
    }
    s.update(overrides)
    return {k: v for k, v in s.items() if v is not DROP}


DROP = object()


def batch(samples: list[dict[str, Any]], user_id: str = "user-1", data_type: str = "steps") -> dict[str, Any]:
    return {"user_id": user_id, "data_type": data_type, "data": samples}


def valid_samples(n: int) -> list[dict[str, Any]]:
    return [sample(value=i + 1, start_date=f"2023-11-01T08:00:{i % 60:02d}+00:00", end_date=DROP) for i in range(n)]


def with_sample_at(index: int, bad: dict[str, Any], n: int = 3) -> dict[str, Any]:
    samples = valid_samples(n)
    samples[index] = bad
    return batch(samples)


async def post(
    client: TestClient,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    token: str | None = TOKEN,
    authorization: str | None = None,
    content_type: str | None = "application/json",
    path: str = "/samples",
) -> tuple[int, Any, Any]:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = io.BytesIO(raw if raw is not None else json.dumps(payload).encode())
    resp = await client.post(path, data=body, headers=headers, skip_auto_headers=("Content-Type",))
    return resp.status, await resp.json(), resp.headers


async def get_json(client: TestClient, path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def put_faults(client: TestClient, **faults: Any) -> None:
    resp = await client.put("/_sandbox/faults", json=faults)
    assert resp.status == 200, await resp.text()


@pytest.fixture
async def make_client() -> AsyncIterator[Any]:
    clients: list[TestClient] = []

    async def make(**kwargs: Any) -> TestClient:
        kwargs.setdefault("token", TOKEN)
        client = TestClient(TestServer(create_app(**kwargs)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: Any) -> TestClient:
    return await make_client(seed=1)


def state_of(client: TestClient) -> SandboxState:
    return client.app[STATE_KEY]


# --- Happy path ----------------------------------------------------------------------------------


async def test_the_documented_example_is_accepted_and_recorded_as_sent(client: TestClient) -> None:
    samples = [sample(), sample(start_date="2023-11-01T09:47:21.000+04:00", end_date=DROP), sample(value=24.5)]
    status, body, _ = await post(client, batch(samples, user_id="85b4453a", data_type="steps"))

    assert (status, body) == (200, {"accepted": 3})
    accepted = await get_json(client, "/_sandbox/accepted")
    assert accepted == [{"user_id": "85b4453a", "data_type": "steps", **s} for s in samples]
    assert isinstance(accepted[0]["value"], int) and isinstance(accepted[2]["value"], float)
    assert state_of(client).accepted == [("85b4453a", "steps", s) for s in samples]


async def test_bpm_with_count_per_minute_is_accepted(client: TestClient) -> None:
    status, body, _ = await post(client, batch([sample(unit="count/min", value=72)] * 3, data_type="bpm"))
    assert (status, body) == (200, {"accepted": 3})


# --- Batch size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "status", "error"),
    [
        (0, 400, "batch_too_small"),
        (2, 400, "batch_too_small"),
        (3, 200, None),
        (1000, 200, None),
        (1001, 400, "batch_too_large"),
    ],
)
async def test_batch_size_limits(client: TestClient, size: int, status: int, error: str | None) -> None:
    got_status, body, _ = await post(client, batch(valid_samples(size)))

    assert got_status == status
    if error is None:
        assert body == {"accepted": size}
    else:
        assert body["error"] == error
        assert state_of(client).accepted_samples == 0
    stats = state_of(client).stats()
    assert stats["min_batch"] == stats["max_batch"] == size


# --- Per-sample rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "value", "reason"),
    [
        ("count", 30000, None),
        ("count", 30000.0, None),
        ("count", 30001, "value_out_of_range"),
        ("count", 30000.001, "value_out_of_range"),
        ("count/min", 300, None),
        ("count/min", 301, "value_out_of_range"),
        ("count/min", 300.5, "value_out_of_range"),
        ("count/s", 1e6, None),
        ("count/s", 10**20, None),
        ("count", 0, "value_out_of_range"),
        ("count", 0.0, "value_out_of_range"),
        ("count", -1, "value_out_of_range"),
        ("count/s", 0, "value_out_of_range"),
        ("count", 0.001, None),
        ("count", True, "invalid_value"),
        ("count", "14", "invalid_value"),
        ("count", None, "invalid_value"),
        ("count", DROP, "missing_value"),
    ],
)
async def test_value_rules(client: TestClient, unit: str, value: Any, reason: str | None) -> None:
    await check_one_sample(client, sample(unit=unit, value=value), reason)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"unit": "steps"}, "invalid_unit"),
        ({"unit": "COUNT"}, "invalid_unit"),
        ({"unit": DROP}, "missing_unit"),
        ({"device_name": DROP}, "missing_device_name"),
        ({"device_name": ""}, "invalid_device_name"),
        ({"device_name": 7}, "invalid_device_name"),
        ({"device_version": DROP}, None),
        ({"device_version": 17}, "invalid_device_version"),
        ({"device_version": None}, "invalid_device_version"),
        ({"end_date": None}, "invalid_end_date"),
        ({"extra": 1}, "unknown_field"),
    ],
)
async def test_field_rules(client: TestClient, overrides: dict[str, Any], reason: str | None) -> None:
    await check_one_sample(client, sample(**overrides), reason)


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [
        ("2023-11-01T08:04:51+04:00", "2023-11-01T08:04:51+04:00", None),  # equal is fine
        ("2023-11-01T08:04:51.000001+04:00", "2023-11-01T08:04:51+04:00", "end_before_start"),
        ("2023-11-01T08:04:51+04:00", "2023-11-01T08:04:50+04:00", "end_before_start"),
        ("2023-11-01T08:00:00+04:00", "2023-11-01T05:00:00+01:00", None),  # the same instant
        ("2023-11-01T08:00:00+04:00", "2023-11-01T04:30:00Z", None),  # later, though it reads earlier
        ("2023-11-01T08:00:00+00:00", "2023-11-01T09:00:00+02:00", "end_before_start"),  # earlier instant
        ("2023-11-01T08:00:00Z", DROP, None),
        ("2023-11-01", DROP, None),  # fromisoformat accepts a date
        ("20231101T080451+0400", DROP, None),  # and the basic format
        ("yesterday", DROP, "invalid_start_date"),
        ("2023-13-01T00:00:00Z", DROP, "invalid_start_date"),
        ("", DROP, "invalid_start_date"),
        (1698811491, DROP, "invalid_start_date"),
        (None, DROP, "invalid_start_date"),
        (DROP, DROP, "missing_start_date"),
        ("2023-11-01T08:00:00Z", "later", "invalid_end_date"),
        ("2023-11-01T08:00:00Z", 5, "invalid_end_date"),
    ],
)
async def test_date_rules(client: TestClient, start: Any, end: Any, reason: str | None) -> None:
    await check_one_sample(client, sample(start_date=start, end_date=end), reason)


async def check_one_sample(client: TestClient, tested: dict[str, Any], reason: str | None) -> None:
    """Put `tested` in the middle of two valid samples: 200 if it is valid, else 207 naming index 1."""
    status, body, _ = await post(client, with_sample_at(1, tested))
    if reason is None:
        assert (status, body) == (200, {"accepted": 3})
    else:
        assert (status, body) == (207, {"accepted": 2, "rejected": [{"index": 1, "reason": reason}]})
        assert tested not in [s for _, _, s in state_of(client).accepted]


async def test_naive_dates_are_accepted_but_counted(client: TestClient) -> None:
    samples = [
        sample(start_date="2023-11-01T08:00:00", end_date="2023-11-01T08:00:05"),  # 2 naive
        sample(start_date="2023-11-01T08:00:00", end_date="2023-11-01T08:00:05+00:00"),  # 1 naive
        sample(start_date="2023-11-01T08:00:00+00:00", end_date=DROP),  # none
        sample(start_date="2023-11-01T09:00:00", end_date="2023-11-01T08:30:00+00:00"),  # naive read as UTC: earlier
    ]
    status, body, _ = await post(client, batch(samples))

    assert (status, body) == (207, {"accepted": 3, "rejected": [{"index": 3, "reason": "end_before_start"}]})
    assert (await get_json(client, "/_sandbox/stats"))["naive_dates"] == 3


async def test_partial_acceptance_reports_every_rejected_index(client: TestClient) -> None:
    samples = valid_samples(8)
    samples[0] = sample(value=0)
    samples[3] = sample(unit="bogus")
    samples[7] = 42  # not an object
    status, body, _ = await post(client, batch(samples, user_id="u-207"))

    assert status == 207
    assert body == {
        "accepted": 5,
        "rejected": [
            {"index": 0, "reason": "value_out_of_range"},
            {"index": 3, "reason": "invalid_unit"},
            {"index": 7, "reason": "not_an_object"},
        ],
    }
    accepted = [s for _, _, s in state_of(client).accepted]
    assert accepted == [samples[i] for i in (1, 2, 4, 5, 6)]
    stats = await get_json(client, "/_sandbox/stats")
    assert stats["accepted_samples"] == 5 and stats["rejected_samples"] == 3
    assert stats["rejected_reasons"] == {"value_out_of_range": 1, "invalid_unit": 1, "not_an_object": 1}


async def test_no_valid_sample_answers_400_with_the_rejections(client: TestClient) -> None:
    samples = [sample(value=-1), sample(device_name=""), sample(end_date="2000-01-01T00:00:00Z")]
    status, body, _ = await post(client, batch(samples))

    assert status == 400
    assert body == {
        "accepted": 0,
        "rejected": [
            {"index": 0, "reason": "value_out_of_range"},
            {"index": 1, "reason": "invalid_device_name"},
            {"index": 2, "reason": "end_before_start"},
        ],
    }
    assert state_of(client).accepted == []


async def test_a_value_too_large_for_a_float_is_refused_on_its_own(client: TestClient) -> None:
    raw = json.dumps(with_sample_at(2, sample(unit="count/s", value=12345))).encode().replace(b"12345", b"1e400")
    status, body, _ = await post(client, raw=raw)
    assert (status, body) == (207, {"accepted": 2, "rejected": [{"index": 2, "reason": "invalid_value"}]})


# --- Request-level rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"bearer {TOKEN}",
        f"Bearer  {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Token {TOKEN}",
        TOKEN,
    ],
)
async def test_anything_but_the_exact_bearer_token_is_401(client: TestClient, authorization: str | None) -> None:
    status, body, headers = await post(client, batch(valid_samples(3)), token=None, authorization=authorization)
    assert (status, body) == (401, {"error": "unauthorized"})
    assert headers["WWW-Authenticate"] == "Bearer"
    assert state_of(client).accepted_samples == 0


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/json; charset=UTF-8", 200),
        ("Application/JSON", 200),
        ("application/json; charset=iso-8859-1", 415),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        (None, 415),
    ],
)
async def test_content_type(client: TestClient, content_type: str | None, status: int) -> None:
    got, body, _ = await post(client, batch(valid_samples(3)), content_type=content_type)
    assert got == status
    if status == 415:
        assert body == {"error": "unsupported_media_type"}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (batch(valid_samples(3), data_type="sleep"), "invalid_data_type"),
        (batch(valid_samples(3), data_type="Steps"), "invalid_data_type"),
        (batch(valid_samples(3), data_type=None), "invalid_data_type"),
        ({"user_id": "u", "data": valid_samples(3)}, "missing_data_type"),
        (batch(valid_samples(3), user_id=""), "invalid_user_id"),
        (batch(valid_samples(3), user_id=42), "invalid_user_id"),
        ({"data_type": "steps", "data": valid_samples(3)}, "missing_user_id"),
        ({"user_id": "u", "data_type": "steps"}, "missing_data"),
        ({"user_id": "u", "data_type": "steps", "data": {"0": sample()}}, "invalid_data"),
        ({**batch(valid_samples(3)), "source": "x"}, "unknown_field"),
        ([batch(valid_samples(3))], "not_an_object"),
        ("samples", "not_an_object"),
    ],
)
async def test_envelope_errors_are_400_and_accept_nothing(client: TestClient, payload: Any, error: str) -> None:
    status, body, _ = await post(client, payload)

    assert status == 400
    assert body["error"] == error and isinstance(body["detail"], str)
    assert state_of(client).accepted_samples == 0
    assert state_of(client).request_errors == {error: 1}


@pytest.mark.parametrize("raw", [b"", b"{", b'{"user_id": "u",}', b"\xff\xfe", b'{"value": NaN}'])
async def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    status, body, _ = await post(client, raw=raw)
    assert (status, body["error"]) == (400, "invalid_json")


async def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    status, body, _ = await post(client, raw=b'{"user_id": "' + b"u" * (9 * 1024 * 1024) + b'"}')
    assert (status, body) == (413, {"error": "body_too_large"})


async def test_only_post_on_the_samples_path_is_served(client: TestClient) -> None:
    assert (await client.get("/samples")).status == 405
    assert (await client.post("/samples/", data=b"{}")).status == 404


async def test_prefix_moves_the_api_but_not_the_control_endpoints(make_client: Any) -> None:
    client = await make_client(prefix="/api/v2.2/")
    status, _, _ = await post(client, batch(valid_samples(3)), path="/api/v2.2/samples")
    assert status == 200
    assert (await client.post("/samples", data=b"{}")).status == 404
    assert (await get_json(client, "/_sandbox/stats"))["accepted_samples"] == 3


async def test_invalid_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        create_app(TOKEN, prefix="api")


# --- Cross-check against an independent reading of the documentation ----------------------------


def reference_reason(s: Any) -> str | None:
    """The documented rules, written plainly; None when the sample is valid."""
    if not isinstance(s, dict):
        return "not_an_object"
    if set(s) - {"device_name", "device_version", "start_date", "end_date", "unit", "value"}:
        return "unknown_field"
    for name in ("device_name", "start_date", "unit", "value"):
        if name not in s:
            return "missing_" + name
    if not isinstance(s["device_name"], str) or s["device_name"] == "":
        return "invalid_device_name"
    if "device_version" in s and not isinstance(s["device_version"], str):
        return "invalid_device_version"
    if s["unit"] not in ("count", "count/min", "count/s"):
        return "invalid_unit"
    v = s["value"]
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "invalid_value"
    if v <= 0 or (s["unit"] == "count" and v > 30000) or (s["unit"] == "count/min" and v > 300):
        return "value_out_of_range"
    dates = []
    for name in ("start_date", "end_date"):
        if name in s:
            try:
                d = datetime.fromisoformat(s[name])
            except (TypeError, ValueError):
                return "invalid_" + name
            dates.append(d if d.tzinfo else d.replace(tzinfo=UTC))
    if len(dates) == 2 and dates[1] < dates[0]:
        return "end_before_start"
    return None


def random_sample(rng: random.Random) -> Any:
    if rng.random() < 0.02:
        return rng.choice([None, 5, "x", []])
    s = sample(
        unit=rng.choice(["count", "count/min", "count/s", "count", "bpm"]),
        value=rng.choice([rng.uniform(-1, 40000), rng.randint(-2, 31000), 300, 301, 30000, 30001, 0, True, "1"]),
        start_date=rng.choice(["2023-11-01T08:00:00+02:00", "2023-11-01T08:00:00", "2023-11-01", "bad", 3]),
        end_date=rng.choice([DROP, "2023-11-01T06:00:00Z", "2023-11-01T05:59:59Z", "2023-11-01T08:00:00", "x"]),
        device_name=rng.choice(["iPhone", "Apple Watch", "", None, DROP]),
        device_version=rng.choice(["1", DROP, DROP, 2]),
    )
    if rng.random() < 0.03:
        s["extra"] = 1
    return s


async def test_validity_agrees_with_a_plain_reading_of_the_documentation(client: TestClient) -> None:
    rng = random.Random(20231101)
    for _ in range(5):
        samples = [random_sample(rng) for _ in range(1000)]
        expected = {i: r for i, s in enumerate(samples) if (r := reference_reason(s)) is not None}
        status, body, _ = await post(client, batch(samples))
        assert status == (207 if 0 < len(expected) < 1000 else 200 if not expected else 400)
        got = {r["index"]: r["reason"] for r in body.get("rejected", [])}
        assert set(got) == set(expected)
        assert body["accepted"] == 1000 - len(expected)
        assert got == expected  # and for the same first broken rule


# --- Fault injection -----------------------------------------------------------------------------


async def test_fail_all_status_refuses_everything_until_cleared(client: TestClient) -> None:
    await put_faults(client, fail_all_status=503)
    status, body, _ = await post(client, batch(valid_samples(3)))
    assert (status, body) == (503, {"error": "outage"})
    assert state_of(client).accepted_samples == 0

    await put_faults(client)  # back to defaults
    assert (await post(client, batch(valid_samples(3))))[0] == 200
    stats = await get_json(client, "/_sandbox/stats")
    assert stats["status_counts"] == {"200": 1, "503": 1}
    assert stats["faults_injected"] == {"fail_all": 1}


async def test_throttle_answers_429_with_retry_after(client: TestClient) -> None:
    await put_faults(client, throttle_rate=1.0, retry_after=7)
    body = batch(valid_samples(3), user_id="u-throttled")
    status, answer, headers = await post(client, body)

    assert (status, answer) == (429, {"error": "rate_limited"})
    assert headers["Retry-After"] == "7"
    assert state_of(client).accepted_samples == 0

    await put_faults(client)
    assert (await post(client, body))[0] == 200
    log = await get_json(client, "/_sandbox/requests")
    assert [(e["status"], e["fault"], e["user_id"], e["size"]) for e in log] == [
        (429, "throttle", "u-throttled", 3),
        (200, None, "u-throttled", 3),
    ]
    assert log[0]["digest"] == log[1]["digest"]  # the retry is recognisable
    assert log[0]["t"] <= log[1]["t"]


async def test_poisoned_users_always_get_500(client: TestClient) -> None:
    await put_faults(client, poison_user_ids=["bad-user"])
    for _ in range(2):
        status, body, _ = await post(client, batch(valid_samples(3), user_id="bad-user"))
        assert (status, body) == (500, {"error": "internal_error"})
    assert (await post(client, batch(valid_samples(3), user_id="good-user")))[0] == 200
    assert {u for u, _, _ in state_of(client).accepted} == {"good-user"}


async def test_refused_devices_drive_the_207_and_400_paths_with_valid_data(client: TestClient) -> None:
    await put_faults(client, refuse_device_names=["Broken Watch"])
    samples = [sample(), sample(device_name="Broken Watch"), sample(), sample(device_name="Broken Watch")]
    status, body, _ = await post(client, batch(samples))
    assert (status, body) == (
        207,
        {
            "accepted": 2,
            "rejected": [{"index": 1, "reason": "device_refused"}, {"index": 3, "reason": "device_refused"}],
        },
    )

    status, body, _ = await post(client, batch([sample(device_name="Broken Watch")] * 3))
    assert status == 400 and body["accepted"] == 0 and len(body["rejected"]) == 3

    # A sample that is also invalid is refused for its own fault first.
    status, body, _ = await post(client, with_sample_at(0, sample(device_name="Broken Watch", value=0)))
    assert body["rejected"] == [{"index": 0, "reason": "value_out_of_range"}]


async def test_error_rate_one_fails_every_request_with_the_configured_status(client: TestClient) -> None:
    await put_faults(client, error_rate=1.0, error_status=502)
    for _ in range(3):
        assert (await post(client, batch(valid_samples(3))))[:2] == (502, {"error": "injected_error"})
    assert state_of(client).faults_injected == {"error": 3}
    assert state_of(client).accepted_samples == 0


async def test_fault_draws_are_reproducible_with_a_seed(make_client: Any) -> None:
    async def statuses(client: TestClient) -> list[int]:
        return [(await post(client, batch(valid_samples(3))))[0] for _ in range(30)]

    faults = Faults(error_rate=0.3, throttle_rate=0.3)
    a = await make_client(seed=7, faults=faults)
    b = await make_client(seed=7, faults=faults)
    first = await statuses(a)
    assert first == await statuses(b)
    assert {200, 429, 503} <= set(first)

    reset = await a.post("/_sandbox/reset")
    assert reset.status == 204
    assert await statuses(a) == first  # reset re-seeds


async def test_latency_is_added_to_each_request(make_client: Any) -> None:
    client = await make_client(faults=Faults(latency_ms=100))
    started = time.monotonic()
    assert (await post(client, batch(valid_samples(3))))[0] == 200
    assert time.monotonic() - started >= 0.1


async def test_a_hung_request_never_answers_until_the_client_gives_up(make_client: Any) -> None:
    client = await make_client(faults=Faults(hang_rate=1.0))
    with pytest.raises(TimeoutError):
        await client.post(
            "/samples",
            json=batch(valid_samples(3)),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    state = state_of(client)
    await state.wait_for(lambda s: s.hung == 1, timeout=5)
    assert state.accepted_samples == 0
    (entry,) = state.request_log
    assert (entry["status"], entry["fault"]) == (None, "hang")


async def test_stopping_the_server_releases_hung_requests_at_once() -> None:
    async with SandboxServer(token=TOKEN, faults=Faults(hang_rate=1.0)) as server, aiohttp.ClientSession() as session:

        async def hung_post() -> int:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(server.url + "/samples", json=batch(valid_samples(3)), headers=headers) as r:
                return r.status

        request = asyncio.create_task(hung_post())
        await server.state.wait_for(lambda s: s.hung == 1, timeout=5)
        await asyncio.wait_for(server.stop(), timeout=3)
        assert await asyncio.wait_for(request, timeout=3) == 503
    assert server.state.status_counts == {503: 1}


async def test_the_token_can_be_changed_at_run_time(client: TestClient) -> None:
    resp = await client.put("/_sandbox/token", json={"token": "rotated"})
    assert resp.status == 204
    assert (await post(client, batch(valid_samples(3))))[0] == 401
    assert (await post(client, batch(valid_samples(3)), token="rotated"))[0] == 200


@pytest.mark.parametrize("body", [{"token": ""}, {"token": "a b"}, {"token": 5}, {}, {"token": "x", "y": 1}])
async def test_an_invalid_token_change_is_refused(client: TestClient, body: Any) -> None:
    resp = await client.put("/_sandbox/token", json=body)
    assert resp.status == 400
    assert (await post(client, batch(valid_samples(3))))[0] == 200


async def test_faults_endpoint_reads_and_replaces(client: TestClient) -> None:
    defaults = await get_json(client, "/_sandbox/faults")
    assert defaults == {
        "latency_ms": 0.0,
        "error_rate": 0.0,
        "error_status": 503,
        "throttle_rate": 0.0,
        "retry_after": 1,
        "hang_rate": 0.0,
        "hang_seconds": 3600.0,
        "fail_all_status": None,
        "poison_user_ids": [],
        "refuse_device_names": [],
        "redirect_status": 0,
        "redirect_rate": 1.0,
        "partial_rate": 0.0,
        "odd_207": None,
    }
    await put_faults(client, throttle_rate=0.5)
    await put_faults(client, error_rate=0.25)  # replaces: throttle_rate is back to its default
    now = await get_json(client, "/_sandbox/faults")
    assert now == {**defaults, "error_rate": 0.25}


@pytest.mark.parametrize(
    "faults",
    [
        {"error_rate": 1.5},
        {"throttle_rate": -0.1},
        {"error_status": 200},
        {"nonsense": 1},
        {"poison_user_ids": "u"},
        {"hang_seconds": 0},
        {"redirect_status": 300},
        {"redirect_status": 304},
        {"redirect_status": 200},
        {"redirect_status": "302"},
        {"redirect_rate": 1.5},
        {"partial_rate": -0.1},
        {"odd_207": "bogus"},
        {"odd_207": ""},
    ],
)
async def test_invalid_faults_are_refused_and_change_nothing(client: TestClient, faults: dict[str, Any]) -> None:
    resp = await client.put("/_sandbox/faults", json=faults)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_faults"
    assert state_of(client).faults == Faults()


def test_faults_built_in_python_are_validated_too() -> None:
    with pytest.raises(ValueError):
        create_app(TOKEN, faults=Faults(error_rate=2.0))


async def post_raw(client: TestClient, payload: Any, token: str = TOKEN) -> aiohttp.ClientResponse:
    """POST /samples without following redirects; the caller reads the response."""
    headers = {"Authorization": f"Bearer {token}"}
    return await client.post("/samples", json=payload, headers=headers, allow_redirects=False)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_answers_the_status_with_a_landing_page_that_accepts_nothing(
    client: TestClient, status: int
) -> None:
    await put_faults(client, redirect_status=status)
    resp = await post_raw(client, batch(valid_samples(3)))

    assert resp.status == status
    location = resp.headers["Location"]
    assert location == f"http://{client.host}:{client.port}/_sandbox/landing"
    assert resp.content_type == "text/html"
    state = state_of(client)
    assert (state.accepted_samples, state.faults_injected) == (0, {"redirect": 1})
    assert [(e["status"], e["fault"], e["size"]) for e in state.request_log] == [(status, "redirect", 3)]

    # The landing page answers 200 to a GET (what 301/302/303 become) and to a POST (307/308), accepts nothing.
    for method in ("GET", "POST"):
        async with client.session.request(method, location, json=batch(valid_samples(3))) as landing:
            assert landing.status == 200
            assert "html" in (await landing.text()).lower()
    stats = await get_json(client, "/_sandbox/stats")
    assert stats["landing_requests"] == {"GET": 1, "POST": 1}
    assert (stats["accepted_samples"], stats["requests"]) == (0, 1)

    await put_faults(client)  # faithful again
    assert (await post_raw(client, batch(valid_samples(3)))).status == 200


async def test_redirect_is_checked_after_the_token_and_before_the_body(client: TestClient) -> None:
    await put_faults(client, redirect_status=308)
    assert (await post_raw(client, batch(valid_samples(3)), token="wrong")).status == 401
    assert (await post_raw(client, batch(valid_samples(1)))).status == 308  # a faulted request is not judged


async def test_redirect_rate_redirects_a_reproducible_share(make_client: Any) -> None:
    async def statuses(client: TestClient) -> list[int]:
        return [(await post_raw(client, batch(valid_samples(3)))).status for _ in range(30)]

    faults = Faults(redirect_status=302, redirect_rate=0.5)
    first = await statuses(await make_client(seed=3, faults=faults))
    assert first == await statuses(await make_client(seed=3, faults=faults))
    assert set(first) == {200, 302}


async def test_partial_rate_refuses_one_random_sample_of_a_valid_batch(client: TestClient) -> None:
    await put_faults(client, partial_rate=1.0)
    samples = valid_samples(10)
    status, body, _ = await post(client, batch(samples))

    assert status == 207
    assert body["accepted"] == 9
    ((refused,),) = [[r["index"] for r in body["rejected"]]]
    assert body["rejected"] == [{"index": refused, "reason": "partial_refused"}]
    assert [s for _, _, s in state_of(client).accepted] == samples[:refused] + samples[refused + 1 :]
    stats = await get_json(client, "/_sandbox/stats")
    assert stats["rejected_reasons"] == {"partial_refused": 1}
    assert stats["faults_injected"] == {"partial": 1}
    assert state_of(client).request_log[-1]["fault"] == "partial"


async def test_partial_rate_leaves_batches_with_their_own_refusals_alone(client: TestClient) -> None:
    await put_faults(client, partial_rate=1.0)
    status, body, _ = await post(client, with_sample_at(1, sample(value=0), n=4))

    assert (status, body["rejected"]) == (207, [{"index": 1, "reason": "value_out_of_range"}])
    assert state_of(client).faults_injected == {}


async def test_partial_rate_draws_a_reproducible_share(make_client: Any) -> None:
    async def answers(client: TestClient) -> list[tuple[int, Any]]:
        out = []
        for _ in range(30):
            status, body, _ = await post(client, batch(valid_samples(5)))
            out.append((status, body.get("rejected")))
        return out

    first = await answers(await make_client(seed=5, faults=Faults(partial_rate=0.5)))
    assert first == await answers(await make_client(seed=5, faults=Faults(partial_rate=0.5)))
    assert {status for status, _ in first} == {200, 207}
    assert len({str(rejected) for status, rejected in first if status == 207}) > 1  # not always the same index


REFUSED_AT_1_AND_3 = [sample(), sample(device_name="Broken Watch"), sample(), sample(device_name="Broken Watch")]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("reason_null", {"accepted": 2, "rejected": [{"index": 1, "reason": None}, {"index": 3, "reason": None}]}),
        (
            "reason_object",
            {
                "accepted": 2,
                "rejected": [
                    {"index": 1, "reason": {"code": "device_refused", "message": "sample 1 refused"}},
                    {"index": 3, "reason": {"code": "device_refused", "message": "sample 3 refused"}},
                ],
            },
        ),
        (
            "index_string",
            {
                "accepted": 2,
                "rejected": [{"index": "1", "reason": "device_refused"}, {"index": "3", "reason": "device_refused"}],
            },
        ),
        (
            "index_float",
            {
                "accepted": 2,
                "rejected": [{"index": 1.0, "reason": "device_refused"}, {"index": 3.0, "reason": "device_refused"}],
            },
        ),
        (
            "unknown_shape",
            {
                "accepted": 2,
                "rejected": [{"sample": 1, "error": "device_refused"}, {"sample": 3, "error": "device_refused"}],
            },
        ),
        ("empty_list", {"accepted": 2, "rejected": []}),
        (
            "extra_fields",
            {
                "accepted": 2,
                "rejected": [
                    {
                        "index": i,
                        "reason": "device_refused",
                        "severity": "error",
                        "field": None,
                        "details": {"retry": False},
                    }
                    for i in (1, 3)
                ],
                "request_id": "sandbox",
                "warnings": [],
            },
        ),
    ],
)
async def test_odd_207_reshapes_the_body_of_a_207_and_nothing_else(
    client: TestClient, shape: str, expected: dict[str, Any]
) -> None:
    await put_faults(client, refuse_device_names=["Broken Watch"], odd_207=shape)
    resp = await post_raw(client, batch(REFUSED_AT_1_AND_3))

    assert resp.status == 207
    raw = await resp.read()
    assert json.loads(raw) == expected
    if shape == "index_float":
        assert b'"index":1.0' in raw  # a float on the wire, not an integer
    state = state_of(client)
    assert (state.accepted_samples, state.rejected_samples) == (2, 2)  # the truth is unchanged
    assert state.faults_injected == {"odd_207": 1}
    # 200 and 400 keep their documented bodies.
    assert (await post(client, batch(valid_samples(3))))[:2] == (200, {"accepted": 3})
    status, body, _ = await post(client, batch([sample(device_name="Broken Watch")] * 3))
    assert status == 400 and body["rejected"][0] == {"index": 0, "reason": "device_refused"}


async def test_odd_207_not_json_answers_an_html_page(client: TestClient) -> None:
    await put_faults(client, refuse_device_names=["Broken Watch"], odd_207="not_json")
    resp = await post_raw(client, batch(REFUSED_AT_1_AND_3))

    assert (resp.status, resp.content_type) == (207, "text/html")
    text = await resp.text()
    assert text.lstrip().startswith("<!doctype html>")
    with pytest.raises(ValueError):
        json.loads(text)
    assert state_of(client).accepted_samples == 2


async def test_odd_207_applies_to_a_207_made_by_partial_rate(client: TestClient) -> None:
    await put_faults(client, partial_rate=1.0, odd_207="index_string")
    status, body, _ = await post(client, batch(valid_samples(4)))

    assert status == 207
    (entry,) = body["rejected"]
    assert entry["reason"] == "partial_refused" and entry["index"] in {"0", "1", "2", "3"}
    assert state_of(client).faults_injected == {"partial": 1, "odd_207": 1}
    assert state_of(client).request_log[-1]["fault"] == "odd_207"


def test_the_new_fault_flags_map_to_faults() -> None:
    args = sandbox_parser().parse_args(
        ["--redirect-status", "307", "--redirect-rate", "0.25", "--partial-rate", "0.5", "--odd-207", "index_float"]
    )
    assert faults_from_args(args) == Faults(
        redirect_status=307, redirect_rate=0.25, partial_rate=0.5, odd_207="index_float"
    )
    assert faults_from_args(sandbox_parser().parse_args([])) == Faults()  # faithful by default


@pytest.mark.parametrize(
    "argv", [["--redirect-status", "300"], ["--redirect-rate", "2"], ["--partial-rate", "-1"], ["--odd-207", "x"]]
)
def test_cli_rejects_invalid_new_fault_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err  # the flag exists; its value is what is refused
    assert argv[0] in err or argv[0].lstrip("-").replace("-", "_") in err


# --- Records, stats and control ------------------------------------------------------------------


async def test_stats_summarise_every_request(client: TestClient) -> None:
    await post(client, batch(valid_samples(5)))
    await post(client, with_sample_at(0, sample(value=0), n=4))
    await post(client, batch(valid_samples(2)))
    await post(client, batch(valid_samples(3)), token="wrong")

    stats = await get_json(client, "/_sandbox/stats")
    assert stats == {
        "requests": 4,
        "status_counts": {"200": 1, "207": 1, "400": 1, "401": 1},
        "accepted_samples": 8,
        "rejected_samples": 1,
        "accepted_batches": 2,
        "min_batch": 2,
        "max_batch": 5,
        "naive_dates": 0,
        "hung": 0,
        "faults_injected": {},
        "rejected_reasons": {"value_out_of_range": 1},
        "request_errors": {"batch_too_small": 1},
        "landing_requests": {},
        "fast": False,
    }
    log = await get_json(client, "/_sandbox/requests")
    assert [(e["status"], e["size"], e["accepted"]) for e in log] == [
        (200, 5, 5),
        (207, 4, 3),
        (400, 2, 0),
        (401, None, 0),
    ]
    assert all(a["t"] <= b["t"] for a, b in itertools.pairwise(log))


async def test_reset_forgets_records_but_keeps_token_and_faults(client: TestClient) -> None:
    await put_faults(client, refuse_device_names=["X"])
    await post(client, batch(valid_samples(3)))
    assert (await client.post("/_sandbox/reset")).status == 204

    stats = await get_json(client, "/_sandbox/stats")
    assert (stats["requests"], stats["accepted_samples"], stats["min_batch"]) == (0, 0, None)
    assert await get_json(client, "/_sandbox/accepted") == []
    assert await get_json(client, "/_sandbox/requests") == []
    assert (await get_json(client, "/_sandbox/faults"))["refuse_device_names"] == ["X"]
    assert (await post(client, batch(valid_samples(3))))[0] == 200


async def test_request_log_is_bounded(make_client: Any) -> None:
    client = await make_client(request_log_size=2)
    for i in range(3):
        await post(client, batch(valid_samples(3), user_id=f"u{i}"))
    assert [e["user_id"] for e in await get_json(client, "/_sandbox/requests")] == ["u1", "u2"]
    assert state_of(client).requests == 3


async def test_fast_mode_keeps_counters_only_and_still_validates(make_client: Any) -> None:
    client = await make_client(fast=True)
    samples = valid_samples(5)
    samples[2] = sample(value=30001)  # structure and ranges are checked for every sample
    samples[0] = sample(start_date="not a date")  # dates are spot-checked on the first and last sample
    samples[3] = sample(start_date="not a date either")  # ...but not in between (documented)
    status, body, _ = await post(client, batch(samples))

    assert status == 207
    assert body["rejected"] == [
        {"index": 0, "reason": "invalid_start_date"},
        {"index": 2, "reason": "value_out_of_range"},
    ]
    assert (await client.get("/_sandbox/accepted")).status == 409
    stats = await get_json(client, "/_sandbox/stats")
    assert (stats["accepted_samples"], stats["fast"]) == (3, True)
    assert state_of(client).accepted == []


async def test_wait_for_returns_when_the_condition_holds_and_times_out_otherwise(client: TestClient) -> None:
    state = state_of(client)
    waiting = asyncio.create_task(state.wait_for(lambda s: s.accepted_samples >= 6, timeout=5))
    await post(client, batch(valid_samples(3)))
    assert not waiting.done()
    await post(client, batch(valid_samples(3)))
    await waiting
    with pytest.raises(TimeoutError):
        await state.wait_for(lambda s: s.accepted_samples > 6, timeout=0.05)
    assert state._waiters == []


# --- SandboxServer and the command line ----------------------------------------------------------


async def test_sandbox_server_serves_on_a_free_port_with_prefix() -> None:
    async with SandboxServer(token=TOKEN, prefix="/api/v2.2") as server, aiohttp.ClientSession() as session:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}/api/v2.2"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(server.url + "/samples", json=batch(valid_samples(3)), headers=headers) as r:
            assert r.status == 200
        async with session.get(server.root_url + "/_sandbox/stats") as r:
            assert (await r.json())["accepted_samples"] == 3
        assert server.state.accepted_samples == 3
    await server.stop()  # idempotent


def test_cli_rejects_invalid_fault_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--error-rate", "2"])
    assert exc.value.code == 2


def test_cli_serves_until_sigterm_and_never_logs_the_token() -> None:
    env = {**os.environ, "STREAM_SANDBOX_TOKEN": "secret-from-env"}
    args = ["--port", "0", "--fast", "--throttle-rate", "1", "--retry-after", "3", "--poison-user-id", "p"]
    code = "import sys; from stream.dev.sandbox import main; sys.exit(main(sys.argv[1:]))"
    with subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # the start line: waiting for it is the synchronisation
            url = re.search(r"API URL (http://\S+),", line)
            assert url, line
            asyncio.run(_post_once(url.group(1)))
            proc.terminate()
            assert proc.wait(timeout=10) == 0
            rest = proc.stderr.read()
        finally:
            proc.kill()
    assert "secret-from-env" not in line + rest


async def _post_once(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer secret-from-env"}
        async with session.post(url + "/samples", json=batch(valid_samples(3)), headers=headers) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "3"
        async with session.get(url + "/_sandbox/faults") as r:
            assert (await r.json())["poison_user_ids"] == ["p"]
