"""The `rfloc` command line: serve, simulate, predict, and the model registry operations."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serve_app.listeners import haproxy_env, private_ray_token, private_runtime_dir
from serve_app.settings import REPO_ROOT, redact_url

DEFAULT_CONFIG = REPO_ROOT / "configs" / "serve_config.yaml"
LOOPBACK_ENV = {
    # Keep a single-node cluster on 127.0.0.1 (node IP, GCS, dashboard).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Throughput (docs/performance.md): HAProxy instead of the Python proxy, the ingress
    # replica serving HTTP itself, gRPC between deployments. A /predict/batch group of 64
    # captures is ~17 MB, over gRPC's 4 MB default message limit.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
    # Token authentication of the dashboard, the GCS and the replicas' gRPC servers (Ray
    # turns it on for a local cluster anyway; said here so that it stays on).
    "RAY_AUTH_MODE": "token",
}
# With two or more Ingress replicas (the KubeRay manifest sets these on its pods): HAProxy
# replays a request whose Ingress replica closed the connection without an answer (a
# replica killed mid-request) on another replica; predictions are idempotent. HAProxy
# replays only a request that fits one buffer: 512 KiB holds a standard capture (359 kB)
# and any of up to 10 receivers in iq_b64. Not in `rfloc serve`'s defaults: with its one
# Ingress replica there is no other replica to replay on, and the larger buffers cost
# HAProxy memory under many connections (figures in docs/reliability.md).
HAPROXY_REPLAY_ENV = {
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(512 * 1024),
}
# Only for the single machine of `rfloc serve`, not a cluster behind a load balancer: a
# stopping direct-ingress replica stays open this long for an external balancer to
# deregister it (Ray's default 30 s made Ctrl-C take 35 s). Here the only balancer is the
# node's own HAProxy, which Serve reconfigures at once and which retries refused connections.
SINGLE_NODE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def _registry(model_name: str):
    from serve_app.lifecycle import make_registry
    from serve_app.settings import EnvSettings

    return make_registry(EnvSettings(), model_name)


def cmd_serve(a: argparse.Namespace) -> int:
    """Bootstrap the registry, then `serve run` the config in the foreground."""
    import yaml

    from serve_app.errors import RflocError
    from serve_app.lifecycle import bootstrap
    from serve_app.settings import AppArgs, EnvSettings

    cfg = yaml.safe_load(Path(a.config).read_text())
    app_cfg = cfg["applications"][0]
    try:
        args = AppArgs.model_validate(app_cfg.get("args") or {})
        env = EnvSettings()
        version = bootstrap(args, env)
    except (RflocError, ValueError) as exc:
        print(f"rfloc serve: cannot start: {exc}", file=sys.stderr)
        return 2
    where = (redact_url(env.mlflow_tracking_uri) if env.mlflow_tracking_uri
             else f"embedded registry in {env.state_dir}")
    print(f"model {args.model_name}@{args.model_alias} -> version {version} ({where})", flush=True)
    serve_bin = shutil.which("serve")
    if serve_bin is None:
        print("rfloc serve: the `serve` command (ray[serve]) is not installed", file=sys.stderr)
        return 2
    config_path = Path(a.config)
    if env.http_host:  # `serve run` reads a file: run a copy with the host replaced
        cfg.setdefault("http_options", {})["host"] = env.http_host
        with tempfile.NamedTemporaryFile("w", prefix="rfloc-serve-", suffix=".yaml",
                                         delete=False) as tmp:
            yaml.safe_dump(cfg, tmp, sort_keys=False)
        config_path = Path(tmp.name)
    # A fresh local Ray instance, even when another cluster runs on this machine (set
    # RAY_ADDRESS to attach to one on purpose; `serve deploy` is the way onto a cluster).
    env_vars = {**LOOPBACK_ENV, **SINGLE_NODE_ENV, "RAY_ADDRESS": "local", **os.environ}
    note = private_ray_token(env_vars)
    if note:
        print(f"rfloc serve: {note}", flush=True)
    runtime_dir = None
    if env_vars.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # HAProxy's stats and Prometheus ports on loopback, its admin socket private
        # (serve_app/listeners.py); an operator's own RAY_SERVE_HAPROXY_* settings win.
        runtime_dir = private_runtime_dir()
        env_vars = {**haproxy_env(runtime_dir, env_vars), **env_vars}
    port = cfg.get("http_options", {}).get("port", 8000)
    print(f"starting Ray Serve: http://127.0.0.1:{port}/docs  (Ctrl-C stops)", flush=True)
    # `serve run` shuts Serve and the local Ray instance it started down on SIGINT; turn
    # SIGTERM into SIGINT so that `kill` and container stops are just as clean.
    # A shell may start us with SIGINT ignored (background jobs); the child must not inherit it.
    child = subprocess.Popen(
        [serve_bin, "run", str(config_path)], env=env_vars,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    finally:
        if config_path != Path(a.config):
            config_path.unlink(missing_ok=True)
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)


def cmd_simulate(a: argparse.Namespace) -> int:
    """Write simulated capture requests (a single request, or a batch) to a JSON file."""
    import orjson

    from serve_app.samples import make_samples

    if a.sigmf:  # recording sets, one SigMF recording per receiver
        from serve_app.io.sigmf import write_simulated_sets
        from serve_app.receivers import load_network

        sim = write_simulated_sets(a.sigmf, a.n, a.seed, network=load_network(a.receivers),
                                   datatype=a.datatype or "ci16_le", archive=a.archive,
                                   max_missing=a.max_missing, keep_iq=False)
        first = f" ({sim.paths[0]}" + (f" ... {sim.paths[-1].name})" if a.n > 1 else ")")
        print(f"wrote {a.n} recording set(s) of {a.datatype or 'ci16_le'} to {a.sigmf}{first}")
        return 0
    if a.parquet:  # a capture dataset for `rfloc batch` instead of request JSON
        from serve_app.capture_parquet import write_capture_dataset

        if a.datatype not in (None, "cf32_le", "ci16_le"):  # simulated IQ exceeds 8 bits
            print("rfloc simulate: --parquet takes --datatype cf32_le or ci16_le",
                  file=sys.stderr)
            return 2

        files = write_capture_dataset(a.parquet, a.n, seed=a.seed, shards=a.shards,
                                      datatype=a.datatype or "cf32_le",
                                      max_missing=a.max_missing,
                                      workers=a.workers, progress=a.n >= 4096)
        print(f"wrote {a.n} capture(s) to {a.parquet} ({len(files)} file(s))")
        return 0
    s = make_samples(a.n, a.seed, form=a.form, max_missing=a.max_missing)
    body = s.requests[0] if a.n == 1 else {"captures": s.requests}
    Path(a.out).write_bytes(orjson.dumps(body))
    truth = [{"latitude": float(la), "longitude": float(lo)} for la, lo in s.truth_latlon]
    if a.truth:
        Path(a.truth).write_text(json.dumps(truth, indent=1))
    print(f"wrote {a.n} capture(s) to {a.out}" + (f", truth to {a.truth}" if a.truth else ""))
    return 0


def cmd_batch(a: argparse.Namespace) -> int:
    """Localize a Parquet capture dataset on Ray Data into a GeoParquet dataset."""
    if os.environ.get("RAY_ADDRESS", "local") == "local":  # a local instance: on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    private_ray_token(os.environ)  # Ray would write a missing one readable by all
    from serve_app.batch import run_batch

    summary = run_batch(a.input, a.output, batch_size=a.batch_size, max_actors=a.max_actors,
                        min_actors=a.min_actors, num_cpus=a.num_cpus, model_path=a.model,
                        confidence_level=a.confidence_level, rows_per_file=a.rows_per_file,
                        overwrite=a.overwrite, progress=not a.no_progress,
                        object_store_mib=a.object_store_mib)
    if a.json_summary:
        print(json.dumps(summary))
    elif summary["skipped"]:
        print(f"{summary['output']} is already complete ({summary['captures']} captures, "
              f"{summary['failed']} failed, finished {summary['finished']}); nothing to do "
              "(--overwrite runs the job again)")
    else:
        busy = summary["busy_captures_s"]
        print(f"{summary['captures']} captures, {summary['failed']} failed, "
              f"{summary['captures_s']:,.0f} captures/s"
              + (f" ({busy:,.0f}/s while the actors were busy)" if busy else "")
              + f" -> {summary['output']} ({summary['files']} file(s))")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    """POST a request file, or a SigMF recording set decoded into one, and print the answer."""
    import httpx

    capture = None
    if Path(a.file).is_dir() or a.file.lower().endswith((".sigmf", ".sigmf.gz", ".sigmf.xz")):
        import orjson

        from serve_app.io.sigmf import read_recording_set
        from serve_app.receivers import load_network

        capture = read_recording_set(a.file, load_network(a.receivers), start=a.start,
                                     match_distance_m=a.match_distance_m)
        body = orjson.dumps(capture.to_request(confidence_level=a.confidence_level))
        print(f"{a.file}: {len(capture.receiver_ids)} recordings "
              f"({', '.join(capture.receiver_ids)}), window at {capture.start or 'sample 0'}",
              file=sys.stderr)
    else:
        body = Path(a.file).read_bytes()
    path = "/predict/batch" if body.lstrip()[:20].startswith(b'{"captures"') else "/predict"
    r = httpx.post(a.url.rstrip("/") + path, content=body, timeout=a.timeout,
                   headers={"content-type": "application/json"})
    out = r.json()
    if capture is not None and r.status_code != 200:  # name the recording, not the row
        m = re.match(r"receivers\[(\d+)\]", str((out.get("error") or {}).get("field")))
        if m and int(m.group(1)) < len(capture.files):
            out["error"]["file"] = capture.files[int(m.group(1))]
    if not a.full and r.status_code == 200:
        items = [x.get("result") for x in out["results"]] if "results" in out else [out]
        out = [{k: v for k, v in (it or {}).items() if k != "geojson"} for it in items]
    print(json.dumps(out, indent=2))
    return 0 if r.status_code == 200 else 1


def cmd_register(a: argparse.Namespace) -> int:
    """Register an ONNX file (with its model card) as a new version."""
    from serve_app.model import OnnxLocalizer
    from serve_app.receivers import load_network

    path = Path(a.path)
    OnnxLocalizer(path, load_network().ids)  # refuse what would never load
    card_path = Path(a.card) if a.card else path.with_name("model_card.json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    version = _registry(a.model_name).register(path, card, description=a.description)
    print(f"registered {a.model_name} version {version}")
    return 0


def cmd_promote(a: argparse.Namespace) -> int:
    """Point an alias at a version."""
    _registry(a.model_name).set_alias(a.alias, a.version)
    print(f"{a.model_name}@{a.alias} -> version {a.version}")
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    """Move an alias back to the version it pointed to before."""
    version = _registry(a.model_name).rollback(a.alias)
    print(f"{a.model_name}@{a.alias} -> version {version}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    """List versions, aliases and accuracy."""
    rows = _registry(a.model_name).versions()
    if a.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'version':>7}  {'aliases':<24} {'median km':>9} {'cov95':>6}  sha256")
    for r in rows:
        acc = r.get("accuracy") or {}
        med = acc.get("median_m")
        cov = acc.get("coverage_0.95")
        print(f"{r['version']:>7}  {','.join(r.get('aliases') or []):<24} "
              f"{(med / 1000) if med else float('nan'):>9.1f} "
              f"{cov if cov is not None else float('nan'):>6.3f}  {(r.get('sha256') or '')[:12]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `rfloc`."""
    p = argparse.ArgumentParser(prog="rfloc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the service in the foreground (embedded defaults)")
    s.add_argument("--config", default=str(DEFAULT_CONFIG))
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("simulate", help="write simulated capture requests to a file")
    s.add_argument("--out", default="sample_request.json")
    s.add_argument("--n", type=int, default=1)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--form", choices=["b64", "pairs", "int16", "cf32_le", "ci16_le", "ci8", "cu8"],
                   default="b64", help="b64 (complex64), pairs, or the iq_b64 dtype")
    s.add_argument("--max-missing", type=int, default=0)
    s.add_argument("--truth", default=None, help="also write the true positions here")
    s.add_argument("--parquet", default=None, metavar="DIR",
                   help="write a capture dataset for `rfloc batch` into DIR instead")
    s.add_argument("--shards", type=int, default=None,
                   help="files of the --parquet dataset (default: one per 2,048 captures)")
    s.add_argument("--workers", type=int, default=1, help="processes simulating --parquet")
    s.add_argument("--sigmf", default=None, metavar="DIR",
                   help="write SigMF recording sets DIR/0000, DIR/0001, ... instead")
    s.add_argument("--datatype", "--dtype", dest="datatype", default=None,
                   choices=["cf32_le", "ci16_le", "ci8", "cu8"],
                   help="sample type (SigMF name) of --sigmf recordings (default ci16_le; the "
                        "8-bit types too) or of the --parquet dataset (default cf32_le)")
    s.add_argument("--archive", action="store_true",
                   help="write each recording set as one .sigmf archive")
    s.add_argument("--receivers", default=None, help="receivers.yaml (default: the shipped)")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("batch", help="localize a Parquet capture dataset offline on Ray Data")
    s.add_argument("input", help="Parquet capture dataset: a file, a directory, a glob or a "
                                 "URI; or a local directory of SigMF recording sets")
    s.add_argument("output", help="GeoParquet dataset to write: a directory (path or URI)")
    s.add_argument("--batch-size", type=int, default=256, help="captures per actor call")
    s.add_argument("--max-actors", type=int, default=None,
                   help="upper bound of the autoscaling actor pool (default: CPUs / num-cpus)")
    s.add_argument("--min-actors", type=int, default=1, help="lower bound of the actor pool")
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    s.add_argument("--model", default=None, help="ONNX file (default: the shipped model)")
    s.add_argument("--confidence-level", type=float, default=0.95)
    s.add_argument("--rows-per-file", type=int, default=8192,
                   help="at least this many rows per output file (the last may have fewer)")
    s.add_argument("--overwrite", action="store_true",
                   help="run again over a completed OUTPUT and replace it")
    s.add_argument("--object-store-mib", type=int, default=None,
                   help="object store size of the local Ray instance this command starts")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json-summary", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_batch)

    s = sub.add_parser("predict", help="POST a request file or a SigMF recording set to a "
                                       "running service")
    s.add_argument("file", help="request JSON, or a SigMF recording set: a directory of "
                                ".sigmf-meta/.sigmf-data pairs or a .sigmf archive")
    s.add_argument("--start", default=None,
                   help="recording sets: first sample time of the window (ISO 8601 UTC, "
                        "e.g. 2026-11-30T17:00:00.25Z); default the start of the overlap")
    s.add_argument("--receivers", default=None,
                   help="recording sets: receivers.yaml to match against (default: the shipped)")
    s.add_argument("--match-distance-m", type=float, default=500.0,
                   help="recording sets: how far a core:geolocation may be from its receiver")
    s.add_argument("--confidence-level", type=float, default=0.95,
                   help="recording sets: the ellipse's confidence level")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--full", action="store_true", help="print the GeoJSON too")
    s.set_defaults(func=cmd_predict)

    for name, func, help_ in (
        ("register", cmd_register, "register an ONNX model as a new version"),
        ("promote", cmd_promote, "point an alias at a version"),
        ("rollback", cmd_rollback, "move an alias back to its previous version"),
        ("models", cmd_models, "list versions, aliases and accuracy"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model-name", default="localization_model")
        s.set_defaults(func=func)
        if name == "register":
            s.add_argument("path")
            s.add_argument("--card", default=None)
            s.add_argument("--description", default="")
        if name == "promote":
            s.add_argument("version")
        if name in ("promote", "rollback"):
            s.add_argument("--alias", default="production")
        if name == "models":
            s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rfloc` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    from serve_app.errors import RflocError

    try:
        return int(a.func(a))
    except RflocError as exc:
        print(f"rfloc {a.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
