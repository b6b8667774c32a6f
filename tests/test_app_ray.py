"""The shipped serve config on a real local Ray cluster: HTTP API, batching, bad input."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from load.harness import hostile
from tests.conftest import deploy_config, shipped_config

pytestmark = pytest.mark.ray


def post(url: str, body: dict, path: str = "/predict", **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60.0, **kw)


@pytest.mark.parametrize("form", ["b64", "pairs", "int16"])
def test_predict_each_encoding(app_url, sample_requests, form):
    body = {**sample_requests[form][0], "cache": False}
    r = post(app_url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"]["name"] == "localization_model" and out["model"]["version"]
    assert out["cache_hit"] is False
    u = out["uncertainty"]
    assert u["semi_major_m"] >= u["semi_minor_m"] > 0
    assert u["confidence_level"] == 0.95
    kinds = [f["properties"]["kind"] for f in out["geojson"]["features"]]
    assert kinds == ["position", "uncertainty_ellipse"]
    ring = out["geojson"]["features"][1]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) > 10
    assert set(out["receivers_used"]) <= {r["id"] for r in body["receivers"]}
    assert {"preprocess", "inference", "postprocess", "total"} <= set(out["timing_ms"])


def test_same_capture_same_answer_across_encodings(app_url, sample_requests):
    a = post(app_url, {**sample_requests["b64"][1], "cache": False}).json()
    b = post(app_url, {**sample_requests["pairs"][1], "cache": False}).json()
    assert a["position"] == pytest.approx(b["position"], abs=1e-9)


def test_bad_inputs_get_4xx_naming_the_field(app_url, sample_requests):
    good = sample_requests["b64"][2]
    cases = hostile.bad_inputs(good)
    assert len(cases) >= 12
    for name, body, status, field in cases:
        if isinstance(body, bytes):
            r = httpx.post(app_url + "/predict", content=body, timeout=60.0)
        else:
            r = post(app_url, body)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert field in (err["field"] or ""), (name, err)
        assert err["message"], name
    # Oversize body and too many batch items.
    r = httpx.post(app_url + "/predict", content=b" " * (64 * 1024 * 1024 + 10), timeout=60.0)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    r = post(app_url, {"captures": [good] * 65}, "/predict/batch")
    assert r.status_code in (413, 422) and r.json()["error"]["field"] == "captures"
    # ...and the service keeps serving.
    assert post(app_url, {**good, "cache": False}).status_code == 200


def test_batch_endpoint_isolates_bad_items(app_url, sample_requests):
    good = sample_requests["b64"]
    bad = {**good[0], "receivers": good[0]["receivers"][:2]}
    r = post(app_url, {"captures": [good[3], bad, good[4]]}, "/predict/batch")
    assert r.status_code == 200, r.text
    items = r.json()["results"]
    assert [it["ok"] for it in items] == [True, False, True]
    assert items[1]["error"]["field"].startswith("captures[1].receivers")
    single = post(app_url, {**good[3], "cache": False}).json()
    assert items[0]["result"]["position"] == pytest.approx(single["position"], abs=1e-9)


def test_read_endpoints(app_url):
    h = httpx.get(app_url + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["model"]["version"]
    rx = httpx.get(app_url + "/receivers", timeout=30).json()["receivers"]
    assert [r["id"] for r in rx][:3] == ["giaveno", "coazze", "torino"]
    info = httpx.get(app_url + "/model/info", timeout=30).json()
    assert info["metadata"]["feature_spec_version"] == "rss-v1"
    spec = httpx.get(app_url + "/openapi.json", timeout=30).json()
    paths = {"/predict", "/predict/batch", "/health", "/receivers", "/model/info"}
    assert paths <= set(spec["paths"])
    assert "pid" not in info  # the open view: no PID (the admin view has it)
    # The Swagger UI loads its assets from a CDN: off unless args.docs_ui enables it.
    assert httpx.get(app_url + "/docs", timeout=30).status_code == 404


def test_replicas_run_with_the_configs_malloc_tuning(app_url):
    """The app's runtime_env reaches every replica (docs/performance.md: malloc)."""
    import ray

    from load.harness import SERVE_NAMESPACE, replica_names

    app = shipped_config(int(app_url.rsplit(":", 1)[1]))["applications"][0]
    want = app["runtime_env"]["env_vars"]["GLIBC_TUNABLES"]
    assert "glibc.malloc.mmap_threshold=" in want
    for deployment in ("Ingress", "Preprocessor", "LocalizationModel", "Postprocessor"):
        names = replica_names("rfloc", deployment)
        assert names, deployment
        for name in names:
            actor = ray.get_actor(name, namespace=SERVE_NAMESPACE)
            seen = ray.get(actor.__ray_call__.remote(
                lambda self: os.environ.get("GLIBC_TUNABLES")), timeout=30)
            assert seen == want, (deployment, seen)


