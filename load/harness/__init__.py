"""What the marked tests and the load scripts both need: deploying a serve config, free ports
and waiting for HTTP, Serve's replicas and processes, server processes of our own, the
two-node cluster; the fault scenarios (`faults`) and hostile input (`hostile`) as modules.

tests/ import load/ only through this package; nothing here imports tests/.
"""

from .deploy import (
    SHIPPED_CONFIG,
    cluster_config,
    deploy,
    grpc_options,
    shipped_config,
    with_second_app,
)
from .http1 import Connection
from .multinode import TwoNodeCluster
from .net import TEST_HOSTS, check_target, free_port, wait_http
from .procs import children_named, cpu_s, descendants, pids_matching, rss_mb
from .replicas import (
    SERVE_NAMESPACE,
    deployment_ready,
    proxy_pids,
    replica_names,
    replica_pid,
    wait_replaced,
)
from .servers import MlflowServer, RedisServer

__all__ = [
    "SERVE_NAMESPACE", "SHIPPED_CONFIG", "TEST_HOSTS", "Connection", "MlflowServer",
    "RedisServer", "TwoNodeCluster", "check_target", "children_named", "cluster_config",
    "cpu_s", "deploy",
    "deployment_ready", "descendants", "free_port", "grpc_options", "pids_matching",
    "proxy_pids", "replica_names", "replica_pid", "rss_mb", "shipped_config", "wait_http",
    "wait_replaced", "with_second_app",
]
