"""Which user a caller on this host runs as, for a gRPC connection over loopback TCP: the kernel's socket diagnostics
(netlink sock_diag, Linux) find the caller's own end of the connection by its address and port and say which uid
owns it.

The shared-memory path (shared_memory.py) reads a region only when it belongs to that user: without this check a
caller could name another user's region (names are listed in /dev/shm) and have the server, which may read it, run
the teacher on somebody else's pixels. The lookup names the socket exactly (both ends), so the kernel finds it in
its hash table at once (~16 us): reading /proc/net/tcp instead walks every bucket of that table, ~3.4 ms a read on a
machine with 262,144 buckets, whatever the number of connections.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from urllib.parse import unquote

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE, each half: match whatever socket has the tuple
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBBI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_UID_AT = _HEADER.size + 4 + 48 + 12  # inet_diag_msg: family..retrans, the 48-byte sockid, expires, rqueue, wqueue

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(peer: str) -> tuple[IpAddress, int] | None:
    """'ipv4:127.0.0.1:5678' -> (127.0.0.1, 5678), 'ipv6:[::1]:5678' (or %5B::1%5D) -> (::1, 5678); None for any
    other form (unix:..., or not an address)."""
    scheme, _, rest = peer.partition(":")
    host, _, port = unquote(rest).rpartition(":")
    if scheme not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")), int(port)
    except ValueError:
        return None


def _candidates(ip: IpAddress, server_host: str) -> Iterator[tuple[int, IpAddress, IpAddress]]:
    """(family, the caller's address, the server address it may have connected to) for each way the caller's socket
    can look: an IPv4 caller (also as a dual-stack listener shows it, ::ffff:a.b.c.d) from an IPv4 socket or an
    IPv6 one; the server's address: the one it listens on when that is an address, else loopback's usual ones."""
    try:
        listening = [ipaddress.ip_address(server_host.strip("[]"))]
    except ValueError:  # a name such as localhost
        listening = []
    servers = [a for a in listening if not a.is_unspecified]
    v4 = ip if isinstance(ip, ipaddress.IPv4Address) else ip.ipv4_mapped
    if v4 is None:
        for server in dict.fromkeys([*servers, ipaddress.IPv6Address("::1")]):  # each address asked once
            if isinstance(server, ipaddress.IPv6Address):
                yield socket.AF_INET6, ip, server
        return
    v4_servers = [s if isinstance(s, ipaddress.IPv4Address) else s.ipv4_mapped for s in servers]
    for server in dict.fromkeys([*(s for s in v4_servers if s is not None), ipaddress.IPv4Address("127.0.0.1"), v4]):
        yield socket.AF_INET, v4, server
        yield socket.AF_INET6, ipaddress.IPv6Address(f"::ffff:{v4}"), ipaddress.IPv6Address(f"::ffff:{server}")


def _socket_uid(family: int, local: IpAddress, local_port: int, remote: IpAddress, remote_port: int) -> int | None:
    """The uid of the TCP socket whose own end is local:local_port and whose other end is remote:remote_port."""

    def padded(address: IpAddress) -> bytes:
        return address.packed + bytes(16 - len(address.packed))

    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)  # any state
    body += struct.pack("!HH", local_port, remote_port) + padded(local) + padded(remote)
    body += struct.pack("=III", 0, NO_COOKIE, NO_COOKIE)  # any interface
    message = _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(1.0)
        diag.sendto(message, (0, 0))
        reply = diag.recv(4096)
    _, kind, _, _, _ = _HEADER.unpack_from(reply)
    if kind == NLMSG_ERROR or len(reply) < _UID_AT + 4:
        return None  # ENOENT: no such socket
    uid: int = struct.unpack_from("=I", reply, _UID_AT)[0]
    return uid


def peer_uid(peer: str, *, server_port: int, server_host: str = "") -> int | None:
    """The uid owning the caller's end of the connection `peer` (`context.peer()`) to this server (listening on
    `server_host`:`server_port`), or None when it cannot be told: not a TCP peer, no such socket in this network
    namespace (not on this host), or no sock_diag (not Linux)."""
    parsed = peer_address(peer)
    if parsed is None or not 0 < server_port < 65536:
        return None
    ip, port = parsed
    try:
        for family, local, server in _candidates(ip, server_host):
            uid = _socket_uid(family, local, port, server, server_port)
            if uid is not None:
                return uid
    except OSError:  # no netlink here (another OS, a sandbox)
        return None
    return None
