"""Fault scenarios under steady load, shared by tests/test_faults_ray.py and load/reliability.py.

Each scenario drives concurrent clients at a running service, injects one fault (a replica
killed, Redis killed and restarted, a model reload, the registry gone, overload) and returns
a `Row`: the fault, the load during it, requests sent, failed, the failure codes and the time
to recover. No pytest here: the scenarios need a connected Ray driver (`ray.init`) on the
cluster that runs the service, and send traffic to loopback (or the netns test hosts of
load/harness/multinode.py) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from .deploy import deploy, with_second_app
from .http1 import Connection
from .net import check_target, free_port, wait_http
from .procs import children_named, cpu_s, descendants, rss_mb
from .replicas import (
    SERVE_NAMESPACE,
    deployment_ready,
    proxy_pids,
    replica_names,
    replica_pid,
    wait_replaced,
)
from .servers import MlflowServer, RedisServer

# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent and answered (monotonic s), its status and headers."""

    t_sent: float
    t_done: float
    status: int  # HTTP status; -1 connection error, -2 client timeout
    retry_after: str | None = None
    version: str | None = None  # model version of a 200 answer (when recorded)
    error: str | None = None  # the client-side exception of a -1 / -2

    @property
    def latency_s(self) -> float:
        return self.t_done - self.t_sent


class SteadyLoad:
    """`clients` concurrent clients POSTing `bodies` in turn, bounded by count and time.

    With `rate_rps` the clients share that total rate (each waits for its slot); without it
    each sends back to back. `honor_retry_after` makes a client wait Retry-After seconds after
    a 503, as a well-behaved client would. Each client keeps one HTTP/1.1 connection (a
    lean asyncio client: 600 clients cost well under a core). Runs on its own event loop in
    a thread; use as a context manager or start()/stop().
    """

    def __init__(self, url: str, bodies: list[bytes], *, clients: int = 4,
                 rate_rps: float | None = 20.0, path: str = "/predict",
                 max_requests: int = 100_000, max_s: float = 600.0, timeout_s: float = 60.0,
                 honor_retry_after: bool = False, record_version: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        check_target(url)
        self.url, self.path, self.bodies = url.rstrip("/"), path, bodies
        self.clients, self.rate_rps = clients, rate_rps
        self.max_requests, self.max_s, self.timeout_s = max_requests, max_s, timeout_s
        self.honor_retry_after, self.record_version = honor_retry_after, record_version
        self.headers = {"content-type": "application/json", **(headers or {})}
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self.t_start = self.t_stop = 0.0

    @property
    def load(self) -> tuple[int, float | None]:
        return self.clients, self.rate_rps

    def start(self) -> SteadyLoad:
        self.t_start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 30)
        self.t_stop = time.monotonic()
        return list(self.samples)

    def __enter__(self) -> SteadyLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        parts = urlsplit(self.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = (parts.path.rstrip("/") + self.path) or "/"
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        heads = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
                  f"Content-Length: {len(b)}\r\n\r\n").encode() for b in self.bodies]
        counter = iter(range(self.max_requests))
        t0 = time.monotonic()
        deadline = t0 + self.max_s

        async def one_client(k: int) -> None:
            conn = Connection(host, port)
            try:
                for n, i in enumerate(counter):
                    now = time.monotonic()
                    if self._stop.is_set() or now >= deadline:
                        return
                    if self.rate_rps:
                        due = t0 + (n * self.clients + k) / self.rate_rps
                        if due > now:
                            await asyncio.sleep(min(due - now, deadline - now))
                            if self._stop.is_set():
                                return
                    j = i % len(self.bodies)
                    s = await self._send(conn, heads[j], self.bodies[j])
                    self.samples.append(s)
                    if self.honor_retry_after and s.status == 503 and s.retry_after:
                        with contextlib.suppress(ValueError):
                            await asyncio.sleep(float(s.retry_after))
            finally:
                conn.close()

        await asyncio.gather(*(one_client(k) for k in range(self.clients)))

    async def _send(self, conn: Connection, head: bytes, body: bytes) -> Sample:
        t = time.monotonic()
        try:
            status, headers, content = await asyncio.wait_for(conn.request(head, body),
                                                              self.timeout_s)
        except TimeoutError:
            conn.close()
            return Sample(t, time.monotonic(), -2, error="no answer within the client timeout")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            conn.close()
            return Sample(t, time.monotonic(), -1, error=repr(exc)[:200])
        version = None
        if self.record_version and status == 200:
            with contextlib.suppress(Exception):
                version = orjson.loads(content)["model"]["version"]
        return Sample(t, time.monotonic(), status, headers.get("retry-after"), version)


