"""What a failing TLS connection to Kafka means, and which setting it names (stream/kafka_tls.py).

No network: real TLS handshakes between the service's own TLS context and a server context, in memory
(ssl.MemoryBIO), with certificates made by the test (tests/integration/certs.py). The TLS listeners of a real
broker are in tests/integration/test_tls.py.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import msgspec
import pytest
from aiokafka.errors import KafkaConnectionError

from stream import config, kafka_tls
from stream.kafka_credentials import CredentialsChanged
from stream.kafka_tls import (
    TLS_FAILURE_MEMORY_SECONDS,
    TlsFailure,
    TlsStatus,
    probe_tls,
    ssl_context,
    tls_failure,
    tls_problem,
    wait_for_tls,
)
from tests.integration.certs import Material, Pki, make_material, write_pki

BROKER = "127.0.0.1"


@pytest.fixture(scope="module")
def material() -> Material:
    return make_material()


@pytest.fixture
def pki(material: Material, tmp_path: Path) -> Pki:
    return write_pki(tmp_path / "pki", material)


@pytest.fixture(autouse=True)
def _fresh_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_tls, "_statuses", {})


def settings(**values: object) -> config.Settings:
    values.setdefault("kafka_security_protocol", "SSL")
    values.setdefault("kafka_bootstrap_servers", f"{BROKER}:9093")
    return msgspec.convert({"api_token": "x", **values}, config.Settings)


def server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.broker_keystore)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def converse(client_context: ssl.SSLContext, server_ctx: ssl.SSLContext, hostname: str = BROKER) -> bytes:
    """A handshake, then one request and its answer, in memory; raises what the client side raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)

    def step(action) -> bool:
        try:
            action()
        except ssl.SSLWantReadError:
            return False
        return True

    client_done = server_done = server_failed = False
    for _ in range(10):
        if not client_done:
            client_done = step(client.do_handshake)
        s_in.write(c_out.read())
        if not server_done and not server_failed:
            try:
                server_done = step(server.do_handshake)
            except ssl.SSLError:
                server_failed = True  # it refused us: its alert is in s_out, for the client to read
        c_in.write(s_out.read())
        if client_done and (server_done or server_failed):
            break
    client.write(b"request")
    s_in.write(c_out.read())
    if server_done:
        with_answer = step(lambda: server.read(100))
        if with_answer:
            server.write(b"answer")
    c_in.write(s_out.read())
    return client.read(100)


def failure_of(client_context: ssl.SSLContext, server_ctx: ssl.SSLContext, s: config.Settings,
               hostname: str = BROKER) -> TlsFailure:
    with pytest.raises(ssl.SSLError) as raised:
        converse(client_context, server_ctx, hostname)
    found = tls_failure(raised.value, s, hostname)
    assert found is not None
    return found


# -- what a failure means -------------------------------------------------------------------------------------


def test_a_wrong_ca_is_a_verification_failure_that_names_the_cafile(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.other_ca))
    found = failure_of(ssl_context(s), server_context(pki), s)
    assert found.reason.startswith(f"TLS verification of the Kafka broker {BROKER} failed (")
    assert f"check STREAM_KAFKA_SSL_CAFILE ({pki.other_ca})" in found.reason
    assert found.variables == ("STREAM_KAFKA_SSL_CAFILE",)


def test_no_cafile_says_the_system_bundle_was_used(pki: Pki):
    s = settings()
    found = failure_of(ssl_context(s), server_context(pki), s)
    assert "STREAM_KAFKA_SSL_CAFILE is not set, so the system's CA bundle was used" in found.reason


def test_a_certificate_for_another_host_names_the_bootstrap_servers(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca))
    found = failure_of(ssl_context(s), server_context(pki), s, hostname="kafka.example.org")
    assert "does not name the host" in found.reason
    assert found.variables == ("STREAM_KAFKA_BOOTSTRAP_SERVERS",)


def test_a_broker_requiring_a_client_certificate_names_certfile_and_keyfile(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca))
    found = failure_of(ssl_context(s), server_context(pki, require_client_cert=True), s)
    assert "refused the TLS connection without a client certificate" in found.reason
    assert "set STREAM_KAFKA_SSL_CERTFILE and STREAM_KAFKA_SSL_KEYFILE" in found.reason


def test_a_client_certificate_the_broker_does_not_trust_names_the_certfile(pki: Pki, material: Material,
                                                                         tmp_path: Path):
    from tests.integration.certs import issue

    stranger = issue(material.other_ca, "stranger", server=False)
    (tmp_path / "stranger.crt").write_bytes(stranger.cert_pem())
    (tmp_path / "stranger.key").write_bytes(stranger.key_pem())
    s = settings(kafka_ssl_cafile=str(pki.ca), kafka_ssl_certfile=str(tmp_path / "stranger.crt"),
                 kafka_ssl_keyfile=str(tmp_path / "stranger.key"))
    found = failure_of(ssl_context(s), server_context(pki, require_client_cert=True), s)
    assert "refused the client certificate" in found.reason
    assert f"check STREAM_KAFKA_SSL_CERTFILE ({tmp_path / 'stranger.crt'})" in found.reason


