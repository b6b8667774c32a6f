"""Custom metrics of the deployments, through `ray.serve.metrics`.

Build one role class per deployment in its `__init__` (never at import: a Serve metric
picks up the replica's context when it is created). Serve adds the tags `deployment`,
`replica` and `application`; Ray exports every metric as `ray_<name>` on each node's
metrics export port (counters with a `_total` suffix, histograms as `_bucket`, `_sum`,
`_count`). `METRICS` is the single list of names, types and labels; docs/observability.md
documents the same table and a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.pipeline import n_captures

PREFIX = "rfloc_"

LATENCY_BUCKETS_MS = [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
WAIT_BUCKETS_MS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 5000]
# Ray 2.60 exports a histogram's _sum from bucket midpoints, not the observed values, so
# integer-valued histograms get half-integer bounds: a bucket of one integer has that integer
# as its midpoint and the exported sum (and mean) stays exact where buckets are one wide.
BATCH_SIZE_BUCKETS = [0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5, 256.5, 512.5, 1024.5]
RECEIVER_BUCKETS = [n + 0.5 for n in range(17)]
# Ray's agent drops a gauge series its worker has not re-reported for two report intervals
# (metrics_report_interval_ms, 10 s by default): a set-once gauge vanishes, so refresh it.
GAUGE_REFRESH_S = 5.0
AREA_BUCKETS_KM2 = [10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000]
DISTANCE_BUCKETS_KM = [0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]


@dataclass(frozen=True)
class MetricSpec:
    """A metric's type, labels (besides Serve's own), meaning and histogram buckets."""

    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    description: str
    buckets: list[float] | None = None


METRICS: dict[str, MetricSpec] = {
    "rfloc_requests": MetricSpec(
        "counter",
        ("endpoint", "status"),
        "Requests answered by the ingress (HTTP, and gRPC infers), by route and status code.",
    ),
    "rfloc_stage_latency_ms": MetricSpec(
        "histogram",
        ("stage",),
        "Latency of a pipeline stage in ms: preprocess/inference per batch, postprocess per "
        "request group, total per /predict, /predict/batch or OIP infer request (REST or "
        "gRPC) in the ingress.",
        LATENCY_BUCKETS_MS,
    ),
    "rfloc_batch_size": MetricSpec(
        "histogram",
        (),
        "Captures per executed @serve.batch call (Preprocessor and LocalizationModel).",
        BATCH_SIZE_BUCKETS,
    ),
    "rfloc_batch_queue_wait_ms": MetricSpec(
        "histogram",
        (),
        "Per request: ms from entering the replica's @serve.batch queue to the start of the "
        "batch that runs it.",
        WAIT_BUCKETS_MS,
    ),
    "rfloc_cache_events": MetricSpec(
        "counter",
        ("event", "backend"),
        "Prediction cache outcomes: hit, miss, error (failed get/set), skipped "
        "(circuit breaker open), invalid (an entry that is not a cached prediction of the "
        "serving model: a miss, deleted).",
    ),
    "rfloc_model_version_info": MetricSpec(
        "gauge",
        ("version", "alias"),
        "1 for the model version a replica serves for its alias (re-reported every 5 s); 0, "
        "reported once, for the version it replaced.",
    ),
    "rfloc_model_reloads": MetricSpec(
        "counter",
        ("outcome",),
        "Model refreshes by outcome: success (a validated version swapped in, including the "
        "initial load), refused (failed validation), registry_error.",
    ),
    "rfloc_receivers_detected": MetricSpec(
        "histogram",
        (),
        "Receivers that detected the signal (in-channel SNR >= 3 dB), per capture.",
        RECEIVER_BUCKETS,
    ),
    "rfloc_ellipse_area_km2": MetricSpec(
        "histogram",
        (),
        "Area of the returned uncertainty ellipse in km^2, per localized capture (at the "
        "requested confidence level).",
        AREA_BUCKETS_KM2,
    ),
    "rfloc_challenger_requests": MetricSpec(
        "counter",
        ("outcome",),
        "Shadow runs on the challenger model: ok, error, skipped (too many in flight).",
    ),
    "rfloc_challenger_distance_km": MetricSpec(
        "histogram",
        ("version",),
        "Geodesic distance in km between the champion's and the challenger's position for "
        "the same capture.",
        DISTANCE_BUCKETS_KM,
    ),
    "rfloc_challenger_latency_ms": MetricSpec(
        "histogram",
        ("version",),
        "Latency in ms of a shadow run through the chain on the challenger model.",
        LATENCY_BUCKETS_MS,
    ),
}


def make_metric(name: str) -> Any:
    """The Serve metric `name` as specified in METRICS."""
    spec = METRICS[name]
    if spec.kind == "counter":
        return Counter(name, description=spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return Gauge(name, description=spec.description, tag_keys=spec.labels)
    return Histogram(
        name, description=spec.description, boundaries=spec.buckets, tag_keys=spec.labels
    )


# -- ingress -------------------------------------------------------------------------------

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"  # the endpoint of gRPC infers
PREDICT_ROUTES = ("/predict", "/predict/batch", "/v2/models/{name}/infer",
                  "/v2/models/{name}/versions/{version}/infer", GRPC_INFER)


class IngressMetrics:
    """Requests by endpoint and status, end-to-end latency, cache outcomes."""

    def __init__(self) -> None:
        self._requests = make_metric("rfloc_requests")
        self._latency = make_metric("rfloc_stage_latency_ms")
        self._cache = make_metric("rfloc_cache_events")
        self._challenger = make_metric("rfloc_challenger_requests")
        self._challenger_km = make_metric("rfloc_challenger_distance_km")
        self._challenger_ms = make_metric("rfloc_challenger_latency_ms")
        self._cache_seen: dict[str, int] = {}
        self._cache_lock = threading.Lock()

    def request(self, endpoint: str, status: int, elapsed_ms: float) -> None:
        """Count one answered request; a successful prediction also times stage "total"."""
        self._requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        if endpoint in PREDICT_ROUTES and status < 400:
            self._latency.observe(elapsed_ms, tags={"stage": "total"})

    def challenger(self, outcome: str, version: str | None = None,
                   distances_km: list[float] = (), latency_ms: float | None = None) -> None:
        """Record one shadow run on the challenger."""
        self._challenger.inc(tags={"outcome": outcome})
        if version is not None:
            for d in distances_km:
                self._challenger_km.observe(d, tags={"version": version})
            if latency_ms is not None:
                self._challenger_ms.observe(latency_ms, tags={"version": version})

    def sync_cache(self, cache: Any) -> None:
        """Add what the cache counted since the last call (its `stats` counters)."""
        if cache is None:
            return
        health = cache.health()
        events = {"hit": "hits", "miss": "misses", "error": "errors", "skipped": "skipped",
                  "invalid": "invalid"}
        with self._cache_lock:
            for event, key in events.items():
                now = health["stats"].get(key, 0)
                delta = now - self._cache_seen.get(key, 0)
                self._cache_seen[key] = now
                if delta > 0:
                    self._cache.inc(delta, tags={"event": event, "backend": health["backend"]})


class RequestMetricsMiddleware:
    """ASGI middleware: counts every HTTP request by route template and status code.

    The route template (not the raw path) keeps label cardinality bounded; requests that
    match no route are counted as "unmatched". It reaches the replica's IngressMetrics
    through the Serve replica context, so the metrics are still created in `__init__`.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception escaping the app is answered 500 further out
        t0 = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics = _ingress_metrics()
            if metrics is not None:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                metrics.request(endpoint, status, (time.perf_counter() - t0) * 1000.0)


