"""Settings for `stream run`: one frozen struct, loaded from STREAM_* variables and flags, loud on bad values."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

PREFIX = "STREAM_"

Seconds = Annotated[float, msgspec.Meta(gt=0, le=10 * 365 * 86400)]  # finite: "inf" is a typo, not a wish

COMMIT_TIMEOUT_SECONDS = 10.0  # a commit that takes longer is abandoned (retried at the next interval)
REBALANCE_MARGIN_SECONDS = 5.0  # between the end of a revoke and the group's rebalance timeout
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Each field is STREAM_<NAME> in the environment and --<name-with-dashes> on the command line.
    # The help text of each lives in HELP below, so `stream run --help` and the README agree.
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topics: tuple[str, ...] = ("samples",)
    kafka_group_id: str = "samples-sync"
    kafka_client_id: str = "stream"
    kafka_max_poll_records: Annotated[int, msgspec.Meta(ge=1)] = 5000
    kafka_session_timeout_seconds: Annotated[float, msgspec.Meta(ge=6, le=1800)] = 45.0
    kafka_heartbeat_interval_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 3.0
    kafka_rebalance_timeout_seconds: Annotated[float, msgspec.Meta(ge=10, le=3600)] = 60.0
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_sasl_password_file: str = ""
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_credentials_check_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    dlq_topic: str = "samples.dlq"
    pending_topic: str = ""  # derived from the group id when empty (see __post_init__)
    api_url: str = "https://api-b2b.gerosense.ai/api/v2.2"
    api_token: str = ""
    api_token_file: str = ""
    api_timeout_seconds: Seconds = 30.0
    batch_max_samples: Annotated[int, msgspec.Meta(ge=3, le=1000)] = 1000
    batch_window_seconds: Seconds = 5.0
    min_batch_hold_seconds: Seconds = 30.0
    min_batch_max_age_seconds: Seconds = 86400.0
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    max_requests_per_second: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0
    max_buffered_samples: Annotated[int, msgspec.Meta(ge=1000)] = 500_000
    commit_interval_seconds: Seconds = 5.0
    drain_timeout_seconds: Seconds = 30.0
    revoke_timeout_seconds: Seconds = 15.0
    retry_backoff_first_seconds: Seconds = 0.5
    retry_backoff_max_seconds: Seconds = 30.0
    retry_max_seconds: Annotated[float, msgspec.Meta(ge=0, le=10 * 365 * 86400)] = 900.0
    refusal_storm_guard: bool = True
    refusal_storm_window_seconds: Seconds = 60.0
    refusal_storm_min_batches: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10
    refusal_storm_share: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    ledger: Literal["on", "shadow", "off"] = "on"
    ledger_topic: str = ""  # derived from the group id when empty (see __post_init__)
    ledger_horizon_seconds: Seconds = 3 * 86400.0
    ledger_max_memory_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = 256 << 20
    ledger_max_samples_per_device: Annotated[int, msgspec.Meta(ge=100)] = 200_000
    ledger_beyond_horizon: Literal["send", "dead_letter"] = "send"
    metrics_port: Port = 9090
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.kafka_topics or not all(self.kafka_topics):
            raise ConfigError("STREAM_KAFKA_TOPICS: needs at least one topic name")
        if not self.pending_topic:
            # Each consumer group parks in a topic of its own (like Kafka Streams' internal topics): another
            # deployment on the same cluster never reads, re-parks or sends this group's parked samples.
            msgspec.structs.force_setattr(self, "pending_topic", f"{self.kafka_group_id}-pending")
        if not self.ledger_topic:
            # Like Kafka Streams' `<application.id>-<store>-changelog`: each group remembers in a topic of its own.
            msgspec.structs.force_setattr(self, "ledger_topic", f"{self.kafka_group_id}-ledger")
        if self.kafka_heartbeat_interval_seconds * 3 > self.kafka_session_timeout_seconds:
            raise ConfigError(
                "STREAM_KAFKA_HEARTBEAT_INTERVAL_SECONDS: must be at most a third of "
                "STREAM_KAFKA_SESSION_TIMEOUT_SECONDS"
            )
        if self.revoke_budget_seconds > self.kafka_rebalance_timeout_seconds:
            raise ConfigError(
                f"STREAM_REVOKE_TIMEOUT_SECONDS: a revoke may take it plus {COMMIT_TIMEOUT_SECONDS:.0f} s for its "
                f"commit plus a {REBALANCE_MARGIN_SECONDS:.0f} s margin = {self.revoke_budget_seconds:g} s, more than "
                f"STREAM_KAFKA_REBALANCE_TIMEOUT_SECONDS ({self.kafka_rebalance_timeout_seconds:g} s): the group "
                "would move on without this member while it still sends; lower the one or raise the other"
            )
        if {self.dlq_topic, self.pending_topic, self.ledger_topic} & set(self.kafka_topics):
            raise ConfigError(
                "STREAM_DLQ_TOPIC / STREAM_PENDING_TOPIC / STREAM_LEDGER_TOPIC: must differ from STREAM_KAFKA_TOPICS"
            )
        if self.ledger_topic in (self.dlq_topic, self.pending_topic):
            raise ConfigError("STREAM_LEDGER_TOPIC: must differ from STREAM_DLQ_TOPIC and STREAM_PENDING_TOPIC")
        if self.min_batch_max_age_seconds < self.min_batch_hold_seconds:
            raise ConfigError(
                "STREAM_MIN_BATCH_MAX_AGE_SECONDS: must be at least STREAM_MIN_BATCH_HOLD_SECONDS"
            )
        url = urlsplit(self.api_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"STREAM_API_URL: must be an http:// or https:// URL with a host, got {self.api_url!r}")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ConfigError("STREAM_KAFKA_SASL_USERNAME: required with a SASL security protocol")
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_password or self.kafka_sasl_password_file
        ):
            raise ConfigError(
                "STREAM_KAFKA_SASL_PASSWORD or STREAM_KAFKA_SASL_PASSWORD_FILE: required with a SASL security protocol"
            )
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError("STREAM_KAFKA_SSL_CERTFILE / STREAM_KAFKA_SSL_KEYFILE: a client certificate needs both")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"STREAM_LOG_LEVEL: one of DEBUG, INFO, WARNING, ERROR, got {self.log_level!r}")

    @property
    def revoke_budget_seconds(self) -> float:
        """The longest a revoke can take: waiting for in-flight requests, then the commit, then a margin."""
        return self.revoke_timeout_seconds + COMMIT_TIMEOUT_SECONDS + REBALANCE_MARGIN_SECONDS

    @property
    def samples_url(self) -> str:
        return self.api_url.rstrip("/") + "/samples"

    @property
    def input_topics(self) -> tuple[str, ...]:
        """Every topic the service consumes: the producers' topics and its own pending topic."""
        return (*self.kafka_topics, self.pending_topic)

    def read_sasl_password(self) -> str:
        if self.kafka_sasl_password_file:
            try:
                return Path(self.kafka_sasl_password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"STREAM_KAFKA_SASL_PASSWORD_FILE: cannot read it ({exc.strerror})") from None
        return self.kafka_sasl_password

    def read_token(self) -> str:
        """The API token, from STREAM_API_TOKEN_FILE when set (so a rotated Secret is picked up)."""
        if self.api_token_file:
            try:
                token = Path(self.api_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"STREAM_API_TOKEN_FILE: cannot read it ({exc.strerror})") from None
            if not token:
                raise ConfigError("STREAM_API_TOKEN_FILE: the file is empty")
            return token
        if not self.api_token:
            raise ConfigError("STREAM_API_TOKEN or STREAM_API_TOKEN_FILE: one of them is required")
        return self.api_token

    def __rich_repr__(self):
        yield from self._masked().items()

    def _masked(self) -> dict[str, object]:
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        for secret in SECRETS:
            if fields[secret]:
                fields[secret] = "***"
        return fields

    def __repr__(self) -> str:
        # The token must never reach a log line, even through a debug repr.
        fields = self._masked()
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


