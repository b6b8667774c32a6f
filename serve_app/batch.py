"""Offline batch localization: a file of captures → predictions with GeoJSON, on Ray Data.

Input: an NPZ with ``iq`` [n, R, S] complex64 (zero rows for absent receivers) and
``present`` [n, R] bool, receivers in the network's slot order (``rfloc simulate --npz``
writes one). Output: one row per capture, in input order, as Parquet (``.parquet``) or JSON
lines (anything else): position, ENU mean and covariance, the ellipse, ``receivers_used``,
the GeoJSON FeatureCollection as JSON text, and ``error`` (JSON text) for a capture that
could not be localized.

The captures go through the serving core (`pipeline.preprocess` → `infer` → `postprocess`)
in `BatchPredictor`, a class-based `map_batches` UDF on an autoscaling actor pool. Ray is
imported inside `run_batch` only, so this module stays importable without a cluster.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from serve_app.constants import DEFAULT_CONFIDENCE
from serve_app.errors import InvalidInput
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import CaptureGroup, infer, postprocess, preprocess
from serve_app.receivers import ReceiverNetwork, load_network
from serve_app.schemas import ModelRef
from serve_app.settings import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = DEFAULT_MODEL_DIR / "localization_model.onnx"
BLOCK_CAPTURES = 128  # captures per Ray Data block (~34 MB of standard captures)
FLOAT_COLUMNS = (
    "latitude", "longitude", "east_m", "north_m", "cov_ee_m2", "cov_en_m2", "cov_nn_m2",
    "sigma_x", "sigma_y", "rho", "theta", "semi_major_m", "semi_minor_m", "orientation_deg",
    "confidence_level", "area_m2",
)
TEXT_COLUMNS = ("receivers_used", "geojson", "error")


def write_npz(path: str | Path, n: int, seed: int = 1, *, max_missing: int = 0,
              network: ReceiverNetwork | None = None) -> None:
    """Simulate `n` captures and write them (with their true positions) as an input NPZ."""
    from serve_app.simulate import sample_scenes, synthesize_iq

    net = network or load_network()
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(net, n, rng, max_missing=max_missing)
    iq = synthesize_iq(net, scenes, rng)
    iq[~scenes.present] = 0  # absent receivers carry no samples
    lat, lon = net.to_geodetic(scenes.tx_enu_m[:, 0], scenes.tx_enu_m[:, 1])
    np.savez(path, iq=iq.astype(np.complex64, copy=False), present=scenes.present,
             truth_latlon=np.stack([lat, lon], axis=-1), receiver_ids=np.array(net.ids))


def load_npz(path: str | Path, network: ReceiverNetwork | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(iq [n, R, S] complex64, present [n, R] bool) from an input NPZ, checked."""
    net = network or load_network()
    with np.load(path, allow_pickle=False) as z:
        for key in ("iq", "present"):
            if key not in z:
                raise InvalidInput(key, f"{path}: no array {key!r} in the NPZ")
        iq, present = z["iq"], z["present"]
        ids = z["receiver_ids"].tolist() if "receiver_ids" in z else None
    if iq.ndim != 3 or iq.shape[1] != len(net) or not np.iscomplexobj(iq):
        raise InvalidInput("iq", f"expected complex [n, {len(net)}, samples], got "
                                 f"{iq.dtype} {iq.shape}")
    if present.shape != iq.shape[:2] or present.dtype != np.bool_:
        raise InvalidInput("present", f"expected bool {iq.shape[:2]}, got "
                                      f"{present.dtype} {present.shape}")
    if ids is not None and ids != net.ids:
        raise InvalidInput("receiver_ids", f"{ids} do not match the network {net.ids}")
    return iq.astype(np.complex64, copy=False), present


