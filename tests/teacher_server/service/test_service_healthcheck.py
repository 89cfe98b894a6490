"""`teacher-server health` (the compose health check and the Kubernetes exec probes) against real servers: plain
text, TLS and mutual TLS with a CA the test makes. SERVING is exit 0 and one line on stdout; NOT_SERVING, an unknown
service, an unreachable port, an untrusted or misnamed certificate and unreadable files are exit 1 and one line on
stderr, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from service_testkit import settings

from teacher_server.service.server import SERVICE_NAME
from teacher_server.testing.server import RunningServer, running_server
from teacher_server.testing.tls import Pki, make_pki

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(settings(tmp_path_factory.mktemp("plain"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(
        settings(tmp_path_factory.mktemp("tls"), tls_cert=pki.server_cert, tls_key=pki.server_key)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(
        settings(
            tmp_path_factory.mktemp("mtls"), tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
        )
    ) as srv:
        yield srv


def health(*args: str) -> tuple[int, str]:
    """Run the console command; returns (exit code, its one line) and checks the line is alone on its stream."""
    result = subprocess.run(
        [sys.executable, "-m", "teacher_server.cli", "health", "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out, err = result.stdout.strip().splitlines(), result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        assert len(out) == 1 and err == [], (out, err)
        return 0, out[0]
    assert len(err) == 1 and out == [], (out, err)
    return result.returncode, err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plain_text_serving_not_serving_and_unknown_service(plain_server: RunningServer) -> None:
    assert health("--target", plain_server.address) == (0, f"{plain_server.address} (server): SERVING")
    code, line = health("--target", plain_server.address, "--service", SERVICE_NAME)
    assert code == 0 and line.endswith("SERVING")
    code, line = health("--target", plain_server.address, "--service", "no.such.Service")
    assert code == 1 and "NOT_FOUND" in line
    # the state a draining server announces (server.py sets it on the same health servicer)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    plain_server._call(plain_server.server.health.set(SERVICE_NAME, not_serving))
    try:
        assert health("--target", plain_server.address, "--service", SERVICE_NAME) == (
            1,
            f"{plain_server.address} {SERVICE_NAME}: NOT_SERVING",
        )
        assert health("--target", plain_server.address)[0] == 0  # the process as a whole still lives
    finally:
        plain_server._call(plain_server.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))


def test_unreachable_port_and_bad_files_are_exit_1_one_line(pki: Pki, tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    code, line = health("--target", target)
    assert code == 1 and line.startswith(f"{target} (server): UNAVAILABLE")
    code, line = health("--target", target, "--ca", str(tmp_path / "missing.pem"))
    assert code == 1 and "cannot check" in line and "missing.pem" in line
    code, line = health("--target", target, "--ca", __file__)
    assert code == 1 and "not a PEM file" in line


def test_tls_checks_verify_the_certificate(tls_server: RunningServer, pki: Pki) -> None:
    address = tls_server.address
    assert health("--target", address, "--ca", pki.ca) == (0, f"{address} (server): SERVING")
    assert health("--target", address, "--ca", pki.ca, "--service", SERVICE_NAME)[0] == 0
    assert health("--target", address, "--ca", pki.ca, "--server-name", "localhost")[0] == 0  # in the SAN
    code, line = health("--target", address, "--ca", pki.ca, "--server-name", "teacher")  # not in the SAN
    assert code == 1 and "UNAVAILABLE" in line
    code, line = health("--target", address, "--ca", pki.other_ca)  # a CA that did not sign it
    assert code == 1 and "UNAVAILABLE" in line
    code, line = health("--target", address)  # plain text against the TLS-only port
    assert code == 1 and "UNAVAILABLE" in line


def test_mutual_tls_needs_the_client_certificate(mtls_server: RunningServer, pki: Pki) -> None:
    address = mtls_server.address
    assert (
        health("--target", address, "--ca", pki.ca, "--client-cert", pki.client_cert, "--client-key", pki.client_key)[0]
        == 0
    )
    assert health("--target", address, "--ca", pki.ca)[0] == 1
    code, line = health("--target", address, "--ca", pki.ca, "--client-cert", pki.client_cert)
    assert code == 1 and "go together" in line
