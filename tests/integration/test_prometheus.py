"""A real Prometheus server scrapes a running `stream run` while it moves data; the series it stored are
read back through Prometheus's HTTP API."""

from __future__ import annotations

import signal
import subprocess

import aiohttp
import pytest

from stream.dev.generate import WearableData, produce
from stream.dev.localkafka import die_with_parent
from tests.tools import require_tool

from .conftest import all_done, eventually, make_settings, settings_env
from .test_process import expected_identities, free_port, start_service, wait_exit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The Prometheus server's path; without one the test skips (fails under CI), before any broker starts."""
    return require_tool("prometheus")


@pytest.fixture
def prometheus(prometheus_binary, tmp_path):
    """A Prometheus server whose scrape target is filled in by the test (file-based service discovery)."""
    binary = prometheus_binary
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: stream\n"
        f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(),
    )
    try:
        yield f"http://127.0.0.1:{port}", targets
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


async def query(base: str, promql: str) -> list[dict]:
    try:
        async with aiohttp.ClientSession() as session, session.get(
            f"{base}/api/v1/query", params={"query": promql}
        ) as r:
            body = await r.json()
    except aiohttp.ClientError:
        return []
    return body.get("data", {}).get("result", []) if body.get("status") == "success" else []


@pytest.mark.usefixtures("prometheus_binary")  # set up first: a missing server skips before the broker starts
async def test_prometheus_scrapes_the_running_service(kafka, topics, sandbox, prometheus):
    base, targets = prometheus
    records = WearableData(seed=51).mixed(users=100, per_user=(20, 60))
    samples = sum(expected_identities(records).values())
    port = free_port()
    targets.write_text(f'[{{"targets": ["127.0.0.1:{port}"], "labels": {{"app": "stream"}}}}]')
    env = settings_env(make_settings(kafka, topics, sandbox.url, metrics_port=port))
    service = start_service(env)
    try:
        await produce(kafka, topics.samples, records)
        await eventually(lambda: all_done(kafka, topics), timeout=120, what="delivery")

        async def scraped_everything() -> bool:
            result = await query(base, 'sum(stream_samples_total{outcome="accepted"})')
            return bool(result) and float(result[0]["value"][1]) >= samples

        await eventually(scraped_everything, timeout=60, what="Prometheus to store the accepted samples")
        assert (await query(base, 'up{job="stream"}'))[0]["value"][1] == "1"
        for series in (
            "stream_records_consumed_total",
            "stream_batches_total",
            "stream_batch_size_samples_bucket",
            "stream_request_duration_seconds_bucket",
            "stream_end_to_end_latency_seconds_bucket",
            "stream_committed_offset",
            "stream_consumer_lag",
            "stream_buffered_samples",
            "stream_build_info",
        ):
            assert await query(base, series), f"{series} not scraped"
        # No user id ever becomes a label: every label value is from a small fixed set.
        label_names = set()
        for result in await query(base, '{job="stream", __name__=~"stream_.*"}'):
            label_names.update(result["metric"])
        assert not {"user_id", "user"} & label_names
        service.send_signal(signal.SIGTERM)
        assert await wait_exit(service, 60) == 0
    finally:
        service.kill()
