"""Model lifecycle on the running service: promote, rollback, refusal, pinning, registry loss."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from load.harness import MlflowServer, with_second_app
from serve_app.registry import ModelRegistry, embedded_uris
from tests.conftest import REPO, free_port, wait_http

pytestmark = pytest.mark.ray
SHIPPED_ONNX = REPO / "models" / "localization_model.onnx"


def variant(tmp: Path, name: str, *, nan: bool = False, spec: str | None = None) -> Path:
    """A copy of the shipped model: a new sha, NaN positions, or another feature spec."""
    m = onnx.load(str(SHIPPED_ONNX))
    meta = {p.key: p.value for p in m.metadata_props}
    meta["variant"] = name
    if spec is not None:
        meta["feature_spec_version"] = spec
    del m.metadata_props[:]
    for k, v in sorted(meta.items()):
        m.metadata_props.add(key=k, value=v)
    if nan:
        for node in m.graph.node:
            node.output[:] = ["mean_raw" if o == "mean_enu_m" else o for o in node.output]
        m.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan_c"))
        m.graph.node.append(helper.make_node("Mul", ["mean_raw", "nan_c"], ["mean_enu_m"]))
    path = tmp / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def registry(ray_cluster) -> ModelRegistry:
    uri, _ = embedded_uris(ray_cluster["state_dir"])
    return ModelRegistry(uri, cache_dir=ray_cluster["state_dir"] / "test-cache")


class Load:
    """Steady concurrent load in the background; records (status, version) per response."""

    def __init__(self, url: str, body: dict, workers: int = 4) -> None:
        self.url, self.body = url + "/predict", {**body, "cache": False}
        self.results: list[tuple[float, int, str | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(timeout=60.0) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(self.url, json=self.body)
                    v = r.json()["model"]["version"] if r.status_code == 200 else None
                    if r.status_code != 200 and len(self.errors) < 5:
                        self.errors.append(r.text[:500])
                    self.results.append((time.monotonic(), r.status_code, v))
                except httpx.HTTPError:
                    self.results.append((time.monotonic(), -1, None))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def wait_version(self, version: str, timeout_s: float) -> float:
        """Seconds until every response after some instant carries `version`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            recent = [v for t, s, v in self.results[-8:] if s == 200]
            if len(recent) >= 4 and all(v == version for v in recent):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"responses did not switch to version {version}: "
                             f"{Counter(v for _, _, v in self.results[-20:])} {self.errors}")


def served_version(url: str) -> str:
    return httpx.get(url + "/model/info", timeout=30).json()["model"]["version"]


