"""deploy/k8s, TLS and tokens: the teacher serves gRPC over TLS only, with the certificate and key of a
kubernetes.io/tls Secret mounted as files; its probes (exec: `teacher-server health`) and the RayJob's student verify
it with the CA of another Secret; tokens, keys and passwords reach pods only from Secrets, never a command line."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from test_compose import parse_cli, student_parser, teacher_parser
from test_k8s import container, pod_specs, probe_command, rendered, secret_templates  # noqa: F401 (fixture)

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


def mounted_secret(spec: dict[str, Any], container_: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file `path` as mounted into `container_`: a secret volume's mount directory."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container_.get("volumeMounts", []):
        if Path(path).parent.as_posix() == mount["mountPath"] and "secret" in volumes[mount["name"]]:
            assert mount.get("readOnly"), mount
            secret = volumes[mount["name"]]["secret"]
            assert not secret.get("optional"), "TLS files must be there: the pod must not start without them"
            return secret["secretName"], Path(path).name
    raise AssertionError(f"{path} is in no mounted Secret volume of {container_['name']}")


def test_teacher_serves_tls_only_from_the_secret_and_clients_verify_it(rendered) -> None:
    templates = secret_templates()
    deployment = rendered[("Deployment", "teacher")]
    spec, main = deployment["spec"]["template"]["spec"], container(deployment)
    args = parse_cli(teacher_parser(), main["command"][1:])
    # the server's certificate and key: the kubernetes.io/tls Secret's own keys, mounted as files
    assert mounted_secret(spec, main, args.tls_cert) == ("maskedkd-tls", "tls.crt")
    assert mounted_secret(spec, main, args.tls_key) == ("maskedkd-tls", "tls.key")
    assert templates["maskedkd-tls"]["type"] == "kubernetes.io/tls"
    # every probe checks over TLS with the CA, for the name clients dial (the headless Service)
    job = rendered[("RayJob", "student-train")]
    student = parse_cli(student_parser(), shlex.split(job["spec"]["entrypoint"])[1:])
    dialled = student.teacher.removeprefix("dns:///").rsplit(":", 1)[0]
    assert ("Service", dialled) in rendered
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = probe_command(main[kind])
        ca_secret, ca_key = mounted_secret(spec, main, probe.ca)
        assert ca_key in templates[ca_secret]["stringData"] and probe.server_name == dialled, kind
    # the student's --teacher-ca: the same CA on every Ray node (the workers open the channels); the server's key
    # stays on the teacher pods
    assert student.teacher_ca and "--teacher-ca" in job["spec"]["entrypoint"]
    for node in pod_specs(job):
        assert mounted_secret(node, node["containers"][0], student.teacher_ca) == (ca_secret, ca_key)
    for (kind, name), obj in rendered.items():
        for pod in pod_specs(obj):
            uses_tls = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
            assert "maskedkd-tls" not in uses_tls or name == "teacher", f"{kind}/{name} mounts the server key"
    # no longer announced as plain-text HTTP/2
    assert all(p.get("appProtocol") != "kubernetes.io/h2c" for p in rendered[("Service", "teacher")]["spec"]["ports"])


SECRET_ENV = re.compile(r"TOKEN|PASSWORD|API_KEY|^MASKEDKD_DB$")
SECRET_FLAGS = ("--admin-token", "--viewer-token", "--api-key", "--password")


def secrets_outside_secret_refs(obj: dict[str, Any]) -> list[str]:
    """Tokens, keys and passwords given as literal env values or command-line flags in `obj`'s pods."""
    found = []
    commands = [shlex.split(obj["spec"]["entrypoint"])] if obj["kind"] == "RayJob" else []
    for spec in pod_specs(obj):
        for c in spec.get("initContainers", []) + spec["containers"]:
            commands += [c.get("command", []) + c.get("args", [])]
            commands += [
                c[p]["exec"]["command"]
                for p in ("startupProbe", "readinessProbe", "livenessProbe")
                if "exec" in c.get(p, {})
            ]
            for env in c.get("env", []):
                if SECRET_ENV.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                    found.append(f"{c['name']}: env {env['name']} is not from a Secret")
    for argv in commands:
        found += [
            f"{obj['metadata']['name']}: {a}"
            for a in argv
            if a.split("=")[0] in SECRET_FLAGS or a.startswith("--runtime-env-json")
        ]
    return found


def test_tokens_come_only_from_secrets_never_a_command_line(rendered) -> None:
    assert [f for obj in rendered.values() for f in secrets_outside_secret_refs(obj)] == []
    dashboard = rendered[("Deployment", "dashboard")]
    env = {e["name"]: e for e in container(dashboard)["env"]}
    assert env["MASKEDKD_VIEWER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "maskedkd-viewer", "key": "token"}
    assert env["MASKEDKD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "maskedkd-admin", "key": "token"}
    args = parse_cli(teacher_parser(), container(dashboard)["command"][1:])
    assert not args.dashboard_public, "the read views stay behind the viewer token"
    # the check can fail: a token flag, a literal token and a key in the RayJob's entrypoint are caught
    broken = copy.deepcopy(dashboard)
    container(broken)["command"] += ["--viewer-token", "abc"]
    container(broken)["env"].append({"name": "MASKEDKD_ADMIN_TOKEN", "value": "abc"})
    assert len(secrets_outside_secret_refs(broken)) == 2
    job = copy.deepcopy(rendered[("RayJob", "student-train")])
    job["spec"]["entrypoint"] += " --api-key=mkd_x"
    assert secrets_outside_secret_refs(job)
