"""deploy/docker-compose.yml, TLS and tokens: the teacher serves gRPC over TLS with the files deploy/make-dev-certs.sh
makes (git-ignored, mounted file by file), its health check and the student verify them with the CA, and the
dashboard's tokens come from the environment only. The script's certificates are served by a real teacher server and
checked with the compose health check's own command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_compose import (  # noqa: F401 (fixtures)
    COMPOSE,
    DEPLOY,
    REPO,
    commands,
    compose,
    health_check_command,
    load_compose,
    parse_cli,
    parsed_commands,
    services,
    student_parser,
)

from teacher_server.service.server import SERVICE_NAME
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

SCRIPT = DEPLOY / "make-dev-certs.sh"
TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10}


def tls_sources(service: dict[str, Any]) -> dict[str, str]:
    """container path -> ./tls/ file of a service's TLS mounts; each one read-only and never created by Docker."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume["source"].startswith("./tls/"):
            assert volume["type"] == "bind" and volume["read_only"] is True, volume
            assert volume["bind"]["create_host_path"] is False, "a missing file must fail, not become a directory"
            found[volume["target"]] = volume["source"]
    return found


def student_args(commands: dict[str, tuple[str, Any]]) -> Any:  # noqa: F811
    return parse_cli(student_parser(), list(commands["student"][1]["entrypoint"][1:]))


def test_teacher_serves_tls_and_every_client_verifies_it(
    services: dict[str, Any],  # noqa: F811
    commands: dict[str, tuple[str, Any]],
) -> None:  # noqa: F811
    teacher = commands["teacher"][1]
    mounts = tls_sources(services["teacher"])
    assert mounts[teacher.tls_cert] == "./tls/server.crt" and mounts[teacher.tls_key] == "./tls/server.key"
    # the health check: gRPC health over TLS with the CA, for the name the student dials, the draining service
    probe = health_check_command(services["teacher"])
    student = student_args(commands)
    dialled = student.teacher.removeprefix("dns:///").rsplit(":", 1)[0]
    assert (probe.ca, mounts[probe.ca]) == (student.teacher_ca, "./tls/ca.crt")
    assert probe.server_name == dialled == "teacher" and probe.service == SERVICE_NAME
    # every Ray node (the workers open the channels) has the CA, and only the teacher the server's key
    for node in ("ray-head", "ray-worker"):
        assert tls_sources(services[node]) == {student.teacher_ca: "./tls/ca.crt"}, node
    holders = [name for name, s in services.items() if "./tls/server.key" in tls_sources(s).values()]
    assert holders == ["teacher"]
    # generated files stay out of git
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/tls/server.key"], cwd=REPO)
    assert ignored.returncode == 0, "deploy/tls/ must be git-ignored"


def test_tokens_come_from_the_environment_never_a_command_line() -> None:
    env = {"MASKEDKD_VIEWER_TOKEN": "viewer-sentinel", "MASKEDKD_ADMIN_TOKEN": "admin-sentinel"}
    services = load_compose(COMPOSE, env)["services"]  # noqa: F811
    for name, service in services.items():
        argv = " ".join(map(str, service.get("command", []) + service.get("healthcheck", {}).get("test", [])))
        assert "sentinel" not in argv, name
    holders = {name for name, s in services.items() if "viewer-sentinel" in str(s.get("environment", {}))}
    assert holders == {"dashboard"}
    dashboard = services["dashboard"]
    assert dashboard["environment"]["MASKEDKD_VIEWER_TOKEN"] == "viewer-sentinel"
    args = parsed_commands(services)["dashboard"][1]
    assert not args.dashboard_public and args.admin_token is None and args.viewer_token is None
    # without the variables the read views and the admin API are locked (empty tokens), not open
    unset = load_compose(COMPOSE)["services"]["dashboard"]["environment"]
    assert unset["MASKEDKD_VIEWER_TOKEN"] == "" and unset["MASKEDKD_ADMIN_TOKEN"] == ""


def _health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "teacher_server.cli", "health", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make-dev-certs.sh needs openssl")
def test_dev_certificates_are_served_and_pass_the_compose_health_check(
    services: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    tls = tmp_path / "tls"
    made = subprocess.run(["sh", str(SCRIPT), str(tls)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    mounted = {src for s in services.values() for src in tls_sources(s).values()}
    assert {Path(src).name for src in mounted} <= {p.name for p in tls.iterdir()}
    ca_before = (tls / "ca.crt").read_bytes()
    assert subprocess.run(["sh", str(SCRIPT), str(tls)], capture_output=True, timeout=120).returncode == 0
    assert (tls / "ca.crt").read_bytes() == ca_before, "a second run keeps the CA clients already trust"
    probe = [str(a) for a in services["teacher"]["healthcheck"]["test"][3:]]  # after CMD teacher-server health
    settings = ServerSettings(
        model="vit_tiny_patch16_224",
        model_kwargs=TINY,
        db=f"sqlite:///{tmp_path / 'l.db'}",
        metrics_port=None,
        tls_cert=str(tls / "server.crt"),
        tls_key=str(tls / "server.key"),
    )
    with running_server(settings) as srv:
        argv = [srv.address if a.startswith("127.0.0.1:") else a for a in probe]
        argv = [str(tls / Path(a).name) if a.startswith("/tls/") else a for a in argv]
        result = _health(*argv)
        assert result.returncode == 0 and result.stdout.strip().endswith("SERVING"), result.stderr
        other = subprocess.run(["sh", str(SCRIPT), str(tmp_path / "other")], capture_output=True, timeout=120)
        assert other.returncode == 0  # another CA: the same check must fail
        argv = [str(tmp_path / "other" / "ca.crt") if a.endswith("/ca.crt") else a for a in argv]
        assert _health(*argv).returncode == 1