def test_promote_then_rollback_under_load(app_url, registry, admin_headers, sample_requests,
                                          tmp_path):
    v_old = served_version(app_url)
    v_new = registry.register(variant(tmp_path, "candidate"), description="test candidate")
    with Load(app_url, sample_requests["b64"][0]) as load:
        time.sleep(1.0)
        registry.set_alias("production", v_new)
        r = httpx.post(app_url + "/model/reload", headers=admin_headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["alias_version"] == v_new
        switch_s = load.wait_version(v_new, timeout_s=15)
        # Rollback through the poll alone (shipped poll interval: 10 s).
        assert registry.rollback("production") == v_old
        poll_s = load.wait_version(v_old, timeout_s=10 + 15)
        time.sleep(0.5)
    assert not load.failures(), f"failed requests: {load.failures()[:5]} {load.errors}"
    versions = {v for _, _, v in load.results}
    assert versions == {v_old, v_new}
    print(f"requests {len(load.results)}, switch after reload {switch_s:.1f} s, "
          f"rollback by poll {poll_s:.1f} s")


@pytest.mark.parametrize("kind", ["nan_outputs", "wrong_signature"])
def test_broken_candidate_is_refused(app_url, registry, admin_headers, sample_requests,
                                     tmp_path, kind):
    v_old = served_version(app_url)
    path = variant(tmp_path, kind, nan=kind == "nan_outputs",
                   spec="rss-v0" if kind == "wrong_signature" else None)
    v_bad = registry.register(path, description=f"broken: {kind}")
    try:
        with Load(app_url, sample_requests["b64"][1], workers=2) as load:
            registry.set_alias("production", v_bad)
            r = httpx.post(app_url + "/model/reload", headers=admin_headers, timeout=60)
            assert r.status_code == 200
            assert r.json()["outcome"] == "refused"
            time.sleep(2.0)
        assert not load.failures()
        assert {v for _, _, v in load.results} == {v_old}
        info = httpx.get(app_url + "/model/info", timeout=30).json()
        assert info["model"]["version"] == v_old
        assert info["last_refusal"]["version"] == v_bad
        expected = "non-finite" if kind == "nan_outputs" else "feature_spec_version"
        assert expected in info["last_refusal"]["reason"]
        assert info["reloads"]["refused"] >= 1
    finally:
        registry.set_alias("production", v_old)
        httpx.post(app_url + "/model/reload", headers=admin_headers, timeout=60)


def test_pinned_versions(app_url, registry, sample_requests, tmp_path, admin_headers):
    v_alias = served_version(app_url)
    v_pin = registry.register(variant(tmp_path, "pinned"), description="pinned")
    body = {**sample_requests["b64"][2], "cache": False}
    # A version the alias never named is not open to pinning: the admin token may pin it.
    r = httpx.post(app_url + "/predict", json={**body, "model_version": v_pin}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["field"] == "model_version"
    r = httpx.post(app_url + "/predict", json={**body, "model_version": v_pin}, timeout=60,
                   headers=admin_headers)
    assert r.status_code == 200 and r.json()["model"]["version"] == v_pin
    r = httpx.post(app_url + "/predict", json=body, timeout=60,
                   headers={"serve_multiplexed_model_id": v_pin, **admin_headers})
    assert r.status_code == 200 and r.json()["model"]["version"] == v_pin
    r = httpx.post(app_url + "/predict", json=body, timeout=60)
    assert r.json()["model"]["version"] == v_alias
    r = httpx.post(app_url + "/predict", json={**body, "model_version": "999"}, timeout=60,
                   headers=admin_headers)
    assert r.status_code == 404 and r.json()["error"]["field"] == "model_version"
    assert r.json()["error"]["message"] == "model 'localization_model' has no version 999"


def test_cold_start_without_registry_fails_fast(tmp_path):
    port = free_port()  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "RFLOC_STATE_DIR": str(tmp_path)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "serve_app.cli", "serve"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "cannot start" in p.stderr and f"127.0.0.1:{port}" in p.stderr
    assert time.monotonic() - t0 < 60


def test_registry_unreachable_during_reload(app_url, admin_headers, sample_requests, tmp_path):
    """A second app on an MLflow server we stop: it keeps serving and reports degraded."""
    from tests.conftest import deploy_config, shipped_config

    server = MlflowServer(free_port(), tmp_path)
    try:
        server.start(timeout_s=120)
        # Keep the session's app: deploy both applications together. The second one's
        # runtime_env reaches its build task and replicas.
        deploy_config(with_second_app(
            shipped_config(int(app_url.rsplit(":", 1)[1])), "remote", "/remote",
            {"MLFLOW_TRACKING_URI": server.url, "RFLOC_STATE_DIR": str(tmp_path / "state")}))
        url = app_url + "/remote"
        wait_http(url + "/health", timeout_s=240)
        body = {**sample_requests["b64"][3], "cache": False}
        assert httpx.post(url + "/predict", json=body, timeout=60).status_code == 200

        server.stop()
        r = httpx.post(url + "/model/reload", headers=admin_headers, timeout=60)
        assert r.status_code == 503 and "registry unreachable" in r.json()["error"]["message"]
        for _ in range(5):
            assert httpx.post(url + "/predict", json=body, timeout=60).status_code == 200
        # A version not loaded yet needs the registry: 503 with its own message, no traceback.
        r = httpx.post(url + "/predict", json={**body, "model_version": "7"}, timeout=90,
                       headers=admin_headers)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert "Traceback" not in r.text and "pid=" not in r.text, r.text
        print(f"\npinned while the registry is down: {r.status_code} {r.json()}")
        health = httpx.get(url + "/health", timeout=30).json()
        assert health["status"] == "degraded" and health["registry"] == "degraded"
        assert health["model"]["version"]
    finally:
        server.stop()
        deploy_config(shipped_config(int(app_url.rsplit(":", 1)[1])))


def test_challenger_shadows_requests_off_the_response_path(app_url, registry, sample_requests,
                                                           tmp_path):
    from tests.conftest import deploy_config, shipped_config

    v_champion = served_version(app_url)
    v_challenger = registry.register(variant(tmp_path, "challenger"), description="challenger")
    registry.set_alias("challenger", v_challenger)
    port = int(app_url.rsplit(":", 1)[1])
    cfg = shipped_config(port)
    ingress = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"] = {**ingress["user_config"], "challenger_alias": "challenger",
                              "challenger_fraction": 1.0}
    deploy_config(cfg)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = httpx.get(app_url + "/model/info", timeout=30).json()
            if info["challenger"]["version"] == v_challenger:
                break
            time.sleep(0.5)
        assert info["challenger"]["version"] == v_challenger
        for body in sample_requests["b64"][:4]:
            r = httpx.post(app_url + "/predict", json={**body, "cache": False}, timeout=60)
            assert r.status_code == 200 and r.json()["model"]["version"] == v_champion
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = httpx.get(app_url + "/model/info", timeout=30).json()["challenger"]
            if info["runs"]["ok"] >= 4:
                break
            time.sleep(0.5)
        assert info["runs"]["ok"] >= 4 and info["runs"]["error"] == 0, info
        # Same weights, other file: the challenger agrees with the champion to the metre.
        assert info["last_distances_km"] and max(info["last_distances_km"]) < 1e-3
    finally:
        deploy_config(shipped_config(port))


def test_cache_identity_follows_the_served_file(app_url, registry, admin_headers,
                                                sample_requests, tmp_path):
    """An answer cached for one model file is never served for another, same version or not."""
    # A level never used before: fresh keys even in a Redis that outlived earlier runs.
    level = round(random.uniform(0.80, 0.99), 6)
    body = {**sample_requests["b64"][6], "confidence_level": level, "cache": True}
    first = httpx.post(app_url + "/predict", json=body, timeout=60).json()
    again = httpx.post(app_url + "/predict", json=body, timeout=60).json()
    assert (first["cache_hit"], again["cache_hit"]) == (False, True)
    assert again["model"]["sha256"] == first["model"]["sha256"]
    v_old = served_version(app_url)
    v_new = registry.register(variant(tmp_path, "cache-identity"), description="cache test")
    registry.set_alias("production", v_new)
    try:
        assert httpx.post(app_url + "/model/reload", headers=admin_headers,
                          timeout=60).status_code == 200
        after = httpx.post(app_url + "/predict", json=body, timeout=60).json()
        assert after["cache_hit"] is False and after["model"]["version"] == v_new
        assert after["model"]["sha256"] != first["model"]["sha256"]
    finally:
        registry.set_alias("production", v_old)
        httpx.post(app_url + "/model/reload", headers=admin_headers, timeout=60)
