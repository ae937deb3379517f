"""The local Kafka broker really serves: records, committed offsets across restarts, SCRAM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from stream.dev.localkafka import (
    PIDFILE_VARIABLE,
    BrokerTls,
    LocalKafka,
    LocalKafkaError,
    _free_ports,
    _port_open,
    main,
    process_start_time,
    resolve_kafka,
)

from .conftest import eventually

pytestmark = pytest.mark.integration

USERS = {"alice": "alice-secret", "bob": "b0b=pa:ss!"}
REPO = Path(__file__).resolve().parents[2]


# Its own broker (not the session one from conftest): these tests restart and kill it.
@pytest.fixture(scope="module")
def broker():
    with LocalKafka(scram_users=USERS) as kafka:
        pid, data_dir = kafka.pid, kafka.data_dir
        yield kafka
    assert not _java_alive(pid), "stop() left the broker running"
    assert not data_dir.exists(), "stop() left the temporary data dir behind"


def _java_alive(pid: int | None) -> bool:
    # /proc/<pid> of a reaped child is gone; a zombie would still say "Z".
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, TypeError):
        return False


def _brokers_using(path: Path) -> list[int]:
    """Pids of kafka.Kafka processes whose command line mentions ``path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "kafka.Kafka" in cmdline and str(path) in cmdline:
            pids.append(int(proc.name))
    return pids


async def _eventually(check: Callable[[], bool], timeout: float) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; the sleep only paces the polling."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


def _topic() -> str:
    return f"localkafka-{uuid.uuid4().hex[:10]}"


async def _produce(bootstrap: str, topic: str, values: list[bytes], **client) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


async def _read(consumer: AIOKafkaConsumer, count: int, timeout: float = 30) -> list[bytes]:
    """Poll until ``count`` records arrived or the deadline passes."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500, max_records=count - len(got))
        got += [record.value for records in batches.values() for record in records]
    return got


def _consumer(bootstrap: str, topic: str, group: str | None = None, **client) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **client,
    )
    consumer.assign([TopicPartition(topic, 0)])
    return consumer


async def _committed_after_reconnect(bootstrap: str, topic: str, group: str) -> tuple[int | None, bytes]:
    """The group's committed offset on partition 0, and the record a consumer resumes at."""
    # Right after a restart the group coordinator may still be loading the offsets topic: committed() answers None
    # then, and a consumer that starts fetching meanwhile may fall back to its reset policy. So wait until the
    # coordinator gives the group's offset, then see where a consumer resumes.
    probe = _consumer(bootstrap, topic, group)
    await probe.start()
    try:
        async def loaded() -> bool:
            return await probe.committed(TopicPartition(topic, 0)) is not None

        await eventually(loaded, timeout=60, what="the group coordinator to load the committed offsets")
    finally:
        await probe.stop()
    consumer = _consumer(bootstrap, topic, group)
    await consumer.start()
    try:
        (next_value,) = await _read(consumer, 1)
        committed = await consumer.committed(TopicPartition(topic, 0))
        return committed, next_value
    finally:
        await consumer.stop()


async def _commit_first(bootstrap: str, topic: str, group: str, count: int) -> list[bytes]:
    consumer = _consumer(bootstrap, topic, group)
    await consumer.start()
    try:
        got = await _read(consumer, count)
        await consumer.commit({TopicPartition(topic, 0): count})
        return got
    finally:
        await consumer.stop()


def _values(n: int) -> list[bytes]:
    return [f"sample-{i}".encode() for i in range(n)]


async def test_produce_and_consume(broker: LocalKafka):
    topic = _topic()
    await _produce(broker.bootstrap, topic, _values(5))

    consumer = _consumer(broker.bootstrap, topic)
    await consumer.start()
    try:
        assert await _read(consumer, 5) == _values(5)
    finally:
        await consumer.stop()


async def test_committed_offset_survives_restart(broker: LocalKafka):
    topic, group = _topic(), f"group-{uuid.uuid4().hex[:8]}"
    await _produce(broker.bootstrap, topic, _values(5))
    assert await _commit_first(broker.bootstrap, topic, group, 3) == _values(3)
    bootstrap, pid = broker.bootstrap, broker.pid

    broker.restart()

    assert broker.bootstrap == bootstrap and broker.pid != pid
    assert not _java_alive(pid)
    assert await _committed_after_reconnect(broker.bootstrap, topic, group) == (3, b"sample-3")


async def test_committed_offset_survives_crash(broker: LocalKafka):
    topic, group = _topic(), f"group-{uuid.uuid4().hex[:8]}"
    await _produce(broker.bootstrap, topic, _values(4))
    await _commit_first(broker.bootstrap, topic, group, 2)
    pid = broker.pid

    broker.kill()
    assert not broker.is_running() and not _java_alive(pid)
    broker.start()

    assert await _committed_after_reconnect(broker.bootstrap, topic, group) == (2, b"sample-2")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("user", sorted(USERS))
