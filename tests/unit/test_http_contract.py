"""The HTTP contract end to end over loopback: the real SamplesSink (aiohttp client) against the sandbox.

A redirect is never followed and never passes for an acceptance; a 207 whose list of refused samples is
odd still names the samples the sandbox truly refused, or says it cannot tell (None). No Kafka involved:
these live with the unit tests (the `integration` marker means "needs the broker").
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from stream.dev.sandbox import Faults, SandboxServer
from stream.outcome import Accepted, Partial, Retry
from stream.sink import REDIRECT_LOG_EVERY, SamplesSink

TOKEN = "contract-token"
REFUSED_DEVICE = "Broken Watch"


def samples(n: int, refused_at: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "device_name": REFUSED_DEVICE if i in refused_at else "iPhone",
            "start_date": f"2024-03-01T08:00:{i:02d}+00:00",
            "unit": "count",
            "value": i + 1,
        }
        for i in range(n)
    ]


def body_of(data: list[dict[str, Any]], user_id: str = "user-1") -> bytes:
    return json.dumps({"user_id": user_id, "data_type": "steps", "data": data}).encode()


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(token=TOKEN, seed=1) as server:
        yield server


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., Any]]:
    sinks: list[SamplesSink] = []

    async def make(url: str, **kwargs: Any) -> SamplesSink:
        sink = SamplesSink(url + "/samples", lambda: TOKEN, timeout=10.0, max_connections=4, **kwargs)
        await sink.start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()


# --- Redirects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_a_page_that_answers_200_is_a_retry_not_an_acceptance(
    sandbox: SandboxServer, make_sink: Callable[..., Any], status: int
) -> None:
    sink = await make_sink(sandbox.url)
    body = body_of(samples(3))
    sandbox.state.set_faults(Faults(redirect_status=status))

    got_status, outcome = await sink.send(body)

    assert got_status == status
    assert outcome == Retry("redirect", None, f"{sandbox.root_url}/_sandbox/landing")
    stats = sandbox.state.stats()
    assert stats["accepted_samples"] == 0
    assert stats["landing_requests"] == {}  # not followed: no GET (301/302/303), no re-POST (307/308)
    assert stats["faults_injected"] == {"redirect": 1}

    sandbox.state.set_faults(Faults())  # the API is where it should be again: the same body is accepted
    assert await sink.send(body) == (200, Accepted())
    assert sandbox.state.accepted_samples == 3
    first, second = sandbox.state.request_log
    assert first["digest"] == second["digest"]
    assert sandbox.state.landing_requests == {}


async def fake_api(handler: Callable[[web.Request], Any]) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def url_of(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_without_location_is_a_redirect_too(make_sink: Callable[..., Any], status: int) -> None:
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=status, text="moved, but where?")

    runner = await fake_api(moved)
    try:
        sink = await make_sink(url_of(runner))
        assert await sink.send(body_of(samples(3))) == (status, Retry("redirect", None, None))
    finally:
        await runner.cleanup()


async def test_a_redirect_keeps_its_retry_after_and_a_cross_origin_307_is_not_blamed_on_the_token(
    sandbox: SandboxServer, make_sink: Callable[..., Any]
) -> None:
    # Another origin (the sandbox's port): following would drop the Authorization header and get a 401.
    target = f"{sandbox.url}/samples"
    seen: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.Response(status=307, headers={"Location": target, "Retry-After": "5"})

    runner = await fake_api(moved)
    try:
        sink = await make_sink(url_of(runner))
        assert await sink.send(body_of(samples(3))) == (307, Retry("redirect", 5.0, target))
    finally:
        await runner.cleanup()
    assert seen == ["POST"]
    assert sandbox.state.requests == 0


async def test_redirects_are_logged_at_most_once_a_minute_with_status_and_location_only(
    sandbox: SandboxServer, make_sink: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    sink = await make_sink(sandbox.url, clock=lambda: now[0])
    sandbox.state.set_faults(Faults(redirect_status=302))
    body = body_of(samples(3))
    location = f"{sandbox.root_url}/_sandbox/landing"

    with caplog.at_level(logging.WARNING, logger="stream.sink"):
        for _ in range(3):
            await sink.send(body)
            now[0] += 1.0
        now[0] += REDIRECT_LOG_EVERY
        await sink.send(body)

    lines = [r for r in caplog.records if r.name == "stream.sink"]
    assert [(r.levelno, r.event, r.status, r.location, r.suppressed) for r in lines] == [
        (logging.WARNING, "api_redirect", 302, location, 0),
        (logging.WARNING, "api_redirect", 302, location, 2),
    ]
    for record in lines:
        everything = record.getMessage() + repr(vars(record))
        assert TOKEN not in everything
        assert "iPhone" not in everything  # nothing of the body


# --- 207 with an odd list of refused samples -------------------------------------------------------


def device_reason(i: int) -> str:
    return "device_refused"


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ("reason_null", lambda i: "refused"),
        ("reason_object", lambda i: f'{{"code":"device_refused","message":"sample {i} refused"}}'),
        ("index_string", device_reason),
        ("index_float", device_reason),
        ("extra_fields", device_reason),
        ("unknown_shape", None),
        ("not_json", None),
        ("empty_list", None),
    ],
)
async def test_an_odd_207_names_the_samples_truly_refused_or_says_it_cannot_tell(
    sandbox: SandboxServer, make_sink: Callable[..., Any], shape: str, reason: Callable[[int], str] | None
) -> None:
    sink = await make_sink(sandbox.url)
    sandbox.state.set_faults(Faults(refuse_device_names=[REFUSED_DEVICE], odd_207=shape))

    status, outcome = await sink.send(body_of(samples(6, refused_at=(1, 4))))

    assert status == 207
    assert isinstance(outcome, Partial)
    assert sandbox.state.accepted_samples == 4  # the truth: 1 and 4 refused
    expected = None if reason is None else {i: reason(i) for i in (1, 4)}
    assert outcome.refused == expected
    assert outcome.detail  # an excerpt of the body, for the dead letter's message
    assert ("207 Multi-Status" if shape == "not_json" else '"accepted":4') in outcome.detail


@pytest.mark.parametrize("shape", ["reason_null", "reason_object", "index_string", "index_float", "extra_fields"])
async def test_a_207_from_valid_input_names_the_one_sample_the_sandbox_refused(
    sandbox: SandboxServer, make_sink: Callable[..., Any], shape: str
) -> None:
    sink = await make_sink(sandbox.url)
    sandbox.state.set_faults(Faults(partial_rate=1.0, odd_207=shape))
    sent = samples(20)

    status, outcome = await sink.send(body_of(sent))

    assert status == 207 and isinstance(outcome, Partial) and outcome.refused is not None
    accepted = [sample for _, _, sample in sandbox.state.accepted]
    truly_refused = {i for i, sample in enumerate(sent) if sample not in accepted}
    assert len(truly_refused) == 1
    assert set(outcome.refused) == truly_refused
