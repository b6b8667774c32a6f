"""Start one peer (P of DESIGN.md "Performance") in the foreground on 127.0.0.1:PORT.

    python load/peers/run.py mlserver --port 8200
    python load/peers/run.py bentoml --port 8300 --set max_latency_ms=5000
    python load/peers/run.py mlserver --prepare      # only create its virtualenv

Each peer runs from its own virtualenv, created on first use under $RFLOC_PEERS_DIR (default
~/.cache/rfloc/peers/NAME) from load/peers/requirements-NAME.txt, and made anew when that
file's pins change. The project is not installed there: the server runs with this checkout and
load/peers on PYTHONPATH, so one virtualenv serves every checkout. Both peers answer
N's `POST /predict` and `POST /predict/batch` bodies (load/peers/peer_core.py).
Ctrl-C or SIGTERM stops the server and every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PR_SET_CHILD_SUBREAPER = 36  # prctl(2), Linux


@dataclass(frozen=True)
class Peer:
    """A peer server: its settings (what `--set` may change) and its readiness path."""

    name: str
    settings: dict[str, str]
    health: str
    doc: dict[str, str] = field(default_factory=dict)  # setting -> what it is

    @property
    def requirements(self) -> Path:
        return HERE / f"requirements-{self.name}.txt"


PEERS = {
    "mlserver": Peer(
        "mlserver",
        {"parallel_workers": "0", "max_batch_size": "32", "max_batch_time": "0.005",
         "batch_bodies": "direct"},
        "/v2/models/localization_model/ready",
        {"parallel_workers": "MLServer's inference worker processes (0: in the server "
                             "process)",
         "max_batch_size": "adaptive batching: requests per batch",
         "max_batch_time": "adaptive batching: seconds to wait for a batch to fill",
         "batch_bodies": "batched: /predict/batch bodies go through the adaptive batching "
                         "too; direct: each runs on its own"}),
    "bentoml": Peer(
        "bentoml",
        {"workers": "1", "threads": "1", "max_batch_size": "32", "max_latency_ms": "10000",
         "async": "1", "batch_bodies": "direct"},
        "/readyz",
        {"workers": "service processes", "threads": "threads running the batched method",
         "max_batch_size": "adaptive batching: bodies per batch",
         "max_latency_ms": "adaptive batching: latency bound before a request is refused",
         "async": "1: the batched method runs on the event loop, not in a thread",
         "batch_bodies": "batched: /predict/batch is a batchable API too; direct: each "
                         "batch body runs on its own"}),
}


def venv_dir(name: str) -> Path:
    """Where the peer's virtualenv lives (outside the repository)."""
    root = os.environ.get("RFLOC_PEERS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "rfloc" / "peers"
    return base / name


def _stamp(peer: Peer) -> str:
    """What the virtualenv was made from: the pinned requirements and the interpreter."""
    pins = [ln.strip() for ln in peer.requirements.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    h = hashlib.sha256("\n".join(pins).encode())
    h.update(f"{sys.version_info[:3]}".encode())
    return h.hexdigest()


def prepare(peer: Peer, quiet: bool = False) -> Path:
    """The peer's virtualenv, created (or made anew) if it is missing or stale."""
    venv = venv_dir(peer.name)
    stamp_file = venv / ".rfloc-stamp"
    stamp = _stamp(peer)
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return venv
    t0 = time.monotonic()
    print(f"run.py: creating the {peer.name} virtualenv in {venv} (a few minutes)...",
          file=sys.stderr, flush=True)
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(peer.requirements)],
                   check=True, stdout=out)
    stamp_file.write_text(stamp)
    print(f"run.py: {peer.name} virtualenv ready in {time.monotonic() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return venv


def _mlserver(venv: Path, port: int, s: dict[str, str], tmp: Path) -> list[str]:
    """`mlserver start` on a generated model repository; every port but PORT is free."""
    from socket import socket

    def free_port() -> int:
        with socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    (tmp / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "parallel_workers": int(s["parallel_workers"]),
        # Best throughput: no access log (debug), no Prometheus middleware, no gzip.
        "debug": False, "metrics_endpoint": None, "gzip_enabled": False,
        # Its defaults are ./.metrics and ./.envs: nothing in the checkout.
        "metrics_dir": str(tmp / "metrics"), "environments_dir": str(tmp / "envs"),
    }))
    model = tmp / "localization_model"
    model.mkdir()
    (model / "model-settings.json").write_text(json.dumps({
        "name": "localization_model", "implementation": "mlserver_runtime.RflocRuntime",
        "max_batch_size": int(s["max_batch_size"]),
        "max_batch_time": float(s["max_batch_time"]),
        "parameters": {"extra": {"batch_bodies": s["batch_bodies"]}},
    }))
    return [str(venv / "bin" / "mlserver"), "start", str(tmp)]


def _bentoml(venv: Path, port: int, s: dict[str, str], env: dict[str, str],
             tmp: Path) -> list[str]:
    """`bentoml serve` of load/peers/bentoml_service.py; settings through the environment."""
    env.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                "RFLOC_BENTO_WORKERS": s["workers"], "RFLOC_BENTO_THREADS": s["threads"],
                "RFLOC_BENTO_MAX_BATCH": s["max_batch_size"],
                "RFLOC_BENTO_MAX_LATENCY_MS": s["max_latency_ms"],
                "RFLOC_BENTO_ASYNC": s["async"], "RFLOC_BENTO_BATCH_BODIES": s["batch_bodies"]})
    return [str(venv / "bin" / "bentoml"), "serve", "bentoml_service:Localizer",
            "--host", "127.0.0.1", "--port", str(port), "--working-dir", str(HERE)]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def serve(peer: Peer, port: int, settings: dict[str, str], grace_s: float = 30.0) -> int:
    """Run the peer's server until it exits or we are told to stop; the exit code."""
    venv = prepare(peer)
    tmp = Path(tempfile.mkdtemp(prefix=f"rfloc-{peer.name}-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(HERE), str(REPO), os.environ.get("PYTHONPATH")])),
        "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    if peer.name == "mlserver":
        argv = _mlserver(venv, port, settings, tmp)
    else:
        argv = _bentoml(venv, port, settings, env, tmp)
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"run.py: {peer.name} on http://127.0.0.1:{port} ({shown})", file=sys.stderr,
          flush=True)
    # Orphans of the server (a worker whose parent exited first) become our children.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    child = subprocess.Popen(argv, env=env, cwd=HERE)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping and child.poll() is None:
            stopping = True
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            try:
                return child.wait(timeout=0.5 if not stopping else grace_s)
            except subprocess.TimeoutExpired:
                if stopping:  # the grace period is over
                    return -1
    finally:
        # The server's processes that outlived it were handed to us (the subreaper): none
        # is left behind, and none is left a zombie.
        deadline = time.monotonic() + 10
        while (left := descendants(os.getpid())) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """Parse the command line and start the peer."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(PEERS))
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the peer (repeatable): " + "; ".join(
                       f"{n}: " + ", ".join(f"{k} (default {v})"
                                            for k, v in peer.settings.items())
                       for n, peer in PEERS.items()))
    p.add_argument("--prepare", action="store_true", help="only create the virtualenv")
    a = p.parse_args()
    peer = PEERS[a.name]
    if a.prepare:
        print(prepare(peer))
        return 0
    settings = dict(peer.settings)
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep or k not in settings:
            p.error(f"--set {kv}: one of {', '.join(settings)} as KEY=VALUE")
        settings[k] = v
    return serve(peer, a.port, settings)


if __name__ == "__main__":
    sys.exit(main())