# -- a scenario's outcome --------------------------------------------------------------------


@dataclass
class Row:
    """One line of the reliability table."""

    fault: str
    clients: int
    rate_rps: float | None
    sent: int
    failed: int
    codes: dict[int, int]  # status of the failed requests -> count (-1 conn. error, -2 timeout)
    recovery_s: float | None
    p50_ms: float
    p99_ms: float
    max_ms: float
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def load(self) -> str:
        rate = f"{self.rate_rps:g} req/s" if self.rate_rps else "back to back"
        return f"{self.clients} clients, {rate}"

    def as_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "load": self.load, "sent": self.sent,
                "failed": self.failed, "codes": self.codes, "recovery_s": self.recovery_s,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
                "notes": self.notes, **self.extra}


@dataclass(frozen=True)
class _Load:
    clients: int
    rate_rps: float | None


def summarize(fault: str, load: SteadyLoad | _Load, samples: list[Sample], recovery_s: float | None,
              notes: str = "", ok: Iterable[int] = (200,), **extra: Any) -> Row:
    """A Row from the samples of one scenario; statuses in `ok` are not failures."""
    ok = set(ok)
    bad = Counter(s.status for s in samples if s.status not in ok)
    errors = Counter(s.error for s in samples if s.error)
    if errors:
        notes += "; client-side errors: " + ", ".join(f"{e} x{n}" for e, n in errors.items())
    lat = np.array([s.latency_s for s in samples if s.status == 200] or [np.nan]) * 1000.0
    return Row(fault, load.clients, load.rate_rps, len(samples), sum(bad.values()),
               dict(sorted(bad.items())), recovery_s, float(np.nanpercentile(lat, 50)),
               float(np.nanpercentile(lat, 99)), float(np.nanmax(lat)), notes, extra)


def last_failure(samples: list[Sample], after: float) -> float | None:
    """When the last non-200 answer after `after` arrived (monotonic s), None if none."""
    times = [s.t_done for s in samples if s.status != 200 and s.t_done >= after]
    return max(times) if times else None


# -- requests --------------------------------------------------------------------------------


def request_bodies(n: int = 8, seed: int = 23, *, cache: bool = False,
                   form: str = "b64") -> list[bytes]:
    """`n` simulated standard captures as /predict bodies."""
    from serve_app.samples import make_samples

    reqs = make_samples(n, seed, form=form).requests  # type: ignore[arg-type]
    return [orjson.dumps({**r, "cache": cache}) for r in reqs]


# -- scenarios -------------------------------------------------------------------------------


def kill_replica(url: str, deployment: str, bodies: list[bytes], *, app: str = "rfloc",
                 clients: int = 4, rate_rps: float = 20.0, warm_s: float = 3.0,
                 settle_s: float = 3.0, timeout_s: float = 180.0) -> Row:
    """`ray.kill` one replica of `deployment` under load; Serve replaces it.

    Recovery: from the kill until the replacement runs and the last failure (if any) is past.
    """
    import ray

    before = replica_names(app, deployment)
    if not before:
        raise RuntimeError(f"no live replica of {app}/{deployment}")
    victim = before[0]
    load = SteadyLoad(url, bodies, clients=clients, rate_rps=rate_rps)
    with load:
        time.sleep(warm_s)
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace=SERVE_NAMESPACE), no_restart=True)
        try:
            replaced = wait_replaced(app, deployment, victim, set(before), timeout_s)
        except TimeoutError:
            replaced = None
        time.sleep(settle_s)
    samples = load.samples
    last_bad = last_failure(samples, t_kill)
    recovery = None if replaced is None else max(replaced, last_bad or 0.0) - t_kill
    during = [s for s in samples if s.t_sent <= (replaced or load.t_stop) and s.t_done >= t_kill]
    worst = max((s.latency_s for s in during if s.status == 200), default=float("nan"))
    notes = (f"{len(before)} replica(s) before; replacement running after "
             f"{(replaced - t_kill):.1f} s" if replaced else "replacement did not come up")
    bad_at = [f"{s.t_sent - t_kill:+.1f}" for s in samples if s.status != 200]
    if bad_at:
        notes += f"; failed requests sent at {', '.join(bad_at[:10])} s from the kill"
    return summarize(f"{deployment} replica killed (ray.kill)", load, samples, recovery,
                     notes + f"; slowest answer across the kill {worst:.1f} s",
                     replaced_s=None if replaced is None else replaced - t_kill)


