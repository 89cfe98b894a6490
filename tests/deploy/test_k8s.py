"""deploy/k8s: what can be checked without a cluster. Each overlay is rendered (kustomize_lite, the subset of
kustomize the manifests use) and every object is validated against the Kubernetes 1.37 schemas (strict: unknown
fields are errors) shipped by `kubernetes-validate`; the RayJob against KubeRay's RayJob schema (tests/deploy/kuberay).
Commands parse with our CLIs, and names, ports, labels, secrets, volumes and metrics agree across objects and with
the code they run."""

from __future__ import annotations

import copy
import functools
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import schema_contents
from kustomize_lite import KustomizeError, build, json_patch, load_documents
from test_compose import parse_cli, student_parser, teacher_parser

from student_client.transport.channel import HEALTH_SERVICE, grpc_target
from teacher_server.metrics import ServerMetrics
from teacher_server.service.server import SERVICE_NAME

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.37"
KUBERAY_SCHEMA = Path(__file__).with_name("kuberay") / "rayjob.schema.yaml"
CRD_KINDS = {"RayJob"}  # validated against the KubeRay schema instead


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in build(K8S / "overlays" / request.param)}


def k8s_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}"]
    return []


@functools.cache
def rayjob_validator() -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    definitions = schema_contents(
        f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json", K8S_VERSION
    )
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def rayjob_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator().iter_errors(obj)]


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        return [
            cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])),
        ]
    return []


def container(obj: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return pod_specs(obj)[0]["containers"][index]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def probe_command(probe: dict[str, Any]) -> Any:
    """The parsed `teacher-server health ...` of an exec probe."""
    command = probe["exec"]["command"]
    assert command[:2] == ["teacher-server", "health"] and "grpc" not in probe, probe
    return parse_cli(teacher_parser(), command[1:])


def secret_templates() -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in load_documents(K8S / "secrets.example.yaml")}


# ------------------------------------------------------------------------------------------------ schemas


def test_every_object_validates_against_the_kubernetes_and_kuberay_schemas(rendered) -> None:
    errors: list[str] = []
    for (kind, _), obj in rendered.items():
        errors += rayjob_errors(obj) if kind in CRD_KINDS else k8s_errors(obj)
    for secret in secret_templates().values():
        errors += k8s_errors(secret)
    assert errors == []
    kinds = {kind for kind, _ in rendered}
    assert {
        "Deployment",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayJob",
    } <= kinds


def test_broken_manifests_are_rejected(rendered) -> None:
    """The checks can fail: misspelt fields, wrong types and missing required fields are reported, in built-in
    objects, in the RayJob and in the pod templates the RayJob embeds."""
    teacher = copy.deepcopy(rendered[("Deployment", "teacher")])
    teacher["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert k8s_errors(teacher)
    teacher = copy.deepcopy(rendered[("Deployment", "teacher")])
    teacher["spec"]["replicas"] = "two"
    assert k8s_errors(teacher)
    teacher = copy.deepcopy(rendered[("Deployment", "teacher")])
    teacher["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"] = "teacher-server health"
    assert k8s_errors(teacher)
    hpa = copy.deepcopy(rendered[("HorizontalPodAutoscaler", "teacher")])
    del hpa["spec"]["maxReplicas"]
    assert k8s_errors(hpa)
    job = rendered[("RayJob", "student-train")]
    for breakage in (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2),
        lambda j: j["spec"].update(shutdownAfterJobFinishes="yes"),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicy=1
        ),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(volumez=[]),
    ):
        broken = copy.deepcopy(job)
        breakage(broken)
        assert rayjob_errors(broken), breakage
    # the renderer refuses what it does not implement, and patches that miss
    with pytest.raises(KustomizeError):
        json_patch({"spec": {}}, {"op": "replace", "path": "/spec/replicas", "value": 3})
    with pytest.raises(KustomizeError):
        json_patch({"spec": {}}, {"op": "add", "path": "/spec/template/spec", "value": {}})


