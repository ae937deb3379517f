"""Kafka over TLS, against a real broker's TLS listeners: SSL with CA verification, mutual TLS, SASL_SSL with
SCRAM; and a wrong CA, which keeps the service up, not ready, saying which setting to check.

One LocalKafka for the module, with a PLAINTEXT listener (for the test's own checks), SSL, MTLS (client
certificates required) and SASL_SSL listeners, and certificates made by the test (tests/integration/certs.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

from stream.dev.generate import Record, WearableData
from stream.dev.localkafka import BrokerTls, LocalKafka
from stream.kafka_options import kafka_client_options
from stream.kafka_tls import tls_problem

from .certs import Material, Pki, issue, make_material, write_pki
from .conftest import (
    Topics,
    accepted_identities,
    all_done,
    create_topics,
    eventually,
    make_settings,
    running,
    sandbox_stats,
    settings_env,
    wait_for_group_coordinator,
)
from .test_process import expected_identities, free_port, log_tail, start_service, wait_exit
from .test_rotation import logged, ready, swap_in

pytestmark = pytest.mark.integration

USER, PASSWORD = "stream-tls", "tls-pa55word"


@pytest.fixture(scope="module")
def material() -> Material:
    return make_material()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, material: Material) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"), material)


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[LocalKafka]:
    tls = BrokerTls(keystore=pki.broker_keystore, ca=pki.ca, client_keystore=pki.client_keystore)
    with LocalKafka(port=0, tls=tls, scram_users={USER: PASSWORD}) as kafka:
        asyncio.run(wait_for_group_coordinator(kafka.bootstrap))
        yield kafka


@pytest.fixture
async def topics(broker: LocalKafka) -> Topics:
    tag = uuid.uuid4().hex[:8]
    names = Topics(f"samples-tls-{tag}", f"dlq-tls-{tag}", f"pending-tls-{tag}", f"group-tls-{tag}")
    await create_topics(broker.bootstrap, [names.samples, names.dlq, names.pending], partitions=4)
    return names


async def produce_over_tls(bootstrap: str, topic: str, records: list[Record], cafile: Path) -> None:
    """The producers' side, through the SSL listener as well (verifying the broker with the CA)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, security_protocol="SSL", acks="all",
                                ssl_context=create_ssl_context(cafile=str(cafile)))
    await producer.start()
    try:
        for r in records:
            await producer.send(topic, value=r.value, key=r.key)
        await producer.flush()
    finally:
        await producer.stop()


async def deliver(broker: LocalKafka, topics: Topics, sandbox, records: list[Record], bootstrap: str,
                  **tls: object) -> None:
    settings = make_settings(bootstrap, topics, sandbox.url, **tls)
    async with running(settings) as pipeline:
        await eventually(lambda: all_done(broker.bootstrap, topics), what=f"delivery over {bootstrap}")
        assert pipeline.ready() == (True, "ready")
    assert sorted(await accepted_identities(sandbox)) == sorted(expected_identities(records).elements())


async def test_ssl_with_ca_verification_delivers_and_commits(broker, topics, sandbox, pki):
    records = WearableData(seed=71).mixed(users=30, per_user=(5, 30))
    await produce_over_tls(broker.ssl_bootstrap, topics.samples, records, pki.ca)
    await deliver(broker, topics, sandbox, records, broker.ssl_bootstrap,
                  kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.ca))


async def test_mutual_tls_refuses_a_client_without_certificate_and_serves_one_with(broker, topics, sandbox, pki,
                                                                                caplog):
    records = WearableData(seed=72).mixed(users=20, per_user=(5, 20))
    await produce_over_tls(broker.ssl_bootstrap, topics.samples, records, pki.ca)

    caplog.set_level(logging.ERROR, "stream.kafka")
    no_cert = make_settings(broker.mtls_bootstrap, topics, sandbox.url,
                            kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.ca))
    async with running(no_cert) as pipeline:

        async def refused() -> bool:
            return "without a client certificate" in pipeline.ready()[1]

        await eventually(refused, timeout=30, what="/readyz to say the client certificate is missing")
        ready, reason = pipeline.ready()
    assert not ready
    assert reason.startswith("the Kafka broker 127.0.0.1 refused the TLS connection without a client certificate (")
    assert reason.endswith("it requires mutual TLS; set STREAM_KAFKA_SSL_CERTFILE and STREAM_KAFKA_SSL_KEYFILE")
    assert any(getattr(r, "event", None) == "kafka_tls_failed" and r.getMessage() == reason for r in caplog.records)
    assert (await sandbox_stats(sandbox))["requests"] == 0

    await deliver(broker, topics, sandbox, records, broker.mtls_bootstrap,
                  kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.ca),
                  kafka_ssl_certfile=str(pki.client_cert), kafka_ssl_keyfile=str(pki.client_key))


async def test_sasl_ssl_with_scram_delivers_and_commits(broker, topics, sandbox, pki, tmp_path):
    password_file = tmp_path / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    records = WearableData(seed=73).mixed(users=20, per_user=(5, 20))
    await produce_over_tls(broker.ssl_bootstrap, topics.samples, records, pki.ca)
    await deliver(broker, topics, sandbox, records, broker.sasl_ssl_bootstrap,
                  kafka_security_protocol="SASL_SSL", kafka_ssl_cafile=str(pki.ca),
                  kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=USER,
                  kafka_sasl_password_file=str(password_file))


