"""Serve's replica and proxy actors on the connected cluster, found through the GCS."""

from __future__ import annotations

import os
import time

SERVE_NAMESPACE = "serve"
REPLICA_PREFIX = "SERVE_REPLICA::"


def replica_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of a deployment (from the GCS: no dashboard needed)."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))


def replica_pid(name: str) -> int:
    """PID of a replica actor's process (asked of the actor itself)."""
    import ray

    handle = ray.get_actor(name, namespace=SERVE_NAMESPACE)
    return int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))


def proxy_pids() -> list[int]:
    """PIDs of the Serve HTTP proxy actors."""
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith("SERVE_PROXY_ACTOR"):
            handle = ray.get_actor(a["name"], namespace=SERVE_NAMESPACE)
            out.append(int(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()),
                                   timeout=30)))
    return out


def deployment_ready(app: str, deployment: str) -> bool:
    """The deployment is HEALTHY and every replica Serve knows of is RUNNING."""
    from ray import serve

    try:
        st = serve.status().applications[app].deployments[deployment]
    except KeyError:
        return False
    states = dict(st.replica_states)
    return (str(st.status).endswith("HEALTHY") and not str(st.status).endswith("UNHEALTHY")
            and states.get("RUNNING", 0) >= 1 and sum(states.values()) == states["RUNNING"])


def wait_replaced(app: str, deployment: str, victim: str, before: set[str],
                  timeout_s: float = 180.0) -> float:
    """Monotonic time at which a replica killed from `before` was replaced and all run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = set(replica_names(app, deployment))
        if victim not in names and names - before and deployment_ready(app, deployment):
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"{deployment} replica {victim} not replaced within {timeout_s} s")
