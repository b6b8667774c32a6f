"""Serve configs onto the connected cluster: the shipped config, deployed as a dict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .net import free_port

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve_config.yaml"
RAYSERVICE = SHIPPED_CONFIG.parent / "kuberay" / "rayservice.yaml"


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


def deploy(cfg: dict) -> None:
    """Deploy a serve config dict the way `serve deploy` does (the driver's cluster).

    Serve's cluster-scoped options go through the public `serve.start`. The config itself
    (several apps, each with its `args`, `runtime_env` and per-deployment overrides, built
    on the cluster in a task with that runtime_env) has no public call in Ray 2.60 but
    `serve deploy`, which needs the dashboard (the test clusters run without it);
    `serve.run` takes one Application built in the driver, without an app runtime_env.
    `serve run CONFIG` itself applies a config file with this same controller call.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options=cfg["http_options"], grpc_options=cfg.get("grpc_options"),
                proxy_location=cfg.get("proxy_location"))
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))


def grpc_options() -> Any:
    """The gRPC options Serve's proxies run with: the first deployed config's (Serve keeps
    them). No public call reads them back; the controller is asked as `deploy` applies."""
    import ray
    from ray.serve.context import _get_global_client

    return ray.get(_get_global_client()._controller.get_grpc_config.remote())


def with_second_app(base_cfg: dict, name: str, route_prefix: str, env_vars: dict[str, str],
                    edit: Callable[[dict], None] | None = None) -> dict:
    """`base_cfg` plus a one-replica copy of its first app under `route_prefix`.

    The copy gets `env_vars` added to its runtime_env (its build task and replicas see
    them), tiny CPU shares and no autoscaling, so it fits beside the first app on a small
    cluster.
    """
    import copy

    cfg = copy.deepcopy(base_cfg)
    app = copy.deepcopy(cfg["applications"][0])
    runtime_env = app.get("runtime_env", {})
    app.update(name=name, route_prefix=route_prefix, runtime_env={
        **runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), **env_vars}})
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.01}
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        if edit is not None:
            edit(d)
    cfg["applications"] = [cfg["applications"][0], app]
    return cfg