SECRETS = ("api_token", "kafka_sasl_password")  # never shown: masked in repr, never logged

HELP: dict[str, str] = {
    "kafka_bootstrap_servers": "Kafka brokers, host:port[,host:port]",
    "kafka_topics": "input topics, comma-separated",
    "kafka_group_id": "consumer group; replicas with the same group share the partitions",
    "kafka_client_id": "client id shown in broker logs and metrics",
    "kafka_max_poll_records": "most records taken from Kafka per poll",
    "kafka_session_timeout_seconds": "the group drops a member it has not heard from for this long (a crashed pod's "
    "partitions move after it; a graceful stop leaves at once)",
    "kafka_heartbeat_interval_seconds": "heartbeat period, at most a third of the session timeout",
    "kafka_rebalance_timeout_seconds": "how long the group waits for members to finish their revoke and rejoin; "
    "must cover STREAM_REVOKE_TIMEOUT_SECONDS + 10 s commit + 5 s margin",
    "kafka_security_protocol": "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    "kafka_sasl_mechanism": "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL protocol)",
    "kafka_sasl_username": "SASL user name",
    "kafka_sasl_password": "SASL password (prefer the file); never logged",
    "kafka_sasl_password_file": "file holding the SASL password (a mounted Secret)",
    "kafka_ssl_cafile": "CA bundle to verify the brokers (with SSL or SASL_SSL; default: the system's)",
    "kafka_ssl_certfile": "client certificate for mutual TLS (PEM), with STREAM_KAFKA_SSL_KEYFILE",
    "kafka_ssl_keyfile": "client private key for mutual TLS (PEM)",
    "kafka_credentials_check_seconds": "how often the SASL password and TLS files are checked for a change; a "
    "change rebuilds the Kafka clients in the process after a graceful drain (0: never)",
    "dlq_topic": "dead-letter topic: invalid records and samples the API refused, with the reason in headers",
    "pending_topic": "topic where buffers of fewer than 3 samples are parked until more samples arrive",
    "api_url": "Samples API base URL; batches go to {api_url}/samples",
    "api_token": "Bearer token for the API (prefer STREAM_API_TOKEN_FILE); never logged",
    "api_token_file": "file holding the Bearer token, re-read when it changes (a mounted Secret)",
    "api_timeout_seconds": "timeout of one POST to the API",
    "batch_max_samples": "samples per request, 3..1000; a buffer this full is sent at once",
    "batch_window_seconds": "a buffer is sent when its oldest sample has waited this long",
    "min_batch_hold_seconds": "a buffer of 1-2 samples waits this long for more, then is parked in the pending topic",
    "min_batch_max_age_seconds": "a parked sample older than this goes to the DLQ as below_min_batch",
    "max_in_flight": "concurrent requests to the API (one per user and data type at a time)",
    "max_requests_per_second": "ceiling on requests per second to the API (0: none)",
    "max_buffered_samples": "samples held in memory (buffered and in flight) before fetching pauses",
    "retry_max_seconds": "a batch failing this long while other batches succeed is dead-lettered as "
    "retry_exhausted (0: retry forever)",
    "refusal_storm_guard": "on (true) or off (false): when the API suddenly refuses most samples, hold and "
    "probe instead of dead-lettering them (off for an API known to refuse a lot)",
    "refusal_storm_window_seconds": "how long the refusal-storm guard keeps the API's answers as evidence; a "
    "refusal without enough traffic after it to judge within this long is dead-lettered",
    "refusal_storm_min_batches": "batches answered after a refusal that the guard needs before it judges it "
    "(an API incident, or one bad batch)",
    "refusal_storm_share": "share of those batches' samples the API must refuse (more than this) for an API "
    "incident (a refusal storm), 0..1 exclusive",
    "commit_interval_seconds": "how often done offsets are committed to Kafka",
    "drain_timeout_seconds": "on SIGTERM, how long to wait for in-flight requests before exiting",
    "revoke_timeout_seconds": "on a rebalance, how long to wait for the revoked partitions' requests on the wire",
    "retry_backoff_first_seconds": "first retry delay of a failed request (exponential, full jitter)",
    "retry_backoff_max_seconds": "cap of the retry delay",
    "ledger": "on, shadow or off: the sync ledger remembers what the API accepted, per device, so a re-sent, "
    "re-read or replayed sample is not sent twice (shadow: decide and count, but send everything)",
    "ledger_topic": "compacted topic holding the ledger (default: <group id>-ledger, created when missing)",
    "ledger_horizon_seconds": "how far behind a device's newest accepted sample the ledger remembers samples",
    "ledger_max_memory_bytes": "memory for the ledger's fingerprints (16 B a sample); past it the least recently "
    "active devices are forgotten",
    "ledger_max_samples_per_device": "fingerprints remembered per device at most (its oldest forgotten first)",
    "ledger_beyond_horizon": "send or dead_letter: a sample older than its device's horizon, which the ledger "
    "cannot vouch for (send: a duplicate is better than a loss)",
    "metrics_port": "port of /metrics, /healthz and /readyz (0 disables the server)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parse_field(field: str, value: str) -> object:
    if field == "kafka_topics":
        return tuple(t.strip() for t in value.split(",") if t.strip())
    if field in _SWITCHES:
        word = value.strip().lower()
        if word not in _SWITCH_WORDS:
            raise ConfigError(f"{env_name(field)}: on or off (also true/false, yes/no, 1/0), got {value!r}")
        return _SWITCH_WORDS[word]
    return value if field in _VERBATIM else value.strip()


