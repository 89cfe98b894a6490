"""A throw-away PKI for tests and local trials: a CA, a server certificate for 127.0.0.1 / localhost and client
certificates, written as PEM files. Needs `cryptography` (the `test` extra).

    pki = make_pki(tmp_path)   # pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key, ...
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: str  # PEM CA certificate that signed everything below
    server_cert: str  # for 127.0.0.1, ::1 and localhost (subjectAltName)
    server_key: str
    client_cert: str  # a client certificate signed by `ca`
    client_key: str
    other_ca: str  # a second, unrelated CA
    other_client_cert: str  # a client certificate signed by `other_ca`
    other_client_key: str


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key=None) -> str:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # Both key identifiers, as a real CA writes them: RFC 5280 strict verification (Python 3.13's default)
        # refuses a certificate without the authority's.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer_key or key).public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for prefix, ca_name in (("", "maskedkd test CA"), ("other_", "unrelated test CA")):
        ca_key = _key()
        ca = _cert(ca_name, ca_key, None, None, ca=True)
        files[f"{prefix}ca"] = _write(directory / f"{prefix}ca.pem", ca)
        client_key = _key()
        client = _cert(f"{prefix}student", client_key, ca.subject, ca_key, ca=False)
        files[f"{prefix}client_cert"] = _write(directory / f"{prefix}client.pem", client, client_key)
        files[f"{prefix}client_key"] = str(directory / f"{prefix}client.key")
        if not prefix:
            server_key = _key()
            server = _cert("localhost", server_key, ca.subject, ca_key, ca=False, server=True)
            files["server_cert"] = _write(directory / "server.pem", server, server_key)
            files["server_key"] = str(directory / "server.key")
    return Pki(**files)
