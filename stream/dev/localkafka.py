"""A real single-node Apache Kafka broker (KRaft combined mode) on this machine.

No Docker and no Apache download site: the broker's jars come from Maven Central
through ``mvn`` into a local cache, and the broker runs as a plain ``java``
subprocess. Used by the integration tests and by the ``stream kafka`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

DEFAULT_VERSION = "4.1.1"
HOST = "127.0.0.1"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_FORBIDDEN = '",[]'
# Listener name -> security protocol. MTLS is a second SSL listener, one that requires client certificates.
_PROTOCOL = {
    "PLAINTEXT": "PLAINTEXT",
    "CONTROLLER": "PLAINTEXT",
    "SASL_PLAINTEXT": "SASL_PLAINTEXT",
    "SSL": "SSL",
    "MTLS": "SSL",
    "SASL_SSL": "SASL_SSL",
}

# Pinned so a resolve today and a resolve next year give the same classpath.
_LOG4J_VERSION = "2.25.3"
_SLF4J_VERSION = "2.0.17"
_DEPENDENCY_PLUGIN_VERSION = "3.8.1"

_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by stream.dev.localkafka: only used to fetch the Kafka broker's jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- Explicit slf4j 2 API so the slf4j2 binding below is the one picked up. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{plugin}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""

# WARN and up to stdout, which the broker's subprocess redirects into its log file:
# one file holds both log4j output and anything the JVM itself prints (OOM, bad flags).
_LOG4J2_PROPERTIES = """\
status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
"""


class LocalKafkaError(RuntimeError):
    """The local broker could not be resolved, formatted or started."""


@dataclass(frozen=True)
class BrokerTls:
    """TLS material of a LocalKafka, as PEM files made by the caller (the tests make theirs with `cryptography`).

    With it the broker gets TLS listeners besides PLAINTEXT: SSL (server authentication only), MTLS (SSL with
    ``ssl.client.auth=client_auth``, required by default) and, with SCRAM users, SASL_SSL. Kafka reads the PEM
    files directly (``ssl.keystore.type=PEM``, ``ssl.truststore.type=PEM``): no keytool, no JKS.
    """

    keystore: Path  # the broker's private key (PKCS#8, unencrypted) followed by its certificate chain
    ca: Path  # the CA client certificates must chain to on MTLS; the start-up checks also verify the broker with it
    client_keystore: Path | None = None  # a client key + certificate the start-up check presents on MTLS
    client_auth: Literal["required", "requested"] = "required"  # of the MTLS listener

    def __post_init__(self) -> None:
        for name in ("keystore", "ca", "client_keystore"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise LocalKafkaError(f"BrokerTls.{name}: no such file: {path}")
        if self.client_auth not in ("required", "requested"):
            raise LocalKafkaError(f"BrokerTls.client_auth: required or requested, got {self.client_auth!r}")


# When this variable names a file, every broker started here appends "<pid> <start time>" to it, so that a CI
# run can stop exactly the brokers it started, even those a crashed or killed test session left behind
# (.ci/run and .ci/stop-started). No STREAM_ prefix: it is not a setting of `stream run`.
PIDFILE_VARIABLE = "LOCALKAFKA_PIDFILE"


# --------------------------------------------------------------------------- tools


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("STREAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stream"


def _java() -> str:
    # JAVA_HOME wins, as with Kafka's own scripts; otherwise whatever `java` PATH finds.
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise LocalKafkaError(
            "java not found (set JAVA_HOME or put java on PATH); Kafka 4 needs Java 17+, "
            "e.g. apt-get install openjdk-17-jre-headless"
        )
    return found


def _mvn() -> str:
    found = shutil.which("mvn")
    if not found:
        raise LocalKafkaError("mvn not found on PATH; it fetches Kafka's jars, e.g. apt-get install maven")
    return found


def _run_tool(cmd: list[str], what: str, timeout: float) -> str:
    """Run a short-lived command; on failure raise with its output, which names the cause."""
    try:
        done = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalKafkaError(f"{what} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise LocalKafkaError(f"{what} failed (exit {done.returncode}):\n{_tail_text(done.stdout)}")
    return done.stdout


def _tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------- resolve


def resolve_kafka(cache_dir: Path | None = None, version: str = DEFAULT_VERSION) -> Path:
    """Return the directory of the broker's jars, fetching them with Maven only when missing."""
    home = _cache_root(cache_dir) / f"kafka-{version}"
    libs = home / "libs"
    if _has_jars(libs):
        return libs
    _java()  # fail early and clearly rather than after a 50 s download
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(
        _POM.format(version=version, slf4j=_SLF4J_VERSION, log4j=_LOG4J_VERSION, plugin=_DEPENDENCY_PLUGIN_VERSION)
    )
    # Resolve beside the final place and rename: a killed download leaves only a
    # libs.tmp-* dir, never a half-filled libs/ that would be taken as complete.
    staging = Path(tempfile.mkdtemp(prefix="libs.tmp-", dir=home))
    try:
        _copy_dependencies(pom, staging)
        _publish(staging, libs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs


def _has_jars(libs: Path) -> bool:
    return libs.is_dir() and any(libs.glob("kafka_2.13-*.jar"))


def _copy_dependencies(pom: Path, out: Path) -> None:
    cmd = [
        _mvn(),
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={out}",
        "-DincludeScope=runtime",
    ]
    _run_tool(cmd, "mvn dependency:copy-dependencies", timeout=900)
    if not any(out.glob("kafka_2.13-*.jar")):
        raise LocalKafkaError(f"mvn finished but left no kafka_2.13 jar in {out}")


def _publish(staging: Path, libs: Path) -> None:
    try:
        staging.rename(libs)
    except OSError:
        # Another process published first (rename onto a non-empty dir fails): use theirs.
        if not _has_jars(libs):
            raise


# ------------------------------------------------------------------------- helpers


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is chosen so the ports are distinct.
    # Another process may still grab one before the broker binds; rare enough here.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def _check_port_free(port: int) -> None:
    # A clear message now beats a bind error buried in the broker log 5 s later.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise LocalKafkaError(f"port {HOST}:{port} is already in use") from exc


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _cluster_id() -> str:
    # Same format as `StorageTool random-uuid` (16 random bytes, url-safe base64, no
    # padding, never starting with "-") without paying a JVM start for it.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _check_scram_users(users: dict[str, str]) -> dict[str, str]:
    # Kafka's tools parse `SCRAM-SHA-256=[name=...,password=...]`: these characters
    # would split or end a value, so refuse them up front with a clear message.
    for name, password in users.items():
        for value in (name, password):
            if not value or any(c in _SCRAM_FORBIDDEN or c.isspace() for c in value):
                raise LocalKafkaError(
                    f"SCRAM user {name!r}: names and passwords must be non-empty without "
                    f"spaces or any of {_SCRAM_FORBIDDEN}"
                )
    return dict(users)


def _scram_arg(mechanism: str, name: str, password: str) -> str:
    # Quoted, so "=" and other punctuation inside a value are taken verbatim.
    return f'{mechanism}=[name="{name}",password="{password}"]'


def _run_async(coro):
    """Run a coroutine to completion on a private event loop in a worker thread.

    start() is synchronous but is often called from code that already runs a loop
    (async pytest fixtures), where asyncio.run() would refuse to nest.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="localkafka-probe") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _serves_metadata(bootstrap: str, timeout: float = 8, **client_kwargs: object) -> bool:
    """True once the broker answers a metadata request that lists a broker.

    An open TCP port is not enough: the socket server binds before the broker has
    registered with its controller, and until then metadata lists no broker at all.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **client_kwargs)
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            cluster = await admin.describe_cluster()
        return bool(cluster.get("brokers"))
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()


