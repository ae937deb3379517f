"""Kafka credentials kept in files (the SASL password, the CA bundle, the client certificate and its key): which
files they are, and whether they changed since the Kafka clients loaded them.

The clients read them once, when they are built: a rotated SCRAM password or a renewed certificate (cert-manager,
Strimzi user certificates: Kubernetes swaps a mounted Secret's files in place) reaches the brokers only through
new clients. So the pipeline polls these files (`CredentialWatch`, every STREAM_KAFKA_CREDENTIALS_CHECK_SECONDS)
and, when one changed, stops as for a shutdown (deliveries finished, offsets committed, tails parked), and
`stream run` builds a new pipeline with new clients in the same process: no pod restart, no crash loop, the
metrics endpoint stays up. The API token is not here: it is re-read before every request (stream/token.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from stream.config import ConfigError, Settings, env_name

# Settings naming a file whose contents the Kafka clients load when built.
FILE_SETTINGS = ("kafka_sasl_password_file", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
UNREADABLE = b""  # the fingerprint of a file that cannot be read now (being swapped, gone): never settled
LOGIN_TIMEOUT_SECONDS = 15.0  # a trial login with changed files: longer, and the brokers are taken as refusing


class CredentialsChanged(Exception):
    """Kafka credential files changed since the clients loaded them: the clients must be built anew."""

    def __init__(self, variables: list[str], why: str = "changed") -> None:
        self.variables = variables
        super().__init__(
            f"the Kafka credential files ({', '.join(variables)}) {why}: rebuilding the Kafka clients to load them"
        )


def credential_files(settings: Settings) -> dict[str, str]:
    """Variable name -> path, for each credential file the Kafka clients of these settings load."""
    files: dict[str, str] = {}
    sasl = settings.kafka_security_protocol.startswith("SASL")
    tls = settings.kafka_security_protocol in ("SSL", "SASL_SSL")
    for name in FILE_SETTINGS:
        path = getattr(settings, name)
        if path and (sasl if name == "kafka_sasl_password_file" else tls):
            files[env_name(name)] = path
    return files


def fingerprints(settings: Settings) -> dict[str, bytes]:
    """Variable name -> a digest of its file's contents now; UNREADABLE for a file that cannot be read."""
    found: dict[str, bytes] = {}
    for variable, path in credential_files(settings).items():
        try:
            found[variable] = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()
        except OSError:
            found[variable] = UNREADABLE
    return found


def changed(loaded: dict[str, bytes], now: dict[str, bytes]) -> list[str]:
    """The variables whose file differs between the two looks."""
    return [variable for variable in sorted(loaded.keys() | now.keys()) if loaded.get(variable) != now.get(variable)]


@dataclass
class CredentialWatch:
    """Tells when the credential files changed since the clients loaded them, once the change has settled.

    A change counts only when two looks in a row agree on it: a file being written in place (a manual edit, a
    tool that does not swap files atomically as the kubelet does) is not loaded half-written. A file that cannot
    be read never settles: the clients built from what was there keep working, new ones could not be built.
    """

    loaded: dict[str, bytes]
    _seen: dict[str, bytes] | None = field(default=None, init=False)

    @classmethod
    def of(cls, settings: Settings) -> CredentialWatch:
        """Call right before the clients are built: what they are about to load."""
        return cls(fingerprints(settings))

    @property
    def watching(self) -> bool:
        return bool(self.loaded)

    def look(self, now: dict[str, bytes]) -> list[str]:
        """The variables whose file changed and has settled since the last look; [] while nothing did."""
        if not changed(self.loaded, now) or UNREADABLE in now.values():
            self._seen = None
            return []
        if self._seen != now:  # new, or still moving: wait for one more look that agrees
            self._seen = now
            return []
        return changed(self.loaded, now)


async def try_login(settings: Settings, timeout: float = LOGIN_TIMEOUT_SECONDS) -> str | None:
    """Whether the brokers accept the credential files as they are now: a throwaway client bootstraps with them
    (TLS handshake and SASL login included). None when it did; else why not, in a few words (never a secret).

    Asked before the pipeline drains for new clients: with the file changed before the brokers know the new
    password, draining first would leave every member of the group out, each waiting for the brokers.
    """
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    from stream.kafka_options import kafka_client_options

    try:
        options = kafka_client_options(settings, watched=False)  # a failure here must not make /readyz say TLS
    except (OSError, ConfigError) as exc:
        return f"they cannot be loaded: {getattr(exc, 'strerror', None) or exc}"
    client = AIOKafkaClient(**options, request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            await client.bootstrap()
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"no broker accepted a connection with them ({type(exc).__name__})"
    finally:
        await client.close()
    return None
