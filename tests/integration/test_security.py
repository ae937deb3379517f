"""Kafka security and secrets: delivery through a SCRAM listener of a real broker; the API token (and the
SASL password) never appear in logs or metrics, and sample payloads never appear in logs."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from stream.dev.generate import WearableData, produce

from .conftest import (
    accepted_identities,
    all_done,
    dedicated_broker,
    eventually,
    make_settings,
    running,
    sandbox_stats,
    settings_env,
)
from .test_process import expected_identities, free_port, log_tail, start_service, wait_exit

pytestmark = pytest.mark.integration


async def test_delivery_through_a_scram_listener(sandbox, tmp_path):
    password_file = tmp_path / "kafka-password"
    password_file.write_text("scram-pa55word\n")
    async with dedicated_broker("scram", scram_users={"stream": "scram-pa55word"}) as (broker, topics):
        records = WearableData(seed=41).mixed(users=30, per_user=(5, 30))
        await produce(broker.bootstrap, topics.samples, records)
        settings = make_settings(
            broker.sasl_bootstrap, topics, sandbox.url,
            kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="stream", kafka_sasl_password_file=str(password_file),
        )
        async with running(settings):
            await eventually(lambda: all_done(broker.bootstrap, topics), what="delivery through SCRAM")
    assert sorted(await accepted_identities(sandbox)) == sorted(expected_identities(records).elements())


async def test_the_token_and_sample_payloads_never_reach_logs_or_metrics(kafka, topics, sandbox):
    token = "tok-very-SECRET-4711"
    records = WearableData(seed=42).mixed(users=10, per_user=(5, 10))
    await produce(kafka, topics.samples, records)
    port = free_port()
    # The sandbox wants another token: the service logs its auth failure, its retries, its state.
    env = settings_env(make_settings(kafka, topics, sandbox.url, api_token=token, metrics_port=port))
    env["STREAM_LOG_LEVEL"] = "DEBUG"
    service = start_service(env)
    try:

        async def refused_a_few_times() -> bool:
            return (await sandbox_stats(sandbox))["status_counts"].get("401", 0) >= 2

        await eventually(refused_a_few_times, what="the API to refuse the token")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                metrics_text = await r.text()
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
        service.send_signal(signal.SIGTERM)
        await wait_exit(service, 60)
    finally:
        service.kill()
    logs = log_tail(service, limit=None)
    assert "auth_failed" in logs  # the failure itself is logged...
    assert token not in logs  # ...never the token
    assert token not in metrics_text
    assert "stream_api_auth_failure 1.0" in metrics_text
    # No sample payload in the logs, even at debug: no device name, no date of a sample.
    assert "Apple Watch" not in logs and "iPhone" not in logs
    assert "2026-11-01T" not in logs
