"""What a second node buys: S on one node against S on two, each node one core.

Two Ray nodes on this machine in the shipped cluster mode (HAProxy, throughput-optimized, as
configs/kuberay/rayservice.yaml sets them): the head in the root network namespace pinned to
core 0, the worker in a namespace of its own (a test host at 10.213.x.2) pinned to core 1,
each started with `--num-cpus=1`. The app runs one replica of every deployment per node
(`max_replicas_per_node: 1`, CPU shares that fill one core). wrk (C, one thread per front
door) drives every node's own front door, as a cloud load balancer spreads clients over the
nodes; its CPU is measured beside the nodes' and stated in the table, because on this
machine it shares the cores with them.

    python load/scale.py [--duration 30] [--doc docs/performance.md]

Needs root (network namespaces), wrk (`apt-get install wrk`) and the fixed 10.213.x range:
run it alone, under `flock /tmp/rfloc-fixed-ports.lock` when other work shares the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BATCH_CAPTURES, loadavg, replace_sections  # noqa: E402
from harness import SHIPPED_CONFIG, TwoNodeCluster, cpu_s, free_port, wait_http  # noqa: E402
from sysinfo import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
CLUSTER_ENV = {  # what the KubeRay manifest sets on every pod
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
}
# One core per node: the four deployments' shares fill it (Serve's controller and proxy
# take none).
NODE_SHARES = {"Ingress": 0.35, "Preprocessor": 0.25, "LocalizationModel": 0.25,
               "Postprocessor": 0.15}
WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}", "rb"):read("*a")
"""