def _ingress_metrics() -> IngressMetrics | None:
    try:
        servable = serve.get_replica_context().servable_object
    except Exception:  # outside a Serve replica (e.g. a plain FastAPI test client)
        return None
    return getattr(servable, "_metrics", None)


# -- batching deployments -----------------------------------------------------------------



class BatchMetrics:
    """Stage latency, batch size and batch queue wait of a @serve.batch deployment."""

    def __init__(self, stage: str) -> None:
        self._stage = stage
        self._latency = make_metric("rfloc_stage_latency_ms")
        self._batch_size = make_metric("rfloc_batch_size")
        self._wait = make_metric("rfloc_batch_queue_wait_ms")
        # id(item) -> perf_counter() when it entered the batch queue; the caller holds the
        # item for the whole wait, so an id cannot be reused while it is in here.
        self._queued_at: dict[int, float] = {}

    @contextlib.contextmanager
    def queued(self, item: Any) -> Iterator[None]:
        """Mark `item` as waiting for a batch for the duration of the block."""
        self._queued_at[id(item)] = time.perf_counter()
        try:
            yield
        finally:
            self._queued_at.pop(id(item), None)

    def batch_started(self, items: list[Any]) -> None:
        """Observe the batch's size in captures and each item's wait in the queue."""
        now = time.perf_counter()
        self._batch_size.observe(n_captures(items))
        for item in items:
            t = self._queued_at.get(id(item))
            if t is not None:
                self._wait.observe((now - t) * 1000.0)

    def stage_ms(self, ms: float) -> None:
        """Observe one execution of this deployment's stage."""
        self._latency.observe(ms, tags={"stage": self._stage})


