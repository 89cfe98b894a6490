"""deploy/: what can be checked without Docker. The compose files validate against the compose specification's schema;
every command is accepted by the CLI it runs (our argparse parsers, Ray's click commands); ports, hosts, URLs and
paths agree across services and config files. (The Grafana dashboard is checked in test_grafana.py.)"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "maskedkd.yml"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$\$")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $$) over a loaded document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if op and op.endswith("?"):
            raise AssertionError(f"${{{name}{op}...}} makes every compose command fail without {name}; use a default")
        if op == ":-":
            return env.get(name) or arg
        if op == "-":
            return env.get(name, arg)
        return env.get(name, "")

    return _VAR.sub(one, value)


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), env or {})


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


# ------------------------------------------------------------------------------------------------ schema


def test_compose_files_validate_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    validator.check_schema(schema)
    for path in (COMPOSE, COMPOSE_GPU):
        for env in ({}, {"MASKEDKD_API_KEY": "mkd_x", "POSTGRES_PASSWORD": "s3cret"}):
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(load_compose(path, env))
            ]
            assert errors == [], f"{path.name}: {errors}"
    # the validator really checks: a misspelt key and a wrong type are errors
    broken = load_compose(COMPOSE)
    broken["services"]["teacher"]["comand"] = ["x"]
    broken["services"]["dashboard"]["ports"] = "8080:8080"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_gpu_override_reserves_an_nvidia_gpu_for_the_teacher_only() -> None:
    override = load_compose(COMPOSE_GPU)
    assert set(override["services"]) == {"teacher"}
    devices = override["services"]["teacher"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    base = load_compose(COMPOSE)["services"]["teacher"]
    assert "deploy" not in base  # the base file starts on hosts without a GPU


# ------------------------------------------------------------------------------------------------ commands


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise AssertionError(f"{parser.prog} has no subcommand {name!r}")


def parse_cli(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse like the console script would, but with exact flag names only (no abbreviations) and errors raised."""
    sub = _subparser(parser, argv[0])
    for p in (parser, sub):
        p.allow_abbrev = False
    flags = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
    unknown = flags - set(sub._option_string_actions)
    assert not unknown, f"{parser.prog} {argv[0]} has no flag(s) {sorted(unknown)}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except (SystemExit, Exception) as exc:  # noqa: BLE001 - both CLIs' parsers raise maskedkd.settings_cli.FlagError
        message = stderr.getvalue().strip() or str(exc)
        raise AssertionError(f"{parser.prog} {' '.join(argv)}: {message}") from None


def teacher_parser() -> argparse.ArgumentParser:
    from teacher_server.cli.main import build_parser

    return build_parser()


def student_parser() -> argparse.ArgumentParser:
    from student_client.cli import build_parser

    return build_parser()


def ray_command(path: list[str]) -> Any:
    from ray.scripts.scripts import cli

    command: Any = cli
    for name in path:
        command = command.commands[name]
    return command


def ray_params(argv: list[str]) -> dict[str, Any]:
    """Parse `ray ...` argv with Ray's own click commands (an unknown option raises)."""
    path = argv[:1] if argv[0] == "start" else argv[:2]
    return ray_command(path).make_context("ray " + " ".join(path), list(argv[len(path) :])).params


