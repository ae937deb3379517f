"""Certificates made by the tests themselves (with `cryptography`): a CA, a broker certificate it signs (for
127.0.0.1 and localhost), a client certificate it signs (mutual TLS), and a second CA that signed nothing of
these (the "wrong CA"). EC P-256 keys: made in milliseconds; Kafka's PEM key store reads them (PKCS#8).

Nothing here touches the network; the unit tests use the same material for in-memory handshakes.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)  # a test session is shorter; a leaked file is worthless soon


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        # PKCS#8, unencrypted: what Kafka's PEM key store (ssl.keystore.type=PEM) reads without ssl.key.password.
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stream tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a little slack for clocks
        .not_valid_after(now + VALIDITY)
    )


def new_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    """A leaf certificate signed by `ca`: a server one names 127.0.0.1 and localhost; a client one names nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files `make_pki` wrote."""

    ca: Path  # the CA that signed the broker's and the client's certificates
    broker_keystore: Path  # the broker's key, its certificate and the CA's (Kafka's PEM key store format)
    client_cert: Path  # the client's certificate (STREAM_KAFKA_SSL_CERTFILE)
    client_key: Path  # its key (STREAM_KAFKA_SSL_KEYFILE)
    client_keystore: Path  # key and certificate in one file (LocalKafka's start-up check on the mTLS listener)
    other_ca: Path  # a CA that signed none of these: the wrong STREAM_KAFKA_SSL_CAFILE


@dataclass(frozen=True)
class Material:
    """The same, in memory (for in-memory handshakes in unit tests)."""

    ca: Issued
    broker: Issued
    client: Issued
    other_ca: Issued


def make_material() -> Material:
    ca = new_ca("stream test CA")
    return Material(
        ca=ca,
        broker=issue(ca, "localkafka broker", server=True),
        client=issue(ca, "stream", server=False),
        other_ca=new_ca("unrelated CA"),
    )


def write_pki(directory: Path, material: Material | None = None) -> Pki:
    m = material or make_material()
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes, private: bool = False) -> Path:
        path = directory / name
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        return path

    return Pki(
        ca=write("ca.pem", m.ca.cert_pem()),
        broker_keystore=write("broker.pem", m.broker.key_pem() + m.broker.cert_pem() + m.ca.cert_pem(), True),
        client_cert=write("client.crt", m.client.cert_pem()),
        client_key=write("client.key", m.client.key_pem(), True),
        client_keystore=write("client.pem", m.client.key_pem() + m.client.cert_pem(), True),
        other_ca=write("other-ca.pem", m.other_ca.cert_pem()),
    )
