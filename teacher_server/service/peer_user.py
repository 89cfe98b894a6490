"""Which user a caller on this host runs as, for a gRPC connection over loopback TCP: the kernel's socket tables
(/proc/net/tcp and tcp6, Linux) list the caller's own end of the connection with the uid that owns it.

The shared-memory path (shared_memory.py) reads a region only when it belongs to that user: without this check a
caller could name another user's region (names are listed in /dev/shm) and have the server, which may read it, run
the teacher on somebody else's pixels.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from urllib.parse import unquote

SOCKET_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = b"01"  # the st column of a connected socket


def peer_address(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
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


def _table_forms(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[str]:
    """The address as the socket tables print it (each 32-bit word in host byte order, %08X): an IPv4 address both as
    itself and as the IPv4-mapped IPv6 address a dual-stack socket shows."""
    v4 = ip if isinstance(ip, ipaddress.IPv4Address) else ip.ipv4_mapped
    packed = [ip.packed] if v4 is None else [v4.packed, ipaddress.IPv6Address(f"::ffff:{v4}").packed]
    return {"".join(f"{w:08X}" for w in struct.unpack(f"={len(p) // 4}I", p)) for p in packed}


def peer_uid(peer: str, *, tables: tuple[Path, ...] = SOCKET_TABLES) -> int | None:
    """The uid owning the caller's end of the connection `peer` (`context.peer()`), or None when it cannot be told:
    not a TCP peer, no such connected socket in this network namespace (not on this host), or no /proc."""
    parsed = peer_address(peer)
    if parsed is None:
        return None
    ip, port = parsed
    needles = [f": {form}:{port:04X} ".encode() for form in _table_forms(ip)]  # "sl: local_address " of a line
    for table in tables:
        try:
            text = table.read_bytes()
        except OSError:
            continue
        for needle in needles:  # found at C speed: a busy host's table has thousands of lines
            at = text.find(needle)
            while at >= 0:
                end = text.find(b"\n", at)
                line = text[text.rfind(b"\n", 0, at) + 1 : len(text) if end < 0 else end]
                # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
                fields = line.split()
                if len(fields) > 7 and fields[3] == ESTABLISHED:
                    return int(fields[7])
                at = text.find(needle, at + 1)
    return None