@pytest.fixture
async def readyz_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_wrong_ca_keeps_the_service_up_not_ready_naming_the_setting(broker, topics, sandbox, pki,
                                                                           readyz_session):
    port = free_port()
    settings = make_settings(broker.ssl_bootstrap, topics, sandbox.url, metrics_port=port,
                             kafka_security_protocol="SSL", kafka_ssl_cafile=str(pki.other_ca))
    service = start_service(settings_env(settings))
    answer: list[tuple[int, str]] = []
    try:

        async def not_ready_for_tls() -> bool:
            try:
                async with readyz_session.get(f"http://127.0.0.1:{port}/readyz") as r:
                    answer[:] = [(r.status, await r.text())]
            except aiohttp.ClientError:
                return False
            return "TLS" in answer[0][1]

        await eventually(not_ready_for_tls, timeout=60, what="/readyz to say TLS verification failed")
        # Still up a while later (no restart loop), still saying why; and it never got to the API.
        await asyncio.sleep(3)  # the condition is "still running after a while": a pause is the test itself
        assert service.poll() is None, log_tail(service)
        async with readyz_session.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert (r.status, await r.text()) == answer[0]
        assert (await sandbox_stats(sandbox))["requests"] == 0
        service.send_signal(signal.SIGTERM)
        code = await wait_exit(service, 30)
    finally:
        service.kill()
    status, reason = answer[0]
    assert status == 503
    assert reason == (
        "TLS verification of the Kafka broker 127.0.0.1 failed (self-signed certificate in certificate chain): "
        f"check STREAM_KAFKA_SSL_CAFILE ({pki.other_ca}): it must hold the CA that signed the brokers' "
        "certificates\n"
    )
    assert code == 0, log_tail(service)
    logs = log_tail(service, limit=None)
    failed = [line for line in logs.splitlines() if '"event":"kafka_tls_failed"' in line]
    assert failed, logs
    assert '"check":"STREAM_KAFKA_SSL_CAFILE"' in failed[0] and '"level":"error"' in failed[0]
    assert "Traceback" not in logs and "Unclosed" not in logs


async def test_a_kafka_clients_own_tls_failure_is_seen_too(broker, topics, pki):
    """Past the start check (a broker's certificate replaced while the service runs), the clients' own
    connections report: aiokafka only logs the TLS error and raises "Unable to bootstrap", yet /readyz knows."""
    settings = make_settings(broker.ssl_bootstrap, topics, "http://unused.invalid", kafka_security_protocol="SSL",
                             kafka_ssl_cafile=str(pki.other_ca))
    assert tls_problem(settings) is None
    options = kafka_client_options(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=options["bootstrap_servers"], security_protocol="SSL",
                                ssl_context=options["ssl_context"])
    try:
        with pytest.raises(KafkaConnectionError):
            await admin.start()
    finally:
        await admin.close()
    problem = tls_problem(settings)
    assert problem is not None and problem.startswith("TLS verification of the Kafka broker 127.0.0.1 failed")
    assert f"check STREAM_KAFKA_SSL_CAFILE ({pki.other_ca})" in problem


async def test_ssl_pointed_at_the_plaintext_listener_names_the_address_and_the_protocol(broker, topics, pki):
    # The most common TLS mistake: SSL against the plaintext port. Kafka hangs up on the TLS greeting without a
    # word of TLS; the service must not say "cannot reach Kafka" (and restart in a loop) but name what to check.
    from stream.kafka_tls import probe_tls

    settings = make_settings(broker.bootstrap, topics, "http://127.0.0.1:1", kafka_security_protocol="SSL",
                             kafka_ssl_cafile=str(pki.ca))
    failure = await probe_tls(settings, timeout=10)
    assert failure is not None
    assert failure.variables == ("STREAM_KAFKA_BOOTSTRAP_SERVERS", "STREAM_KAFKA_SECURITY_PROTOCOL")
    assert "does not speak TLS" in failure.reason


async def test_a_renewed_client_certificate_is_taken_without_a_restart(broker, topics, sandbox, pki, material,
                                                                       tmp_path):
    # cert-manager renews the client certificate in place (cert and key in one Secret). First one signed by a CA
    # the brokers do not trust: a trial login refuses it, and the clients that work go on with the old one.
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.client_cert.read_bytes())
    key.write_bytes(pki.client_key.read_bytes())
    data, sent = WearableData(seed=75), []

    async def deliver_a_round(users: int) -> None:
        records = data.mixed(users=users, per_user=(3, 12))
        sent.extend(records)
        await produce_over_tls(broker.ssl_bootstrap, topics.samples, records, pki.ca)
        await eventually(lambda: all_done(broker.bootstrap, topics), what="delivery of a round", timeout=90)

    def renew(issued) -> None:
        swap_in(cert, issued.cert_pem().decode())
        swap_in(key, issued.key_pem().decode())

    port = free_port()
    service = start_service(settings_env(make_settings(
        broker.mtls_bootstrap, topics, sandbox.url, metrics_port=port, kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(pki.ca), kafka_ssl_certfile=str(cert), kafka_ssl_keyfile=str(key),
        kafka_credentials_check_seconds=0.5,
    )))
    try:
        await deliver_a_round(10)
        renew(issue(material.other_ca, "stream", server=False))
        await eventually(logged(service, "kafka_credentials_not_accepted"), what="the untrusted certificate refused")
        await deliver_a_round(10)  # still delivering with the clients that work
        renew(issue(material.ca, "stream", server=False))
        await eventually(logged(service, "kafka_clients_rebuilding"), what="new clients with the renewed certificate")
        await eventually(lambda: ready(port), what="ready with the renewed certificate", timeout=90)
        await deliver_a_round(10)
        service.send_signal(signal.SIGTERM)
        assert await wait_exit(service, 60) == 0
    finally:
        service.kill()
    assert sorted(await accepted_identities(sandbox)) == sorted(expected_identities(sent).elements())
    assert log_tail(service, None).count('"event":"kafka_clients_rebuilding"') == 1