def test_a_plaintext_listener_names_the_bootstrap_servers_and_the_protocol(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca))
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl_context(s).wrap_bio(c_in, c_out, server_hostname=BROKER)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    c_in.write(b"\x00\x00\x01\x00" + b"\x00" * 256)  # a Kafka answer where a TLS ServerHello was expected
    with pytest.raises(ssl.SSLError) as raised:
        client.do_handshake()
    found = tls_failure(raised.value, s, BROKER)
    assert found is not None and found.variables == ("STREAM_KAFKA_BOOTSTRAP_SERVERS",
                                                     "STREAM_KAFKA_SECURITY_PROTOCOL")


def test_a_tls_error_wrapped_by_the_client_is_found_and_other_errors_are_not_tls(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.other_ca))
    with pytest.raises(ssl.SSLCertVerificationError) as raised:
        converse(ssl_context(s), server_context(pki))
    wrapped = KafkaConnectionError("Connection at 127.0.0.1:9093 broken")
    wrapped.__cause__ = raised.value
    assert tls_failure(wrapped, s, BROKER) == tls_failure(raised.value, s, BROKER)

    assert tls_failure(ConnectionRefusedError(111, "refused"), s, BROKER) is None
    assert tls_failure(TimeoutError(), s, BROKER) is None
    assert tls_failure(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), s, BROKER) is None


def test_the_clients_context_works_with_the_right_ca_and_client_certificate(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca), kafka_ssl_certfile=str(pki.client_cert),
                 kafka_ssl_keyfile=str(pki.client_key))
    assert converse(ssl_context(s, watched=True), server_context(pki, require_client_cert=True)) == b"answer"
    assert tls_problem(s) is None


# -- the watched context: what /readyz says, what is logged --------------------------------------------------


def test_a_client_handshake_failure_is_logged_naming_the_setting_and_given_to_readyz(pki: Pki, caplog):
    s = settings(kafka_ssl_cafile=str(pki.other_ca))
    caplog.set_level(logging.ERROR, "stream.kafka")
    for _ in range(3):  # a client retrying: one line, not three
        with pytest.raises(ssl.SSLCertVerificationError):
            converse(ssl_context(s, watched=True), server_context(pki))

    problem = tls_problem(s)
    assert problem is not None and problem.startswith("TLS verification of the Kafka broker 127.0.0.1 failed")
    assert "STREAM_KAFKA_SSL_CAFILE" in problem
    lines = [r for r in caplog.records if getattr(r, "event", None) == "kafka_tls_failed"]
    assert len(lines) == 1
    assert lines[0].getMessage() == problem and lines[0].check == "STREAM_KAFKA_SSL_CAFILE"
    # Other settings (another CA file) have a status of their own.
    assert tls_problem(settings(kafka_ssl_cafile=str(pki.ca))) is None
    assert tls_problem(settings(kafka_security_protocol="PLAINTEXT")) is None


def test_a_refused_client_certificate_after_the_handshake_is_seen_by_the_watched_reads(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca))
    with pytest.raises(ssl.SSLError):
        converse(ssl_context(s, watched=True), server_context(pki, require_client_cert=True))
    problem = tls_problem(s)
    assert problem is not None and "without a client certificate" in problem


def test_data_from_the_broker_clears_its_failure(pki: Pki):
    s = settings(kafka_ssl_cafile=str(pki.ca))
    with pytest.raises(ssl.SSLError):
        converse(ssl_context(s, watched=True), server_context(pki, require_client_cert=True))
    assert tls_problem(s) is not None
    assert converse(ssl_context(s, watched=True), server_context(pki)) == b"answer"  # the broker was fixed
    assert tls_problem(s) is None


def test_a_failure_is_forgotten_when_nothing_tried_for_a_while_and_logged_again_a_minute_later(caplog):
    now = [1000.0]
    status = TlsStatus(clock=lambda: now[0])
    failure = TlsFailure("TLS verification ... check STREAM_KAFKA_SSL_CAFILE", ("STREAM_KAFKA_SSL_CAFILE",), "x")
    caplog.set_level(logging.ERROR, "stream.kafka")
    status.failed("b1", failure)
    now[0] += 30
    status.failed("b1", failure)
    assert status.problem() == failure.reason
    now[0] += TLS_FAILURE_MEMORY_SECONDS - 1
    assert status.problem() == failure.reason
    now[0] += 2
    assert status.problem() is None
    status.failed("b1", failure)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "kafka_tls_failed"]
    assert [r.suppressed for r in lines] == [0, 1]


