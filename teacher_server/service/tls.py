"""TLS of the gRPC port: server credentials from PEM files, checked up front so a bad path or a key that does not
match its certificate is a one-line error at start-up, not a failed handshake later."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from teacher_server.settings import ServerSettings


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable or not what it should be."""


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes  # PEM certificate chain
    key: bytes  # PEM private key
    client_ca: bytes | None  # PEM CA bundle; set: mutual TLS


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{what} {path} is not a PEM file")
    return data


def load_tls_files(settings: ServerSettings) -> TlsFiles | None:
    """The PEM files of `settings` (None without TLS), verified with the standard library's TLS stack."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    client_ca = _read(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--tls-cert {settings.tls_cert} and --tls-key {settings.tls_key} do not form a "
            f"certificate and its private key: {exc.reason or exc}"
        ) from exc
    if settings.tls_client_ca:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"--tls-client-ca {settings.tls_client_ca} holds no usable CA certificate: {exc.reason or exc}"
            ) from exc
    return TlsFiles(cert=cert, key=key, client_ca=client_ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with a client CA, a client without a certificate signed by it is refused."""
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)], root_certificates=files.client_ca, require_client_auth=files.client_ca is not None
    )
