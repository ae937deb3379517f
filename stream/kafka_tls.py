"""What a failing TLS connection to the Kafka brokers means for an operator, and the TLS context the clients use.

The Kafka clients log a refused handshake deep inside
("Unable connect to node ...") and retry for ever, or end the start with "Unable to bootstrap": neither says
which setting is wrong. Here:

- `tls_failure` maps an exception to what it means and which setting to check (pure: unit-tested);
- every TLS context made here watches its own handshakes and reads (`SSLContext.sslobject_class`), so a failure
  of any client (consumer, producer, admin) is logged once a minute as `kafka_tls_failed`, naming the setting,
  and `tls_problem` gives it to /readyz;
- `wait_for_tls` is run before any client starts: while TLS with the brokers fails, the service stays up (not
  ready, saying why) and tries again with backoff, instead of exiting with a misleading "cannot reach Kafka".
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.conn import collect_hosts
from aiokafka.helpers import create_ssl_context

from stream.config import Settings, env_name
from stream.kafka_credentials import CredentialsChanged, changed, fingerprints
from stream.logs import RateLimited

log = logging.getLogger("stream.kafka")

TLS_FAILURE_MEMORY_SECONDS = 60.0  # a failure this old with no attempt since no longer makes the service unready
TLS_LOG_EVERY_SECONDS = 60.0  # one `kafka_tls_failed` line a minute per broker and failure, with `suppressed`
TLS_PROBE_TIMEOUT_SECONDS = 10.0
TLS_RETRY_FIRST_SECONDS = 1.0
TLS_RETRY_MAX_SECONDS = 30.0

CAFILE, CERTFILE, KEYFILE = env_name("kafka_ssl_cafile"), env_name("kafka_ssl_certfile"), env_name("kafka_ssl_keyfile")
BOOTSTRAP, PROTOCOL = env_name("kafka_bootstrap_servers"), env_name("kafka_security_protocol")

# OpenSSL verify codes (X509_V_ERR_*) that are not about which CA is trusted.
_NAME_MISMATCH = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_OUT_OF_VALIDITY = {9, 10}  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
# Alerts a broker sends when it does not accept the client's certificate (or its absence): mutual TLS.
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE",  # Java's answer to a missing or untrusted client certificate
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED",
}
# What OpenSSL says when the other side does not speak TLS at all (a PLAINTEXT or SASL_PLAINTEXT listener).
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD",
            "HTTP_REQUEST"}


def uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def ssl_context(settings: Settings, *, watched: bool = False) -> ssl.SSLContext:
    """The TLS context from STREAM_KAFKA_SSL_*; `watched`: its failures go to the settings' TlsStatus.

    Raises OSError (ssl.SSLError is one) when a file cannot be loaded: `stream run` checks this at start.
    """
    context = create_ssl_context(
        cafile=settings.kafka_ssl_cafile or None,
        certfile=settings.kafka_ssl_certfile or None,
        keyfile=settings.kafka_ssl_keyfile or None,
    )
    if watched:
        context.sslobject_class = _watching(settings)
    return context


# -- what a failure means -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFailure:
    reason: str  # one sentence for the log and /readyz: what failed, why, and which setting to check
    variables: tuple[str, ...]  # the settings to check
    error: str  # the TLS library's own words


def tls_failure(exc: BaseException, settings: Settings, broker: str) -> TlsFailure | None:
    """What a failed connection to `broker` means, when TLS is why it failed; None for anything else (a refused
    or reset connection, a timeout, a closed one: not TLS's doing as far as can be told)."""
    error = _tls_error(exc)
    if error is None:
        return None
    said = _library_words(error)
    if isinstance(error, ssl.SSLCertVerificationError):
        return _verification_failure(error, settings, broker)
    code = getattr(error, "reason", None) or ""
    if code in _CLIENT_CERT_ALERTS:
        if not settings.kafka_ssl_certfile:
            return TlsFailure(
                f"the Kafka broker {broker} refused the TLS connection without a client certificate ({said}): it "
                f"requires mutual TLS; set {CERTFILE} and {KEYFILE}",
                (CERTFILE, KEYFILE), said,
            )
        return TlsFailure(
            f"the Kafka broker {broker} refused the client certificate ({said}): check {CERTFILE} "
            f"({settings.kafka_ssl_certfile}) and {KEYFILE}: the certificate must be valid and signed by a CA "
            "the brokers trust",
            (CERTFILE, KEYFILE), said,
        )
    if code in _NOT_TLS:
        return _not_tls(broker, said)
    return TlsFailure(
        f"TLS with the Kafka broker {broker} failed ({said}): check {CAFILE}, {CERTFILE} / {KEYFILE} and {PROTOCOL}",
        (CAFILE, CERTFILE, KEYFILE, PROTOCOL), said,
    )


def _not_tls(broker: str, said: str) -> TlsFailure:
    return TlsFailure(
        f"TLS handshake with the Kafka broker {broker} failed ({said}): the address does not speak TLS; check "
        f"{BOOTSTRAP} (a TLS listener's port) and {PROTOCOL}",
        (BOOTSTRAP, PROTOCOL), said,
    )


def _verification_failure(error: ssl.SSLCertVerificationError, settings: Settings, broker: str) -> TlsFailure:
    said = error.verify_message or _library_words(error)
    head = f"TLS verification of the Kafka broker {broker} failed ({said})"
    if error.verify_code in _NAME_MISMATCH:
        return TlsFailure(
            f"{head}: its certificate does not name the host the client connected to; check the host names in "
            f"{BOOTSTRAP} (and the brokers' advertised listeners)",
            (BOOTSTRAP,), said,
        )
    if error.verify_code in _OUT_OF_VALIDITY:
        return TlsFailure(
            f"{head}: the broker's certificate is outside its validity period (or this machine's clock is wrong); "
            f"{CAFILE} is not the cause",
            (), said,
        )
    if not settings.kafka_ssl_cafile:
        return TlsFailure(
            f"{head}: {CAFILE} is not set, so the system's CA bundle was used; set {CAFILE} to the CA that "
            "signed the brokers' certificates",
            (CAFILE,), said,
        )
    return TlsFailure(
        f"{head}: check {CAFILE} ({settings.kafka_ssl_cafile}): it must hold the CA that signed the brokers' "
        "certificates",
        (CAFILE,), said,
    )


def _tls_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The TLS error behind `exc` (itself, or its cause or context, as a client may wrap it)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLWantReadError | ssl.SSLWantWriteError | ssl.SSLZeroReturnError | ssl.SSLEOFError
        ):
            return exc  # a closed connection (EOF) says nothing of TLS itself
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _library_words(error: ssl.SSLError) -> str:
    # "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate (_ssl.c:2580)" -> "sslv3 alert bad certificate"
    text = str(error.args[1]) if len(error.args) > 1 else str(error)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text).strip() or type(error).__name__


