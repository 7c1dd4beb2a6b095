"""The Grafana dashboard: valid JSON, provisioned datasource, and every metric and label its queries use exist
in the service's Prometheus exposition (service.metrics, with _bucket/_sum/_count and _total suffixes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import DASHBOARD_DIR, metric_catalog, promql_label_problems, promql_metrics

DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield f"variable {var['name']}", query


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return json.loads(path.read_text())


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS, f"no dashboard JSON under {DASHBOARD_DIR}"


def test_every_queried_metric_exists(dashboard: dict[str, Any]) -> None:
    catalog = metric_catalog()
    seen: set[str] = set()
    for where, expr in _queries(dashboard):
        used = promql_metrics(expr)
        assert used, f"{where}: no segquant_* metric in {expr!r}"
        unknown = used - set(catalog)
        assert not unknown, f"{where}: {sorted(unknown)} not exposed by service.metrics"
        seen |= used
    assert len(seen) >= 15


def test_every_queried_label_exists(dashboard: dict[str, Any]) -> None:
    catalog = metric_catalog()
    for where, expr in _queries(dashboard):
        problems = promql_label_problems(expr, catalog)
        assert not problems, f"{where}: {problems}"


def test_histograms_are_queried_through_their_buckets(dashboard: dict[str, Any]) -> None:
    for where, expr in _queries(dashboard):
        if "histogram_quantile" in expr:
            assert all(m.endswith("_bucket") for m in promql_metrics(expr)), where
            assert " le" in expr or "le)" in expr, f"{where}: histogram_quantile needs sum by (…, le)"


def test_required_views_are_present(dashboard: dict[str, Any]) -> None:
    """Latency per variant, queue depth, throughput, memory per variant, errors."""
    exprs = " ".join(expr for _, expr in _queries(dashboard))
    required = {
        "latency per variant": ("segquant_job_duration_seconds_bucket", "segquant_inference_seconds_bucket"),
        "queue depth": ("segquant_queue_depth",),
        "throughput": ("segquant_images_generated_total", "segquant_jobs_finished_total"),
        "memory per variant": ("segquant_model_peak_memory_bytes",),
        "errors": ("segquant_jobs_failed_total", "segquant_rejected_requests_total"),
    }
    for view, metrics in required.items():
        for metric in metrics:
            assert metric in exprs, f"the dashboard lacks {view} ({metric})"
    per_variant = [
        expr
        for _, expr in _queries(dashboard)
        if "segquant_job_duration_seconds_bucket" in expr or "segquant_model_peak_memory_bytes" in expr
    ]
    assert all("variant" in expr for expr in per_variant), "latency and memory are broken down per variant"


def test_datasource_is_the_provisioned_one(dashboard: dict[str, Any]) -> None:
    import yaml

    provisioned = [
        d
        for f in (DASHBOARD_DIR.parent / "provisioning" / "datasources").glob("*.y*ml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    uids = {d["uid"] for d in provisioned} | {f"${{{n}}}" for n, v in variables.items() if v["type"] == "datasource"}
    for panel in _panels(dashboard["panels"]):
        if panel.get("type") == "row":
            continue
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            assert ds and ds["type"] == "prometheus" and ds["uid"] in uids, f"panel {panel.get('title')}: {ds}"
    for var in variables.values():
        if var["type"] == "datasource":
            assert var["query"] == "prometheus"


def test_layout(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p.get('title')} overflows the 24-column grid"
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p.get('title')} overlaps another"
        cells |= mine
        for target in p.get("targets", []):
            assert target.get("refId"), f"panel {p.get('title')}: target without refId"