def test_the_renderer_refuses_unsupported_kustomizations(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="unsupported"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [../outside.yaml]\n")
    (tmp_path.parent / "outside.yaml").write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(KustomizeError, match="outside"):
        build(tmp_path)


# ------------------------------------------------------------------------------------------------ teacher


def test_teacher_command_probes_and_headless_service_agree(rendered) -> None:
    deployment, service = rendered[("Deployment", "teacher")], rendered[("Service", "teacher")]
    main = container(deployment)
    args = parse_cli(teacher_parser(), main["command"][1:])
    assert main["command"][0] == "teacher-server" and args.command == "serve"
    assert args.host == "0.0.0.0" and "--db" not in main["command"]  # the ledger URL comes from a Secret
    env = {e["name"]: e for e in main["env"]}
    assert env["MASKEDKD_DB"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    # probes: gRPC health on the serving port (exec: TLS, test_teacher_serves_tls_only_...); readiness asks for the
    # service the server marks NOT_SERVING while draining, startup and liveness for the server as a whole
    assert HEALTH_SERVICE == SERVICE_NAME
    probes = {kind: probe_command(main[kind]) for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p.target for p in probes.values()} == {f"127.0.0.1:{args.port}"}
    assert probes["readinessProbe"].service == SERVICE_NAME
    assert probes["startupProbe"].service == probes["livenessProbe"].service == ""
    for kind, probe in probes.items():  # the check must answer within the kubelet's timeout
        assert probe.timeout < main[kind]["timeoutSeconds"], kind
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.drain_s + args.grace_s, "the kubelet must not SIGKILL a draining teacher"
    # headless Service over the teacher pods, ports by name
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        obj = rendered[(kind, "teacher")]
        if kind == "PodDisruptionBudget":
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
        else:
            assert obj["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "teacher"}
            pdb = rendered[("PodDisruptionBudget", "teacher")]
            assert obj["spec"]["minReplicas"] >= 2 > pdb["spec"]["minAvailable"]  # a drain never blocks forever


def test_autoscaling_and_scraping_use_metrics_the_server_exports(rendered) -> None:
    exported = {m.name for m in ServerMetrics().registry.collect()}
    hpa = rendered[("HorizontalPodAutoscaler", "teacher")]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names and set(names) <= exported, (names, sorted(exported))
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-rules.yaml").read_text())
    published = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert set(names) <= published
    # Prometheus: kubernetes_sd over pods, kept by the annotations the teacher template carries, on its metrics port
    deployment = rendered[("Deployment", "teacher")]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    args = parse_cli(teacher_parser(), container(deployment)["command"][1:])
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(args.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    assert {e["name"]: e.get("value") for e in container(deployment)["env"]}["MASKEDKD_METRICS_HOST"] == "0.0.0.0"
    config = yaml.safe_load(rendered[("ConfigMap", "prometheus-config")]["data"]["prometheus.yml"])
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = job["relabel_configs"][0]
    assert keep == {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "action": "keep",
        "regex": "true",
    }
    prometheus = rendered[("Deployment", "prometheus")]["spec"]["template"]["spec"]
    role = rendered[("Role", "prometheus-discovery")]
    assert prometheus["serviceAccountName"] == "prometheus" and "pods" in role["rules"][0]["resources"]
    binding = rendered[("RoleBinding", "prometheus-discovery")]
    assert binding["subjects"][0]["name"] == "prometheus" and binding["roleRef"]["name"] == role["metadata"]["name"]
    monitor = yaml.safe_load((K8S / "extras" / "servicemonitor.yaml").read_text())
    service = rendered[("Service", "teacher")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not() -> None:
    for overlay, gpus in (("cpu", None), ("gpu", 1)):
        objects = {(o["kind"], o["metadata"]["name"]): o for o in build(K8S / "overlays" / overlay)}
        resources = container(objects[("Deployment", "teacher")])["resources"]
        assert resources["limits"].get("nvidia.com/gpu") == gpus, overlay
        assert resources["requests"].get("nvidia.com/gpu") == gpus, overlay
        others = [
            c
            for o in objects.values()
            for spec in pod_specs(o)
            for c in spec["containers"]
            if o["metadata"]["name"] != "teacher"
        ]
        assert all("nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}) for c in others)


# ------------------------------------------------------------------------------------------------ wiring


def test_secrets_are_templates_and_every_reference_resolves(rendered) -> None:
    templates = secret_templates()
    for secret in templates.values():  # nothing real is committed
        assert all(value == "" for value in secret.get("stringData", {}).values()), secret["metadata"]["name"]
        assert "data" not in secret
    assert not [o for o in rendered.values() if o["kind"] == "Secret"], "secrets stay out of the kustomization"
    refs = set()
    for obj in rendered.values():
        for spec in pod_specs(obj):
            for c in spec["containers"]:
                for env in c.get("env", []):
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    refs.add((volume["secret"]["secretName"], None))
    for name, key in refs:
        assert name in templates, name
        assert key is None or key in templates[name]["stringData"], (name, key)
    assert templates["maskedkd-tls"]["type"] == "kubernetes.io/tls"
    assert {"maskedkd-postgres", "maskedkd-admin", "maskedkd-student", "maskedkd-tls"} <= templates.keys()


def test_volumes_config_maps_and_services_resolve(rendered) -> None:
    claims = {name: o for (kind, name), o in rendered.items() if kind == "PersistentVolumeClaim"}
    for name in ("maskedkd-models", "maskedkd-data", "maskedkd-runs"):
        assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], name  # shared by pods on many nodes
    pod_labels = [
        o["spec"]["template"]["metadata"]["labels"]
        for o in rendered.values()
        if o["kind"] in {"Deployment", "StatefulSet"}
    ]
    for (kind, name), obj in rendered.items():
        for spec in pod_specs(obj):
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in rendered, (name, volume)
            for c in spec["containers"]:
                mounted = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounted <= {v["name"] for v in spec.get("volumes", [])} | {
                    t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])
                }, (name, mounted)
        if kind == "Service":
            selector = obj["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), f"Service {name} selects nothing"
    # the StatefulSet's governing Service is headless; the ledger URL's host is that Service
    postgres = rendered[("StatefulSet", "postgres")]
    assert rendered[("Service", postgres["spec"]["serviceName"])]["spec"]["clusterIP"] == "None"
    port = rendered[("Service", "postgres")]["spec"]["ports"][0]["port"]
    database = {e["name"]: e.get("value") for e in container(postgres)["env"]}["POSTGRES_DB"]
    assert f"@postgres:{port}/{database}" in (K8S / "secrets.example.yaml").read_text()  # the documented URL


def test_grafana_mounts_the_compose_stacks_files(rendered) -> None:
    grafana = rendered[("Deployment", "grafana")]
    spec = grafana["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    by_map = {v["configMap"]["name"]: mounts[v["name"]] for v in spec["volumes"]}
    grafana_dir = REPO / "deploy" / "grafana"
    provider = yaml.safe_load((grafana_dir / "provisioning" / "dashboards" / "maskedkd.yml").read_text())
    assert by_map["grafana-dashboards"] == provider["providers"][0]["options"]["path"]
    assert by_map["grafana-dashboard-providers"] == "/etc/grafana/provisioning/dashboards"
    assert by_map["grafana-datasources"] == "/etc/grafana/provisioning/datasources"
    dashboards = rendered[("ConfigMap", "grafana-dashboards")]["data"]
    assert dashboards["maskedkd.json"] == (grafana_dir / "dashboards" / "maskedkd.json").read_text()
    json.loads(dashboards["maskedkd.json"])
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == by_map["grafana-dashboards"] and Path(home).name in dashboards
    datasource = yaml.safe_load(rendered[("ConfigMap", "grafana-datasources")]["data"]["prometheus.yml"])
    url = datasource["datasources"][0]["url"]
    service = rendered[("Service", "prometheus")]
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_rayjob_trains_against_the_headless_service_with_shared_storage(rendered) -> None:
    job = rendered[("RayJob", "student-train")]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "student-client"
    args = parse_cli(student_parser(), argv[1:])
    assert args.command == "train" and args.ray_address == "auto"
    assert "--api-key" not in argv  # the key comes from a Secret through the environment, never argv
    target = grpc_target(args.teacher)
    assert target.startswith("dns:///")
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    service = rendered[("Service", host.split(".")[0])]
    assert service["spec"]["clusterIP"] == "None" and int(port) in {p["port"] for p in service["spec"]["ports"]}
    # every Ray node mounts the data read-only and the runs volume, the same claims, where the command looks
    for spec in pod_specs(job):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        data = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]
        runs = volumes[mounts["/runs"]["name"]]["persistentVolumeClaim"]
        assert (data["claimName"], runs["claimName"]) == ("maskedkd-data", "maskedkd-runs")
        assert mounts["/data"].get("readOnly") and not mounts["/runs"].get("readOnly")
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["MASKEDKD_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "maskedkd-student"
    assert args.data.startswith("/data/") and args.out.startswith("/runs/")
    assert (REPO / "data" / args.data.removeprefix("/data/") / "train").is_dir()
    # the Ray the student image installs: pinned in constraints.txt
    ray_pin = next(
        line.split("==")[1].strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith("ray==")
    )
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert workers["replicas"] >= int(args.workers)