# -- before the clients start ---------------------------------------------------------------------------------


async def test_wait_for_tls_does_nothing_without_tls():
    assert await wait_for_tls(settings(kafka_security_protocol="PLAINTEXT"), asyncio.Event()) is True


async def test_wait_for_tls_retries_while_tls_fails_and_ends_at_a_stop(monkeypatch: pytest.MonkeyPatch):
    answers = [TlsFailure("bad", (), "x"), TlsFailure("bad", (), "x"), None]
    tries: list[float] = []

    async def probe(_settings, _context=None):
        tries.append(asyncio.get_running_loop().time())
        return answers.pop(0)

    monkeypatch.setattr(kafka_tls, "probe_tls", probe)
    assert await wait_for_tls(settings(), asyncio.Event(), first=0.01, most=0.02) is True
    assert len(tries) == 3

    answers[:] = [TlsFailure("bad", (), "x")] * 100
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stopping.set)
    assert await wait_for_tls(settings(), stopping, first=0.01, most=0.02) is False


async def test_wait_for_tls_goes_on_when_the_brokers_cannot_be_reached_at_all():
    # A refused connection is not TLS's doing: the clients report it as they always did (exit 1 at start).
    s = settings(kafka_bootstrap_servers="127.0.0.1:1")
    assert await asyncio.wait_for(wait_for_tls(s, asyncio.Event()), 15) is True


async def test_wait_for_tls_asks_for_new_clients_when_the_tls_files_change_while_tls_fails(
        pki: Pki, monkeypatch: pytest.MonkeyPatch):
    # The clients loaded the files when built: a CA fixed in place (a Secret edited) takes new clients to be used,
    # and waiting on would end, once the probe passed with the new file, in the clients failing with the old one.
    probes: list[int] = []

    def fix_the_ca_in_place() -> None:  # the operator's fix lands on disk
        Path(pki.ca).write_bytes(Path(pki.other_ca).read_bytes())

    async def probe(_settings, _context=None):
        probes.append(1)
        if len(probes) == 2:
            fix_the_ca_in_place()
        return TlsFailure("bad", (), "x")

    monkeypatch.setattr(kafka_tls, "probe_tls", probe)
    with pytest.raises(CredentialsChanged, match=r"STREAM_KAFKA_SSL_CAFILE\) changed while TLS with the brokers fail"):
        await asyncio.wait_for(
            wait_for_tls(settings(kafka_ssl_cafile=str(pki.ca)), asyncio.Event(), first=0.01, most=0.01), 10)
    assert len(probes) == 2  # the change is seen right after the try that failed, not after another wait


async def test_a_plaintext_listener_that_hangs_up_on_the_tls_greeting_is_named(pki: Pki):
    # What a Kafka PLAINTEXT port does with a TLS ClientHello: reads it as a huge request and closes the
    # connection. Nothing in that error says TLS; the same address answering a plain request does.
    async def plaintext_kafka(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(5)
        if first[:1] != b"\x16":  # not a TLS handshake record: answer like a broker (a size, then the rest)
            writer.write(b"\x00\x00\x00\x04" + b"\x00" * 4)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(plaintext_kafka, BROKER, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        s = settings(kafka_bootstrap_servers=f"{BROKER}:{port}", kafka_ssl_cafile=str(pki.ca))
        failure = await probe_tls(s, timeout=5)
    finally:
        server.close()
        await server.wait_closed()
    assert failure is not None
    assert failure.variables == ("STREAM_KAFKA_BOOTSTRAP_SERVERS", "STREAM_KAFKA_SECURITY_PROTOCOL")
    assert "does not speak TLS" in failure.reason
    assert tls_problem(s) == failure.reason


async def test_a_listener_that_hangs_up_on_everything_is_not_called_a_tls_problem(pki: Pki):
    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, BROKER, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        failure = await probe_tls(settings(kafka_bootstrap_servers=f"{BROKER}:{port}", kafka_ssl_cafile=str(pki.ca)),
                                  timeout=5)
    finally:
        server.close()
        await server.wait_closed()
    assert failure is None  # not known to be TLS's doing: the clients report it as they always did


# -- files that cannot be loaded: a configuration error at start (stream/cli.py), naming the variable ---------


def test_a_ca_file_that_holds_no_certificate_is_a_configuration_error(tmp_path: Path):
    from stream import cli

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(config.ConfigError, match=r"^STREAM_KAFKA_SSL_CAFILE: cannot load the TLS files"):
        cli._check_kafka_files(settings(kafka_ssl_cafile=str(garbage)))