def replica_processes(root: int, app: str, deployment: str) -> list[int]:
    """PIDs of the replica processes of `app`/`deployment` among `root`'s descendants.

    Found by the process title Ray gives a replica (`ray::ServeReplica:<app>:<deployment>`),
    so no Ray driver is needed (e.g. for the cluster `rfloc serve` starts).
    """
    title = f"ray::ServeReplica:{app}:{deployment}".encode()
    out = []
    for pid in descendants({root}):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].strip()
            if argv0 == title:
                out.append(pid)
    return sorted(out)


def start_rfloc_serve(workdir: Path, cfg: dict, extra_env: dict[str, str] | None = None,
                      timeout_s: float = 300.0) -> tuple[subprocess.Popen[bytes], str]:
    """`rfloc serve --config` of `cfg` (fresh state and Ray token under `workdir`), once its
    /health answers: (the process, its URL). Binds HAProxy mode's fixed ports."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "serve_config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RFLOC_", "REDIS_URL", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(RFLOC_STATE_DIR=str(workdir / "state"),
               RAY_AUTH_TOKEN_PATH=str(workdir / "ray" / "auth_token"), **(extra_env or {}))
    rfloc = shutil.which("rfloc") or str(Path(sys.executable).parent / "rfloc")
    with (workdir / "serve.log").open("wb") as log:
        proc = subprocess.Popen([rfloc, "serve", "--config", str(config)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{cfg['http_options']['port']}"
    try:
        wait_http(url + "/health", timeout_s=timeout_s)
    except BaseException as exc:
        stop_rfloc_serve(proc)
        log = (workdir / "serve.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"rfloc serve did not come up; its log ends:\n{log}") from exc
    return proc, url


def stop_rfloc_serve(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C `rfloc serve`, then SIGKILL whatever of its process tree is left."""
    tree = descendants({proc.pid})
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=120)
    for pid in tree - {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_replicas(root: int, n: dict[str, int], app: str = "rfloc",
                  timeout_s: float = 300.0) -> None:
    """Wait until each deployment of `n` has that many replica processes under `root`."""
    deadline = time.monotonic() + timeout_s
    for deployment, count in n.items():
        while len(replica_processes(root, app, deployment)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} {deployment} replicas")
            time.sleep(1)


def kill_ingress(url: str, root: int, bodies: list[bytes], *, app: str = "rfloc",
                 clients: int = 4, rate_rps: float | None = None, warm_s: float = 5.0,
                 settle_s: float = 15.0, timeout_s: float = 180.0) -> Row:
    """`kill -9` of one Ingress replica process (under `root`) under load.

    Meant for HAProxy mode with two or more Ingress replicas: HAProxy sends each request to
    an Ingress replica directly, so a request in flight on the killed one is lost unless
    HAProxy retries it elsewhere. Serve starts a replacement; `settle_s` covers HAProxy's
    reload once it registers. Recovery: from the kill until the replacement process exists
    and the last failure (if any) is past.
    """
    before = replica_processes(root, app, "Ingress")
    if not before:
        raise RuntimeError(f"no Ingress replica process of {app} under pid {root}")
    victim = before[0]
    load = SteadyLoad(url, bodies, clients=clients, rate_rps=rate_rps)
    replaced = None
    with load:
        time.sleep(warm_s)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = t_kill + timeout_s
        while time.monotonic() < deadline:
            now = set(replica_processes(root, app, "Ingress"))
            if victim not in now and len(now) >= len(before) and now - set(before):
                replaced = time.monotonic()
                break
            time.sleep(0.2)
        time.sleep(settle_s)
    samples = load.samples
    last_bad = last_failure(samples, t_kill)
    recovery = None if replaced is None else max(replaced, last_bad or 0.0) - t_kill
    during = [s for s in samples if s.t_done >= t_kill]
    worst = max((s.latency_s for s in during if s.status == 200), default=float("nan"))
    notes = (f"{len(before)} Ingress replica(s) before; a new replica process after "
             f"{replaced - t_kill:.1f} s" if replaced else "no replacement process appeared")
    bad_at = [f"{s.t_sent - t_kill:+.1f}" for s in samples if s.status != 200]
    if bad_at:
        notes += f"; failed requests sent at {', '.join(bad_at[:10])} s from the kill"
    return summarize("Ingress replica killed (kill -9)", load, samples, recovery,
                     notes + f"; slowest answer after the kill {worst:.2f} s",
                     replaced_s=None if replaced is None else replaced - t_kill,
                     replicas=len(before))


def freeze_replica(base_cfg: dict, deployment: str = "Preprocessor", *, freeze_s: float = 12.0,
                   clients: int = 2, rate_rps: float = 20.0, warm_s: float = 3.0,
                   settle_s: float = 3.0) -> Row:
    """One of two replicas of `deployment` stops answering (SIGSTOP) for `freeze_s`, under load.

    A hung process, or one on a node that is gone but not yet declared dead, holds the calls
    sent to it without failing them. Runs on a second app at /faultfreeze with two replicas of
    `deployment`; expected: no request fails and none waits out the freeze (the Ingress's
    per-try deadline, `chain_timeout_s`, retries them). `base_cfg` alone is deployed again at
    the end.
    """
    port = int(base_cfg["http_options"]["port"])
    url = f"http://127.0.0.1:{port}/faultfreeze"

    def two(d: dict) -> None:
        if d["name"] == deployment:
            d["num_replicas"] = 2

    try:
        deploy(with_second_app(base_cfg, "faultfreeze", "/faultfreeze", {}, two))
        wait_http(url + "/health", timeout_s=300)
        deadline = time.monotonic() + 180
        while len(names := replica_names("faultfreeze", deployment)) < 2 or not (
                deployment_ready("faultfreeze", deployment)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultfreeze/{deployment}: 2 replicas did not come up")
            time.sleep(0.5)
        pid = replica_pid(names[0])
        load = SteadyLoad(url, request_bodies(8, seed=43), clients=clients, rate_rps=rate_rps)
        with load:
            time.sleep(warm_s)
            t_freeze = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(freeze_s)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            time.sleep(settle_s)
    finally:
        deploy(base_cfg)
    samples = load.samples
    during = [s for s in samples if s.t_done >= t_freeze and s.t_sent <= t_freeze + freeze_s]
    worst = max((s.latency_s for s in during if s.status == 200), default=float("nan"))
    notes = (f"1 of 2 {deployment} replicas SIGSTOPped for {freeze_s:g} s; slowest answer "
             f"across the freeze {worst:.1f} s")
    return summarize(f"{deployment} replica hung (SIGSTOP)", load, samples, None, notes,
                     freeze_s=freeze_s, slowest_s=worst)


def _first_time(check: Callable[[], bool], deadline: float, interval_s: float) -> float | None:
    """The monotonic time `check()` first held, polling until `deadline`; None if never."""
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval_s)
    return None


def _cache_health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json().get("cache", {})


def redis_restart(base_cfg: dict, *, clients: int = 4, rate_rps: float = 20.0,
                  down_s: float = 5.0, warm_s: float = 3.0, settle_s: float = 3.0,
                  timeout_s: float = 120.0) -> Row:
    """Redis killed and restarted under load, on a second app using our own redis-server.

    The app is `base_cfg`'s first app again at /faultredis with REDIS_URL pointing at a
    redis-server on a free port; `base_cfg` alone is deployed again at the end. Recovery:
    from the restart until the cache's breaker is closed and cache hits resume.
    """
    port = int(base_cfg["http_options"]["port"])
    url = f"http://127.0.0.1:{port}/faultredis"
    bodies = request_bodies(8, seed=31, cache=True)
    with tempfile.TemporaryDirectory(prefix="rfloc-redis-") as tmp:
        redis = RedisServer(free_port(), Path(tmp))
        redis.start()
        try:
            deploy(with_second_app(base_cfg, "faultredis", "/faultredis",
                                   {"REDIS_URL": redis.url}))
            wait_http(url + "/health", timeout_s=300)
            for b in bodies:  # fill the cache
                httpx.post(url + "/predict", content=b, timeout=60,
                           headers={"content-type": "application/json"})
            load = SteadyLoad(url, bodies, clients=clients, rate_rps=rate_rps)
            with load:
                time.sleep(warm_s)
                hits_up = _cache_health(url)["stats"]["hits"]
                t_kill = time.monotonic()
                redis.kill()
                time.sleep(down_s)
                down = _cache_health(url)
                t_restart = time.monotonic()
                redis.start()
                hits0 = _cache_health(url)["stats"]["hits"]

                def hitting() -> bool:
                    h = _cache_health(url)
                    return h.get("breaker") == "closed" and h["stats"]["hits"] > hits0

                recovered = _first_time(hitting, t_restart + timeout_s, 0.2)
                time.sleep(settle_s)
            samples = load.samples
        finally:
            redis.kill()
            deploy(base_cfg)
    recovery = None if recovered is None else recovered - t_restart
    notes = (f"Redis down {t_restart - t_kill:.1f} s (breaker {down.get('breaker')} while "
             f"down; {hits_up} hits before); cache hits again "
             + (f"{recovery:.1f} s after the restart" if recovery is not None else "never"))
    return summarize("Redis killed, restarted after 5 s", load, samples, recovery, notes)


def candidate_model(path: Path, name: str = "candidate") -> Path:
    """A copy of the shipped model with one more metadata entry (a new sha256)."""
    import onnx

    from serve_app.settings import DEFAULT_MODEL_DIR

    m = onnx.load(str(DEFAULT_MODEL_DIR / "localization_model.onnx"))
    m.metadata_props.add(key="variant", value=name)
    out = path / f"{name}.onnx"
    onnx.save(m, str(out))
    return out


def _wait_version(load: SteadyLoad, version: str, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        recent = [s.version for s in load.samples[-8:] if s.status == 200]
        if len(recent) >= 4 and all(v == version for v in recent):
            return time.monotonic()
        time.sleep(0.1)
    return None


def model_reload(url: str, registry: Any, admin_token: str, bodies: list[bytes], *,
                 alias: str = "production", clients: int = 4, rate_rps: float = 20.0,
                 warm_s: float = 2.0, timeout_s: float = 60.0) -> Row:
    """Promote a new registered version and POST /model/reload under load, then roll back.

    Recovery: from the reload call until every answer carries the new version.
    """
    headers = {"Authorization": f"Bearer {admin_token}"}
    v_old = httpx.get(url + "/model/info", timeout=30).json()["model"]["version"]
    with tempfile.TemporaryDirectory(prefix="rfloc-candidate-") as tmp:
        v_new = registry.register(candidate_model(Path(tmp)), description="reliability run")
    load = SteadyLoad(url, bodies, clients=clients, rate_rps=rate_rps, record_version=True)
    codes = []
    with load:
        time.sleep(warm_s)
        t0 = time.monotonic()
        registry.set_alias(alias, v_new)
        codes.append(httpx.post(url + "/model/reload", headers=headers, timeout=60).status_code)
        switched = _wait_version(load, v_new, timeout_s)
        t1 = time.monotonic()
        registry.set_alias(alias, v_old)
        codes.append(httpx.post(url + "/model/reload", headers=headers, timeout=60).status_code)
        back = _wait_version(load, v_old, timeout_s)
        time.sleep(1.0)
    samples = load.samples
    versions = Counter(s.version for s in samples if s.status == 200)
    recovery = None if switched is None else switched - t0
    notes = (f"v{v_old} → v{v_new} → v{v_old}; reload answered {codes}; every answer on the "
             f"new version {recovery:.1f} s after the reload, back in "
             f"{(back - t1) if back else float('nan'):.1f} s; answers per version "
             f"{dict(versions)}" if recovery is not None else "never switched")
    return summarize("model reload (promote, then roll back)", load, samples, recovery, notes,
                     reload_codes=codes, versions=dict(versions))


def registry_unreachable(base_cfg: dict, admin_token: str, *, clients: int = 4,
                         rate_rps: float = 10.0, down_s: float = 5.0, warm_s: float = 2.0,
                         timeout_s: float = 120.0) -> Row:
    """The MLflow server stops under load, a reload is asked for, then the server returns.

    A second app at /faultregistry follows a real `mlflow server`; `base_cfg` alone is
    deployed again at the end. Recovery: from the server's restart until /health is "ok".
    """
    port = int(base_cfg["http_options"]["port"])
    url = f"http://127.0.0.1:{port}/faultregistry"
    headers = {"Authorization": f"Bearer {admin_token}"}
    bodies = request_bodies(4, seed=37)
    with tempfile.TemporaryDirectory(prefix="rfloc-mlflow-") as tmp:
        server = MlflowServer(free_port(), Path(tmp))
        server.start()
        try:
            deploy(with_second_app(base_cfg, "faultregistry", "/faultregistry", {
                "MLFLOW_TRACKING_URI": server.url, "RFLOC_STATE_DIR": str(Path(tmp) / "st")}))
            wait_http(url + "/health", timeout_s=300)
            load = SteadyLoad(url, bodies, clients=clients, rate_rps=rate_rps)
            with load:
                time.sleep(warm_s)
                t_stop = time.monotonic()
                server.stop()
                reload = httpx.post(url + "/model/reload", headers=headers, timeout=60)
                time.sleep(down_s)
                degraded = httpx.get(url + "/health", timeout=30).json().get("status")
                t_restart = time.monotonic()
                server.start()

                def reloaded() -> bool:
                    r = httpx.post(url + "/model/reload", headers=headers, timeout=60)
                    return r.status_code == 200 and httpx.get(
                        url + "/health", timeout=30).json().get("status") == "ok"

                recovered = _first_time(reloaded, t_restart + timeout_s, 0.5)
                time.sleep(1.0)
            samples = load.samples
        finally:
            server.stop()
            deploy(base_cfg)
    recovery = None if recovered is None else recovered - t_restart
    notes = (f"registry down {t_restart - t_stop:.1f} s: reload answered {reload.status_code} "
             f"(Retry-After {reload.headers.get('retry-after')}), health {degraded!r}; "
             "health 'ok' and reload 200 "
             + (f"{recovery:.1f} s after the restart" if recovery is not None else "never"))
    return summarize("registry (MLflow server) unreachable during a reload", load, samples,
                     recovery, notes, reload_status=reload.status_code, health_down=degraded)


def downstream_backpressure(base_cfg: dict, *, clients: int = 16, duration_s: float = 8.0
                            ) -> Row:
    """The ingress's own handle calls hit a full downstream queue (BackPressureError).

    A second app at /faultqueue whose Postprocessor takes one request at a time and queues
    one; pinned requests (which skip the ingress's chain batching) pile up on it. Expected:
    200 or 503 with Retry-After from the ingress, nothing else. `base_cfg` alone is
    deployed again at the end.
    """
    port = int(base_cfg["http_options"]["port"])
    url = f"http://127.0.0.1:{port}/faultqueue"

    def squeeze(d: dict) -> None:
        if d["name"] == "Postprocessor":
            d.update(max_ongoing_requests=1, max_queued_requests=1)

    try:
        deploy(with_second_app(base_cfg, "faultqueue", "/faultqueue", {}, squeeze))
        wait_http(url + "/health", timeout_s=300)
        version = httpx.get(url + "/model/info", timeout=30).json()["model"]["version"]
        bodies = [orjson.dumps({**orjson.loads(b), "model_version": version})
                  for b in request_bodies(4, seed=41)]
        load = SteadyLoad(url, bodies, clients=clients, rate_rps=None, max_s=duration_s)
        with load:
            time.sleep(duration_s)
        after = [httpx.post(url + "/predict", content=bodies[0], timeout=60,
                            headers={"content-type": "application/json"}).status_code
                 for _ in range(5)]
    finally:
        deploy(base_cfg)
    samples = load.samples
    shed = [s for s in samples if s.status == 503]
    with_header = sum(1 for s in shed if s.retry_after)
    notes = (f"Postprocessor max_ongoing_requests=1, max_queued_requests=1; pinned requests; "
             f"{len(shed)} answered 503 by the ingress, {with_header} with Retry-After; "
             f"then 5 sequential requests: {after}")
    return summarize("downstream queue full (ingress handle gets BackPressureError)", load,
                     samples, None, notes, ok=(200, 503), shed=len(shed),
                     shed_with_retry_after=with_header, after=after)


class _RssSampler:
    """Samples the RSS of some processes every `interval_s` in a thread."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.5) -> None:
        self.pids, self.interval_s = pids, interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_share(self, key: str, t0: float, t1: float) -> float:
        """Mean CPU use of one process between t0 and t1, in cores."""
        inside = [(t, v[key]) for t, v in self.cpu if t0 <= t <= t1]
        if len(inside) < 2:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(),
                                     {k: rss_mb(p) for k, p in self.pids.items()}))
                self.cpu.append((time.monotonic(),
                                 {k: cpu_s(p) for k, p in self.pids.items()}))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def peak(self, key: str, t0: float, t1: float) -> float:
        return max((v[key] for t, v in self.samples if t0 <= t <= t1), default=float("nan"))


def overload(url: str, bodies: list[bytes], *, app: str = "rfloc", clients: int = 600,
             round_s: float = 15.0, rounds: int = 2, gap_s: float = 5.0,
             honor_retry_after: bool = True, after_s: float = 10.0) -> Row:
    """Far more concurrent clients than the service holds, in rounds; then light load again.

    Expected: answers are 200 or 503 with Retry-After (the proxy's max_queued_requests, or
    the ingress's BackPressureError mapping), never a timeout; the ingress's and the proxy's
    RSS stop growing (the second round peaks no higher than the first); light load is
    served again at once. Recovery: from the end of the overload until ten answers in a row
    are 200.
    """
    [ingress] = replica_names(app, "Ingress")
    proxies = proxy_pids()
    haproxy = [h for p in proxies for h in children_named(p, "haproxy")]
    pids = {"ingress": replica_pid(ingress),
            **{f"proxy{i}": p for i, p in enumerate(proxies)},
            **{f"haproxy{i}": p for i, p in enumerate(haproxy)},
            **{dep: replica_pid(replica_names(app, dep)[0])
               for dep in ("Preprocessor", "LocalizationModel", "Postprocessor")}}
    samples: list[Sample] = []
    spans: list[tuple[float, float]] = []
    with _RssSampler(pids) as rss:
        time.sleep(1.5)
        for r in range(rounds):
            if r:
                time.sleep(gap_s)
            load = SteadyLoad(url, bodies, clients=clients, rate_rps=None, max_s=round_s,
                              honor_retry_after=honor_retry_after, timeout_s=60.0)
            t0 = time.monotonic()
            with load:
                time.sleep(round_s)
            spans.append((t0, time.monotonic()))
            samples += load.samples
        t_drop = spans[-1][1]
        light = SteadyLoad(url, bodies, clients=2, rate_rps=10.0, max_s=after_s)
        with light:
            time.sleep(after_s)
        time.sleep(1.0)
    before = {k: rss.peak(k, 0.0, spans[0][0]) for k in pids}
    peaks = [{k: rss.peak(k, a, b) for k in pids} for a, b in spans]
    after = {k: rss.samples[-1][1][k] for k in pids}
    recovered = None
    run = 0
    for s in light.samples:
        run = run + 1 if s.status == 200 else 0
        if run == 10:
            recovered = s.t_done
            break
    shed = [s for s in samples if s.status == 503]
    with_header = sum(1 for s in shed if s.retry_after)
    ok = sum(s.status == 200 for s in samples)
    busy_s = sum(b - a for a, b in spans)
    cpu = {k: round(rss.cpu_share(k, spans[0][0], t_drop), 2) for k in pids}

    def mib(d: dict, k: str) -> str:
        return f"{d.get(k, float('nan')):.0f}"

    notes = (f"{rounds} rounds of {round_s:g} s; {ok} answered 200 ({ok / busy_s:.0f}/s), "
             f"{len(shed)} shed with 503, {with_header} of them with Retry-After; "
             f"RSS MiB ingress {mib(before, 'ingress')} → peaks "
             f"{' / '.join(mib(p, 'ingress') for p in peaks)} → {mib(after, 'ingress')}"
             + "".join(f", {k} {mib(before, k)} → peaks {' / '.join(mib(p, k) for p in peaks)}"
                       f" → {mib(after, k)}" for k in pids if k.startswith(("proxy0", "haproxy")))
             + "; "
             f"light load after: {dict(Counter(s.status for s in light.samples))}")
    return summarize(f"overload: {clients} clients, far beyond capacity", _Load(clients, None),
                     samples, None if recovered is None else recovered - t_drop, notes,
                     shed=len(shed), shed_with_retry_after=with_header, ok_answers=ok,
                     rss_before_mb=before, rss_peaks_mb=peaks, rss_after_mb=after,
                     light_after=dict(Counter(s.status for s in light.samples)),
                     inflight_max=_max_inflight(samples), cpu_cores=cpu)


def _max_inflight(samples: list[Sample]) -> int:
    events = sorted([(s.t_sent, 1) for s in samples] + [(s.t_done, -1) for s in samples])
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak
