"""Connection options for the Kafka clients (consumer and producer): brokers, client id, TLS and SASL."""

from __future__ import annotations

from aiokafka.helpers import create_ssl_context

from stream.config import Settings


def kafka_client_options(settings: Settings) -> dict[str, object]:
    """Keyword arguments shared by AIOKafkaConsumer and AIOKafkaProducer."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile or None,
            certfile=settings.kafka_ssl_certfile or None,
            keyfile=settings.kafka_ssl_keyfile or None,
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.read_sasl_password()
    return options
