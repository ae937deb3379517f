"""Connection options for the Kafka clients (consumer and producer): brokers, client id, TLS and SASL."""

from __future__ import annotations

from stream.config import Settings
from stream.kafka_tls import ssl_context, uses_tls


def kafka_client_options(settings: Settings, *, watched: bool = True) -> dict[str, object]:
    """Keyword arguments shared by AIOKafkaConsumer and AIOKafkaProducer. `watched`: TLS failures of these
    clients are reported (logs, /readyz; see stream.kafka_tls)."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if uses_tls(settings):
        options["ssl_context"] = ssl_context(settings, watched=watched)
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.read_sasl_password()
    return options
