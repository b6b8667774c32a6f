"""Custom metrics: documented names match the code; a real Prometheus finds them on the app.

The cluster test starts its own Prometheus server (Debian package `prometheus`) on a
loopback port with a copy of configs/prometheus.yml whose only changes are a 2 s scrape
interval and a service-discovery file that lists the session cluster's metrics export port
(the shipped path, /tmp/ray/prom_metrics_service_discovery.json, follows whichever Ray
session started last on this shared machine, and is only written when the dashboard runs).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port, wait_http

PROMETHEUS_CONFIG = REPO / "configs" / "prometheus.yml"
DASHBOARD = REPO / "configs" / "grafana" / "rfloc_dashboard.json"
OBSERVABILITY_DOC = REPO / "docs" / "observability.md"
SHIPPED_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
KIND_SUFFIXES = {"counter": "_total", "gauge": "", "histogram": "_bucket"}


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{name: (type, labels)} from the metrics table of docs/observability.md."""
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in OBSERVABILITY_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`rfloc_"):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} documented twice"
        labels = tuple(re.findall(r"`([a-z_]+)`", cells[2]))
        rows[name] = (cells[1].lower(), labels)
    return rows


# -- unit tests (no cluster) ----------------------------------------------------------------


def test_documented_metrics_match_the_code():
    from deployments.metrics import METRICS, PREFIX

    documented = documented_metrics()
    assert documented, "no metrics table found in docs/observability.md"
    assert set(documented) == set(METRICS), (
        f"only in docs: {sorted(set(documented) - set(METRICS))}; "
        f"only in code: {sorted(set(METRICS) - set(documented))}")
    for name, spec in METRICS.items():
        assert name.startswith(PREFIX)
        assert spec.description.isascii(), f"{name}: Ray refuses non-ASCII descriptions"
        assert documented[name] == (spec.kind, spec.labels), name


def test_every_metric_is_created_by_a_role_class():
    source = (REPO / "deployments" / "metrics.py").read_text()
    from deployments.metrics import METRICS

    created = set(re.findall(r'make_metric\("(rfloc_[a-z0-9_]+)"\)', source))
    assert created == set(METRICS)


def test_dashboard_queries_only_known_metrics():
    from deployments.metrics import METRICS

    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    used = set(re.findall(r"ray_(rfloc_[a-z0-9_]+)", " ".join(exprs)))
    exported = {}
    for name, spec in METRICS.items():
        exported[name + KIND_SUFFIXES[spec.kind]] = name
        if spec.kind == "histogram":
            exported.update({name + "_sum": name, name + "_count": name})
    unknown = used - set(exported)
    assert not unknown, f"dashboard queries unknown series {unknown}"
    assert {exported[u] for u in used} == set(METRICS), "a metric has no dashboard panel"


def test_shipped_prometheus_config_is_valid():
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [SHIPPED_SD_FILE]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# -- a real Prometheus against the session's app -------------------------------------------


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Base URL of a Prometheus server scraping the session cluster's metrics export port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian package) is not installed; tests/run.sh installs it")
    tmp: Path = tmp_path_factory.mktemp("prometheus")
    sd_file = tmp / "prom_metrics_service_discovery.json"
    target = f"127.0.0.1:{ray_cluster['metrics_export_port']}"
    sd_file.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [target]}]))
    cfg = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    cfg["global"].update(scrape_interval="2s", evaluation_interval="2s")
    [job] = cfg["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(sd_file)]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config_path}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp / 'data'}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", timeout_s=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def query(prom_url: str, expr: str) -> list[dict]:
    """The instant-vector result of a PromQL query."""
    r = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10.0)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def send_traffic(app_url: str, sample_requests: dict) -> dict:
    """A mix of requests exercising every metric; returns what the answers said."""
    # A confidence level never used before gives fresh cache keys: a guaranteed miss, then a hit.
    level = round(random.uniform(0.80, 0.99), 6)
    body = {**sample_requests["b64"][5], "confidence_level": level, "cache": True}
    with httpx.Client(base_url=app_url, timeout=60.0) as c:
        first = c.post("/predict", json=body)
        second = c.post("/predict", json=body)
        assert first.status_code == second.status_code == 200, first.text
        assert (first.json()["cache_hit"], second.json()["cache_hit"]) == (False, True)
        for req in sample_requests["pairs"][:4]:
            assert c.post("/predict", json={**req, "cache": False}).status_code == 200
        batch = {"captures": [{**r, "cache": False} for r in sample_requests["b64"][:6]]}
        assert c.post("/predict/batch", json=batch).status_code == 200
        bad = {**sample_requests["b64"][0], "confidence_level": 1.5}
        assert c.post("/predict", json=bad).status_code == 422
        assert c.get("/no/such/route").status_code == 404
        assert c.get("/health").status_code == 200
        info = c.get("/model/info").json()
    return {"area_km2": first.json()["uncertainty"]["area_m2"] / 1e6, "model": info["model"],
            "done_at": time.monotonic()}


@pytest.mark.ray
def test_prometheus_finds_the_custom_metrics(app_url, prometheus, sample_requests):
    seen = send_traffic(app_url, sample_requests)
    version, alias = seen["model"]["version"], seen["model"]["alias"]
    app = 'application="rfloc"'
    expected = {
        "requests 200": f'ray_rfloc_requests_total{{endpoint="/predict",status="200",{app}}}',
        "requests 422": 'ray_rfloc_requests_total{endpoint="/predict",status="422"}',
        "batch requests": 'ray_rfloc_requests_total{endpoint="/predict/batch",status="200"}',
        "health": 'ray_rfloc_requests_total{endpoint="/health",status="200"}',
        "unmatched 404": 'ray_rfloc_requests_total{endpoint="unmatched",status="404"}',
        "total": 'ray_rfloc_stage_latency_ms_count{stage="total",deployment="Ingress"}',
        "preprocess": 'ray_rfloc_stage_latency_ms_count{stage="preprocess",'
                      'deployment="Preprocessor"}',
        "inference": 'ray_rfloc_stage_latency_ms_count{stage="inference",'
                     'deployment="LocalizationModel"}',
        "postprocess": 'ray_rfloc_stage_latency_ms_count{stage="postprocess",'
                       'deployment="Postprocessor"}',
        "preprocess batch": 'ray_rfloc_batch_size_bucket{deployment="Preprocessor",le="+Inf"}',
        "model batch": 'ray_rfloc_batch_size_bucket{deployment="LocalizationModel",le="+Inf"}',
        "preprocess wait": 'ray_rfloc_batch_queue_wait_ms_count{deployment="Preprocessor"}',
        "model wait": 'ray_rfloc_batch_queue_wait_ms_count{deployment="LocalizationModel"}',
        "cache hit": 'ray_rfloc_cache_events_total{event="hit",backend="redis"}',
        "cache miss": 'ray_rfloc_cache_events_total{event="miss",backend="redis"}',
        "serving version": f'ray_rfloc_model_version_info{{version="{version}",'
                           f'alias="{alias}"}} == 1',
        "reload success": 'ray_rfloc_model_reloads_total{outcome="success"}',
        "receivers detected": 'ray_rfloc_receivers_detected_count',
        "ellipse area": 'ray_rfloc_ellipse_area_km2_count',
    }
    deadline = time.monotonic() + 150.0
    missing = dict(expected)
    while missing and time.monotonic() < deadline:
        for what, expr in list(missing.items()):
            if any(float(s["value"][1]) > 0 for s in query(prometheus, expr)):
                del missing[what]
        if missing:
            time.sleep(2.0)
    targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]
    health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["activeTargets"]]
    assert not missing, f"not found in Prometheus: {sorted(missing)}; targets: {health}"

    # Serve's own tags come along, and the values make sense.
    [sample] = query(prometheus, expected["requests 200"])
    assert {"deployment", "replica", "application"} <= set(sample["metric"])
    assert sample["metric"]["deployment"] == "Ingress"
    # Integer histograms have half-integer bounds, so Ray's midpoint-based _sum is exact.
    detected = buckets(prometheus, "ray_rfloc_receivers_detected_bucket")
    assert detected[7.5] == detected[float("inf")] > 0  # never more than the 7 receivers
    [mean] = query(prometheus, "sum(ray_rfloc_receivers_detected_sum)"
                               " / sum(ray_rfloc_receivers_detected_count)")
    assert 3.0 <= float(mean["value"][1]) <= 7.0
    # The ellipse we were answered was counted in its bucket.
    area = buckets(prometheus, "ray_rfloc_ellipse_area_km2_bucket")
    bounds = sorted(area)
    i = next(i for i, b in enumerate(bounds) if seen["area_km2"] <= b)
    assert area[bounds[i]] - (area[bounds[i - 1]] if i else 0.0) >= 1

    # The version gauge outlives Ray's gauge TTL (2 report intervals, 20 s) without traffic.
    time.sleep(max(0.0, seen["done_at"] + 30.0 - time.monotonic()))
    version_series = query(prometheus, expected["serving version"])
    assert version_series, "the model version gauge aged out without traffic"

    # Every query of the Grafana dashboard is valid PromQL and finds data (every series has
    # had many scrapes by now, which rate() and increase() need).
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$Application", ".*")
                    .replace("$__rate_interval", "2m").replace("$__range", "10m"))
            result = query(prometheus, expr)
            if target["legendFormat"] != "5xx":  # no 5xx here, so that ratio is empty
                assert result, f"dashboard panel {panel['title']!r}: no data for {expr}"


def buckets(prom_url: str, series: str) -> dict[float, float]:
    """{upper bound: cumulative count} of a histogram, summed over replicas."""
    result = query(prom_url, f"sum by (le) ({series})")
    return {float(r["metric"]["le"]): float(r["value"][1]) for r in result}
