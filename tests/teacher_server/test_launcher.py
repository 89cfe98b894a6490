"""teacher_server.launcher: real `teacher-server serve` children. The JSON ready line says what the server really
serves (called over gRPC at the announced address, its metrics and dashboard URLs fetched); a child that cannot start
is one LaunchError carrying its log's last lines; kill, restart and the graceful stop."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from dtype_marks import child_env
from service_testkit import MODEL, TINY

from maskedkd.settings_cli import settings_from_flags
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.cli.main import build_parser
from teacher_server.cli.serve import SERVE_FIELDS
from teacher_server.launcher import LaunchError, Ready, ServerProcess, serve_argv, settings_flags
from teacher_server.service.server import human_announcement
from teacher_server.settings import ServerSettings
from teacher_server.testing.tls import make_pki

pytestmark = [pytest.mark.dtype("none"), pytest.mark.timeout(240)]  # model numerics: not looked at

TINY_FLAGS = ("--model", MODEL, "--model-kwargs", json.dumps(TINY), "--dtype", "float32")  # float32: no bf16 check


def served_models(channel: grpc.Channel) -> tuple[str, ...]:
    info = pb_grpc.TeacherServiceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    return tuple(info.models)


def test_the_ready_line_says_what_the_server_serves_and_kill_restart_stop_work(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server = ServerProcess(
        serve_argv(
            *TINY_FLAGS,
            "--served-name",
            "tiny-teacher",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--db",
            f"sqlite:///{tmp_path / 'ledger.db'}",
        ),
        log=log,
        env=child_env(),
    )
    with server:
        ready = server.ready
        assert ready is not None and ready.pid == server.pid and ready.port > 0
        assert (ready.address, ready.models, ready.tls, ready.dashboard_url) == (
            f"127.0.0.1:{ready.port}",
            ("tiny-teacher",),
            "off",
            None,
        )
        with grpc.insecure_channel(ready.address) as channel:
            assert served_models(channel) == ready.models
        assert ready.metrics_url is not None
        assert "maskedkd_requests_total" in urllib.request.urlopen(ready.metrics_url, timeout=10).read().decode()
        lines = log.read_text().splitlines()
        announced = [i for i, line in enumerate(lines) if Ready.from_line(line) is not None]
        assert len(announced) == 1 and lines[announced[0] - 1] == human_announcement(ready)  # the line for people

        assert server.kill() == -signal.SIGKILL and not server.alive
        again = server.start()
        assert again.pid != ready.pid and server.alive
        with grpc.insecure_channel(again.address) as channel:
            assert served_models(channel) == ("tiny-teacher",)
        assert server.stop() == 0  # SIGTERM: drained and flushed
    assert log.read_text().count("teacher-server: stopped") == 1  # the killed one never got to say it


def test_the_ready_line_of_a_mutual_tls_server_with_its_dashboard(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    argv = serve_argv(
        *TINY_FLAGS,
        "--port",
        "0",
        "--no-metrics",
        "--dashboard-port",
        "0",
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
        "--tls-client-ca",
        pki.ca,
        "--db",
        f"sqlite:///{tmp_path / 'ledger.db'}",
    )
    with ServerProcess(argv, log=tmp_path / "serve.log", env=child_env()) as server:
        ready = server.ready
        assert ready is not None and (ready.tls, ready.metrics_url) == ("mtls", None)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(pki.ca).read_bytes(),
            private_key=Path(pki.client_key).read_bytes(),
            certificate_chain=Path(pki.client_cert).read_bytes(),
        )
        with grpc.secure_channel(ready.address, credentials) as channel:
            assert served_models(channel) == (MODEL,)
        assert ready.dashboard_url is not None and ready.dashboard_url.startswith("https://127.0.0.1:")
        health = urllib.request.urlopen(
            ready.dashboard_url + "healthz", timeout=10, context=ssl.create_default_context(cafile=pki.ca)
        )
        assert health.status == 200


def test_a_bad_flag_is_one_error_with_the_child_log_tail(tmp_path: Path) -> None:
    server = ServerProcess(serve_argv(*TINY_FLAGS, "--port", "eighty"), log=tmp_path / "serve.log", env=child_env())
    with pytest.raises(LaunchError) as caught:
        server.start(timeout_s=60)
    assert caught.value.reason == "teacher-server exited with status 2 before serving"
    assert caught.value.tail[-1].startswith("teacher-server: error:") and "--port" in caught.value.tail[-1]
    assert caught.value.tail[-1] in str(caught.value) and str(tmp_path / "serve.log") in str(caught.value)
    assert not server.alive and server.ready is None


def test_a_port_in_use_is_one_error_with_the_child_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            serve_argv(*TINY_FLAGS, "--port", str(port), "--no-metrics", "--db", f"sqlite:///{tmp_path / 'ledger.db'}"),
            log=tmp_path / "serve.log",
            env=child_env(),
        )
        with pytest.raises(LaunchError) as caught:
            server.start(timeout_s=120)
    assert caught.value.reason == "teacher-server exited with status 2 before serving"
    assert caught.value.tail[-1].startswith(f"teacher-server: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_child_that_never_announces_is_stopped_when_the_time_runs_out(tmp_path: Path) -> None:
    silent = [
        sys.executable,
        "-c",
        "import sys, time; print('loading...', file=sys.stderr, flush=True); time.sleep(120)",
    ]
    server = ServerProcess(silent, log=tmp_path / "child.log", name="silent child")
    with pytest.raises(LaunchError) as caught:
        server.start(timeout_s=2)
    assert caught.value.reason == "silent child did not announce that it serves within 2 s"
    assert caught.value.tail[-1] == "loading..."
    assert not server.alive and server.proc is not None and server.proc.returncode == -signal.SIGTERM


def test_a_ready_line_reads_back_and_other_lines_are_not_one() -> None:
    ready = Ready(
        address="127.0.0.1:50051",
        models=("a", "b"),
        metrics_url="http://127.0.0.1:9464/metrics",
        dashboard_url=None,
        tls="tls",
        pid=42,
    )
    line = ready.to_line()
    assert json.loads(line) == {
        "event": "ready",
        "address": "127.0.0.1:50051",
        "models": ["a", "b"],
        "metrics_url": "http://127.0.0.1:9464/metrics",
        "dashboard_url": None,
        "tls": "tls",
        "pid": 42,
    }
    assert Ready.from_line(line + "\n") == ready and ready.port == 50051
    for other in ("teacher-server: serving a on 127.0.0.1:50051", '{"event": "stopped"}', '{"event": "ready"}', "[]"):
        assert Ready.from_line(other) is None


def test_settings_become_serve_flags_that_the_cli_reads_back_as_the_same_settings() -> None:
    settings = {
        "model": MODEL,
        "model_kwargs": TINY,
        "port": 0,
        "metrics_port": None,
        "compile": "static",
        "compile_shapes": ((8, 4), (16, 8)),
        "pretrained": True,
        "max_delay_ms": 2.5,
        "dashboard_port": None,
    }
    flags = settings_flags(settings)
    assert "--no-metrics" in flags and "--dashboard-port" not in flags
    args = build_parser().parse_args(["serve", *flags])
    parsed = settings_from_flags(ServerSettings, args, SERVE_FIELDS)
    parsed.metrics_port = None if args.no_metrics else parsed.metrics_port
    assert {name: getattr(parsed, name) for name in settings} == settings
    for refused in ({"admin_token": "s3cret"}, {"no_such_setting": 1}):
        with pytest.raises(ValueError, match="not a `teacher-server serve` flag"):
            settings_flags(refused)
