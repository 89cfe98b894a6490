"""Which user a loopback caller runs as, asked of the kernel's socket diagnostics: real TCP connections on 127.0.0.1
and ::1 (this process's uid), one from a child process of another uid (root only), and peers it cannot tell."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded before a fork: a child that gave up root can no longer import it
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from teacher_server.service.wire.peer_user import peer_address, peer_uid

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
        assert peer_uid(_peer(addr), server_port=srv.getsockname()[1]) == os.getuid()
        assert peer_uid(_peer(addr), server_port=srv.getsockname()[1], server_host="127.0.0.1") == os.getuid()
        assert peer_uid(_peer(addr), server_port=srv.getsockname()[1] + 1) is None  # not a connection to us
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
            assert peer_uid(_peer(addr), server_port=port, server_host="::") == os.getuid(), addr  # ::ffff:127...
            assert peer_uid(_peer(addr).replace("[", "%5B").replace("]", "%5D"), server_port=port) == os.getuid()
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
            assert peer_uid(_peer(addr), server_port=port) == NOBODY != os.getuid()
            accepted.send(b"x")
            accepted.close()
        finally:
            os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "peer",
    ["unix:/tmp/teacher.sock", "unix:", "", "ipv4:127.0.0.1", "ipv4:garbage:12", "ipv6:[::1]:x", "dns:localhost:1"],
)
def test_peers_it_cannot_tell(peer: str) -> None:
    assert peer_uid(peer, server_port=50051) is None


def test_no_connection_from_that_port_is_nobody() -> None:
    with listener(socket.AF_INET, "127.0.0.1") as srv:
        free_port = srv.getsockname()[1]  # listening, not connected from
    assert peer_uid(f"ipv4:127.0.0.1:{free_port}", server_port=50051) is None
    assert peer_address("ipv6:%5B::1%5D:5678") == (peer_address("ipv6:[::1]:5678") or (None, 0))
