"""`serve deploy` onto a two-node cluster as the KubeRay manifest runs it; losing the worker.

HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` on both
nodes) and the manifest's serve config: two replicas of each deployment, one per node, and
`http_options.host: 0.0.0.0`. In that mode HAProxy on each node sends requests straight to
the Ingress replicas' own HTTP servers (ports from 30000), on other nodes at their node
address; a replica binds `http_options.host`, so with 127.0.0.1 the head's HAProxy could
not reach the worker's Ingress. Binds fixed ports (HAProxy's 8404 and 9101, replica ports):
run it under the machine's fixed-ports lock, e.g.
    flock /tmp/rfloc-fixed-ports.lock python -m pytest tests/test_multinode_ray.py -q
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from load.harness import TwoNodeCluster, cluster_config
from serve_app.cli import HAPROXY_REPLAY_ENV, LOOPBACK_ENV
from serve_app.listeners import DEFAULT_STATS_PORT, haproxy_env, private_runtime_dir
from tests.conftest import ADMIN_TOKEN, free_port, wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    runtime = private_runtime_dir()  # HAProxy's files; its side ports on each node's loopback
    env = {"RFLOC_STATE_DIR": str(tmp / "state"), "RFLOC_ADMIN_TOKEN": ADMIN_TOKEN,
           **LOOPBACK_ENV, **HAPROXY_REPLAY_ENV}
    env.update(haproxy_env(runtime, {**os.environ, **env}))
    c = TwoNodeCluster(tmp, env)
    try:
        c.start()
        port = free_port()
        cfg_path = tmp / "serve_config.yaml"
        # The manifest's CPU shares halved: one node of 2 CPUs and one of 1 here.
        cfg_path.write_text(yaml.safe_dump(cluster_config(port, cpu_scale=0.5,
                                                          one_node=False)))
        p = c.serve("deploy", str(cfg_path))
        assert p.returncode == 0, p.stderr[-2000:]
        c.url = f"http://127.0.0.1:{port}"
        wait_http(c.url + "/health", timeout_s=300)
        yield c
    finally:
        c.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_replicas_on_both_nodes_and_serving(cluster, sample_requests):
    both = {cluster.head_ip, cluster.worker_ip}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
        if {r["node_ip"] for r in running if r["deployment"] == "Ingress"} == both:
            break
        time.sleep(2)
    assert {r["node_ip"] for r in running if r["deployment"] == "Ingress"} == both, running
    assert {r["node_ip"] for r in running} == both, running
    while len(ingress_sessions(up_only=True)) < 2:  # HAProxy reloads, then checks them
        assert time.monotonic() < deadline, ingress_sessions()
        time.sleep(1)
    # The head's HAProxy has both Ingress replicas UP: its health checks reach the worker's
    # replica at the worker's node address (with http_options.host 127.0.0.1 they could not).
    nodes = ingress_nodes(cluster)
    up = {next((ip for rid, ip in nodes.items() if server.endswith("-" + rid)), server)
          for server in ingress_sessions(up_only=True)}
    assert up == both, (up, nodes)
    for body in sample_requests["b64"][:20]:
        r = httpx.post(cluster.url + "/predict", json={**body, "cache": False}, timeout=60)
        assert r.status_code == 200, r.text
    p = cluster.serve("status")
    assert p.returncode == 0 and "RUNNING" in p.stdout


def ingress_sessions(up_only: bool = False) -> dict[str, int]:
    """The head's HAProxy's Ingress servers (`SERVE_REPLICA_<app>-Ingress-<replica id>`)
    and their session counts, from its stats CSV on the head's loopback; the fallback
    server (the head's Serve proxy) left out."""
    text = httpx.get(f"http://127.0.0.1:{DEFAULT_STATS_PORT}/stats;csv", timeout=10).text
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {r["svname"]: int(r["stot"] or 0) for r in rows
            if r["svname"].startswith("SERVE_REPLICA_") and "-Ingress-" in r["svname"]
            and (r["status"] == "UP" or not up_only)}


def ingress_nodes(cluster: TwoNodeCluster) -> dict[str, str]:
    """Node address of each Ingress replica, by its replica id (the dashboard's Serve API)."""
    r = httpx.get(cluster.dashboard + "/api/serve/applications/", headers=cluster.headers(),
                  timeout=30)
    r.raise_for_status()
    return {rep["replica_id"]: rep.get("node_ip")
            for app in r.json()["applications"].values()
            for name, dep in app["deployments"].items() if name == "Ingress"
            for rep in dep["replicas"]}


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
    # With two replicas of each deployment the service answers again before Serve has
    # noticed the node is gone; then the replicas of the worker stop counting as running.
    deadline = time.monotonic() + 180
    while True:
        running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
        if running and {r["node_ip"] for r in running} == {cluster.head_ip}:
            break
        assert time.monotonic() < deadline, running
        time.sleep(2)
    assert {r["deployment"] for r in running} == {"Ingress", "Preprocessor",
                                                   "LocalizationModel", "Postprocessor"}
