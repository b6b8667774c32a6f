"""Every fault scenario and input class of load/harness/faults.py and load/harness/hostile.py,
once, on local Ray clusters of its own; writes the generated part of docs/reliability.md.

    python load/reliability.py                    # everything (10-20 min on 2 cores)
    python load/reliability.py --skip-multinode   # without the two-node cluster
    python load/reliability.py --doc ''           # print the tables only

Three phases, one after another, each in a fresh process with its own Ray instance:
  proxy      ray.init(num_cpus=2) on 127.0.0.1 with a temporary RFLOC_STATE_DIR, the shipped
             configs/serve_config.yaml on a free port behind Serve's default HTTP proxy (as in
             the tests): every fault scenario, every input class, schemathesis;
  haproxy    the same cluster with the environment `rfloc serve` sets (HAProxy, throughput-
             optimized Serve): a replica kill and the overload; skipped if HAProxy's fixed
             ports (8404, 9101) are taken by another cluster on the machine;
  ingress    `rfloc serve` with the KubeRay manifest's replica counts (two of each): an Ingress
             replica killed with SIGKILL under load; skipped like haproxy;
  multinode  the two-node cluster of load/harness/multinode.py (root, iproute2): its worker node
             stopped under load.
Traffic goes to 127.0.0.1 and the netns test host only. Only the block between the GENERATED
markers of the doc is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from sysinfo import machine  # load/ is on sys.path: a sibling module

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
BEGIN = "<!-- BEGIN GENERATED: python load/reliability.py -->"
END = "<!-- END GENERATED -->"


def _step(name: str, fn, errors: list[str]):  # noqa: ANN001, ANN202 - any scenario
    print(f"--- {name}", flush=True)
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception:
        errors.append(f"{name}: {traceback.format_exc(limit=4)}")
        print(errors[-1], flush=True)
        return None
    print(f"    done in {time.monotonic() - t0:.0f} s", flush=True)
    return out


def _start_cluster(state: Path, token: str) -> tuple[str, dict]:
    """ray.init on loopback, the shipped config deployed on a free port: (URL, config)."""
    import ray

    from load.harness import deploy, free_port, shipped_config, wait_http

    os.environ.update(RFLOC_STATE_DIR=str(state), RFLOC_ADMIN_TOKEN=token)
    for k in ("REDIS_URL", "RFLOC_REDIS_URL", "MLFLOW_TRACKING_URI",
              "RFLOC_MLFLOW_TRACKING_URI"):
        os.environ.pop(k, None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve",
             logging_level="warning", log_to_driver=False)
    cfg = shipped_config(free_port())
    deploy(cfg)
    url = f"http://127.0.0.1:{cfg['http_options']['port']}"
    wait_http(url + "/health", timeout_s=300)
    return url, cfg


def _stop_cluster(state: Path) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(state, ignore_errors=True)


def phase_proxy(args: argparse.Namespace, errors: list[str]) -> dict:
    """Every fault and input class behind Serve's default proxy (as in the tests)."""
    import httpx

    from load.harness import faults, hostile, wait_http
    from serve_app.registry import ModelRegistry, embedded_uris
    from serve_app.samples import make_samples

    state = Path(tempfile.mkdtemp(prefix="rfloc-reliability-"))
    token = secrets.token_hex(16)
    out: dict = {"faults": [], "inputs": [], "fuzz": None, "background": None}
    try:
        url, cfg = _start_cluster(state, token)
        bodies = faults.request_bodies(8)
        registry = ModelRegistry(embedded_uris(state)[0], cache_dir=state / "driver-cache")
        steps = [(f"kill {d}", lambda d=d: faults.kill_replica(url, d, bodies))
                 for d in ("LocalizationModel", "Preprocessor", "Postprocessor")]
        steps += [
            ("hung Preprocessor", lambda: faults.freeze_replica(cfg, "Preprocessor")),
            ("redis", lambda: faults.redis_restart(cfg)),
            ("reload", lambda: faults.model_reload(url, registry, token, bodies)),
            ("registry", lambda: faults.registry_unreachable(cfg, token)),
            ("downstream queue", lambda: faults.downstream_backpressure(cfg)),
            ("overload", lambda: faults.overload(url, bodies, clients=args.clients)),
        ]
        for name, fn in steps:
            row = _step(name, fn, errors)
            out["faults"].append(None if row is None else row.as_dict())
        wait_http(url + "/health", timeout_s=120)

        # Hostile input, with steady good traffic beside it.
        good = make_samples(1, seed=13).requests[0]
        bad = [(f"bad input: {name}", "/predict", body, {status}, field)
               for name, body, status, field in hostile.bad_inputs(good)]
        limit = int(cfg["applications"][0]["args"].get("max_body_bytes", 64 * 2**20))
        background = faults.SteadyLoad(url, bodies, clients=2, rate_rps=5.0)
        with background:
            classes = (_step("bad inputs", lambda: hostile.post_classes(url, bad, repeat=3),
                             errors) or [])
            classes += _step("oversize", lambda: hostile.post_classes(
                url, hostile.oversize_bodies(good)), errors) or []
            classes.append(_step("declared", lambda: hostile.raw_class(
                hostile.declared_oversize(url), {413}), errors))
            classes.append(_step("streamed", lambda: hostile.raw_class(
                hostile.streamed_oversize(url, limit), {413}), errors))
            fuzz = _step("schemathesis", lambda: hostile.run_schemathesis(
                url, max_examples=args.max_examples), errors)
        out["inputs"] = [c.as_dict() for c in classes if c is not None]
        if fuzz is not None:
            out["fuzz"] = {**vars(fuzz), "statuses": dict(fuzz.statuses),
                           "server_errors": fuzz.server_errors}
        out["background"] = faults.summarize("good traffic beside the hostile input",
                                             background, background.samples, None).as_dict()
        out["health_after"] = httpx.get(url + "/health", timeout=30).status_code
    finally:
        _stop_cluster(state)
    return out