async def test_scram_accepts_right_password(broker: LocalKafka, user: str, mechanism: str):
    client = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": user,
        "sasl_plain_password": USERS[user],
    }
    topic = _topic()
    await _produce(broker.sasl_bootstrap, topic, _values(2), **client)

    consumer = _consumer(broker.sasl_bootstrap, topic, **client)
    await consumer.start()
    try:
        assert await _read(consumer, 2) == _values(2)
    finally:
        await consumer.stop()


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "alice-secret")])
async def test_scram_refuses_wrong_credentials(broker: LocalKafka, user: str, password: str):
    host, port = broker.sasl_bootstrap.split(":")
    # create_conn surfaces the broker's verdict; a producer would only say it could not bootstrap.
    with pytest.raises(SaslAuthenticationFailed):
        await create_conn(
            host,
            int(port),
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-256",
            sasl_plain_username=user,
            sasl_plain_password=password,
        )

    producer = AIOKafkaProducer(
        bootstrap_servers=broker.sasl_bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username=user,
        sasl_plain_password=password,
    )
    with pytest.raises(KafkaConnectionError):
        await producer.start()
    await producer.stop()


async def test_plaintext_listener_refuses_sasl_port_mixup(broker: LocalKafka):
    # The SASL listener must not serve unauthenticated clients.
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.sasl_bootstrap, request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    await consumer.stop()


def test_bad_scram_user_is_refused_early():
    with pytest.raises(LocalKafkaError, match="SCRAM user"):
        LocalKafka(scram_users={"eve": "has,comma"})


def test_tls_material_is_checked_early(tmp_path: Path):
    # The TLS listeners themselves are proven in test_tls.py (SSL, mutual TLS, SASL_SSL, a wrong CA).
    with pytest.raises(LocalKafkaError, match=r"BrokerTls\.keystore: no such file"):
        BrokerTls(keystore=tmp_path / "missing.pem", ca=tmp_path / "missing-ca.pem")
    (tmp_path / "broker.pem").write_text("x")
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(LocalKafkaError, match="client_auth"):
        BrokerTls(keystore=tmp_path / "broker.pem", ca=tmp_path / "ca.pem", client_auth="none")  # type: ignore[arg-type]
    with pytest.raises(LocalKafkaError, match="no TLS listener"):
        _ = LocalKafka(port=9092).ssl_bootstrap


def test_taken_port_is_a_clear_error(broker: LocalKafka):
    with pytest.raises(LocalKafkaError, match="already in use"):
        LocalKafka(port=int(broker.bootstrap.rsplit(":", 1)[1])).start()


def test_broker_dying_at_start_raises_with_its_log():
    kafka = LocalKafka(heap="1k")  # the JVM refuses to start with such a heap
    with pytest.raises(LocalKafkaError, match="exited with code") as failure:
        kafka.start()
    assert "heap" in str(failure.value).lower(), "the error should carry the broker log's tail"
    assert not kafka.is_running()
    with pytest.raises(LocalKafkaError, match="not been started"):
        _ = kafka.data_dir  # the temporary data dir went with the failed start


_ABANDONING_PARENT = """
import sys
from pathlib import Path
from stream.dev.localkafka import LocalKafka
LocalKafka(data_dir=Path(sys.argv[1])).start()
print("started", flush=True)
if sys.argv[2] == "crash":
    raise RuntimeError("test session crashed")  # uncaught: atexit must stop the broker
sys.stdin.read()  # wait for SIGKILL: PR_SET_PDEATHSIG must take the broker down
"""


@pytest.mark.parametrize("how", ["crash", "sigkill"])
async def test_no_broker_outlives_its_parent(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, how: str):
    pidfile = tmp_path_factory.mktemp("pidfile") / "brokers.pid"
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ABANDONING_PARENT,
        str(tmp_path),
        how,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), PIDFILE_VARIABLE: str(pidfile)},
    )
    try:
        assert await asyncio.wait_for(parent.stdout.readline(), timeout=120) == b"started\n"
        (broker_pid,) = _brokers_using(tmp_path)
        # The broker's pid and start time are recorded, for .ci/stop-started to stop exactly this process.
        assert pidfile.read_text() == f"{broker_pid} {process_start_time(broker_pid)}\n"
        if how == "sigkill":
            parent.kill()
        await asyncio.wait_for(parent.wait(), timeout=60)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    # The kernel delivers the death signal asynchronously: poll for the broker to be gone.
    assert await _eventually(lambda: not _brokers_using(tmp_path), timeout=15), _brokers_using(tmp_path)


def test_resolve_only_prints_the_cached_libs(capsys: pytest.CaptureFixture[str]):
    assert main(["--resolve-only"]) == 0
    libs = Path(capsys.readouterr().out.strip())
    assert libs == resolve_kafka()
    assert any(libs.glob("kafka_2.13-*.jar"))


async def test_cli_runs_in_foreground_until_sigterm(tmp_path: Path):
    port, sasl_port = _free_ports(2)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stream.dev.localkafka",
        f"--port={port}",
        f"--sasl-port={sasl_port}",
        f"--data-dir={tmp_path}",
        "--scram-user=carol=carol-secret",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = await asyncio.wait_for(cli.stdout.readline(), timeout=120)
        assert f"listening on PLAINTEXT 127.0.0.1:{port}" in line.decode(), await cli.stderr.read()
        assert f"127.0.0.1:{sasl_port}" in line.decode()
        await _produce(f"127.0.0.1:{port}", _topic(), [b"x"])
        assert len(_brokers_using(tmp_path)) == 1

        cli.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(cli.wait(), timeout=60) == 0
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
    assert _brokers_using(tmp_path) == []
    assert not _port_open(port)
    assert (tmp_path / "log" / "meta.properties").exists(), "the CLI's data dir must persist"
