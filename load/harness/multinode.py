"""A two-node Ray cluster on this machine: the worker is a test host in its own netns.

The head runs in the root network namespace on one end of a veth pair, the worker in a
namespace of its own on the other end, each with an explicit --node-ip-address. Every
process is found and stopped by PID (never `ray stop`, which would stop every Ray on the
machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from .net import free_port
from .procs import descendants, pids_matching


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=120)


class TwoNodeCluster:
    """Head on 10.213.<n>.1 (root netns), worker on 10.213.<n>.2 (its own netns)."""

    def __init__(self, tmp: Path, env: dict[str, str], *, head_cpus: int = 2,
                 worker_cpus: int = 1, head_cores: str | None = None,
                 worker_cores: str | None = None) -> None:
        """`*_cpus` are the nodes' logical CPUs; `*_cores` pin a node's processes (taskset)."""
        n = os.getpid() % 200 + 20
        self.ns = f"rfloc-w{os.getpid()}"
        self.veth_head, self.veth_worker = f"rfh{os.getpid()}", f"rfw{os.getpid()}"
        self.head_ip, self.worker_ip = f"10.213.{n}.1", f"10.213.{n}.2"
        # Short: Ray's unix socket paths live under it (108-byte limit). It also marks every
        # daemon of this cluster in its command line.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rfmn", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # explicit node IPs here
        self.ray = shutil.which("ray") or "ray"
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self._pin = {"head": ["taskset", "-c", head_cores] if head_cores else [],
                     "worker": ["taskset", "-c", worker_cores] if worker_cores else []}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, worker: bool = True) -> None:
        """Both nodes (or the head alone), then wait for the head's dashboard."""
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.veth_head, "type", "veth", "peer", "name", self.veth_worker)
        _run("ip", "link", "set", self.veth_worker, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.veth_head)
        _run("ip", "link", "set", self.veth_head, "up")
        for cmd in (("ip", "addr", "add", f"{self.worker_ip}/24", "dev", self.veth_worker),
                    ("ip", "link", "set", self.veth_worker, "up"),
                    ("ip", "link", "set", "lo", "up")):
            _run("ip", "netns", "exec", self.ns, *cmd)
        # Token auth on; the token is generated once and shared by both nodes (same file).
        subprocess.run([self.ray, "get-auth-token", "--generate"], env=self.env,
                       capture_output=True, timeout=60)
        p = subprocess.run(
            [*self._pin["head"], self.ray, "start", "--head",
             f"--node-ip-address={self.head_ip}", f"--port={self.gcs_port}",
             f"--num-cpus={self.head_cpus}", f"--temp-dir={self.temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        if p.returncode:
            raise RuntimeError(f"ray start --head failed: {p.stderr[-3000:]}")
        if worker:
            self.start_worker()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.dashboard + "/api/version", headers=self.headers(),
                             timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("the head's dashboard did not come up")

    def start_worker(self) -> None:
        p = subprocess.run(
            ["ip", "netns", "exec", self.ns, *self._pin["worker"], self.ray, "start",
             f"--address={self.head_ip}:{self.gcs_port}", f"--node-ip-address={self.worker_ip}",
             f"--num-cpus={self.worker_cpus}", "--resources", '{"worker_node": 1}',
             "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        if p.returncode:
            raise RuntimeError(f"ray start (worker) failed: {p.stderr[-3000:]}")

    def serve(self, *args: str) -> subprocess.CompletedProcess:
        """Run the `serve` CLI against the head's dashboard."""
        return subprocess.run([shutil.which("serve") or "serve", *args,
                               "--address", self.dashboard], env=self.env,
                              capture_output=True, text=True, timeout=300)

    def headers(self) -> dict[str, str]:
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def replicas(self) -> list[dict]:
        """(deployment, node_ip, state) of every replica, from the dashboard's Serve API."""
        r = httpx.get(self.dashboard + "/api/serve/applications/", headers=self.headers(),
                      timeout=30)
        r.raise_for_status()
        out = []
        for app in r.json()["applications"].values():
            for name, dep in app["deployments"].items():
                for rep in dep["replicas"]:
                    out.append({"deployment": name, "node_ip": rep.get("node_ip"),
                                "state": rep["state"]})
        return out

    def worker_pids(self) -> set[int]:
        return descendants(pids_matching(f"--node_ip_address={self.worker_ip}")
                         | pids_matching(f"--node-ip-address={self.worker_ip}"))

    def head_pids(self) -> set[int]:
        return descendants(pids_matching(str(self.temp_dir))) - self.worker_pids()

    def stop_worker(self) -> None:
        """Take the worker node down hard, as a failed machine would go."""
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        pids = descendants(pids_matching(str(self.temp_dir))) | self.worker_pids()
        # The head's Ray client server names neither the temp dir nor a node IP flag.
        pids |= descendants(pids_matching(f"--address={self.head_ip}:{self.gcs_port}"))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(3)
        _run("ip", "link", "del", self.veth_head, check=False)
        _run("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