class PreprocessorMetrics(BatchMetrics):
    """Batch metrics plus receivers detected per capture."""

    def __init__(self) -> None:
        super().__init__("preprocess")
        self._detected = make_metric("rfloc_receivers_detected")

    def preprocessed(self, groups: list[Any]) -> None:
        """Observe the batch's preprocess time and every capture's detected receivers."""
        if groups:
            self.stage_ms(groups[0].timing_ms["preprocess"])
        for g in groups:
            for n in g.detected.sum(axis=1).tolist():
                self._detected.observe(n)


class ModelMetrics(BatchMetrics):
    """Batch metrics plus the served model version and reload outcomes."""

    def __init__(self) -> None:
        super().__init__("inference")
        self._version = make_metric("rfloc_model_version_info")
        self._reloads = make_metric("rfloc_model_reloads")
        self._serving: tuple[str, str] | None = None
        self._reloads_seen: dict[str, int] = {}
        self._version_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(
            target=self._keep_version_alive, name="rfloc-version-gauge", daemon=True
        ).start()

    def _keep_version_alive(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_S):
            with self._version_lock:
                if self._serving is not None:
                    version, alias = self._serving
                    self._version.set(1, tags={"version": version, "alias": alias})

    def inferred(self, groups: list[Any]) -> None:
        """Observe the inference time of one model call."""
        if groups:
            self.stage_ms(groups[0].timing_ms["inference"])

    def sync_model(self, manager: Any) -> None:
        """Follow the manager's served version and reload counters (cheap; call often)."""
        current = manager.current
        if current is not None:
            serving = (str(current.ref.version), str(current.ref.alias))
            if serving != self._serving:
                with self._version_lock:
                    if self._serving is not None:  # reported once, then ages out
                        old_version, old_alias = self._serving
                        self._version.set(0, tags={"version": old_version, "alias": old_alias})
                    self._version.set(1, tags={"version": serving[0], "alias": serving[1]})
                    self._serving = serving
        for outcome, count in dict(manager.reloads).items():
            delta = count - self._reloads_seen.get(outcome, 0)
            self._reloads_seen[outcome] = count
            if delta > 0:
                self._reloads.inc(delta, tags={"outcome": outcome})


# -- postprocessor ------------------------------------------------------------------------


class PostprocessorMetrics:
    """Postprocess latency and the area of every returned ellipse."""

    def __init__(self) -> None:
        self._latency = make_metric("rfloc_stage_latency_ms")
        self._area = make_metric("rfloc_ellipse_area_km2")

    def postprocessed(self, group: Any) -> None:
        """Observe the group's postprocess time and each result's ellipse area."""
        self._latency.observe(group.timing_ms["postprocess"], tags={"stage": "postprocess"})
        for result in group.results or ():
            if result is not None:
                self._area.observe(result["uncertainty"]["area_m2"] / 1e6)
