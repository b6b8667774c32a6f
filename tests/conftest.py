"""Shared fixtures: the receiver network, simulated payloads, and one real Ray cluster.

Tiers: plain unit tests use no Ray; `local_serve` runs deployments in Serve's local testing
mode; tests marked `ray` share one local Ray cluster per session with the shipped serve
config deployed on a loopback port.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from load.faults import deploy as deploy_config  # a config dict, as `serve deploy` does
from load.faults import free_port, wait_http  # noqa: F401 - shared with the tests

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "configs" / "serve_config.yaml"
RAYSERVICE = REPO / "configs" / "kuberay" / "rayservice.yaml"
ADMIN_TOKEN = "test-admin-token-0123456789"
REDIS_TEST_URL = "redis://127.0.0.1:6379/3"
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"  # unit tests: their own key prefixes


def pytest_configure(config: pytest.Config) -> None:
    # Ray reads this when it is imported: keep every test cluster on 127.0.0.1.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def network():
    from serve_app.receivers import load_network

    return load_network()


@pytest.fixture(scope="session")
def sample_requests():
    """Eight simulated standard captures per form, shared with load/."""
    from serve_app.samples import make_samples

    return {form: make_samples(8, seed=11, form=form).requests
            for form in ("b64", "pairs", "int16")}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the session (3 logical CPUs, loopback only)."""
    import ray

    state = tmp_path_factory.mktemp("rfloc-state")
    # Serve's default proxy here, not rfloc serve's HAProxy/direct-ingress mode: that mode
    # takes fixed ports (replica HTTP from 30000, HAProxy stats 8404), which a second cluster
    # on the machine (the quickstart and two-node tests start their own) would share.
    env = {"RFLOC_STATE_DIR": str(state), "RFLOC_ADMIN_TOKEN": ADMIN_TOKEN,
           "REDIS_URL": REDIS_TEST_URL}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the raylet and so by every replica
    metrics_export_port = free_port()  # Prometheus scrapes the node's metrics here
    # 3 logical CPUs on the 2 cores: the shipped app holds 1.1 of them, and a batch job
    # beside it needs 1 free for Ray Data's file listing plus its actors.
    ray.init(address="local", num_cpus=3, include_dashboard=False, namespace="serve",
             logging_level="warning", log_to_driver=False,
             _metrics_export_port=metrics_export_port)
    try:
        yield {"state_dir": state, "metrics_export_port": metrics_export_port}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shipped_config(port: int, grpc_port: int | None = None) -> dict:
    """The shipped serve config with its HTTP port moved, and its gRPC port (9000) too."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    cfg["http_options"]["port"] = port
    cfg["grpc_options"]["port"] = grpc_port or free_port()
    return cfg


def cluster_config(port: int, cpu_scale: float = 0.5, one_node: bool = True) -> dict:
    """The KubeRay manifest's serve config (two replicas of each deployment, HTTP on every
    interface) on `port`, its CPU shares scaled to fit this machine; with `one_node`
    without `max_replicas_per_node`, so that one node holds both replicas of each."""
    docs = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    [service] = [d for d in docs if d["kind"] == "RayService"]
    cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    cfg["http_options"]["port"] = port
    cfg["grpc_options"]["port"] = free_port()
    for d in cfg["applications"][0]["deployments"]:
        if one_node:
            d.pop("max_replicas_per_node", None)
        opts = d.setdefault("ray_actor_options", {})
        opts["num_cpus"] = round(opts.get("num_cpus", 1) * cpu_scale, 3)
    return cfg


@pytest.fixture(scope="session")
def app_url(ray_cluster):
    """Base URL of the shipped config running on the session's cluster."""
    port = free_port()
    cfg = shipped_config(port)
    deploy_config(cfg)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    yield url


@pytest.fixture(scope="session")
def app_grpc(app_url) -> str:
    """host:port of the session's gRPC proxy (the first serve config's port: Serve keeps it)."""
    import ray
    from ray.serve.context import _get_global_client

    config = ray.get(_get_global_client()._controller.get_grpc_config.remote())
    assert config.grpc_servicer_functions, "Serve started without the shipped grpc_options"
    return f"127.0.0.1:{config.port}"


@pytest.fixture
def shared_redis():
    """A client to the machine's Redis (SHARED_REDIS_URL) and a list of keys to delete after."""
    import redis

    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {SHARED_REDIS_URL}: {exc}")
    keys: list[str] = []
    yield client, keys
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