def _scram_kwargs(
    name: str, password: str, mechanism: str = "SCRAM-SHA-256", protocol: str = "SASL_PLAINTEXT"
) -> dict[str, str]:
    """aiokafka client arguments for a SCRAM login on the SASL_PLAINTEXT (or SASL_SSL) listener."""
    return {
        "security_protocol": protocol,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": name,
        "sasl_plain_password": password,
    }


def _tls_kwargs(tls: BrokerTls, protocol: str = "SSL", client_keystore: Path | None = None) -> dict[str, object]:
    """aiokafka client arguments for the start-up checks on a TLS listener: the broker verified with ``tls.ca``."""
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(tls.ca), certfile=str(client_keystore) if client_keystore else None
    )
    return {"security_protocol": protocol, "ssl_context": context}


def die_with_parent():
    """preexec_fn making the broker die with the process that started it.

    atexit does not run when the test session is SIGKILLed; PR_SET_PDEATHSIG does.
    The kernel ties it to the *thread* that forked, so it is only used from the main
    thread: a worker thread ending would otherwise take the broker with it.
    """
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl  # loaded before fork, not in the child
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


def process_start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), "-" when unknown.

    With the pid it names one process for good: a pid reused later by another process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    # Field 2 (the command name, in parentheses) may itself hold spaces or parentheses: split after the last ")".
    return stat.rsplit(")", 1)[1].split()[19]