def parsed_commands(services: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """service -> (program, parsed arguments) for every service running one of our CLIs or Ray."""
    parsed: dict[str, tuple[str, Any]] = {}
    for name, service in services.items():
        command = service.get("command")
        if not command:
            continue
        assert isinstance(command, list), f"{name}: write commands as lists (no shell word splitting)"
        program, argv = command[0], [str(a) for a in command[1:]]
        if program == "teacher-server":
            parsed[name] = (program, parse_cli(teacher_parser(), argv))
        elif program == "student-client":
            parsed[name] = (program, parse_cli(student_parser(), argv))
        elif program == "ray":
            parsed[name] = (program, ray_params(argv))
    return parsed


@pytest.fixture(scope="module")
def commands(services: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    return parsed_commands(services)


def test_every_service_command_exists_in_our_clis(
    services: dict[str, Any], commands: dict[str, tuple[str, Any]]
) -> None:
    assert commands["teacher"][1].command == "serve"
    assert commands["dashboard"][1].command == "dashboard"
    assert {"ray-head", "ray-worker", "student"} <= set(commands)
    job = commands["student"][1]
    assert job["entrypoint"][0] == "student-client"
    student = parse_cli(student_parser(), list(job["entrypoint"][1:]))
    assert student.command == "train" and student.ray_address == "auto" and int(student.workers) >= 2
    runtime_env = json.loads(job["runtime_env_json"])
    assert set(runtime_env["env_vars"]) == {"MASKEDKD_API_KEY"}  # the key travels by env, not argv
    assert ray_params(services["ray-head"]["command"][1:])["head"] is True
    # every console script a Dockerfile or compose command names is one the package installs
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for dockerfile in ("Dockerfile.teacher", "Dockerfile.student"):
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", (DEPLOY / dockerfile).read_text(), re.M).group(1))
        assert cmd[0] in scripts
    assert {"teacher-server", "student-client"} <= set(scripts)


def test_bad_flags_are_caught() -> None:
    """The command check can fail: a misspelt flag and a bad value are reported."""
    with pytest.raises(AssertionError, match="no flag"):
        parse_cli(teacher_parser(), ["serve", "--metric-port", "9464"])
    with pytest.raises(AssertionError, match="--port"):
        parse_cli(teacher_parser(), ["dashboard", "--port", "eighty"])
    with pytest.raises(Exception, match=r"no_such|No such option"):
        ray_params(["start", "--no-such-flag"])


# ------------------------------------------------------------------------------------------------ agreement


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"https?://[^'\" ]+", test)
    assert match, test
    return match.group(0)


def health_check_command(service: dict[str, Any]) -> argparse.Namespace:
    """The parsed `teacher-server health ...` of a service's health check."""
    test = [str(a) for a in service["healthcheck"]["test"]]
    assert test[:3] == ["CMD", "teacher-server", "health"], test
    return parse_cli(teacher_parser(), test[2:])


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (short `src:dst[:ro]` and long `{type: bind, ...}` syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = source
    return mounts


def test_ports_hosts_and_urls_agree(services: dict[str, Any], commands: dict[str, tuple[str, Any]]) -> None:
    teacher, dashboard = commands["teacher"][1], commands["dashboard"][1]
    # teacher: gRPC published, listening on all interfaces, metrics reachable from the prometheus container
    assert teacher.host == "0.0.0.0" and teacher.port in _container_ports(services["teacher"])
    assert services["teacher"]["environment"]["MASKEDKD_METRICS_HOST"] == "0.0.0.0"
    assert str(teacher.metrics_port) in {str(p) for p in services["teacher"].get("expose", [])}
    probe = health_check_command(services["teacher"])
    assert probe.target == f"127.0.0.1:{teacher.port}"  # gRPC health on the serving port (test_deploy_tls.py: TLS)
    # prometheus scrapes exactly that port on every replica of the teacher service (DNS service discovery)
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert [job.get("static_configs") for job in prometheus["scrape_configs"]] == [None]
    sds = prometheus["scrape_configs"][0]["dns_sd_configs"]
    discovered = [(name, sd["port"]) for sd in sds for name in sd["names"]]
    assert discovered == [("teacher", teacher.metrics_port)]
    assert prometheus["scrape_configs"][0]["dns_sd_configs"][0]["type"] == "A"
    assert prometheus["scrape_configs"][0].get("metrics_path", "/metrics") == "/metrics"
    # grafana's datasource points at prometheus' listen port
    listen = next(a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address="))
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", int(listen.rsplit(":", 1)[1]))
    assert url.port in _container_ports(services["prometheus"])
    # dashboard: published port = --port, health check on it, same ledger as the teacher
    assert dashboard.host == "0.0.0.0" and dashboard.port in _container_ports(services["dashboard"])
    assert urlsplit(_healthcheck_url(services["dashboard"])).port == dashboard.port
    ledger_urls = {
        teacher.db,
        dashboard.db,
        *(services[s]["environment"]["MASKEDKD_DB"] for s in ("teacher", "dashboard")),
    }
    assert len(ledger_urls) == 1
    db = urlsplit(teacher.db)
    pg = services["postgres"]["environment"]
    assert db.scheme == "postgresql+psycopg2" and db.hostname == "postgres" and (db.port or 5432) == 5432
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    # student -> teacher, ray workers and job -> head
    job = commands["student"][1]
    student = parse_cli(student_parser(), list(job["entrypoint"][1:]))
    host, port = student.teacher.removeprefix("dns:///").rsplit(":", 1)
    assert student.teacher.startswith("dns:///") and host == "teacher" and int(port) == teacher.port
    head = commands["ray-head"][1]
    assert commands["ray-worker"][1]["address"] == f"ray-head:{head['port']}"
    job_api = urlsplit(job["address"])
    assert (job_api.hostname, job_api.port) == ("ray-head", head["dashboard_port"])
    assert head["dashboard_host"] == "0.0.0.0" and head["dashboard_port"] in _container_ports(services["ray-head"])
    # no two services publish the same host port; only the key-guarded gRPC API listens beyond the host
    published = [str(p).split(":") for s in services.values() for p in s.get("ports", [])]
    assert len({p[-2] for p in published}) == len(published)
    assert [p for p in published if len(p) < 3 or p[0] != "127.0.0.1"] == [[TEACHER_PORTS, str(teacher.port)]]


TEACHER_PORTS = "50051-50058"  # the default host port range of the teacher replicas


def fixed_host_ports(service: dict[str, Any]) -> list[str]:
    """Published ports that name a single host port: a second replica of the service could not bind it."""
    fixed = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        host = parts[-2] if len(parts) >= 2 else ""
        if host and "-" not in host:
            fixed.append(str(port))
    return fixed


def test_the_teacher_scales_out(services: dict[str, Any], commands: dict[str, tuple[str, Any]]) -> None:
    """`docker compose up --scale teacher=N`: no host port collision, no fixed container name, clients inside the
    stack balance over every replica (dns:///), Prometheus discovers every replica."""
    from student_client.transport.channel import grpc_target

    teacher = services["teacher"]
    assert "container_name" not in teacher and fixed_host_ports(teacher) == []
    low, high = TEACHER_PORTS.split("-")
    assert int(high) - int(low) + 1 >= 4, "room for a few replicas"
    assert str(commands["teacher"][1].port) in {str(p) for p in teacher["expose"]}
    student = parse_cli(student_parser(), list(commands["student"][1]["entrypoint"][1:]))
    assert grpc_target(student.teacher) == f"dns:///teacher:{commands['teacher'][1].port}"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["dns_sd_configs"][0]["names"] == ["teacher"]
    # the check can fail: the old fixed mapping and a fixed name are caught
    assert fixed_host_ports({"ports": ["50051:50051"]}) == ["50051:50051"]
    assert fixed_host_ports({"ports": ["127.0.0.1:8080:8080", "9000"]}) == ["127.0.0.1:8080:8080"]
    assert fixed_host_ports({"ports": [f"{TEACHER_PORTS}:50051", "50051"]}) == []
    # with the variable set, the range comes from it
    moved = load_compose(COMPOSE, {"MASKEDKD_TEACHER_PORTS": "6000-6003"})["services"]["teacher"]["ports"]
    assert moved == ["6000-6003:50051"]


def test_references_and_paths_exist(
    compose: dict[str, Any], services: dict[str, Any], commands: dict[str, tuple[str, Any]]
) -> None:
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO and (context / build["dockerfile"]).is_file()
        for source in bind_mounts(service).values():
            if source.startswith("./tls/"):  # made by deploy/make-dev-certs.sh, git-ignored (test_deploy_tls.py)
                assert (DEPLOY / "make-dev-certs.sh").is_file()
            elif source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} not declared"
    # grafana: provisioning mounted where grafana reads it, dashboards where the provider looks
    mounts = {source: target for target, source in bind_mounts(services["grafana"]).items()}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()
    # the student's data is the committed subset, mounted at /data on every Ray node
    student = parse_cli(student_parser(), list(commands["student"][1]["entrypoint"][1:]))
    for node in ("ray-head", "ray-worker", "student"):
        assert "../data:/data:ro" in services[node]["volumes"] and "runs:/runs" in services[node]["volumes"]
    assert student.data.startswith("/data/") and student.out.startswith("/runs/")
    assert (REPO / "data" / student.data.removeprefix("/data/") / "train").is_dir()
    # the teacher's checkpoint path lies in its models mount
    teacher = commands["teacher"][1]
    models = next(str(v) for v in services["teacher"]["volumes"] if str(v).endswith(":/models:ro"))
    assert teacher.checkpoint.startswith("/models/") and (DEPLOY / models.split(":")[0]).is_dir()


def test_dockerfiles_copy_what_exists_and_install_the_pinned_stack() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installs = {}
    for name in ("Dockerfile.teacher", "Dockerfile.student"):
        text = (DEPLOY / name).read_text()
        assert re.search(r"^FROM python:3\.11[-.\w]*$", text, re.M), "base image must match requires-python"
        assert ">=3.11" in project["requires-python"]
        ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for source in line.split()[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
                assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, f"{name}: {source} is ignored"
        pip = re.findall(r"^RUN pip install (.+)$", text, re.M)
        assert len(pip) == 1 and pip[0].startswith("-c constraints.txt "), f"{name}: install with the constraints"
        assert "==" not in pip[0], f"{name}: versions come from constraints.txt, not the Dockerfile"
        extras = re.findall(r'"\.\[([\w,]+)\]"', pip[0])
        assert len(extras) == 1 and set(extras[0].split(",")) <= set(project["optional-dependencies"])
        installs[name] = set(extras[0].split(","))
    assert installs["Dockerfile.student"] == {"client", "train"}  # the student image holds no server stack
    assert {"server", "dashboard", "postgres"} <= installs["Dockerfile.teacher"]