HAPROXY_PORTS = (8404, 9101)  # fixed by Serve's HAProxy mode: stats, Prometheus


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _haproxy_ports_busy() -> dict | None:
    """A phase's "skipped" entry when another cluster holds HAProxy's fixed ports."""
    taken = [p for p in HAPROXY_PORTS if _port_taken(p)]
    return {"skipped": f"HAProxy's fixed ports {taken} are taken by another cluster"} \
        if taken else None


def phase_haproxy(args: argparse.Namespace, errors: list[str]) -> dict:
    """A replica kill and the overload with `rfloc serve`'s environment (HAProxy)."""
    from load.harness import faults

    if busy := _haproxy_ports_busy():
        return busy
    state = Path(tempfile.mkdtemp(prefix="rfloc-reliability-ha-"))
    out: dict = {"faults": []}
    try:
        url, _ = _start_cluster(state, secrets.token_hex(16))
        # HAProxy reloads (a new process) when the Ingress replica registers; connections
        # of the old process close as it drains. Let that pass before the first fault.
        time.sleep(10)
        bodies = faults.request_bodies(8)
        for name, fn in (("kill LocalizationModel (HAProxy)",
                          lambda: faults.kill_replica(url, "LocalizationModel", bodies)),
                         ("overload (HAProxy)",
                          lambda: faults.overload(url, bodies, clients=args.clients))):
            row = _step(name, fn, errors)
            if row is not None:
                row.fault += " — HAProxy mode (`rfloc serve`)"
            out["faults"].append(None if row is None else row.as_dict())
    finally:
        _stop_cluster(state)
    return out


