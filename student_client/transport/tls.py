"""Channel credentials for a teacher behind TLS: the CA that signed its certificate (None: the system's roots) and,
for mutual TLS, this client's certificate and key. The same credentials serve grpc and grpc.aio channels."""

from __future__ import annotations

from typing import TypedDict

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from exc


def channel_credentials(
    *,
    tls: bool = False,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    root_certificates: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plain-text channel. Any of the files (or `root_certificates`) implies TLS;
    ValueError (one line) for an unreadable file or a certificate without its key."""
    if bool(client_cert) != bool(client_key):
        raise ValueError(
            "a client certificate needs its key, and a key its certificate "
            "(--teacher-client-cert FILE --teacher-client-key FILE)"
        )
    if not (tls or ca_file or client_cert or root_certificates):
        return None
    roots = _read(ca_file, "teacher CA file") if ca_file else root_certificates
    chain = _read(client_cert, "client certificate") if client_cert else None
    key = _read(client_key, "client key") if client_key else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


class TeacherTls(TypedDict):
    """The TLS arguments of TeacherClient."""

    ca_file: str | None
    client_cert: str | None
    client_key: str | None