# -- what has been failing ------------------------------------------------------------------------------------


class TlsStatus:
    """The last TLS failure with each broker host, until data comes through from that host again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, tuple[TlsFailure, float]] = {}
        self._logs: dict[tuple[str, str], RateLimited] = {}

    def failed(self, broker: str, failure: TlsFailure) -> None:
        now = self._clock()
        self._failures[broker] = (failure, now)
        limiter = self._logs.setdefault((broker, failure.reason), RateLimited(TLS_LOG_EVERY_SECONDS, self._clock))
        suppressed = limiter.take(now)
        if suppressed is not None:
            log.error(failure.reason, extra={"event": "kafka_tls_failed", "broker": broker, "error": failure.error,
                                             "check": ", ".join(failure.variables), "suppressed": suppressed})

    def succeeded(self, broker: str) -> None:
        if self._failures.pop(broker, None) is not None:
            log.info("TLS with the Kafka broker works again", extra={"event": "kafka_tls_ok", "broker": broker})

    def problem(self) -> str | None:
        """The most recent failure that has not been followed by a working connection to its broker."""
        now = self._clock()
        recent = [(at, f) for f, at in self._failures.values() if now - at < TLS_FAILURE_MEMORY_SECONDS]
        return max(recent, key=lambda item: item[0])[1].reason if recent else None


_statuses: dict[tuple[str, ...], TlsStatus] = {}


def _status_key(settings: Settings) -> tuple[str, ...]:
    return (settings.kafka_bootstrap_servers, settings.kafka_security_protocol, settings.kafka_ssl_cafile,
            settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)


def tls_status(settings: Settings) -> TlsStatus:
    """The status shared by every client of these connection settings in this process."""
    return _statuses.setdefault(_status_key(settings), TlsStatus())


def tls_problem(settings: Settings) -> str | None:
    """Why TLS with the brokers fails now (for /readyz), or None."""
    if not uses_tls(settings):
        return None
    status = _statuses.get(_status_key(settings))
    return status.problem() if status is not None else None


def _watching(settings: Settings) -> type[ssl.SSLObject]:
    """An SSLObject class (what asyncio's TLS transport drives) that reports to the settings' TlsStatus."""
    status = tls_status(settings)

    class Watched(ssl.SSLObject):
        _answered = False  # set at the first data read: the broker accepted the connection (and our certificate)

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except ssl.SSLError as exc:
                self._report(exc)
                raise

        def read(self, len: int = 1024, buffer=None):  # ssl.SSLObject's own signature
            try:
                data = super().read(len, buffer)
            except ssl.SSLError as exc:
                self._report(exc)
                raise
            if data and not self._answered:
                # Not at the handshake: with TLS 1.3 a broker refuses a client certificate only after it.
                self._answered = True
                status.succeeded(self.server_hostname or "?")
            return data

        def _report(self, exc: ssl.SSLError) -> None:
            if isinstance(exc, ssl.SSLWantReadError | ssl.SSLWantWriteError):  # routine: more bytes to come
                return
            broker = self.server_hostname or "?"
            failure = tls_failure(exc, settings, broker)
            if failure is not None:
                status.failed(broker, failure)

    return Watched


# -- before the clients start ---------------------------------------------------------------------------------

# An ApiVersions request (v0, which every broker answers, also before a SASL handshake): the broker's answer
# proves that TLS works both ways, client certificate included.
_API_VERSIONS_V0 = struct.pack(">hhih", 18, 0, 0x7374, 9) + b"tls-probe"
_PROBE_REQUEST = struct.pack(">i", len(_API_VERSIONS_V0)) + _API_VERSIONS_V0


async def probe_tls(
    settings: Settings, context: ssl.SSLContext | None = None, timeout: float = TLS_PROBE_TIMEOUT_SECONDS
) -> TlsFailure | None:
    """Connect to each bootstrap server with the service's TLS settings (`context`: as the clients loaded them)
    until one answers.

    None when one answered, or when none could be reached for another reason than TLS (refused, timed out):
    the clients report that themselves. Else the last TLS failure met, recorded in the settings' TlsStatus
    (logged, and /readyz says it).
    """
    context = context or ssl_context(settings)  # not watched: failures are recorded here, once
    status = tls_status(settings)
    failure = None
    for host, port, _family in collect_hosts(settings.kafka_bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(timeout):
                await _ask_api_versions(host, port, context)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            found = tls_failure(exc, settings, host)
            if found is None and _closed_on_us(exc) and await _answers_without_tls(host, port, timeout):
                # A Kafka listener without TLS reads a TLS greeting as a huge request and hangs up: nothing in the
                # error says TLS. The same address answering a plain request says it.
                found = _not_tls(host, "the connection was closed during the TLS handshake; the address answers "
                                       "Kafka requests without TLS")
            if found is not None:
                failure = found
                status.failed(host, found)
            continue
        status.succeeded(host)
        return None
    return failure


async def _ask_api_versions(host: str, port: int, context: ssl.SSLContext | None) -> None:
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(_PROBE_REQUEST)
        await writer.drain()
        await reader.readexactly(4)
    finally:
        writer.close()


def _closed_on_us(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError | asyncio.IncompleteReadError)


async def _answers_without_tls(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await _ask_api_versions(host, port, None)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    return True


async def wait_for_tls(
    settings: Settings,
    stopping: asyncio.Event,
    loaded: dict[str, bytes] | None = None,
    *,
    first: float = TLS_RETRY_FIRST_SECONDS,
    most: float = TLS_RETRY_MAX_SECONDS,
) -> bool:
    """Before the Kafka clients start (SSL and SASL_SSL only): wait, trying again with backoff, while TLS with
    the brokers fails. False when `stopping` was set first. A wrong CA must not end in a restart loop saying
    "cannot reach Kafka": the service stays up, logs `kafka_tls_failed` naming the setting, and /readyz says it.

    `loaded`: the credential files' fingerprints as the clients (built just before) loaded them; by default,
    as they are now. Should they change while TLS fails (an operator fixing the Secret), CredentialsChanged: only
    new clients load them (`stream run` builds them, in the same process).
    """
    if not uses_tls(settings):
        return True
    context = ssl_context(settings)
    loaded = fingerprints(settings) if loaded is None else loaded
    delay = first
    while not stopping.is_set():
        probe = asyncio.ensure_future(probe_tls(settings, context))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((probe, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this wait itself is cancelled: no task left behind
            for task in (probe, stop):
                task.cancel()
            await asyncio.gather(probe, stop, return_exceptions=True)
        if probe.cancelled():  # the stop came first
            break
        if probe.result() is None:
            return True
        if moved := changed(loaded, fingerprints(settings)):
            raise CredentialsChanged(moved, "changed while TLS with the brokers failed")
        try:
            await asyncio.wait_for(stopping.wait(), timeout=delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, most)
    return False
