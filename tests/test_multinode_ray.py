"""`serve deploy` of the shipped config onto a two-node cluster; losing the worker node."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from load.harness import TwoNodeCluster
from tests.conftest import ADMIN_TOKEN, free_port, shipped_config, wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    c = TwoNodeCluster(tmp, {"RFLOC_STATE_DIR": str(tmp / "state"),
                             "RFLOC_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        c.start()
        port = free_port()
        cfg_path = tmp / "serve_config.yaml"
        cfg_path.write_text(yaml.safe_dump(shipped_config(port)))
        p = c.serve("deploy", str(cfg_path))
        assert p.returncode == 0, p.stderr[-2000:]
        c.url = f"http://127.0.0.1:{port}"
        wait_http(c.url + "/health", timeout_s=300)
        yield c
    finally:
        c.stop()


def test_replicas_on_both_nodes_and_serving(cluster, sample_requests):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
        if {r["node_ip"] for r in running} == {cluster.head_ip, cluster.worker_ip}:
            break
        time.sleep(2)
    assert {r["node_ip"] for r in running} == {cluster.head_ip, cluster.worker_ip}, running
    for body in sample_requests["b64"][:4]:
        r = httpx.post(cluster.url + "/predict", json={**body, "cache": False}, timeout=60)
        assert r.status_code == 200, r.text
    p = cluster.serve("status")
    assert p.returncode == 0 and "RUNNING" in p.stdout


def test_batch_job_on_both_nodes(cluster, network, tmp_path):
    """`rfloc batch` onto the cluster: actors on both nodes, the in-process answers."""
    from serve_app.capture_parquet import write_capture_dataset
    from tests.test_batch_offline import N_CAPTURES, assert_matches_reference

    captures, out = tmp_path / "captures", tmp_path / "predictions"
    write_capture_dataset(captures, N_CAPTURES, seed=5, shards=3, max_missing=3)
    env = {**cluster.env, "RAY_ADDRESS": f"{cluster.head_ip}:{cluster.gcs_port}"}
    p = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "batch", str(captures), str(out),
         "--min-actors", "2", "--max-actors", "2", "--num-cpus", "0.2", "--batch-size", "8",
         "--no-progress", "--json-summary"],
        env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary["actors_by_node"]) == {cluster.head_ip, cluster.worker_ip}, summary
    assert summary["captures"] == N_CAPTURES
    assert_matches_reference(out, captures, network)


def test_worker_node_lost_under_load(cluster, sample_requests):
    """The worker goes down hard; the service recovers on the head node."""
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30.0) as c:
            while not stop.is_set():
                try:
                    code = c.post(cluster.url + "/predict",
                                  json={**sample_requests["b64"][0], "cache": False}).status_code
                except httpx.HTTPError:
                    code = -1
                results.append((time.monotonic(), code))
                time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    t_kill = time.monotonic()
    cluster.stop_worker()
    recovered_at = None
    deadline = t_kill + 240
    while time.monotonic() < deadline:
        recent = [code for t, code in results[-10:] if t > t_kill]
        if len(recent) >= 10 and all(code == 200 for code in recent):
            recovered_at = next(t for t, code in reversed(results) if code != 200) \
                if any(code != 200 for t, code in results if t > t_kill) else t_kill
            break
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    failed = [code for t, code in results if t > t_kill and code != 200]
    sent = len([1 for t, _ in results if t > t_kill])
    recovery_s = (recovered_at - t_kill) if recovered_at else None
    print(f"worker node lost: {sent} requests after the kill, {len(failed)} failed "
          f"({sorted(set(failed))}), recovered after {recovery_s} s")
    assert recovered_at is not None, f"no recovery: {failed[-10:]}"
    running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
    assert running and {r["node_ip"] for r in running} == {cluster.head_ip}