class BatchPredictor:
    """The serving core over a batch of captures; a Ray Data UDF (or plain object in-process)."""

    def __init__(self, model_path: str | None = None, receivers_path: str | None = None,
                 confidence_level: float = DEFAULT_CONFIDENCE, n_vertices: int = 64) -> None:
        self._network = load_network(receivers_path)
        self._model = OnnxLocalizer(model_path or DEFAULT_MODEL_PATH, self._network.ids)
        self._ref = ModelRef(name=Path(self._model.path).stem,
                             version=self._model.sha256[:12])
        self._confidence = confidence_level
        self._n_vertices = n_vertices

    def predict(self, iq: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
        """Prediction columns for captures iq [b, R, S] complex64, present [b, R]."""
        b = iq.shape[0]
        group = CaptureGroup(iq, present, np.full(b, self._confidence))
        [g] = infer(preprocess([group], self._network), self._model, self._ref)
        postprocess(g, self._network, self._n_vertices)
        assert g.results is not None and g.mean_enu_m is not None and g.cov_enu_m2 is not None
        cols: dict[str, Any] = {k: np.full(b, np.nan) for k in FLOAT_COLUMNS}
        cols["east_m"], cols["north_m"] = g.mean_enu_m[:, 0].copy(), g.mean_enu_m[:, 1].copy()
        cols["cov_ee_m2"] = g.cov_enu_m2[:, 0, 0].copy()
        cols["cov_en_m2"] = g.cov_enu_m2[:, 0, 1].copy()
        cols["cov_nn_m2"] = g.cov_enu_m2[:, 1, 1].copy()
        text = {k: np.empty(b, object) for k in TEXT_COLUMNS}
        for i, (res, err) in enumerate(zip(g.results, g.errors, strict=True)):
            if res is None:
                text["receivers_used"][i] = "[]"
                text["geojson"][i] = ""
                text["error"][i] = orjson.dumps(err).decode()
                continue
            cols["latitude"][i] = res["position"]["latitude"]
            cols["longitude"][i] = res["position"]["longitude"]
            for k, v in res["uncertainty"].items():
                cols[k][i] = v
            text["receivers_used"][i] = orjson.dumps(res["receivers_used"]).decode()
            text["geojson"][i] = orjson.dumps(res["geojson"]).decode()
            text["error"][i] = ""
        return {**cols, **text}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: `iq` arrives as float32 [b, R, 2S] (Arrow has no complex)."""
        t0 = time.time()  # wall clock: comparable across the actors of one machine
        iq = np.ascontiguousarray(batch["iq"]).view(np.complex64)
        out = self.predict(iq, np.asarray(batch["present"], bool))
        b = len(iq)
        return {"index": np.asarray(batch["index"]), **out,
                "_t_start": np.full(b, t0), "_t_end": np.full(b, time.time())}


def _rows(iq: np.ndarray, present: np.ndarray) -> list[dict[str, Any]]:
    """One row per capture: index, iq as float32 [R, 2S] (Arrow has no complex), present."""
    as_float = iq.view(np.float32)  # zero copy
    return [{"index": i, "iq": as_float[i], "present": present[i]} for i in range(len(iq))]


class _Writer:
    """Parquet (one file) or JSON lines, by the output's suffix."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._parquet = path.suffix == ".parquet"
        self._pq_writer: Any = None
        self._jsonl = None if self._parquet else open(path, "wb")  # noqa: SIM115

    def write(self, batch: dict[str, np.ndarray]) -> None:
        batch = {k: v for k, v in batch.items() if not k.startswith("_")}
        if self._parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({
                k: pa.array([x or None for x in v.tolist()] if k in TEXT_COLUMNS else v)
                for k, v in batch.items()})
            if self._pq_writer is None:
                self._pq_writer = pq.ParquetWriter(self._path, table.schema)
            self._pq_writer.write_table(table)
            return
        assert self._jsonl is not None
        keys = list(batch)
        for i in range(len(batch["index"])):
            row = {k: batch[k][i] for k in keys}
            for k in ("receivers_used", "geojson", "error"):
                row[k] = orjson.loads(row[k]) if row[k] else None
            self._jsonl.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def close(self) -> None:
        if self._pq_writer is not None:
            self._pq_writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_size: int = 256,
    max_actors: int | None = None,
    num_cpus: float = 1.0,
    model_path: str | None = None,
    confidence_level: float = DEFAULT_CONFIDENCE,
    progress: bool = True,
) -> dict:
    """Localize every capture of `input_path` on Ray Data; write `output_path`; a summary.

    Uses the Ray instance this process is connected to, or starts a local one (which it
    shuts down at the end). The actor pool autoscales from 1 to `max_actors` (default: the
    cluster's CPUs / num_cpus) actors of `num_cpus` CPUs.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    t0 = time.perf_counter()
    network = load_network()
    iq, present = load_npz(input_path, network)
    n = len(iq)
    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        started = True
    try:
        if max_actors is None:
            max_actors = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come out in input order
        ctx.enable_progress_bars = progress
        # from_items builds the blocks here, without tasks: `from_arrow`/`from_numpy` run a
        # 1-CPU task per block, which never starts on a cluster whose CPUs Serve holds.
        n_blocks = -(-n // BLOCK_CAPTURES)
        ds = ray.data.from_items(_rows(iq, present), override_num_blocks=n_blocks).map_batches(
            BatchPredictor,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=1, max_size=max_actors),
            num_cpus=num_cpus,
            fn_constructor_kwargs={"model_path": str(model_path) if model_path else None,
                                   "confidence_level": confidence_level},
        )
        out = Path(output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(out)
        t_ready = time.perf_counter()
        rows = failed = 0
        busy_from, busy_to = np.inf, -np.inf
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.write(batch)
                rows += len(batch["index"])
                failed += int(sum(1 for e in batch["error"] if e))
                busy_from = min(busy_from, float(batch["_t_start"].min()))
                busy_to = max(busy_to, float(batch["_t_end"].max()))
        finally:
            writer.close()
        t_end = time.perf_counter()
    finally:
        if started:
            ray.shutdown()
    if rows != n:
        raise RuntimeError(f"wrote {rows} rows for {n} captures")
    return {
        "captures": n, "failed": failed, "output": str(out),
        "startup_s": round(t_ready - t0, 3),
        "pipeline_s": round(t_end - t_ready, 3),
        "captures_s": round(n / (t_end - t_ready), 1),
        # from the first batch's start to the last one's end in the actors: the rate once
        # actors are up and the model loaded (what the pool sustains)
        "processing_captures_s": round(n / (busy_to - busy_from), 1)
        if busy_to > busy_from else None,
        "max_actors": max_actors, "batch_size": batch_size,
    }


def predict_in_process(iq: np.ndarray, present: np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
    """The same columns computed in this process, in one vectorized pass (a reference)."""
    return BatchPredictor(**kwargs).predict(iq, present)


def read_output(path: str | Path) -> list[dict]:
    """Rows of a `run_batch` output file (Parquet or JSON lines), in order."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    return [json.loads(line) for line in p.read_text().splitlines() if line]