_SWITCHES = {"refusal_storm_guard"}
_SWITCH_WORDS = {**dict.fromkeys(("on", "true", "yes", "1"), True), **dict.fromkeys(("off", "false", "no", "0"), False)}


_VERBATIM = {"api_token", "kafka_sasl_password"}  # kept exactly as given


def load(env: Mapping[str, str] = os.environ, overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, with command-line overrides on top. Raises ConfigError naming the variable."""
    raw: dict[str, object] = {}
    for field in Settings.__struct_fields__:
        name = env_name(field)
        if name in env and env[name] != "":
            raw[field] = _parse_field(field, env[name])
    for field, value in (overrides or {}).items():
        if value is not None:
            raw[field] = _parse_field(field, value)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_the_variable(str(exc))) from None


def unknown_variables(env: Mapping[str, str] = os.environ) -> list[str]:
    """STREAM_* variables that are no setting (a typo, most likely), for a warning at start.

    Not an error: Kubernetes injects STREAM_SERVICE_HOST, STREAM_PORT_... for a Service named `stream`.
    """
    known = {env_name(f) for f in Settings.__struct_fields__} | {"STREAM_CACHE_DIR", "STREAM_SANDBOX_TOKEN",
                                                                 "STREAM_TEST_BOOTSTRAP"}
    return sorted(
        name for name in env
        if name.startswith(PREFIX) and name not in known and not name.startswith(("STREAM_SERVICE_", "STREAM_PORT"))
    )


def _name_the_variable(message: str) -> str:
    # msgspec says "Expected `int` <= 1000 - at `$.batch_max_samples`"; operators know the variable name.
    if "- at `$." in message:
        text, _, path = message.rpartition(" - at `$.")
        field = path.rstrip("`").split("[")[0]
        return f"{env_name(field)}: {text}"
    return message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; the default shown is the environment's value or the built-in one."""
    defaults = Settings()
    for field in Settings.__struct_fields__:
        default = getattr(defaults, field)
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "" if field in SECRETS else f" (default: {default})"
        parser.add_argument(
            flag_name(field),
            dest=field,
            default=None,
            metavar=field.upper().split("_")[-1],
            help=f"{HELP[field]}. Env {env_name(field)}{shown}",
        )


def overrides_from(args: argparse.Namespace) -> dict[str, str]:
    return {f: getattr(args, f) for f in Settings.__struct_fields__ if getattr(args, f, None) is not None}
