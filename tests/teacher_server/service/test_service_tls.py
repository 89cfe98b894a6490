"""TLS and mutual TLS on the gRPC port, with a CA the test makes: calls over TLS work and are billed exactly; a
plain-text client, a client that does not trust the CA, and (with mutual TLS) a client without a certificate or with
one from another CA are refused before anything is billed. Bad TLS files are a one-line CLI error."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from dashboard_process import dashboard_process, first_answer
from service_testkit import ledger_rows, serve_cli, settings

from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.errors import TeacherUnavailableError
from student_client.transport.client import TeacherClient
from teacher_server.testing.server import RunningServer, running_server
from teacher_server.testing.tls import Pki, make_pki

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

ADMIN_TOKEN = "tls-test-admin-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    cfg = settings(
        tmp_path_factory.mktemp("tls"),
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        dashboard_port=0,
        admin_token=ADMIN_TOKEN,
    )
    with running_server(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    cfg = settings(
        tmp_path_factory.mktemp("mtls"), tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    with running_server(cfg) as srv:
        yield srv


def _pixels(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def _refused(client: TeacherClient) -> None:
    with pytest.raises(TeacherUnavailableError):
        client.infer(images=_pixels(1))
    client.close()


def test_tls_call_works_and_billing_equals_the_ledger(tls_server: RunningServer, pki: Pki) -> None:
    key = tls_server.create_key("tls-alice")
    with TeacherClient(tls_server.address, key, ca_file=pki.ca) as client:
        _, first = client.infer(images=_pixels(2), keep_indices=torch.arange(16).repeat(2, 1), request_id="t1")
        _, second = client.infer(images=_pixels(3), request_id="t2")
        _, replay = client.infer(images=_pixels(3), request_id="t2")
    assert replay.replayed and not first.replayed
    rows = [r for r in ledger_rows(tls_server.settings.db) if r["key"] == "tls-alice"]
    assert [r["request_id"] for r in rows] == ["t1", "t2"]
    assert [r["images"] for r in rows] == [2, 3]
    assert sum(r["cost"] for r in rows) == pytest.approx(first.cost + second.cost, rel=1e-12)
    assert sum(r["gflops"] for r in rows) == pytest.approx(first.gflops + second.gflops, rel=1e-12)


@pytest.mark.timeout(60)  # far below the default 120 s patience: a failed handshake is not waited out
def test_an_untrusted_certificate_fails_at_once_with_the_default_patience(tls_server: RunningServer, pki: Pki) -> None:
    with (
        TeacherClient(tls_server.address, tls_server.create_key("tls-impatient"), ca_file=pki.other_ca) as client,
        pytest.raises(TeacherUnavailableError, match=r"(?i)handshake failed"),
    ):
        client.infer(images=_pixels(1))


def test_plain_text_and_untrusting_clients_are_refused_unbilled(tls_server: RunningServer, pki: Pki) -> None:
    key = tls_server.create_key("tls-refused")
    once = {"max_retries": 0, "timeout_s": 5, "patience_s": 0}  # a refused handshake is not a teacher restart
    _refused(TeacherClient(tls_server.address, key, **once))  # plain text
    _refused(TeacherClient(tls_server.address, key, tls=True, **once))  # system roots only
    _refused(TeacherClient(tls_server.address, key, ca_file=pki.other_ca, **once))
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.TeacherServiceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r for r in ledger_rows(tls_server.settings.db) if r["key"] == "tls-refused"] == []


def test_dashboard_of_a_tls_server_speaks_https_with_the_same_certificate(tls_server: RunningServer, pki: Pki) -> None:
    url = tls_server.dashboard_url
    assert url is not None and url.startswith("https://")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{url}/api/usage/keys", headers=headers, verify=pki.ca, timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError):  # the certificate is not trusted without the CA
        httpx.get(f"{url}/api/usage/keys", headers=headers, timeout=10)


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server: RunningServer, pki: Pki) -> None:
    key = mtls_server.create_key("mtls-bob")
    with TeacherClient(
        mtls_server.address, key, ca_file=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
    ) as client:
        _, usage = client.infer(images=_pixels(2), request_id="m1")
    once = {"max_retries": 0, "timeout_s": 5, "patience_s": 0}  # a refused handshake is not a teacher restart
    _refused(TeacherClient(mtls_server.address, key, ca_file=pki.ca, **once))
    _refused(
        TeacherClient(
            mtls_server.address,
            key,
            ca_file=pki.ca,
            client_cert=pki.other_client_cert,
            client_key=pki.other_client_key,
            **once,
        )
    )
    rows = [r for r in ledger_rows(mtls_server.settings.db) if r["key"] == "mtls-bob"]
    assert [r["request_id"] for r in rows] == ["m1"] and rows[0]["cost"] == pytest.approx(usage.cost, rel=1e-12)


@pytest.mark.parametrize("case", ["missing-cert", "key-of-another-cert", "not-pem-ca", "cert-without-key"])
def test_bad_tls_files_are_a_one_line_cli_error(pki: Pki, tmp_path: Path, case: str) -> None:
    args = {
        "missing-cert": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", pki.server_key],
        "key-of-another-cert": ["--tls-cert", pki.server_cert, "--tls-key", pki.client_key],
        "not-pem-ca": ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", __file__],
        "cert-without-key": ["--tls-cert", pki.server_cert],
    }[case]
    result = serve_cli("--port", "0", "--no-metrics", "--db", f"sqlite:///{tmp_path / 'l.db'}", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("teacher-server: error:") and "Traceback" not in result.stderr
    assert {
        "missing-cert": "nope.pem",
        "key-of-another-cert": "do not form",
        "not-pem-ca": "not a PEM file",
        "cert-without-key": "both tls_cert and tls_key",
    }[case] in lines[0]
    assert not (tmp_path / "l.db").exists()  # refused before anything was opened


def test_standalone_dashboard_serves_https(pki: Pki, tls_server: RunningServer) -> None:
    """`teacher-server dashboard --tls-cert --tls-key` on the TLS server's ledger, as a real process."""
    import os

    tls_server.create_key("tls-dashboard")
    env = {**os.environ, "MASKEDKD_VIEWER_TOKEN": "tls-viewer"}
    flags = ("--db", tls_server.settings.db, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    with dashboard_process(*flags, env=env) as (process, port):
        response = first_answer(
            process,
            lambda: httpx.get(
                f"https://127.0.0.1:{port}/api/usage/keys",
                verify=pki.ca,
                timeout=2,
                headers={"Authorization": "Bearer tls-viewer"},
            ),
            retry_on=httpx.TransportError,
        )
        assert response.status_code == 200 and "tls-dashboard" in {k["key"] for k in response.json()["keys"]}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/usage/keys", timeout=5)


def test_the_test_pki_passes_strict_x509_verification_both_ways(pki: Pki) -> None:
    """The throw-away PKI holds up under RFC 5280's strict checks, which Python 3.13's default contexts turn on (a
    certificate without an authority key identifier fails them): a TLS handshake over a socket pair in which the
    client checks the server's certificate and the server the client's, both with VERIFY_X509_STRICT. No model."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.load_verify_locations(pki.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=pki.ca)
    client_ctx.load_cert_chain(pki.client_cert, pki.client_key)
    for ctx in (server_ctx, client_ctx):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    left, right = socket.socketpair()
    with left, right, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(server_ctx.wrap_socket, right, server_side=True)
        with client_ctx.wrap_socket(left, server_hostname="localhost") as client, accepted.result(10) as served:
            assert served.getpeercert()["subject"] == ((("commonName", "student"),),)
            assert client.getpeercert()["subject"] == ((("commonName", "localhost"),),)