def test_admin_endpoint_needs_token(app_url, admin_headers):
    assert httpx.post(app_url + "/model/reload", timeout=30).status_code == 401
    r = httpx.post(app_url + "/model/reload", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 403
    r = httpx.post(app_url + "/model/reload", headers=admin_headers, timeout=60)
    assert r.status_code == 200 and r.json()["outcome"] in ("unchanged", "swapped")


def _hammer(url: str, bodies: list[dict], n: int, workers: int) -> list[tuple[int, str]]:
    def one(i: int) -> tuple[int, str]:
        r = c.post(url + "/predict", json={**bodies[i % len(bodies)], "cache": False})
        return r.status_code, r.text[:300] if r.status_code != 200 else ""

    with httpx.Client(timeout=60.0) as c, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def test_dynamic_batching_and_reconfigure(app_url, sample_requests, admin_headers):
    before = httpx.get(app_url + "/model/info", headers=admin_headers, timeout=30).json()
    answers = _hammer(app_url, sample_requests["b64"], 96, 16)
    assert all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200]
    info = httpx.get(app_url + "/model/info", timeout=30).json()
    sizes = {int(k): v for k, v in info["batch_sizes"].items()}
    assert max(sizes) > 1, f"model only ever saw batches of {sizes}"
    # The Ingress sent concurrent single-capture requests down the chain together.
    chain = {int(k): v for k, v in info["chain_batch_sizes"].items()}
    assert max(chain) > 1, f"every chain call carried one capture: {chain}"
    assert sum(k * v for k, v in chain.items()) >= 96

    # A new user_config is applied by reconfigure() in the running replica.
    port = int(app_url.rsplit(":", 1)[1])
    cfg = shipped_config(port)
    model_cfg = next(d for d in cfg["applications"][0]["deployments"]
                     if d["name"] == "LocalizationModel")
    model_cfg["user_config"] = {**model_cfg["user_config"], "max_batch_size": 96,
                                "batch_wait_timeout_s": 0.01}
    deploy_config(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = httpx.get(app_url + "/model/info", timeout=30).json()
        if info["user_config"]["max_batch_size"] == 96:
            break
        time.sleep(0.5)
    assert info["user_config"]["max_batch_size"] == 96
    assert info["user_config"]["batch_wait_timeout_s"] == 0.01
    admin_info = httpx.get(app_url + "/model/info", headers=admin_headers, timeout=30).json()
    assert admin_info["pid"] == before["pid"], "reconfigure must not restart the replica"
    deploy_config(shipped_config(port))  # back to the shipped config


def _model_replicas() -> int:
    from ray import serve

    status = serve.status().applications["rfloc"].deployments["LocalizationModel"]
    return int(status.replica_states.get("RUNNING", 0))


def _settle_model_replicas(expected: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """Poll until `expected` replicas run (or the timeout); the count last seen.

    A redeploy (an earlier test restores the shipped config) briefly takes the running
    replica through UPDATING, so a single look can see 0 between two looks that see 1.
    """
    deadline = time.monotonic() + timeout_s
    seen = _model_replicas()
    while seen != expected and time.monotonic() < deadline:
        time.sleep(poll_s)
        seen = _model_replicas()
    return seen


@pytest.mark.slow
def test_autoscaling_up_and_down(app_url, network):
    """Drive the model deployment through its handle; it scales within the config's limits."""
    import asyncio

    from ray import serve

    from serve_app.pipeline import preprocess, stack_captures
    from serve_app.samples import make_samples

    cfg = shipped_config(0)["applications"][0]["deployments"]
    limits = next(d for d in cfg if d["name"] == "LocalizationModel")["autoscaling_config"]
    s = make_samples(16, seed=5)
    group = preprocess([stack_captures(
        [(s.iq[i], np.arange(len(network))) for i in range(16)], len(network), [0.95] * 16)],
        network)[0]
    # An earlier test's redeploy may still be settling.
    assert _settle_model_replicas(limits["min_replicas"], 60) == limits["min_replicas"]

    async def drive(seconds: float) -> int:
        handle = serve.get_deployment_handle("LocalizationModel", "rfloc")
        peak, t_end = 1, time.monotonic() + seconds
        try:
            while time.monotonic() < t_end and peak < 2:
                # Far more in flight than target_ongoing_requests per replica.
                await asyncio.gather(*[handle.remote(group, "production", None)
                                       for _ in range(96)])
                peak = max(peak, _model_replicas())
        finally:
            # Its router lives on this loop: close it here, before asyncio.run() ends.
            await handle.shutdown_async()
        return peak

    peak = asyncio.run(drive(90.0))
    assert 2 <= peak <= limits["max_replicas"]
    assert _settle_model_replicas(limits["min_replicas"], limits["downscale_delay_s"] + 120,
                                  poll_s=2) == limits["min_replicas"]
