"""`rfloc serve` with its defaults: every socket it listens on, and who can reach it.

Binds fixed ports (8000, HAProxy's 8404 and 9101, replica ports from 30000): run it under
the machine's fixed-ports lock, e.g.
    flock /tmp/rfloc-fixed-ports.lock python -m pytest tests/test_listeners_ray.py -q
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from load.harness import descendants
from serve_app.listeners import DEFAULT_METRICS_PORT, DEFAULT_STATS_PORT
from tests.conftest import wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HTTP_PORT = 8000  # the shipped config's
GRPC_PORT = 9000  # the shipped config's grpc_options.port (HAProxy binds it on the HTTP host)
_USER = re.compile(r'\("([^"]+)",pid=(\d+),')
LOOPBACK = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")
WILDCARD = ("*", "0.0.0.0", "[::]")
GRPC_FALLBACK_PORT = 9500  # Serve's RAY_SERVE_FALLBACK_PROXY_GRPC_PORT
GRPC_DIRECT_PORTS = (40000, 41000)  # RAY_SERVE_DIRECT_INGRESS_MIN/MAX_GRPC_PORT


def listeners(pids: set[int]) -> list[tuple[str, int, str, int]]:
    """(address, port, process name, pid) of every listening TCP socket of `pids`."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        addr, _, port = cols[3].rpartition(":")
        for name, pid in _USER.findall(line):
            if int(pid) in pids:
                found.append((addr, int(port), name, int(pid)))
    return found


def external_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except OSError:
        return True


def haproxy_config(root: int) -> Path:
    """The config file of a running HAProxy of the process tree (a reload replaces it)."""
    for pid in sorted(descendants({root})):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "haproxy":
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                return Path(argv[argv.index(b"-f") + 1].decode())
    raise AssertionError("no HAProxy process under rfloc serve")


def unauthenticated_call(host: str, port: int) -> str:
    """The status of a replica gRPC call that carries no Ray token."""
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def test_rfloc_serve_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RFLOC_", "REDIS_URL", "MLFLOW_", "RAY_ADDRESS", "RAY_AUTH",
                                "RAY_SERVE_"))}
    env["RFLOC_STATE_DIR"] = str(tmp_path / "state")
    token = tmp_path / "ray" / "auth_token"  # not the machine's ~/.ray/auth_token
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    rfloc = shutil.which("rfloc") or "rfloc"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([rfloc, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{HTTP_PORT}/health", timeout_s=300)
        tree = descendants({proc.pid})
        socks = listeners(tree)
        names = {pid: name for _, _, name, pid in socks}
        exposed = [s for s in socks if s[0] not in LOOPBACK]
        replicas = {pid for pid, name in names.items() if name.startswith("ray::ServeRepli")}
        assert all(a in WILDCARD for a, *_ in exposed), exposed
        # gRPC servers that Ray 2.60 binds to "[::]" with no setting (docs/operations.md
        # "Ports"): the Open Inference Protocol's gRPC front doors, which answer without
        # Ray's token (the Ingress replica's direct-ingress port in 40000-41000, HAProxy's
        # backend for 9000; the fallback proxy's 9500) ...
        status = {port: unauthenticated_call("127.0.0.1", port) for _, port, _, _ in exposed}
        front = [s for s in exposed if status[s[1]] != "UNAUTHENTICATED"]
        lo, hi = GRPC_DIRECT_PORTS
        assert sorted((n, p == GRPC_FALLBACK_PORT or lo <= p < hi) for _, p, n, _ in front) \
            == [("ray::ProxyActor", True), ("ray::ServeRepli", True)], exposed
        # ... and every replica's inter-deployment gRPC server, guarded by the cluster token.
        internal = [s for s in exposed if s not in front]
        assert all(n.startswith("ray::ServeRepli") for _, _, n, _ in internal), internal
        assert sorted(pid for *_, pid in internal) == sorted(replicas)
        assert len(replicas) >= 4  # Ingress, Preprocessor, LocalizationModel, Postprocessor
        bound = {(a, p) for a, p, _, _ in socks}
        print("\nlisteners of rfloc serve:")
        for a, p, n, pid in sorted(socks, key=lambda s: (s[0] in LOOPBACK, s[2], s[1])):
            print(f"  {a}:{p}  {n} (pid {pid})")
        for port in (HTTP_PORT, GRPC_PORT, DEFAULT_STATS_PORT, DEFAULT_METRICS_PORT, 8265):
            assert ("127.0.0.1", port) in bound, (port, sorted(bound))
        # The side ports still work where they are.
        assert httpx.get(f"http://127.0.0.1:{DEFAULT_STATS_PORT}/stats", timeout=10) \
            .status_code == 200
        assert "haproxy_" in httpx.get(f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics",
                                       timeout=10).text
        ext = external_address()
        if ext is not None:  # from outside: only the gRPC ports above answer
            for port in (HTTP_PORT, GRPC_PORT, DEFAULT_STATS_PORT, DEFAULT_METRICS_PORT, 8265):
                assert refused(ext, port), f"{ext}:{port} answers"
        # Those answer, but not without the cluster's token, from outside either.
        for _, port, _, _ in internal:
            assert unauthenticated_call(ext or "127.0.0.1", port) == "UNAUTHENTICATED", port
        # Ray's token: private to the user.
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # HAProxy's config and admin socket (mode 666, level admin) sit in a 0700 directory.
        config = haproxy_config(proc.pid)
        runtime = config.parent.parent  # Ray adds a per-node directory
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700, runtime
        assert not str(config).startswith("/tmp/haproxy-serve/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for pid in descendants({proc.pid}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not runtime.exists()  # removed on the way out