def scale_config(nodes: int, port: int, grpc_port: int) -> dict:
    """The shipped config, listening on every node's address, one replica set per node."""
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    cfg["http_options"].update(host="0.0.0.0", port=port)
    cfg["grpc_options"]["port"] = grpc_port
    for d in cfg["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d.update(num_replicas=nodes, max_replicas_per_node=1)
        d["ray_actor_options"] = {"num_cpus": NODE_SHARES[d["name"]]}
    return cfg


def bodies(tmp: Path) -> dict[str, tuple[Path, int, int]]:
    """Workload → (body file, captures per request, connections per front door)."""
    from serve_app.samples import make_samples

    reqs = make_samples(BATCH_CAPTURES, 7, form="b64").requests
    single, batch = tmp / "single.json", tmp / "batch.json"
    single.write_bytes(orjson.dumps({**reqs[0], "cache": False}))
    batch.write_bytes(orjson.dumps({"captures": [{**r, "cache": False} for r in reqs]}))
    return {"single iq_b64": (single, 1, 16), "batch 32 iq_b64": (batch, BATCH_CAPTURES, 4)}


def node_cpu_s(pids: set[int]) -> float:
    """CPU seconds (user + system) used so far by the live `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_s(pid)
    return total


def wrk(urls: list[str], path: str, body: Path, conns: int, dur_s: float,
        tmp: Path) -> list[dict]:
    """One wrk per front door at once: their parsed reports."""
    script = tmp / f"{body.stem}.lua"
    script.write_text(WRK_LUA.format(body=body))
    procs = [subprocess.Popen(
        ["wrk", "-t1", f"-c{conns}", f"-d{dur_s:g}s", "--latency", "-s", str(script),
         url + path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for url in urls]
    return [parse_wrk(p.communicate(timeout=dur_s + 60)[0]) for p in procs]


def parse_wrk(out: str) -> dict:
    """Requests, non-2xx answers, socket errors and latency percentiles from wrk's report."""
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    m = re.search(r"(\d+) requests in", out)
    if m is None:
        raise RuntimeError(f"wrk said: {out[-2000:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if set(pct) != {"50", "99"}:
        raise RuntimeError(f"no latency distribution in wrk's report: {out[-2000:]}")
    return {"requests": int(m.group(1)), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "p50_ms": ms(pct["50"]), "p99_ms": ms(pct["99"])}


def measure(nodes: int, work: dict, dur_s: float, warm_s: float, tmp: Path) -> dict:
    """Start the cluster, deploy, warm up, then measure every workload."""
    cluster = TwoNodeCluster(tmp / f"n{nodes}", {**CLUSTER_ENV,
                                                  "RFLOC_STATE_DIR": str(tmp / f"state{nodes}")},
                             head_cpus=1, worker_cpus=1, head_cores="0", worker_cores="1")
    port = free_port()
    out: dict = {"nodes": nodes}
    try:
        cluster.start(worker=nodes == 2)
        cfg_path = tmp / f"serve_config_{nodes}.yaml"
        cfg_path.write_text(yaml.safe_dump(scale_config(nodes, port, free_port())))
        p = cluster.serve("deploy", str(cfg_path))
        if p.returncode:
            raise RuntimeError(f"serve deploy failed: {p.stderr[-2000:]}")
        ips = [cluster.head_ip, cluster.worker_ip][:nodes]
        urls = [f"http://{ip}:{port}" for ip in ips]
        for url in urls:
            wait_http(url + "/health", timeout_s=300)
        placed = _placement(cluster)
        out["replicas_by_node"] = placed
        for name, (body, per_req, conns) in work.items():
            path = "/predict" if per_req == 1 else "/predict/batch"
            wrk(urls, path, body, conns, warm_s, tmp)
            node_pids = {"head": cluster.head_pids(), "worker": cluster.worker_pids()}
            c0 = {k: node_cpu_s(v) for k, v in node_pids.items()}
            w0 = os.times()  # wrk's CPU: the kernel's accounting of reaped children
            t0 = time.monotonic()
            results = wrk(urls, path, body, conns, dur_s, tmp)
            elapsed = time.monotonic() - t0
            w1 = os.times()
            c1 = {k: node_cpu_s(v) for k, v in node_pids.items()}
            ok = sum(r["requests"] - r["non_2xx"] for r in results)
            caps = ok * per_req
            wrk_cpu = (w1.children_user + w1.children_system
                       - w0.children_user - w0.children_system)
            out[name] = {
                "captures_s": caps / dur_s,
                "by_front_door": [r["requests"] / dur_s * per_req for r in results],
                "p50_ms": max(r["p50_ms"] for r in results),
                "p99_ms": max(r["p99_ms"] for r in results),
                "non_2xx": sum(r["non_2xx"] for r in results),
                "socket_errors": sum(r["socket_errors"] for r in results),
                "cpu_ms_per_capture": {k: 1e3 * (c1[k] - c0[k]) / max(caps, 1)
                                       for k in ("head", "worker")[:nodes]},
                "node_cores_busy": {k: (c1[k] - c0[k]) / elapsed
                                    for k in ("head", "worker")[:nodes]},
                "wrk_cores_busy": wrk_cpu / elapsed,
                "load": loadavg(),
            }
            print(f"{nodes} node(s), {name}: {out[name]['captures_s']:.0f} captures/s, "
                  f"p99 {out[name]['p99_ms']:.0f} ms, load {loadavg()}", flush=True)
    finally:
        cluster.stop()
    return out


def _placement(cluster: TwoNodeCluster) -> dict[str, list[str]]:
    deadline = time.monotonic() + 120
    while True:
        running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
        by_node: dict[str, list[str]] = {}
        for r in running:
            by_node.setdefault(r["node_ip"], []).append(r["deployment"])
        if len(running) >= 4 * len(by_node) or time.monotonic() > deadline:
            return {ip: sorted(d) for ip, d in by_node.items()}
        time.sleep(2)


def table(one: dict, two: dict, work: dict) -> str:
    """The markdown scale table."""
    rows = ["| workload | nodes | captures/s | p50 / p99 ms | CPU-ms per capture (head / "
            "worker) | cores busy (head / worker) | wrk cores | two / one |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name in work:
        for r in (one, two):
            f = r[name]
            cpu = " / ".join(f"{v:.2f}" for v in f["cpu_ms_per_capture"].values())
            busy = " / ".join(f"{v:.2f}" for v in f["node_cores_busy"].values())
            ratio = (f"{f['captures_s'] / one[name]['captures_s']:.2f}"
                     if r is two else "")
            rows.append(f"| {name} | {r['nodes']} | {f['captures_s']:,.0f} | "
                        f"{f['p50_ms']:.0f} / {f['p99_ms']:.0f} | {cpu} | {busy} | "
                        f"{f['wrk_cores_busy']:.2f} | {ratio} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--doc", default=str(DOC), help="markdown file to update ('' = none)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = p.parse_args()
    if shutil.which("wrk") is None or shutil.which("ip") is None:
        print("needs wrk and iproute2 (apt-get install wrk iproute2)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rfscale") as d:
        tmp = Path(d)
        work = bodies(tmp)
        one = measure(1, work, args.duration, args.warmup, tmp)
        two = measure(2, work, args.duration, args.warmup, tmp)
    mach = machine()
    text = table(one, two, work)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": mach, "one": one, "two": two}, indent=2))
    if args.doc:
        placed = "; ".join(f"{ip}: {', '.join(d)}" for ip, d in two["replicas_by_node"].items())
        section = (f"## Scale-out\n\n`python load/scale.py --duration {args.duration:g}` ({stamp}; "
                   f"{mach['nproc']} cores, {mach['cpu']}; load average at the end "
                   f"{loadavg()}). Each node is one core (`taskset`, `--num-cpus=1`); "
                   f"replicas on two nodes: {placed}. wrk: 16 connections (single) or 4 "
                   f"(batch) per front door.\n\n{text}\n")
        doc = Path(args.doc)
        doc.write_text(replace_sections(doc.read_text(), {"Scale-out": section}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
