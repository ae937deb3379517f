"""`stream run` fails fast and cleanly before it joins anything: a taken metrics port, an unreachable Kafka.

No broker needed: the bootstrap address is a closed port (127.0.0.1:1), so the service could never join a group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from stream import cli, config

REPO = Path(__file__).resolve().parents[2]
CLOSED_BOOTSTRAP = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process already listens on (all interfaces, as the metrics server binds)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _stream_run(**variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_")}
    env.update(PYTHONPATH=str(REPO), STREAM_API_TOKEN="x", STREAM_KAFKA_BOOTSTRAP_SERVERS=CLOSED_BOOTSTRAP)
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_taken_metrics_port_exits_2_with_one_line_before_any_kafka_client(taken_port: int):
    done = _stream_run(STREAM_METRICS_PORT=str(taken_port))

    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"stream run: cannot listen on port {taken_port} (STREAM_METRICS_PORT): address already in use\n"
    )
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


def test_an_unreachable_kafka_at_start_exits_1_with_a_clear_line():
    done = _stream_run(STREAM_METRICS_PORT="0")

    assert done.returncode == 1, done.stderr
    assert (
        f"stream run: cannot reach Kafka at {CLOSED_BOOTSTRAP} (STREAM_KAFKA_BOOTSTRAP_SERVERS): "
        "no bootstrap server answered\n"
    ) in done.stderr
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr


def test_an_unreadable_tls_file_is_a_configuration_error(tmp_path: Path):
    done = _stream_run(STREAM_KAFKA_SECURITY_PROTOCOL="SSL", STREAM_KAFKA_SSL_CAFILE=str(tmp_path / "missing.pem"))

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("stream run: configuration error: STREAM_KAFKA_SSL_CAFILE: cannot load")
    assert "Traceback" not in done.stderr


async def test_the_port_is_bound_before_the_pipeline_is_built(monkeypatch: pytest.MonkeyPatch):
    """The pipeline (and with it every Kafka client) is constructed only once the port listens; until then
    /readyz answers "starting", then whatever the pipeline says."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: dict[str, object] = {}

    class FakePipeline:
        credentials_changed = None

        def __init__(self, settings, metrics, token):
            with socket.socket() as sock:
                seen["listening"] = sock.connect_ex(("127.0.0.1", port)) == 0

        def ready(self) -> tuple[bool, str]:
            return False, "fake pipeline"

        def stop(self) -> None:
            pass

        async def run(self) -> None:
            seen["ready"] = await _get(port, "/readyz")

    import stream.pipeline

    monkeypatch.setattr(stream.pipeline, "Pipeline", FakePipeline)
    settings = msgspec.convert({"api_token": "x", "metrics_port": port}, config.Settings)

    assert await cli.serve(settings) == 0
    assert seen == {"listening": True, "ready": (503, "fake pipeline\n")}


def test_readiness_says_starting_until_the_pipeline_exists():
    ready = cli._LateReady()
    assert ready() == (False, "starting")


async def _get(port: int, path: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()

