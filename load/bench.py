"""Side-by-side benchmark of L, N, S and P (DESIGN.md "Performance") for the workloads.

  L  the in-process limit: parse + decode + features + ONNX + postprocess + JSON answer,
     vectorized over 64 captures, one Python process, no HTTP
  N  load/naive_app.py under uvicorn (1 worker), started here on a loopback port
  S  the shipped configs/serve_config.yaml under `rfloc serve` (a copy on another port, a
     temporary RFLOC_STATE_DIR, its own local Ray instance), stopped with SIGTERM
  P  the peers: MLServer and BentoML running the same core (load/peers/run.py, each in
     its own virtualenv, created first if missing), one after the other, stopped with SIGTERM

For each: captures/s at saturation (closed loop) and p50/p99 latency at a fixed moderate
rate (open loop, the same rate for N, S and P: --rate-frac of N's and S's lower saturated
rate).
Also: peak RSS (VmHWM) of every Serve replica under the batch workload. Prints a table and
rewrites the section "## L / N / S / P" of docs/performance.md, keeping every other section
(load/batch_bench.py owns "## Offline batch", the offline `rfloc batch` on Ray Data).

    python load/bench.py            # the full run (~8 min on 2 cores)
    python load/bench.py --quick    # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port  # noqa: E402
from httpload import LoadResult, closed_loop, open_loop, run  # noqa: E402
from sysinfo import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
SHIPPED_CONFIG = REPO / "configs" / "serve_config.yaml"
L_PASS_CAPTURES = 64
SUB_PHASES = 3  # saturation: best of 3 (the machine is shared)
BATCH_CAPTURES = 32
PEERS = {"mlserver": "MLServer", "bentoml": "BentoML"}  # P: load/peers/run.py NAME


@dataclass
class Workload:
    """One of the three DESIGN.md workloads."""

    name: str
    path: str
    bodies: list[bytes]
    captures_per_request: int
    concurrency: int
    results: dict[str, dict] = field(default_factory=dict)  # target → figures
    extra: list[str] | None = None  # per body, extra header lines (OIP binary tensors)


def loadavg() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build_workloads(n_single: int, n_pairs: int, n_batches: int, seed: int) -> list[Workload]:
    """Request bodies from the simulator, JSON-encoded once, cache off."""
    from serve_app.samples import make_samples

    b64 = make_samples(max(n_single, n_batches * BATCH_CAPTURES), seed, form="b64").requests
    pairs = make_samples(n_pairs, seed + 1, form="pairs").requests
    chunks = [b64[i * BATCH_CAPTURES:(i + 1) * BATCH_CAPTURES] for i in range(n_batches)]
    batches = [orjson.dumps({"captures": [{**r, "cache": False} for r in c]}) for c in chunks]
    return [
        Workload("single iq_b64", "/predict",
                 [orjson.dumps({**r, "cache": False}) for r in b64[:n_single]], 1, 16),
        Workload("single iq pairs", "/predict",
                 [orjson.dumps({**r, "cache": False}) for r in pairs], 1, 8),
        Workload("batch 32 iq_b64", "/predict/batch", batches, BATCH_CAPTURES, 4),
        oip_workload(make_samples(n_single, seed, form="b64")),
    ]


def oip_workload(samples) -> Workload:  # noqa: ANN001 - serve_app.samples.Samples
    """Single captures as Open Inference Protocol binary tensors (tritonclient's encoding)."""
    import tritonclient.http as httpclient

    from serve_app.receivers import load_network

    ids = load_network().ids
    bodies, extra = [], []
    for i in range(len(samples.requests)):
        present = samples.scenes.present[i]
        rx = np.array([r if p else "" for r, p in zip(ids, present, strict=True)], object)
        iq = np.ascontiguousarray(samples.iq[i].view(np.float32).reshape(len(ids), -1, 2))
        inputs = [httpclient.InferInput("IQ", list(iq.shape), "FP32"),
                  httpclient.InferInput("RECEIVER_IDS", list(rx.shape), "BYTES")]
        inputs[0].set_data_from_numpy(iq)
        inputs[1].set_data_from_numpy(rx)
        body, header = httpclient.InferenceServerClient.generate_request_body(
            inputs, parameters={"cache": False})
        bodies.append(body)
        extra.append(f"Inference-Header-Content-Length: {header}\r\n")
    return Workload("single OIP binary", "/v2/models/localization_model/infer", bodies, 1, 16,
                    extra=extra)


# -- L ----------------------------------------------------------------------------------------

class InProcess:
    """The whole service's work on request bodies, in this process."""

    def __init__(self) -> None:
        from serve_app.model import OnnxLocalizer
        from serve_app.receivers import load_network
        from serve_app.schemas import ModelRef

        self.network = load_network()
        self.model = OnnxLocalizer(REPO / "models" / "localization_model.onnx",
                                   self.network.ids)
        self.ref = ModelRef(name="localization_model", version="local", alias=None)

    def answer(self, bodies: list[bytes], batch: bool) -> list[bytes]:
        """Decode every capture of `bodies`, run them as one vectorized group, encode answers."""
        from serve_app.decode import decode_capture, decode_raw_batch, decode_raw_body
        from serve_app.pipeline import infer, postprocess, preprocess, stack_captures

        reqs = []
        for b in bodies:
            reqs.extend(decode_raw_batch(b) if batch else [decode_raw_body(b)])
        decoded = [decode_capture(r, self.network) for r in reqs]
        group = stack_captures([(d.iq, d.slots) for d in decoded], len(self.network),
                               [r.confidence_level for r in reqs])
        [g] = infer(preprocess([group], self.network), self.model, self.ref)
        postprocess(g, self.network)
        assert g.results is not None
        return [orjson.dumps({**r, "model": self.ref.model_dump(), "timing_ms": g.timing_ms})
                for r in g.results]

    def answer_oip(self, bodies: list[bytes], extra: list[str]) -> list[bytes]:
        """The same for OIP binary bodies: tensors in, each answer's binary tensors out."""
        from serve_app.pipeline import infer, postprocess, preprocess, stack_captures
        from serve_app.protocols import oip
        from serve_app.service import Outcome

        reqs = [oip.parse_rest(b, x.split(":", 1)[1].strip())
                for b, x in zip(bodies, extra, strict=True)]
        caps = [c for r in reqs for c in oip.to_captures(r, self.network)[0]]
        group = stack_captures([(c.decoded.iq, c.decoded.slots) for c in caps],
                               len(self.network), [c.confidence_level for c in caps])
        [g] = infer(preprocess([group], self.network), self.model, self.ref)
        postprocess(g, self.network)
        assert g.results is not None
        model = self.ref.model_dump()
        return [oip.rest_answer("localization_model", "local", req, oip.output_tensors(
                    [Outcome(result={**r, "model": model})], False)).body
                for req, r in zip(reqs, g.results, strict=True)]


def measure_l(w: Workload, core: InProcess, duration_s: float, n_latency: int) -> dict:
    """Captures/s vectorized over L_PASS_CAPTURES captures, and single-request latency."""
    batch = w.captures_per_request > 1
    per_pass = max(1, L_PASS_CAPTURES // w.captures_per_request)
    items = list(range(len(w.bodies)))
    passes = [items[(i * per_pass) % len(items):][:per_pass]
              for i in range(max(1, len(items) // per_pass))]

    def answer(idx: list[int]) -> list[bytes]:
        bodies = [w.bodies[i] for i in idx]
        if w.extra is not None:
            return core.answer_oip(bodies, [w.extra[i] for i in idx])
        return core.answer(bodies, batch)

    answer(passes[0])  # warm-up
    rates, cpu_s, caps = [], 0.0, 0
    for _ in range(SUB_PHASES):
        done, t0, c0, i = 0, time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t0 < duration_s / SUB_PHASES or i == 0:
            done += len(answer(passes[i % len(passes)]))
            i += 1
        rates.append(done / (time.perf_counter() - t0))
        cpu_s += time.process_time() - c0
        caps += done
    rate = max(rates)
    lat = []
    for k in range(n_latency):
        t = time.perf_counter()
        answer([k % len(w.bodies)])
        lat.append(time.perf_counter() - t)
    return {"captures_s": rate, "sub_phases": rates, "cpu_ms_per_capture": 1e3 * cpu_s / caps,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "note": "one request alone"}


# -- servers ----------------------------------------------------------------------------------

def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready within {timeout_s} s")


def stop(proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """SIGTERM the server we started and wait; SIGKILL its own process group as a last resort."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we created for it, nothing else
            proc.wait(10)


class Server:
    """A server process started by the bench on a loopback port."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str],
                 log: Path, health: str = "/health", cleanup: Path | None = None,
                 cwd: Path = REPO) -> None:
        self.name, self.argv, self.port, self.env, self.log = name, argv, port, env, log
        self.cwd = cwd
        self.health = health
        self.cleanup = cleanup  # a directory of ours to remove after the server stopped
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> None:
        """Start it in its own session and wait for readiness."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=self.cwd)
        try:
            wait_ready(f"http://127.0.0.1:{self.port}{self.health}", self.proc, timeout_s)
        except (RuntimeError, TimeoutError):
            tail = self.log.read_text(errors="replace").splitlines()[-40:]
            print(f"--- {self.name} log ({self.log}), last lines:", *tail, sep="\n",
                  file=sys.stderr)
            self.stop()
            raise

    def stop(self) -> None:
        """Stop it (SIGTERM, wait)."""
        if self.proc is not None:
            stop(self.proc)
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)


def start_naive(tmp: Path) -> Server:
    """N: naive_app under uvicorn, one worker."""
    port = free_port()
    srv = Server("N", [sys.executable, str(REPO / "load" / "naive_app.py"), "--port", str(port)],
                 port, dict(os.environ), tmp / "naive.log")
    srv.start(120)
    return srv


def start_serve(tmp: Path, config: Path, extra_env: dict[str, str],
                code: Path | None = None) -> tuple[Server, str]:
    """S: `rfloc serve --config <copy on a free port>`, its own state dir and Ray instance.

    `code`: another checkout whose serve_app/deployments S runs (before/after comparisons).
    """
    port = free_port()
    cfg = yaml.safe_load(config.read_text())
    cfg["http_options"]["port"] = port
    if "grpc_options" in cfg:
        cfg["grpc_options"]["port"] = free_port()
    cfg_path = tmp / "serve_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RFLOC_REDIS_URL")}
    # Short: Serve adds a 64-character directory, and a unix socket path has <= 107 bytes.
    haproxy = Path(tempfile.mkdtemp(prefix="rfh-", dir="/tmp"))
    env.update({"RFLOC_STATE_DIR": str(tmp / "state"),
                "RAY_ADDRESS": "local",  # never attach to someone else's `ray start` cluster
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                # HAProxy's files and its stats/metrics ports default to fixed, machine-wide
                # values: give this instance its own so it cannot collide with another one.
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                **extra_env})
    if code is not None:  # replicas inherit PYTHONPATH, which precedes the editable install
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "serve_app.cli", "serve", "--config", str(cfg_path)]
    srv = Server("S", argv, port, env, tmp / "serve.log", cleanup=haproxy, cwd=code or REPO)
    srv.start(300)
    shown = " ".join(f"{k}={v}" for k, v in extra_env.items())
    where = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    at = f" (code of {code})" if code else ""
    return srv, f"{shown} rfloc serve --config {where}{at}".strip()


def prepare_peer(name: str) -> str | None:
    """Create the peer's virtualenv if missing; None when ready, else why it cannot run."""
    proc = subprocess.run([sys.executable, str(REPO / "load" / "peers" / "run.py"), name,
                           "--prepare"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def start_peer(tmp: Path, name: str, settings: list[str]) -> tuple[Server, str]:
    """P: `python load/peers/run.py NAME --port P [--set K=V ...]`, its virtualenv ready."""
    sys.path.insert(0, str(REPO / "load" / "peers"))
    from run import PEERS as PEER_SPECS  # noqa: PLC0415 - load/peers/run.py

    port = free_port()
    sets = [a for kv in settings for a in ("--set", kv)]
    argv = [sys.executable, str(REPO / "load" / "peers" / "run.py"), name, "--port", str(port),
            *sets]
    srv = Server(PEERS[name], argv, port, dict(os.environ), tmp / f"{name}.log",
                 health=PEER_SPECS[name].health)
    srv.start(300)
    chosen = {**PEER_SPECS[name].settings, **dict(kv.split("=", 1) for kv in settings)}
    return srv, ", ".join(f"{k}={v}" for k, v in chosen.items())


# -- replicas' memory -------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def replicas(root_pid: int) -> dict[int, str]:
    """pid → name of the `ray::ServeReplica…` processes descended from `root_pid` (ours only)."""
    kids, out, todo = _children(), {}, [root_pid]
    while todo:
        pid = todo.pop()
        for c in kids.get(pid, []):
            todo.append(c)
            try:
                cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmd.startswith("ray::ServeReplica") or cmd.startswith("ray::ProxyActor"):
                out[c] = cmd.strip()
    return out


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peaks(pids: dict[int, str]) -> None:
    """Reset VmHWM (write 5 to clear_refs), so the peak covers what follows only."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peaks(pids: dict[int, str]) -> list[dict]:
    """Peak and current RSS of each replica, MiB."""
    rows = []
    for pid, name in sorted(pids.items(), key=lambda x: x[1]):
        hwm, rss = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS")
        if hwm is not None:
            rows.append({"pid": pid, "name": name.replace("ray::", ""),
                         "peak_rss_mib": round(hwm / 1024, 1),
                         "rss_mib": round((rss or 0) / 1024, 1)})
    return rows


# -- HTTP phases ------------------------------------------------------------------------------

def _proc_name(pid: int) -> str:
    """A short name: the Ray actor (``Ingress``, ``ServeController``) or the program."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    if argv[0].startswith("ray::"):
        name = argv[0][5:].split()[0].split(".")[0]
        return name.rsplit(":", 1)[-1] if name.startswith("ServeReplica:") else name
    if argv[0].startswith("ray-dashboard-"):  # renamed dashboard module subprocesses
        return "ray-dashboard modules"
    prog = Path(argv[0]).name
    if prog.startswith("python") and len(argv) > 1:
        if "-c" in argv:
            return f"{prog} -c"
        rest = [a for a in argv[1:] if a and not a.startswith("-")]
        return f"python {Path(rest[0]).name}" if rest else prog
    return prog


def tree_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `root_pid` and its live descendants, by name."""
    kids, out, todo = _children(), {}, [root_pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            name = _proc_name(pid)
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


def saturate(w: Workload, port: int, warm_s: float, dur_s: float, root_pid: int) -> dict:
    """Warm up, then captures/s at saturation (closed loop): the best of SUB_PHASES phases.

    The machine is shared: the best phase is the one least disturbed by others' work. The
    server's CPU time per capture (all its processes) is measured over all phases.
    """
    run(closed_loop(port, w.path, w.bodies, concurrency=w.concurrency, duration_s=warm_s,
                    max_requests=100_000, extra=w.extra))
    phases: list[LoadResult] = []
    c0 = tree_cpu(root_pid)
    for _ in range(SUB_PHASES):
        phases.append(run(closed_loop(port, w.path, w.bodies, concurrency=w.concurrency,
                                      duration_s=dur_s / SUB_PHASES, max_requests=100_000,
                                      extra=w.extra)))
    c1 = tree_cpu(root_pid)
    caps = sum(r.ok for r in phases) * w.captures_per_request
    by_proc = {k: 1e3 * (v - c0.get(k, 0.0)) / max(caps, 1) for k, v in c1.items()}
    cpu_s = sum(c1.values()) - sum(c0.values())
    status: dict[int, int] = {}
    for r in phases:
        for k, v in r.status.items():
            status[k] = status.get(k, 0) + v
    rates = [r.rps() * w.captures_per_request for r in phases]
    return {"captures_s": max(rates), "sub_phases": rates, "requests": sum(r.requests
                                                                          for r in phases),
            "cpu_ms_per_capture": 1e3 * cpu_s / caps if caps else float("nan"),
            "cpu_ms_per_capture_by_process": dict(sorted(by_proc.items(), key=lambda x: -x[1])),
            "non_200": {k: v for k, v in status.items() if k != 200},
            "conn_errors": sum(r.errors for r in phases), "load": loadavg()}


def at_rate(w: Workload, port: int, rate_rps: float, dur_s: float) -> LoadResult:
    """Latency at a fixed request rate (open loop)."""
    return run(open_loop(port, w.path, w.bodies, rate_rps=rate_rps, duration_s=dur_s,
                         extra=w.extra))


# -- report -----------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 0) -> str:
    """A number for the table (— if missing)."""
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def table(workloads: list[Workload]) -> str:
    """The L/N/S/P markdown table (a column per peer measured)."""
    peers = [p for p in PEERS if any(p in w.results for w in workloads)]
    targets = ["L", "N", "S", *peers]
    label = {"L": "L", "N": "N", "S": "S", **PEERS}
    pl = " / ".join(PEERS[p] for p in peers)
    head = ("| workload | " + " | ".join(f"{label[t]} cap/s" for t in targets)
            + " | **S/N** | **S/L** | "
            + (f"**S/P** {pl} | P/N {pl} | " if peers else "")
            + "CPU ms/cap " + " / ".join(label[t] for t in targets) + " | rate req/s | "
            + " | ".join(f"{label[t]} p50 / p99 ms" for t in targets) + " |\n|---|"
            + "--:|" * (len(targets) * 2 + 4 + (2 if peers else 0)) + "\n")
    rows = []
    for w in workloads:
        r = w.results
        cap = {t: r.get(t, {}).get("captures_s") for t in targets}
        lat = {t: f"{fmt(r.get(t, {}).get('p50_ms'), 1)} / {fmt(r.get(t, {}).get('p99_ms'), 1)}"
               for t in targets}
        rate = r.get("S", r.get("N", {})).get("rate_rps")
        cpu = " / ".join(fmt(r.get(t, {}).get("cpu_ms_per_capture"), 2) for t in targets)
        vs_p = ""
        if peers:
            vs_p = (" / ".join(fmt(_ratio(cap["S"], cap[p]), 2) for p in peers) + " | "
                    + " / ".join(fmt(_ratio(cap[p], cap["N"]), 2) for p in peers) + " | ")
        rows.append(f"| {w.name} | " + " | ".join(fmt(cap[t]) for t in targets) + " | "
                    f"{fmt(_ratio(cap['S'], cap['N']), 2)} | "
                    f"{fmt(_ratio(cap['S'], cap['L']), 2)} | {vs_p}{cpu} | {fmt(rate, 1)} | "
                    + " | ".join(lat[t] for t in targets) + " |")
    return head + "\n".join(rows) + "\n"


def cpu_table(workloads: list[Workload]) -> list[str]:
    """Markdown lines: S's CPU ms per capture at saturation, by process (>= 0.05 somewhere)."""
    by = {w.name: w.results["S"].get("cpu_ms_per_capture_by_process", {})
          for w in workloads if "S" in w.results}
    if not by:
        return []
    names = sorted({n for d in by.values() for n, v in d.items() if v >= 0.05},
                   key=lambda n: -max(d.get(n, 0.0) for d in by.values()))
    lines = ["Where S's CPU goes at saturation, ms per capture answered, by process (Serve "
             "replicas by deployment name; Ray's own processes as named):", "",
             "| process | " + " | ".join(by) + " |", "|---|" + "--:|" * len(by)]
    lines += [f"| {n} | " + " | ".join(fmt(d.get(n), 2) for d in by.values()) + " |"
              for n in names]
    lines.append("| **all** | " + " | ".join(fmt(sum(d.values()), 2) for d in by.values())
                 + " |")
    return [*lines, ""]


# Sections this bench wrote under an older title: replaced in place by the new one.
RENAMED = {"L / N / S": "L / N / S / P"}


def replace_sections(doc: str, sections: dict[str, str]) -> str:
    """Replace (or append) the `## title` sections named in `sections`; keep the others."""
    if not doc.strip():
        doc = "# Performance\n\nFigures of merit of DESIGN.md \"Performance\": S/N and S/L.\n"
    parts = re.split(r"(?m)^(?=## )", doc)
    out, seen = [], set()
    for part in parts:
        title = part.splitlines()[0][3:].strip() if part.startswith("## ") else None
        if title in RENAMED and RENAMED[title] in sections and RENAMED[title] not in seen \
                and f"## {RENAMED[title]}\n" not in doc:
            title = RENAMED[title]
        if title in sections:
            out.append(sections[title].rstrip() + "\n\n")
            seen.add(title)
        else:
            out.append(part if part.endswith("\n\n") or not part.startswith("## ")
                       else part.rstrip() + "\n\n")
    for title, body in sections.items():
        if title not in seen:
            out.append(body.rstrip() + "\n\n")
    return "".join(out).rstrip() + "\n"


def report(args: argparse.Namespace, mach: dict, workloads: list[Workload], rss: list[dict],
           loads: dict[str, str], s_cmd: str, wall_s: float,
           p_cmds: dict[str, str] | None = None) -> dict[str, str]:
    """The markdown sections this bench owns."""
    cmd = "python load/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lns = [
        "## L / N / S / P", "",
        f"Measured by `{cmd.strip()}` on {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"(whole run {wall_s / 60:.1f} min).", "",
        f"Machine: {mach['nproc']} cores ({mach['cpu']}), {mach['ram_gib']} GiB RAM, Linux "
        f"{mach['kernel']}, Python {mach['python']}, Ray {mach['ray']}. Load average "
        f"(1/5/15 min) at start {loads['start']}, before S {loads['before_s']}, at end "
        f"{loads['end']} — the machine is shared, other engineers' tests run beside it.", "",
        f"- **L**: the in-process limit — JSON parse, base64/pairs decode (OIP: the binary "
        f"tensors), features, ONNX, postprocess (ellipse + GeoJSON) and the answer, "
        f"vectorized over "
        f"{L_PASS_CAPTURES} captures, one process, no HTTP ({args.duration:g} s). "
        f"Its latency is one request processed alone.",
        "- **N**: `python load/naive_app.py` (FastAPI, uvicorn, 1 worker, the same core per "
        "request, no batching, no Ray).",
        *([f"- **S**: `{s_cmd}` (a copy on a free port, fresh `RFLOC_STATE_DIR`, "
           "`RAY_ADDRESS=local`)."] if s_cmd != "—" else []),
        *[f"- **P {PEERS[n]}**: `python load/peers/run.py {n}` ({how}): the same core "
          "behind the peer's own adaptive batching, N's bodies and answers "
          "(load/README.md \"Peers\"); no OIP binary endpoint." for n, how in
          (p_cmds or {}).items()],
        f"- Load: `load/httpload.py` (asyncio, keep-alive, loopback), in the bench process. "
        f"Saturation: closed loop, {args.warmup:g} s warm-up then {SUB_PHASES} phases of "
        f"{args.duration / SUB_PHASES:g} s, the best phase reported (L likewise): the machine "
        "is shared and the best phase is the least disturbed one. CPU ms/cap: CPU time of "
        "all the server's processes (L: the process, numpy's BLAS threads included) over all "
        "phases per capture answered — less disturbed by other work than captures/s. "
        f"connections: " + ", ".join(f"{w.name} {w.concurrency}" for w in workloads) + ". "
        f"Latency: open loop at a fixed rate = {args.rate_frac:g} × the lower of N's and S's "
        f"saturated request rate (the same rate for N, S and P), {args.duration:g} s, "
        "measured from each request's scheduled send time.",
        "- Payloads: standard captures (7 receivers × 4,800 samples) from the simulator, "
        "`\"cache\": false` (every request runs the whole chain). OIP binary: the Open "
        "Inference Protocol's REST infer with `IQ` and `RECEIVER_IDS` as binary tensors "
        "(tritonclient's encoding, 269 kB a capture instead of 359 kB of JSON with `iq_b64`), "
        "binary outputs; N serves it through the same front door.", "",
        table(workloads),
    ]
    errs = [f"{w.name} {t}: {w.results[t].get('non_200')}, conn errors "
            f"{w.results[t].get('conn_errors')}" for w in workloads for t in ["N", "S", *PEERS]
            if w.results.get(t, {}).get("non_200") or w.results.get(t, {}).get("conn_errors")]
    if errs:
        lns += ["Non-200 answers / connection errors: " + "; ".join(errs) + ".", ""]
    lns += cpu_table(workloads)
    if rss:
        lns += ["Peak RSS (VmHWM, reset before the phase) of each Serve process under the "
                "batch workload (saturation + fixed rate):", "",
                "| process | pid | peak RSS MiB | RSS after MiB |", "|---|--:|--:|--:|"]
        lns += [f"| {r['name']} | {r['pid']} | {r['peak_rss_mib']} | {r['rss_mib']} |"
                for r in rss]
        lns.append("")
    sections = {"L / N / S / P": "\n".join(lns)}
    return sections


def main() -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short phases, few payloads")
    p.add_argument("--targets", default="LNSP", help="subset of L, N, S, P to measure")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers measured as P (of: " + ", ".join(PEERS) + ")")
    p.add_argument("--peer-set", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a setting of a peer (load/peers/run.py --set), repeatable")
    p.add_argument("--workloads", default="b64,oip,pairs,batch",
                   help="comma-separated: b64, oip (single capture, OIP binary tensors), "
                        "pairs, batch")
    p.add_argument("--config", type=Path, default=SHIPPED_CONFIG, help="serve config for S")
    p.add_argument("--code", type=Path, default=None,
                   help="run S from this checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of `rfloc serve` (repeatable)")
    p.add_argument("--duration", type=float, default=None, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per phase")
    p.add_argument("--rate-frac", type=float, default=0.5)
    p.add_argument("--doc", default=str(DOC), help="markdown file to update ('' = none)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = p.parse_args()
    args.duration = args.duration or (3.0 if args.quick else 12.0)
    args.warmup = args.warmup or (1.0 if args.quick else 4.0)
    t_start = time.perf_counter()
    loads = {"start": loadavg()}
    mach = machine()
    print(f"machine: {mach}; load {loads['start']}", flush=True)
    n_single, n_pairs, n_batches = (16, 4, 2) if args.quick else (64, 16, 4)
    keys = {"b64": 0, "pairs": 1, "batch": 2, "oip": 3}
    all_w = build_workloads(n_single, n_pairs, n_batches, seed=21)
    workloads = [all_w[keys[k]] for k in args.workloads.split(",")]
    serve_env = dict(kv.split("=", 1) for kv in args.serve_env)
    peers = [n for n in args.peers.split(",") if n] if "P" in args.targets else []
    for n in peers:
        if n not in PEERS:
            p.error(f"--peers: {n} is not one of {', '.join(PEERS)}")
    peer_sets: dict[str, list[str]] = {n: [] for n in peers}
    for item in args.peer_set:
        n, _, kv = item.partition(":")
        if n in peer_sets:
            peer_sets[n].append(kv)
    for n in list(peers):  # venvs first: creating one takes minutes, not to be measured
        why = prepare_peer(n)
        if why is not None:
            print(f"P {n}: skipped, its virtualenv could not be made: {why}", flush=True)
            peers.remove(n)
    p_cmds: dict[str, str] = {}

    if "L" in args.targets:
        core = InProcess()
        for w in workloads:
            w.results["L"] = measure_l(w, core, args.duration, 30 if args.quick else 200)
            print(f"L {w.name}: {w.results['L']['captures_s']:.0f} captures/s", flush=True)

    rss: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rfloc-bench-") as tmp_s:
        tmp = Path(tmp_s)
        naive = start_naive(tmp) if "N" in args.targets else None
        serve = None
        s_cmd = "—"
        try:
            if naive:
                for w in workloads:
                    assert naive.proc is not None
                    w.results["N"] = saturate(w, naive.port, args.warmup, args.duration,
                                              naive.proc.pid)
                    print(f"N {w.name}: {w.results['N']['captures_s']:.0f} captures/s", flush=True)
            loads["before_s"] = loadavg()
            if "S" in args.targets:
                t = time.perf_counter()
                serve, s_cmd = start_serve(tmp, args.config, serve_env, args.code)
                print(f"S ready in {time.perf_counter() - t:.0f} s", flush=True)
                assert serve.proc is not None
                for w in workloads:
                    if w.captures_per_request > 1:
                        reset_peaks(replicas(serve.proc.pid))
                    w.results["S"] = saturate(w, serve.port, args.warmup, args.duration,
                                              serve.proc.pid)
                    print(f"S {w.name}: {w.results['S']['captures_s']:.0f} captures/s", flush=True)
                    rate = args.rate_frac * min(
                        w.results[t]["captures_s"] for t in "NS" if t in w.results
                    ) / w.captures_per_request
                    res = at_rate(w, serve.port, max(rate, 0.5), args.duration)
                    w.results["S"].update(p50_ms=res.pct_ms(50), p99_ms=res.pct_ms(99),
                                          rate_rps=max(rate, 0.5), rate_non_200={
                                              k: v for k, v in res.status.items() if k != 200})
                    if w.captures_per_request > 1:
                        rss = peaks(replicas(serve.proc.pid))
                        for r in rss:
                            print(f"  peak RSS {r['name']} (pid {r['pid']}): "
                                  f"{r['peak_rss_mib']} MiB", flush=True)
                serve.stop()
                serve = None
            for n in peers:
                peer, p_cmds[n] = start_peer(tmp, n, peer_sets[n])
                try:
                    assert peer.proc is not None
                    print(f"P {n} ready ({p_cmds[n]})", flush=True)
                    for w in workloads:
                        if w.extra is not None:  # OIP binary: not served by the peers
                            continue
                        w.results[n] = saturate(w, peer.port, args.warmup, args.duration,
                                                peer.proc.pid)
                        print(f"P {n} {w.name}: {w.results[n]['captures_s']:.0f} captures/s",
                              flush=True)
                        # The rate of N and S (the one S used), else half the peer's own.
                        base = [w.results[t]["captures_s"] for t in "NS" if t in w.results]
                        rate = w.results.get("S", {}).get("rate_rps") or max(0.5, (
                            args.rate_frac * min(base or [w.results[n]["captures_s"]])
                            / w.captures_per_request))
                        res = at_rate(w, peer.port, rate, args.duration)
                        w.results[n].update(p50_ms=res.pct_ms(50), p99_ms=res.pct_ms(99),
                                            rate_rps=rate, rate_non_200={
                                                k: v for k, v in res.status.items() if k != 200})
                finally:
                    peer.stop()
            if naive:
                for w in workloads:
                    rate = w.results.get("S", {}).get("rate_rps") or max(
                        0.5, args.rate_frac * w.results["N"]["captures_s"] / w.captures_per_request)
                    res = at_rate(w, naive.port, rate, args.duration)
                    w.results["N"].update(p50_ms=res.pct_ms(50), p99_ms=res.pct_ms(99),
                                          rate_rps=rate)
        finally:
            if serve:
                serve.stop()
            if naive:
                naive.stop()
    loads["end"] = loadavg()
    loads.setdefault("before_s", "—")
    print()
    print(table(workloads))
    sections = report(args, mach, workloads, rss, loads, s_cmd,
                      time.perf_counter() - t_start, p_cmds)
    if args.doc:
        doc = Path(args.doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        old = doc.read_text() if doc.exists() else ""
        doc.write_text(replace_sections(old, sections))
        print(f"wrote {args.doc}")
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "loads": loads, "rss": rss,
                                         "workloads": {
                                             w.name: w.results for w in workloads}},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
