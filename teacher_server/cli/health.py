"""`teacher-server health`: one grpc.health.v1 Check against a teacher, over TLS or plain text, for container
health checks and Kubernetes exec probes (the kubelet's own `grpc:` probe speaks plain text only). One line out;
exit 0 when the service is SERVING, 1 for anything else (NOT_SERVING, unknown service, unreachable, TLS refused,
unreadable files). Loads neither torch nor SQLAlchemy, so a probe starts in well under a second."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from teacher_server.settings import ServerSettings

if TYPE_CHECKING:
    import grpc


@dataclass(frozen=True)
class HealthTarget:
    target: str  # host:port the probe dials, e.g. 127.0.0.1:50051
    service: str = ""  # "" = the server as a whole; maskedkd.v1.TeacherService turns NOT_SERVING first
    ca_file: str | None = None  # PEM CA: check over TLS, verifying the server's certificate with it
    client_cert: str | None = None  # for a server with mutual TLS (--tls-client-ca)
    client_key: str | None = None
    server_name: str | None = None  # the name the certificate must carry, when it is not the target's host
    timeout_s: float = 2.0


@dataclass(frozen=True)
class HealthResult:
    serving: bool
    line: str  # what the probe prints: "<target> <service>: SERVING" or why not


def _read(path: str, what: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def _channel(probe: HealthTarget) -> grpc.Channel:
    import grpc

    if probe.ca_file is None and probe.client_cert is None:
        return grpc.insecure_channel(probe.target)
    if bool(probe.client_cert) != bool(probe.client_key):
        raise ValueError("--client-cert and --client-key go together")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(probe.ca_file, "--ca") if probe.ca_file else None,
        private_key=_read(probe.client_key, "--client-key") if probe.client_key else None,
        certificate_chain=_read(probe.client_cert, "--client-cert") if probe.client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", probe.server_name)] if probe.server_name else []
    return grpc.secure_channel(probe.target, creds, options=options)


def check_health(probe: HealthTarget) -> HealthResult:
    """One Check call; never raises for a failed check (the reason is in the line)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"{probe.target} {probe.service or '(server)'}"
    try:
        channel = _channel(probe)
    except (OSError, ValueError) as exc:
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        return HealthResult(False, f"{what}: cannot check: {reason}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=probe.service), timeout=probe.timeout_s)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() else "ERROR"
        details = " ".join((exc.details() or "").split())[:200]
        return HealthResult(False, f"{what}: {code}" + (f" ({details})" if details else ""))
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return HealthResult(response.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}")


def add_health_command(sub: Any) -> None:
    health = sub.add_parser(
        "health",
        help="one gRPC health check of a teacher (container and Kubernetes exec "
        "probes): exit 0 when SERVING, 1 otherwise",
    )
    target = f"{ServerSettings.model_fields['host'].default}:{ServerSettings.model_fields['port'].default}"
    health.add_argument("--target", default=target, help=f"HOST:PORT (default {target})")
    health.add_argument(
        "--service",
        default="",
        help="service to ask about (default: the server as a whole; "
        "maskedkd.v1.TeacherService turns NOT_SERVING while draining)",
    )
    health.add_argument("--ca", help="PEM CA file: check over TLS and verify the server's certificate with it")
    health.add_argument("--client-cert", help="PEM client certificate, for a server with mutual TLS")
    health.add_argument("--client-key", help="PEM private key of --client-cert")
    health.add_argument(
        "--server-name",
        help="name the server's certificate must carry (default: the target's "
        "host), e.g. the Service name clients dial",
    )
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")


def run_health(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's handshake logs would break the one-line answer
    result = check_health(
        HealthTarget(
            target=args.target,
            service=args.service,
            ca_file=args.ca,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
            timeout_s=args.timeout,
        )
    )
    print(result.line, file=sys.stdout if result.serving else sys.stderr)
    return 0 if result.serving else 1
