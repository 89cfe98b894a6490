"""Which user a loopback caller runs as, read from the kernel's socket tables: real TCP connections on 127.0.0.1 and
::1 (this process's uid), one from a child process of another uid (root only), and peers it cannot tell."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded before a fork: a child that gave up root can no longer import it
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from teacher_server.service.peer_user import peer_address, peer_uid

pytestmark = pytest.mark.dtype("none")  # no tensors

NOBODY = 65534


@contextmanager
def listener(family: socket.AddressFamily, host: str) -> Iterator[socket.socket]:
    srv = socket.socket(family)
    srv.settimeout(10)
    srv.bind((host, 0))
    srv.listen()
    try:
        yield srv
    finally:
        srv.close()


def _peer(addr: tuple) -> str:
    """gRPC's peer string for an accepted connection's address."""
    return f"ipv6:[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"ipv4:{addr[0]}:{addr[1]}"


def test_a_loopback_connection_is_its_own_users() -> None:
    with listener(socket.AF_INET, "127.0.0.1") as srv:
        client = socket.create_connection(srv.getsockname())
        accepted, addr = srv.accept()
        assert peer_uid(_peer(addr)) == os.getuid()
        client.close()
        accepted.close()


def test_ipv6_and_ipv4_through_a_dual_stack_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        ctx = listener(socket.AF_INET6, "::")
        srv = ctx.__enter__()
    except OSError as exc:
        pytest.skip(f"no IPv6 listener here: {exc}")
    try:
        port = srv.getsockname()[1]
        for target in ("127.0.0.1", "::1"):
            try:
                client = socket.create_connection((target, port), timeout=10)
            except OSError:
                continue  # ::1 may be absent in a container
            accepted, addr = srv.accept()
            assert peer_uid(_peer(addr)) == os.getuid(), addr  # ::ffff:127.0.0.1 for the IPv4 client
            assert peer_uid(_peer(addr).replace("[", "%5B").replace("]", "%5D")) == os.getuid()
            client.close()
            accepted.close()
    finally:
        ctx.__exit__(None, None, None)


@pytest.mark.skipif(os.geteuid() != 0, reason="a child of another uid needs root")
def test_a_caller_of_another_uid_is_told_apart() -> None:
    with listener(socket.AF_INET, "127.0.0.1") as srv:
        port = srv.getsockname()[1]
        pid = os.fork()
        if pid == 0:  # the child: only socket calls after giving up root
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                conn = socket.socket()
                conn.connect(("127.0.0.1", port))
                conn.recv(1)
            finally:
                os._exit(0)
        try:
            accepted, addr = srv.accept()
            assert peer_uid(_peer(addr)) == NOBODY != os.getuid()
            accepted.send(b"x")
            accepted.close()
        finally:
            os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "peer",
    ["unix:/tmp/teacher.sock", "unix:", "", "ipv4:127.0.0.1", "ipv4:garbage:12", "ipv6:[::1]:x", "dns:localhost:1"],
)
def test_peers_it_cannot_tell(peer: str) -> None:
    assert peer_uid(peer) is None


def test_no_connection_from_that_port_is_nobody() -> None:
    with listener(socket.AF_INET, "127.0.0.1") as srv:
        free_port = srv.getsockname()[1]  # listening, not connected from
    assert peer_uid(f"ipv4:127.0.0.1:{free_port}") is None
    assert peer_address("ipv6:%5B::1%5D:5678") == (peer_address("ipv6:[::1]:5678") or (None, 0))


def test_a_table_is_read_for_the_connected_socket_only(tmp_path) -> None:
    """A table written here: a closing socket (TIME_WAIT) on the same address is not the caller; the connected one,
    on the table's last line without a newline, is; IPv4-mapped in tcp6 counts for an IPv4 peer."""
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   {n}: {local} 0100007F:C350 {st} 00000000:00000000 00:00000000 00000000  {uid}        0 {n}0 1\n"
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(header + row.format(n=0, local="0100007F:D431", st="06", uid=1000))
    mapped = "0000000000000000FFFF00000100007F:D431"
    tcp6.write_text((header + row.format(n=1, local=mapped, st="01", uid=1234)).rstrip("\n"))
    assert peer_uid("ipv4:127.0.0.1:54321", tables=(tcp, tcp6)) == 1234
    assert peer_uid("ipv4:127.0.0.1:54321", tables=(tcp,)) is None  # only the closing socket there
    assert peer_uid("ipv4:127.0.0.2:54321", tables=(tcp, tcp6)) is None
