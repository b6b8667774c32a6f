"""One or two Ingress replicas under `rfloc serve` on this machine: memory, throughput, a kill.

    python load/ingress_replicas.py                 # 1, 2, 1, 2 Ingress replicas (~12 min)
    python load/ingress_replicas.py --uploads       # also 24 concurrent 60 MB uploads (1 replica)

Each round starts `rfloc serve` (HAProxy mode, the shipped configs/serve_config.yaml on a
free HTTP port, a fresh state directory) with the Ingress's `num_replicas` set, and
measures: the RSS of the Ingress replica processes and of HAProxy idle and after load;
single-capture throughput (`iq_b64`, 16 keep-alive connections, closed loop, 4 s warm-up,
best of three 4 s phases, as docs/performance.md); a 10 s burst of 600 back-to-back clients
(peak RSS of HAProxy and the Ingress); and `load/harness/faults.py`'s `kill_ingress` (kill -9 of one
Ingress replica under 4 back-to-back clients). Rounds alternate the replica count so that
both see the same machine load. Binds HAProxy mode's fixed ports: run it under the
machine's fixed-ports lock (`flock /tmp/rfloc-fixed-ports.lock python load/...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "load"))

from httpload import closed_loop, run  # noqa: E402

from load.harness import faults, hostile, shipped_config  # noqa: E402

DEPLOYMENTS = ("Ingress", "Preprocessor", "LocalizationModel", "Postprocessor")


def shipped(ingress_replicas: int) -> dict:
    cfg = shipped_config(faults.free_port())
    for d in cfg["applications"][0]["deployments"]:
        if d["name"] == "Ingress":
            d["num_replicas"] = ingress_replicas
    return cfg


def ingress_rss(root: int) -> list[float]:
    return [round(faults.rss_mb(p)) for p in faults.replica_processes(root, "rfloc", "Ingress")]


def haproxy_rss(root: int) -> float:
    """RSS of the HAProxy processes under `root` (a reload briefly runs two), in MiB."""
    total = 0.0
    for pid in faults.descendants({root}):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "haproxy":
                total += faults.rss_mb(pid)
        except (OSError, ValueError):
            pass
    return round(total)


def burst(url: str, root: int, bodies: list[bytes], clients: int = 600,
          seconds: float = 10.0) -> dict:
    """`clients` back-to-back clients for `seconds`: statuses and peak RSS of HAProxy and
    the Ingress replicas."""
    load = faults.SteadyLoad(url, bodies, clients=clients, rate_rps=None, max_s=seconds,
                             honor_retry_after=True)
    peak_ha, peak_ingress = 0.0, 0.0
    with load:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            peak_ha = max(peak_ha, haproxy_rss(root))
            peak_ingress = max(peak_ingress, sum(ingress_rss(root)))
            time.sleep(0.5)
    codes: dict[int, int] = {}
    for smp in load.samples:
        codes[smp.status] = codes.get(smp.status, 0) + 1
    return {"clients": clients, "seconds": seconds, "statuses": codes,
            "haproxy_peak_mb": peak_ha, "ingress_peak_mb": peak_ingress}


def ports_free(ports: tuple[int, ...] = (8404, 9101), timeout_s: float = 120.0) -> None:
    """Wait until the previous round's HAProxy has let go of its fixed ports."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as a, socket.socket() as b:
            if a.connect_ex(("127.0.0.1", ports[0])) and b.connect_ex(("127.0.0.1", ports[1])):
                return
        time.sleep(1)


def one_round(n: int, tmp: Path, kill: bool, env: dict[str, str] | None = None) -> dict:
    ports_free()
    cfg = shipped(n)
    proc, url = faults.start_rfloc_serve(tmp, cfg, env)
    try:
        faults.wait_replicas(proc.pid, {"Ingress": n, **dict.fromkeys(DEPLOYMENTS[1:], 1)})
        time.sleep(10)  # HAProxy's reload once the Ingress replicas registered
        out: dict = {"ingress_replicas": n, "env": env or {}, "loadavg": os.getloadavg(),
                     "rss_idle_mb": ingress_rss(proc.pid),
                     "haproxy_rss_idle_mb": haproxy_rss(proc.pid)}
        port = int(cfg["http_options"]["port"])
        bodies = faults.request_bodies(8)
        run(closed_loop(port, "/predict", bodies, concurrency=16, duration_s=4.0,
                        max_requests=10**9))
        phases = [run(closed_loop(port, "/predict", bodies, concurrency=16, duration_s=4.0,
                                  max_requests=10**9)) for _ in range(3)]
        best = max(phases, key=lambda r: r.rps())
        out.update(captures_per_s=[round(p.rps(), 1) for p in phases],
                   best_captures_per_s=round(best.rps(), 1), best_p99_ms=round(best.pct_ms(99), 1),
                   statuses=[p.status for p in phases], errors=[p.errors for p in phases],
                   rss_after_load_mb=ingress_rss(proc.pid),
                   haproxy_rss_after_load_mb=haproxy_rss(proc.pid))
        out["burst"] = burst(url, proc.pid, bodies)
        time.sleep(5)
        if kill:
            row = faults.kill_ingress(url, proc.pid, bodies, clients=4)
            out["kill"] = row.as_dict()
        out["loadavg_end"] = os.getloadavg()
        return out
    finally:
        faults.stop_rfloc_serve(proc)


def uploads(tmp: Path) -> dict:
    """24 concurrent 60 MB `/predict` uploads (one 45 MB iq_b64 each), 1 Ingress replica."""
    from serve_app.samples import make_samples

    ports_free()
    cfg = shipped(1)
    proc, url = faults.start_rfloc_serve(tmp, cfg)
    try:
        faults.wait_replicas(proc.pid, {"Ingress": 1})
        time.sleep(10)
        [pid] = faults.replica_processes(proc.pid, "rfloc", "Ingress")
        good = make_samples(1, seed=13).requests[0]
        res = hostile.concurrent_uploads(url, hostile.large_upload_body(good), 24, pid)
        r = httpx.post(url + "/predict", content=faults.request_bodies(1)[0],
                              headers={"content-type": "application/json"}, timeout=60)
        return {**res, "after_status": r.status_code, "loadavg": os.getloadavg()}
    finally:
        faults.stop_rfloc_serve(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", default="1,2,1,2", help="Ingress replica counts, in turn")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--uploads", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for rfloc serve in the rounds marked "
                         "with a trailing '+' in --order (e.g. 1,1+,2,2+)")
    a = ap.parse_args()
    results: dict = {"rounds": []}
    with tempfile.TemporaryDirectory(prefix="rfloc-ingress-") as tmp:
        if a.uploads:
            results["uploads"] = uploads(Path(tmp) / "up")
            print(json.dumps(results["uploads"]), flush=True)
        extra = dict(kv.split("=", 1) for kv in a.env)
        for i, x in enumerate(x for x in a.order.split(",") if x):
            n, env = int(x.rstrip("+")), extra if x.endswith("+") else None
            try:
                res = one_round(n, Path(tmp) / f"r{i}", not a.no_kill, env)
            except RuntimeError as exc:  # a cluster that did not come up: the next round
                res = {"ingress_replicas": n, "error": str(exc)[-3000:]}
            results["rounds"].append(res)
            print(json.dumps(res, default=str), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