def phase_ingress(args: argparse.Namespace, errors: list[str]) -> dict:
    """kill -9 of an Ingress replica under `rfloc serve` with the KubeRay manifest's replicas."""
    from load.harness import cluster_config, faults
    from serve_app.cli import HAPROXY_REPLAY_ENV

    if busy := _haproxy_ports_busy():
        return busy
    tmp = Path(tempfile.mkdtemp(prefix="rfloc-reliability-ingress-"))
    out: dict = {"faults": []}
    cfg = cluster_config(faults.free_port())
    cfg["http_options"]["host"] = "127.0.0.1"
    proc = None
    try:
        proc, url = faults.start_rfloc_serve(tmp, cfg, HAPROXY_REPLAY_ENV)
        faults.wait_replicas(proc.pid, dict.fromkeys(
            ("Ingress", "Preprocessor", "LocalizationModel", "Postprocessor"), 2))
        time.sleep(10)  # HAProxy's reload once the Ingress replicas registered
        row = _step("kill Ingress (HAProxy, 2 of each)", lambda: faults.kill_ingress(
            url, proc.pid, faults.request_bodies(8), clients=4), errors)
        if row is not None:
            row.fault += (" — `rfloc serve`, HAProxy mode, the KubeRay manifest's replicas "
                          "(2 of each)")
        out["faults"].append(None if row is None else row.as_dict())
    finally:
        if proc is not None:
            faults.stop_rfloc_serve(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def phase_multinode(args: argparse.Namespace, errors: list[str]) -> dict:
    """The worker node of a two-node cluster stopped under load (load/harness/multinode.py)."""
    import httpx
    import yaml

    from load.harness import TwoNodeCluster, faults, free_port, shipped_config, wait_http

    if shutil.which("ip") is None:
        return {"skipped": "needs iproute2 (ip netns)"}
    tmp = Path(tempfile.mkdtemp(prefix="rfmn-"))
    cluster = TwoNodeCluster(tmp, {"RFLOC_STATE_DIR": str(tmp / "state"),
                                   "RFLOC_ADMIN_TOKEN": secrets.token_hex(16)})
    try:
        cluster.start()
        cfg = shipped_config(free_port())
        (tmp / "serve_config.yaml").write_text(yaml.safe_dump(cfg))
        p = cluster.serve("deploy", str(tmp / "serve_config.yaml"))
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        url = f"http://127.0.0.1:{cfg['http_options']['port']}"
        wait_http(url + "/health", timeout_s=300)
        running: list[dict] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # wait for replicas on both nodes
            running = [r for r in cluster.replicas() if r["state"] == "RUNNING"]
            if {r["node_ip"] for r in running} == {cluster.head_ip, cluster.worker_ip}:
                break
            time.sleep(2)
        on_worker = sorted(r["deployment"] for r in running if r["node_ip"] == cluster.worker_ip)
        load = faults.SteadyLoad(url, faults.request_bodies(8), clients=2, rate_rps=20.0)
        healthy = None
        with load:
            time.sleep(3)
            t_kill = time.monotonic()
            cluster.stop_worker()
            while time.monotonic() < t_kill + 300:
                try:
                    replicas = cluster.replicas()
                except (KeyError, httpx.HTTPError):  # a replica without a node yet
                    replicas = []
                recent = [s.status for s in load.samples[-10:] if s.t_sent > t_kill]
                if (replicas and {r["state"] for r in replicas} == {"RUNNING"}
                        and len(recent) == 10 and all(c == 200 for c in recent)):
                    healthy = time.monotonic()
                    break
                time.sleep(1)
            time.sleep(3)
        last_bad = faults.last_failure(load.samples, t_kill)
        recovery = None if healthy is None else max(healthy, last_bad or 0.0) - t_kill
        row = faults.summarize(
            "worker node of a two-node cluster stopped (its Ray processes SIGKILLed)", load,
            load.samples, recovery,
            f"replicas on the worker before: {', '.join(on_worker) or 'none'}; every replica "
            "RUNNING on the head and 10 answers in a row 200 "
            + (f"{healthy - t_kill:.1f} s after the stop" if healthy else "never"))
        return {"faults": [row.as_dict()]}
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


PHASES = {"proxy": phase_proxy, "haproxy": phase_haproxy, "ingress": phase_ingress,
          "multinode": phase_multinode}


def _env_for(phase: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if phase == "multinode":
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # explicit node IPs there
        return env
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray at import: stay on loopback
    for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        env.pop(k, None)
    if phase == "haproxy":
        from serve_app.cli import LOOPBACK_ENV

        env.update(LOOPBACK_ENV)
    return env


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def render(m0: dict, m1: dict, results: dict[str, dict], elapsed_s: float) -> str:
    """The generated block: machine, fault table, input table, schemathesis, errors."""
    proxy = results.get("proxy", {})
    lines = [BEGIN, "",
             f"Run {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
             f"`python load/reliability.py` in {elapsed_s / 60:.0f} min on {m0['nproc']} cores "
             f"({m0['cpu']}), {m0['ram_gib']} GiB RAM, Linux {m0['kernel']}, Python "
             f"{m0['python']}, Ray {m0['ray']}; the machine was shared with other work (load "
             f"average {m0['loadavg'][0]:.1f} at the start, {m1['loadavg'][0]:.1f} at the end). "
             "The shipped `configs/serve_config.yaml` (HTTP port moved) on `ray.init(num_cpus=2)`"
             " behind Serve's default HTTP proxy unless the fault says HAProxy mode; a request "
             "is one standard capture (7 receivers x 4,800 samples, `iq_b64`, 359 kB, "
             '`"cache": false` unless stated).', "",
             "### Faults", "",
             "| fault | load during it | sent | failed | failure codes | recovery (s) "
             "| p50 / p99 / max latency (ms) | what happened |",
             "|---|---|---|---|---|---|---|---|"]
    for phase in ("proxy", "haproxy", "ingress", "multinode"):
        res = results.get(phase, {})
        if "skipped" in res:
            lines.append(f"| {phase} phase skipped: {res['skipped']} | | | | | | | |")
        for r in res.get("faults", []):
            if r is None:
                continue
            codes = ", ".join(f"{c}: {n}" for c, n in r["codes"].items()) or "—"
            lines.append(f"| {r['fault']} | {r['load']} | {r['sent']} | {r['failed']} | {codes} "
                         f"| {_fmt(r['recovery_s'])} | {_fmt(r['p50_ms'], 0)} / "
                         f"{_fmt(r['p99_ms'], 0)} / {_fmt(r['max_ms'], 0)} | {r['notes']} |")
    bg = proxy.get("background")
    lines += ["", "### Hostile and malformed input", "",
              "Each class POSTed " + (
                  f"while good traffic ran beside it ({bg['load']}: {bg['sent']} sent, "
                  f"{bg['failed']} failed). " if bg else "")
              + "As expected = the documented status, naming the documented field.", "",
              "| input class | sent | as expected | 5xx | statuses | median time to answer (ms) "
              "| body bytes |",
              "|---|---|---|---|---|---|---|"]
    for c in proxy.get("inputs", []):
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(c["statuses"].items()))
        note = f" ({c['detail']})" if c["as_expected"] < c["sent"] or "bytes sent" in c[
            "detail"] else ""
        lines.append(f"| {c['class']}{note} | {c['sent']} | {c['as_expected']} | {c['5xx']} | "
                     f"{statuses} | {_fmt(c['median_ms'], 1)} | {c['body_bytes']:,} |")
    fuzz = proxy.get("fuzz")
    if fuzz:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(fuzz["statuses"].items()))
        lines += ["", f"**Schemathesis** (positive and negative cases; checks: no 5xx, response "
                  f"bodies, status codes and content types as documented): {fuzz['cases']} cases "
                  f"over {len(fuzz['operations'])} operations in {fuzz['seconds']:.0f} s; "
                  f"statuses {statuses}; {fuzz['server_errors']} 5xx; "
                  f"{len(fuzz['failures'])} check failures."]
        lines += [f"- `{f.splitlines()[0][:300]}`" for f in fuzz["failures"][:10]]
    errors = [e for res in results.values() for e in res.get("errors", [])]
    if errors:
        lines += ["", "**Scenarios that did not complete:**", ""]
        lines += [f"- `{e.splitlines()[0]}` {e.strip().splitlines()[-1][:300]}" for e in errors]
    lines += ["", END]
    return "\n".join(lines)


