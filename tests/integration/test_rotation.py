"""Kafka credential rotation without a restart: the SCRAM password changes on the broker and in the mounted file,
in either order, and the service goes on delivering, every sample once, with no one restarting it.

The broker is restarted after each rotation: connections logged in with the old password would otherwise go on
working, and only new ones (which a broker restart, a network blip or a rebalance to another broker forces) show
whether the service took the new password."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from stream.dev.generate import WearableData, produce

from .conftest import accepted_identities, all_done, dedicated_broker, eventually, make_settings, settings_env
from .test_process import expected_identities, free_port, log_tail, start_service, wait_exit

pytestmark = pytest.mark.integration


def swap_in(path: Path, text: str) -> None:
    """Replace the file at once, as the kubelet updates a mounted Secret (a new file renamed over the old)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


async def ready(port: int) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False


def logged(service, event: str, times: int = 1):
    """A check for `eventually`: the service has logged this event (at least `times` times)."""
    async def check() -> bool:
        return log_tail(service, None).count(f'"event":"{event}"') >= times
    return check


async def test_a_rotated_scram_password_is_taken_without_a_restart(sandbox, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text("first-pa55\n")
    loop = asyncio.get_running_loop()
    data = WearableData(seed=77)
    sent = []
    async with dedicated_broker("rotation", scram_users={"stream": "first-pa55"}) as (broker, topics):

        async def deliver_a_round(users: int) -> None:
            records = data.mixed(users=users, per_user=(3, 12))
            sent.extend(records)
            await produce(broker.bootstrap, topics.samples, records)
            await eventually(lambda: all_done(broker.bootstrap, topics), what="delivery of a round", timeout=90)

        async def restart_broker() -> None:  # every connection is new afterwards: the old password is gone
            await loop.run_in_executor(None, broker.restart)

        port = free_port()
        env = settings_env(make_settings(
            broker.sasl_bootstrap, topics, sandbox.url, metrics_port=port,
            kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="stream", kafka_sasl_password_file=str(password_file),
            kafka_credentials_check_seconds=0.5,
        ))
        service = start_service(env)
        try:
            await deliver_a_round(20)

            # 1. The brokers first, then the file (Strimzi's order: the kubelet updates the Secret's file later).
            await loop.run_in_executor(None, broker.set_scram_password, "stream", "second-pa55")
            swap_in(password_file, "second-pa55\n")
            await eventually(logged(service, "kafka_clients_rebuilding"),
                             what="new Kafka clients after the file changed", timeout=60)
            await eventually(lambda: ready(port), what="ready with the new clients", timeout=90)
            await restart_broker()
            await deliver_a_round(20)

            # 2. The file first: the brokers refuse a trial login with it, so the clients that work go on (no
            # drain that would leave the whole group waiting) until the brokers have the password too.
            swap_in(password_file, "third-pa55\n")
            await eventually(logged(service, "kafka_credentials_not_accepted"),
                             what="the new file refused by a trial login", timeout=60)
            await deliver_a_round(10)  # still delivering with the clients logged in before
            await loop.run_in_executor(None, broker.set_scram_password, "stream", "third-pa55")
            await eventually(logged(service, "kafka_clients_rebuilding", times=2),
                             what="new clients once the brokers accept the file", timeout=90)
            await eventually(lambda: ready(port), what="ready with the third password", timeout=90)
            await restart_broker()
            await deliver_a_round(20)

            assert service.poll() is None, "the service exited: " + log_tail(service)
            service.send_signal(signal.SIGTERM)
            assert await wait_exit(service, 60) == 0
        finally:
            service.kill()
        logs = log_tail(service, None)
    # Every sample of the three rounds once: none lost across the rebuilds, none sent twice by a drain.
    assert sorted(await accepted_identities(sandbox)) == sorted(expected_identities(sent).elements())
    assert logs.count('"event":"kafka_clients_rebuilding"') == 2, logs[-3000:]
    assert "second-pa55" not in logs and "third-pa55" not in logs  # passwords never logged
