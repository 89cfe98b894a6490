"""deploy/grafana: the provisioned dashboard is valid, uses the provisioned datasource, and its PromQL names only
metrics (and labels) that a real teacher server exports at /metrics after serving a real request."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.settings import ServerSettings
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA_JSON = DEPLOY / "grafana" / "dashboards" / "maskedkd.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """sample name -> label names, scraped from a real teacher server's /metrics after one real request."""
    db = tmp_path_factory.mktemp("metrics") / "ledger.db"
    settings = ServerSettings(
        model="vit_tiny_patch16_224",
        model_kwargs={"img_size": 32, "patch_size": 4, "num_classes": 10},
        db=f"sqlite:///{db}",
        max_delay_ms=0.0,
    )
    with running_server(settings) as server:
        secret = server.create_key("grafana-check")
        request = pb.InferRequest(
            request_id="r1",
            images=tensor_to_proto(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
            keep_indices=tensor_to_proto(torch.arange(32).repeat(2, 1)),
        )
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.TeacherServiceStub(channel).Infer(
                request, metadata=[("authorization", f"Bearer {secret}")], timeout=60
            )
        assert server.metrics_url is not None and server.metrics_url.endswith("/metrics")
        text = httpx.get(server.metrics_url, timeout=10).text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        yield query["query"] if isinstance(query, dict) else query


_FUNCTIONS_AND_KEYWORDS = {
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "by",
    "without",
    "label_values",
    "avg",
    "max",
    "min",
    "count",
    "irate",
    "le",
    "key",
    "code",
    "model",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
}


def test_grafana_dashboard_queries_name_only_exported_metrics(scraped: dict[str, set[str]]) -> None:
    dashboard = json.loads(GRAFANA_JSON.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    queries = list(dashboard_queries(dashboard))
    assert queries
    used_metrics: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid and panel["datasource"]["uid"] == uid
    for expr in queries:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"{expr}: undefined variable ${var}"
        cleaned = re.sub(r'"[^"]*"', '""', expr)  # label values and legend text are not names
        cleaned = re.sub(r"\[[^\]]*\]", "", cleaned)  # range durations
        names = {
            n
            for n in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", cleaned)
            if n not in _FUNCTIONS_AND_KEYWORDS and not n.startswith("__")
        }
        metrics = {n for n in names if n.startswith("maskedkd_")}
        assert names - metrics <= variables, f"{expr}: unexpected names {sorted(names - metrics - variables)}"
        missing = metrics - set(scraped)
        assert not missing, f"{expr}: not exported by the server: {sorted(missing)}"
        used_metrics |= metrics
        # every label grouped by or matched on exists on a metric the query reads
        labels = set()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", cleaned):
            labels |= {x.strip() for x in group.split(",") if x.strip()}
        for matchers in re.findall(r"\{([^}]*)\}", cleaned):
            labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
        labels |= set(re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", cleaned))
        available = set().union(*(scraped[m] for m in metrics)) if metrics else set()
        assert labels <= available, f"{expr}: labels {sorted(labels - available)} not on {sorted(metrics)}"
    # the dashboard shows throughput, latency, GFLOPs used and saved per key
    for needed in (
        "maskedkd_requests_total",
        "maskedkd_images_total",
        "maskedkd_request_latency_seconds_bucket",
        "maskedkd_gflops_used_total",
        "maskedkd_gflops_saved_total",
        "maskedkd_cost_total",
    ):
        assert needed in used_metrics
    assert any("by (key) (rate(maskedkd_gflops_used_total" in q for q in queries)
    assert any("by (key) (rate(maskedkd_gflops_saved_total" in q for q in queries)


def test_grafana_check_catches_a_wrong_metric_name(scraped: dict[str, set[str]]) -> None:
    """The metric set is the real export: a plausible but wrong name is not in it."""
    assert "maskedkd_gflops_used_total" in scraped and "maskedkd_gflops_total" not in scraped
    assert "key" in scraped["maskedkd_gflops_used_total"] and "le" in scraped["maskedkd_batch_images_bucket"]