def write_doc(block: str, path: Path) -> None:
    """Replace the generated block of `path` (or create the doc around it)."""
    if path.exists() and BEGIN in path.read_text():
        head, _, rest = path.read_text().partition(BEGIN)
        _, _, tail = rest.partition(END)
        path.write_text(head + block + tail)
    else:
        path.write_text("# Reliability\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(DOC), help="doc to update ('' = print only)")
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument("--skip-multinode", action="store_true")
    ap.add_argument("--skip-haproxy", action="store_true")
    ap.add_argument("--skip-ingress", action="store_true")
    ap.add_argument("--clients", type=int, default=600, help="clients of the overload")
    ap.add_argument("--max-examples", type=int, default=25, help="schemathesis, per mode")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:  # one phase, in this fresh process
        errors: list[str] = []
        try:
            res = PHASES[args.phase](args, errors)
        except Exception:
            res = {}
            errors.append(f"phase {args.phase}: {traceback.format_exc(limit=6)}")
            print(errors[-1], flush=True)
        Path(args.out).write_text(json.dumps({**res, "errors": errors}, default=str))
        return 0
    t0 = time.monotonic()
    m0 = machine()
    results: dict[str, dict] = {}
    phases = [p for p in PHASES if not (p == "multinode" and args.skip_multinode)
              and not (p == "haproxy" and args.skip_haproxy)
              and not (p == "ingress" and args.skip_ingress)]
    with tempfile.TemporaryDirectory(prefix="rfloc-reliability-out-") as tmp:
        for phase in phases:
            print(f"=== phase {phase}", flush=True)
            out = Path(tmp) / f"{phase}.json"
            cmd = [sys.executable, __file__, "--phase", phase, "--out", str(out),
                   "--clients", str(args.clients), "--max-examples", str(args.max_examples)]
            rc = subprocess.run(cmd, env=_env_for(phase), cwd=REPO).returncode
            results[phase] = (json.loads(out.read_text()) if out.exists() else
                              {"errors": [f"phase {phase}: exited with {rc}\n(no results)"]})
    block = render(m0, machine(), results, time.monotonic() - t0)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.doc:
        write_doc(block, Path(args.doc))
    return 1 if any(res.get("errors") for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