def record_pid(pid: int) -> None:
    """Append "<pid> <start time>" to the file named by $LOCALKAFKA_PIDFILE, when it is set."""
    path = os.environ.get(PIDFILE_VARIABLE)
    if not path:
        return
    line = f"{pid} {process_start_time(pid)}\n".encode()
    try:
        # One write(2) on an O_APPEND descriptor: lines of brokers started concurrently never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LocalKafkaError(f"cannot record the broker's pid in {PIDFILE_VARIABLE}={path}: {exc.strerror}") from exc


# -------------------------------------------------------------------------- broker

# Brokers started and not yet stopped, stopped at interpreter exit so a crashed test
# session leaves no java process behind. A plain set, not a WeakSet: a broker whose
# LocalKafka was dropped without stop() is exactly the one to clean up.
_live: set[LocalKafka] = set()


@atexit.register
def _stop_all() -> None:
    for broker in list(_live):
        with contextlib.suppress(Exception):
            broker.stop(timeout=5)


class LocalKafka:
    """One Kafka broker+controller on 127.0.0.1, run as a java subprocess.

    ``with LocalKafka() as kafka: ...`` starts it and stops it again; ``kafka.bootstrap``
    is the PLAINTEXT address. With ``scram_users`` a SASL_PLAINTEXT listener accepting
    SCRAM-SHA-256/512 for those users is added at ``kafka.sasl_bootstrap``. With ``tls``
    (a BrokerTls) an SSL listener is added at ``kafka.ssl_bootstrap``, one requiring client
    certificates at ``kafka.mtls_bootstrap`` and, with ``scram_users`` too, a SASL_SSL one at
    ``kafka.sasl_ssl_bootstrap``. The broker's own traffic (controller, replication) stays PLAINTEXT.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: Path | None = None,
        cache_dir: Path | None = None,
        heap: str = "512m",
        scram_users: dict[str, str] | None = None,
        *,
        sasl_port: int = 0,
        controller_port: int = 0,
        version: str = DEFAULT_VERSION,
        tls: BrokerTls | None = None,
        ssl_port: int = 0,
        mtls_port: int = 0,
        sasl_ssl_port: int = 0,
    ) -> None:
        self.port = port
        self.sasl_port = sasl_port
        self.tls = tls
        self.ssl_port = ssl_port
        self.mtls_port = mtls_port
        self.sasl_ssl_port = sasl_ssl_port
        self.controller_port = controller_port
        self.heap = heap
        self.version = version
        self.scram_users = _check_scram_users(scram_users or {})
        self._cache_dir = cache_dir
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._owns_data_dir = data_dir is None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses and paths

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self._require_port(self.port)}"

    @property
    def sasl_bootstrap(self) -> str:
        if not self.scram_users:
            raise LocalKafkaError("no SASL listener: LocalKafka was created without scram_users")
        return f"{HOST}:{self._require_port(self.sasl_port)}"

    @property
    def ssl_bootstrap(self) -> str:
        """The SSL listener: the broker's certificate, no client certificate asked."""
        return f"{HOST}:{self._require_port(self._require_tls(self.ssl_port))}"

    @property
    def mtls_bootstrap(self) -> str:
        """The SSL listener with ``ssl.client.auth`` (required by default: mutual TLS)."""
        return f"{HOST}:{self._require_port(self._require_tls(self.mtls_port))}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """SASL (SCRAM-SHA-256/512) over TLS."""
        if not self.scram_users:
            raise LocalKafkaError("no SASL_SSL listener: LocalKafka was created without scram_users")
        return f"{HOST}:{self._require_port(self._require_tls(self.sasl_ssl_port))}"

    def _require_tls(self, port: int) -> int:
        if self.tls is None:
            raise LocalKafkaError("no TLS listener: LocalKafka was created without tls")
        return port

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise LocalKafkaError("the broker has not been started yet")
        return self._data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @staticmethod
    def _require_port(port: int) -> int:
        if not port:
            raise LocalKafkaError("the broker has not been started yet (port not chosen)")
        return port

    # -- lifecycle

    def start(self, timeout: float = 90) -> LocalKafka:
        """Start the broker and return once it serves requests (and SCRAM logins).

        ``timeout`` bounds the broker's own start-up; a first-time jar download
        (resolve_kafka) comes before it and is not counted.
        """
        if self.is_running():
            return self
        libs = resolve_kafka(self._cache_dir, self.version)
        try:
            self._boot(libs, timeout)
        except BaseException:
            self.stop()  # no half-started broker nor stray temp dir, whatever failed
            raise
        return self

    def _boot(self, libs: Path, timeout: float) -> None:
        self._choose_ports()
        self._prepare_dirs()
        config = self._write_config()
        if not self._is_formatted():
            self._format(libs, config)
        deadline = time.monotonic() + timeout
        _live.add(self)
        self._launch(libs, config)
        self._wait_until(lambda: self._serves(self.bootstrap), deadline, timeout)
        self._ensure_scram_users(libs, deadline, timeout)
        self._wait_for_tls_listeners(deadline, timeout)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``; remove a temporary data dir."""
        self._terminate(timeout)
        _live.discard(self)
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def kill(self) -> None:
        """SIGKILL the broker, like a crash; data and ports stay for a later start()."""
        self._signal(signal.SIGKILL)
        self._reap(timeout=10)

    def set_scram_password(self, name: str, password: str) -> None:
        """Change a SCRAM user's password on the running broker (both mechanisms), as an operator rotating it
        would. Connections already logged in stay open; every new one needs the new password."""
        if name not in self.scram_users:
            raise LocalKafkaError(f"no SCRAM user {name!r} on this broker")
        self.scram_users[name] = _check_scram_users({name: password})[name]
        self._alter_scram_users(resolve_kafka(self._cache_dir, self.version), [name])

    def restart(self, timeout: float = 90) -> LocalKafka:
        """Clean stop and start again on the same ports with the same data."""
        self._terminate()
        return self.start(timeout)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalKafka {state} port={self.port} data_dir={self._data_dir}>"

    # -- start steps

    def _prepare_dirs(self) -> None:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="localkafka-"))
        (self._data_dir / "log").mkdir(parents=True, exist_ok=True)

    def _choose_ports(self) -> None:
        # Chosen once and kept: restart() must come back on the same addresses.
        tls = self.tls is not None
        wanted = {
            "port": True,
            "controller_port": True,
            "sasl_port": bool(self.scram_users),
            "ssl_port": tls,
            "mtls_port": tls,
            "sasl_ssl_port": tls and bool(self.scram_users),
        }
        attrs = [attr for attr, used in wanted.items() if used]
        for attr in attrs:
            if getattr(self, attr):
                _check_port_free(getattr(self, attr))
        free = iter(_free_ports(len(attrs)))
        for attr in attrs:
            setattr(self, attr, getattr(self, attr) or next(free))

    def _write_config(self) -> Path:
        config_dir = self.data_dir / "config"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)
        path = config_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in self._properties().items()))
        return path

    def _properties(self) -> dict[str, str]:
        listeners = {"PLAINTEXT": self.port, "CONTROLLER": self.controller_port}
        if self.scram_users:
            listeners["SASL_PLAINTEXT"] = self.sasl_port
        if self.tls is not None:
            listeners["SSL"] = self.ssl_port
            listeners["MTLS"] = self.mtls_port
            if self.scram_users:
                listeners["SASL_SSL"] = self.sasl_ssl_port
        advertised = {name: port for name, port in listeners.items() if name != "CONTROLLER"}
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": ",".join(f"{n}://{HOST}:{p}" for n, p in listeners.items()),
            "advertised.listeners": ",".join(f"{n}://{HOST}:{p}" for n, p in advertised.items()),
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": ",".join(f"{n}:{_PROTOCOL[n]}" for n in listeners),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "log"),
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "4",
            "auto.create.topics.enable": "true",
            # After a crash (kill()) the restarted broker cannot register until the
            # dead incarnation's session expires: 9 s by default, 4 s here.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
        if self.scram_users:
            props.update(self._sasl_properties([n for n in listeners if _PROTOCOL[n].startswith("SASL")]))
        if self.tls is not None:
            props.update(self._tls_properties(self.tls, [n for n in listeners if _PROTOCOL[n].endswith("SSL")]))
        return props

    @staticmethod
    def _sasl_properties(names: list[str]) -> dict[str, str]:
        props = {"sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS)}
        # A broker needs a JAAS login module per SASL listener and mechanism; SCRAM's
        # takes no options, the credentials themselves live in the metadata log.
        for name in names:
            for mechanism in SCRAM_MECHANISMS:
                key = f"listener.name.{name.lower()}.{mechanism.lower()}.sasl.jaas.config"
                props[key] = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return props

    @staticmethod
    def _tls_properties(tls: BrokerTls, names: list[str]) -> dict[str, str]:
        # Per listener (listener.name.<name>.ssl.*): each TLS listener gets the key store, and only MTLS asks
        # for client certificates (for SASL_SSL Kafka honours ssl.client.auth only with a listener prefix).
        props: dict[str, str] = {}
        for name in names:
            prefix = f"listener.name.{name.lower()}."
            props[prefix + "ssl.keystore.type"] = "PEM"
            props[prefix + "ssl.keystore.location"] = str(Path(tls.keystore).resolve())
            props[prefix + "ssl.client.auth"] = tls.client_auth if name == "MTLS" else "none"
            if name == "MTLS":
                props[prefix + "ssl.truststore.type"] = "PEM"
                props[prefix + "ssl.truststore.location"] = str(Path(tls.ca).resolve())
        return props

    def _is_formatted(self) -> bool:
        return (self.data_dir / "log" / "meta.properties").exists()

    def _java_cmd(self, libs: Path, main_class: str, *args: str, jvm: tuple[str, ...] = ()) -> list[str]:
        log4j2 = self.data_dir / "config" / "log4j2.properties"
        opts = [*jvm, "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j2}"]
        return [_java(), *opts, "-cp", f"{libs}/*", main_class, *args]

    def _run_kafka_tool(self, libs: Path, main_class: str, *args: str) -> str:
        # Short-lived JVM: the C1 compiler alone starts noticeably faster.
        cmd = self._java_cmd(libs, main_class, *args, jvm=("-XX:TieredStopAtLevel=1",))
        return _run_tool(cmd, main_class, timeout=120)

    def _format(self, libs: Path, config: Path) -> None:
        args = ["format", "-t", _cluster_id(), "-c", str(config)]
        for name, password in self.scram_users.items():
            for mechanism in SCRAM_MECHANISMS:
                args += ["--add-scram", _scram_arg(mechanism, name, password)]
        self._run_kafka_tool(libs, "kafka.tools.StorageTool", *args)

    def _launch(self, libs: Path, config: Path) -> None:
        cmd = self._java_cmd(libs, "kafka.Kafka", str(config), jvm=(f"-Xmx{self.heap}",))
        with open(self.log_file, "ab") as log:
            log.write(f"\n===== localkafka: starting {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session/process group: Ctrl-C in a terminal reaches only us, and we
            # decide how the broker stops (cleanly) instead of the tty killing it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        record_pid(self._proc.pid)

    def _wait_until(self, condition: Callable[[], bool], deadline: float, timeout: float) -> None:
        while True:
            code = self._proc.poll() if self._proc else None
            if code is not None:
                raise LocalKafkaError(f"Kafka broker exited with code {code} while starting:\n{self.log_tail()}")
            if condition():
                return
            if time.monotonic() >= deadline:
                raise LocalKafkaError(f"Kafka broker not serving after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)  # poll interval, not synchronisation: the loop re-checks a condition

    def _serves(self, bootstrap: str, **client_kwargs: object) -> bool:
        # The cheap TCP check keeps aiokafka from logging connection errors while the JVM boots.
        port = int(bootstrap.rsplit(":", 1)[1])
        return _port_open(port) and _run_async(_serves_metadata(bootstrap, **client_kwargs))

    def _logs_in(self, name: str) -> bool:
        return self._serves(self.sasl_bootstrap, **_scram_kwargs(name, self.scram_users[name]))

    def _ensure_scram_users(self, libs: Path, deadline: float, timeout: float) -> None:
        """Make every SCRAM user able to log in on the SASL listener.

        Format stores the users, but only once: a data dir formatted earlier (the CLI's
        persistent one) may lack users added since, so those are added online.
        """
        missing = [name for name in self.scram_users if not self._logs_in(name)]
        if missing:
            self._alter_scram_users(libs, missing)
        for name in self.scram_users:
            self._wait_until(lambda name=name: self._logs_in(name), deadline, timeout)

    def _wait_for_tls_listeners(self, deadline: float, timeout: float) -> None:
        """Each TLS listener serves metadata to a client that verifies the broker's certificate with the CA.

        MTLS is checked with ``tls.client_keystore`` when given; without one, only when it merely requests
        client certificates (a required one would refuse the check itself).
        """
        tls = self.tls
        if tls is None:
            return
        checks: list[tuple[str, dict[str, object]]] = [(self.ssl_bootstrap, _tls_kwargs(tls))]
        if tls.client_keystore is not None or tls.client_auth == "requested":
            checks.append((self.mtls_bootstrap, _tls_kwargs(tls, client_keystore=tls.client_keystore)))
        for name, password in self.scram_users.items():
            scram = _scram_kwargs(name, password, protocol="SASL_SSL")
            checks.append((self.sasl_ssl_bootstrap, {**scram, **_tls_kwargs(tls, "SASL_SSL")}))
        for bootstrap, kwargs in checks:
            self._wait_until(lambda b=bootstrap, k=kwargs: self._serves(b, **k), deadline, timeout)

    def _alter_scram_users(self, libs: Path, names: list[str]) -> None:
        # One call per mechanism: Kafka 4.1 rejects both in one request ("A user
        # credential cannot be altered twice in the same request").
        for name in names:
            for mechanism in SCRAM_MECHANISMS:
                config = f"{mechanism}=[password={self.scram_users[name]}]"
                args = [
                    "--bootstrap-server",
                    self.bootstrap,
                    "--alter",
                    "--add-config",
                    config,
                    "--entity-type",
                    "users",
                    "--entity-name",
                    name,
                ]
                self._run_kafka_tool(libs, "kafka.admin.ConfigCommand", *args)

    # -- stop steps

    def _terminate(self, timeout: float = 20) -> None:
        if not self.is_running():
            self._reap(timeout=1)
            return
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._reap(timeout=10)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        # The whole group: the JVM is its leader (own session), nothing else is in it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self, timeout: float) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
            if self._proc.poll() is not None:
                self._proc = None

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the broker's log file, for error messages."""
        try:
            with open(self.log_file, "rb") as log:
                tail = deque(log, maxlen=lines)
        except OSError as exc:
            return f"(no broker log: {exc})"
        return b"".join(tail).decode(errors="replace").rstrip()


# ----------------------------------------------------------------------------- CLI


def _scram_user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition("=")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"expected NAME=PASSWORD, got {text!r}")
    return name, password


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream kafka",
        description=(
            "Run a real single-node Apache Kafka broker (KRaft, broker and controller in one "
            "JVM) on 127.0.0.1 in the foreground until Ctrl-C or SIGTERM, then stop it cleanly. "
            "Needs java (17+) and mvn; the broker's jars are fetched from Maven Central once "
            "into $STREAM_CACHE_DIR (default ~/.cache/stream)."
        ),
    )
    parser.add_argument("--port", type=int, default=9092, help="PLAINTEXT listener port (default: %(default)s)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="broker data (topics, offsets, SCRAM users); kept across runs (default: <cache>/kafka-data)",
    )
    parser.add_argument(
        "--scram-user",
        metavar="NAME=PASSWORD",
        type=_scram_user,
        action="append",
        default=[],
        help="add a SASL_PLAINTEXT listener (SCRAM-SHA-256 and -512) with this user; repeatable",
    )
    parser.add_argument(
        "--sasl-port", type=int, default=9094, help="SASL_PLAINTEXT port with --scram-user (default: %(default)s)"
    )
    parser.add_argument("--heap", default="512m", help="broker JVM maximum heap (default: %(default)s)")
    parser.add_argument(
        "--resolve-only",
        action="store_true",
        help="only fetch the broker's jars into the cache and print their directory",
    )
    return parser


def _listening_line(kafka: LocalKafka) -> str:
    where = f"PLAINTEXT {kafka.bootstrap}"
    if kafka.scram_users:
        where += f", SASL_PLAINTEXT (SCRAM-SHA-256/512) {kafka.sasl_bootstrap}"
    if kafka.tls is not None:
        where += f", SSL {kafka.ssl_bootstrap}, SSL with client certificates {kafka.mtls_bootstrap}"
        if kafka.scram_users:
            where += f", SASL_SSL (SCRAM-SHA-256/512) {kafka.sasl_ssl_bootstrap}"
    return f"Kafka {kafka.version} listening on {where}; data {kafka.data_dir}, log {kafka.log_file}"


class _Stop(Exception):
    """Raised from the SIGINT/SIGTERM handler to leave the foreground wait."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _serve_forever(kafka: LocalKafka) -> int:
    kafka.start()
    print(_listening_line(kafka), flush=True)
    while kafka.is_running():
        time.sleep(0.5)  # a poll of the child, woken early by the signal handler raising
    print(f"stream kafka: broker exited unexpectedly:\n{kafka.log_tail()}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``stream kafka``: run a local broker in the foreground; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.resolve_only:
            print(resolve_kafka())
            return 0
        kafka = LocalKafka(
            port=args.port,
            data_dir=args.data_dir or _cache_root(None) / "kafka-data",
            heap=args.heap,
            scram_users=dict(args.scram_user),
            sasl_port=args.sasl_port,
        )
    except LocalKafkaError as exc:
        print(f"stream kafka: {exc}", file=sys.stderr)
        return 1
    # SIGTERM as well as Ctrl-C must reach the finally below, which stops the broker.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve_forever(kafka)
    except _Stop:
        return 0
    except LocalKafkaError as exc:
        print(f"stream kafka: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the clean shutdown short; stop() escalates itself.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        kafka.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
