"""One gRPC channel over one or many teacher replicas: target parsing and channel options.

Targets the clients accept (`TeacherClient`, `AsyncTeacherClient`, `student-client --teacher`):

    host:port                        one server (a name resolving to several addresses uses them all)
    dns:///teacher.ns.svc:50051      a DNS name with several A/AAAA records (a Kubernetes headless Service)
    10.0.0.5:50051,10.0.0.6:50051    an address list -> gRPC's static `ipv4:` (or `ipv6:`) target
    ipv4:..., unix:..., xds:...      any other gRPC target URI, passed through

Every channel balances round-robin over the resolved addresses and watches each one's grpc.health.v1 status
(client-side health checking): a replica that is draining (NOT_SERVING) or unreachable gets no new calls. A call
that fails with UNAVAILABLE is retried by the client under the same request id, so it lands on another replica
and the ledger bills it once.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

import grpc

HEALTH_SERVICE = "maskedkd.v1.TeacherService"  # the name the server marks SERVING / NOT_SERVING
_SCHEME_PREFIXES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def service_config() -> str:
    """Round-robin over every address, each gated by its health status."""
    return json.dumps(
        {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": HEALTH_SERVICE}}
    )


def channel_options(max_message_mb: float) -> list[tuple[str, Any]]:
    limit = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.service_config", service_config()),
        # reconnect within ~2 s of a restarted teacher coming back (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"teacher address {address!r} is not HOST:PORT")
    return host.strip("[]"), port


def is_unix_socket(target: str) -> bool:
    """True for a `unix:` or `unix-abstract:` target."""
    return target.strip().startswith(("unix:", "unix-abstract:"))


def on_this_host(target: str) -> bool:
    """True when every address of `target` is this machine: a Unix socket, `localhost` or a loopback address (the
    teacher then may read the pixels from shared memory: shared_pixels.py). A name other than localhost is not
    resolved: it counts as another host."""
    target = target.strip()
    if is_unix_socket(target):
        return True
    for address in target.removeprefix("ipv4:").removeprefix("ipv6:").removeprefix("dns:///").split(","):
        if not address.strip():
            continue
        try:
            host, _ = _split_host_port(address)
        except ValueError:
            return False
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def require_ports(target: str) -> None:
    """ValueError unless every address of `target` names its port (gRPC would silently use 443 otherwise)."""
    target = target.strip()
    if target.startswith(_SCHEME_PREFIXES) and not target.startswith("dns:"):
        return  # ipv4:, unix:, xds:, ...: gRPC's own syntax
    name = target.removeprefix("dns:")
    if name.startswith("//"):  # dns://AUTHORITY/NAME:PORT
        name = name[2:].partition("/")[2]
    for address in name.split(","):
        try:
            _split_host_port(address)
        except ValueError:
            raise ValueError(
                f"teacher address {address.strip()!r} has no port: give HOST:PORT (e.g. 127.0.0.1:50051)"
            ) from None


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`host` as an IP address; a name is resolved once, here (a static list does not re-resolve)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError) as exc:
        raise ValueError(f"cannot resolve teacher host {host!r} (use dns:///NAME:PORT for names that change)") from exc


def grpc_target(target: str) -> str:
    """The gRPC target URI for one of the accepted forms (see the module docstring)."""
    target = target.strip()
    if not target:
        raise ValueError("no teacher address given")
    if target.startswith(_SCHEME_PREFIXES) or "," not in target:
        return target
    addresses = [a for a in target.split(",") if a.strip()]
    ips = []
    for address in addresses:
        host, port = _split_host_port(address)
        ips.append((_literal_ip(host), port))
    families = {ip.version for ip, _ in ips}
    if families == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in ips)
    if families == {6}:
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in ips)
    raise ValueError(f"teacher address list {target!r} mixes IPv4 and IPv6 addresses")


def open_channel(
    target: str,
    *,
    max_message_mb: float,
    credentials: grpc.ChannelCredentials | None = None,
    aio: bool = False,
    own_connection: bool = False,
) -> Any:
    """A blocking (or, with `aio`, an asyncio) channel to `target`, balanced and health-checked; TLS when
    `credentials` are given (`tls.py` builds them). `own_connection`: connections of its own (gRPC otherwise shares one
    among the channels of a process to the same target with the same options)."""
    uri, options = grpc_target(target), channel_options(max_message_mb)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    module: Any = grpc.aio if aio else grpc
    if credentials is not None:
        return module.secure_channel(uri, credentials, options=options)
    return module.insecure_channel(uri, options=options)
