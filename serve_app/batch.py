"""Offline batch localization on Ray Data: a Parquet capture dataset → a GeoParquet dataset.

Streaming from end to end (docs/batch.md): `read_parquet` runs in the workers, each batch
is decoded and localized by `BatchLocalizer` (the serving core: `pipeline.preprocess` →
`infer` → `postprocess`) on an autoscaling actor pool, and Ray Data's distributed
`write_parquet` writes the GeoParquet files. The driver reads the input files' footers,
shows progress and sums up; nothing of the captures or the answers passes through it.

The job writes into a staging directory beside OUTPUT and renames it to OUTPUT once every
capture is written, so OUTPUT is either absent or complete: a stopped job leaves only its
staging directory, which the next run removes before it starts over; a completed OUTPUT
is left as it is (`overwrite=True` replaces it). A capture that cannot be localized is a
row with its `error`; a file that is not a readable capture dataset fails the job up
front with an error naming the file.

Ray is imported inside functions only, so the module stays importable without a cluster.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from serve_app.capture_parquet import (
    CAPTURE_COLUMNS,
    OPTIONAL_COLUMNS,
    DecodedReceivers,
    binary_list_views,
    decode_receivers,
)
from serve_app.constants import DEFAULT_CONFIDENCE
from serve_app.errors import InvalidInput, RflocError
from serve_app.geoparquet import FLOAT_COLUMNS, OUTPUT_SCHEMA, ellipse_wkb, point_wkb
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import infer, postprocess, preprocess, stack_captures
from serve_app.receivers import load_network
from serve_app.schemas import ModelRef
from serve_app.settings import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = DEFAULT_MODEL_DIR / "localization_model.onnx"
DEFAULT_BATCH_SIZE = 256
DEFAULT_ROWS_PER_FILE = 8192
SUCCESS_FILE = "_SUCCESS"
STAGING_MARK = ".partial-"
_GLOB = re.compile(r"[*?\[]")


class BatchError(RflocError):
    """The batch job cannot run or did not complete (bad input or output location)."""


# -- the per-batch work (no Ray) ----------------------------------------------------------------

class BatchLocalizer:
    """Capture rows (a pyarrow Table) → GeoParquet rows; a Ray Data UDF or a plain object."""

    def __init__(self, model_path: str | None = None, receivers_path: str | None = None,
                 confidence_level: float = DEFAULT_CONFIDENCE, n_vertices: int = 64,
                 stats: Any = None) -> None:
        self._network = load_network(receivers_path)
        self._model = OnnxLocalizer(model_path or DEFAULT_MODEL_PATH, self._network.ids)
        self._ref = ModelRef(name=Path(self._model.path).stem,
                             version=self._model.sha256[:12])
        self._confidence = confidence_level
        self._n_vertices = n_vertices
        self._stats = stats
        if stats is not None:
            import ray

            stats.actor_started.remote(ray.util.get_node_ip_address())

    def decode(self, table: pa.Table) -> list[DecodedReceivers | InvalidInput]:
        """Each row through `decode_receivers`: its IQ, or the error naming its field.

        Rows of SigMF recording sets that could not be read carry their error instead.
        """
        names = table.column_names
        read_errors = (table.column("read_error").to_pylist() if "read_error" in names
                       else [None] * table.num_rows)
        read_fields = (table.column("read_error_field").to_pylist()
                       if "read_error_field" in names else [None] * table.num_rows)
        ids = table.column("receiver_ids").to_pylist()
        iq = binary_list_views(table.column("iq"))
        datatypes = table.column("datatype").to_pylist()
        rates = table.column("sample_rate_hz").to_pylist()
        freqs = table.column("center_freq_hz").to_pylist()
        out: list[DecodedReceivers | InvalidInput] = []
        for i in range(table.num_rows):
            if read_errors[i] is not None:
                out.append(InvalidInput(read_fields[i] or "", str(read_errors[i])))
                continue
            try:
                for name, value in (("receiver_ids", ids[i]), ("iq", iq[i]),
                                    ("datatype", datatypes[i]), ("sample_rate_hz", rates[i]),
                                    ("center_freq_hz", freqs[i])):
                    if value is None:
                        raise InvalidInput(name, "is null")
                out.append(decode_receivers(ids[i], iq[i] or [], datatypes[i],
                                            float(rates[i]), float(freqs[i]), self._network))
            except InvalidInput as exc:
                out.append(exc)
        return out

    def localize(self, table: pa.Table) -> pa.Table:
        """The GeoParquet rows (OUTPUT_SCHEMA) of a table of capture rows, in its order."""
        n = table.num_rows
        decoded = self.decode(table)
        good = [i for i, d in enumerate(decoded) if isinstance(d, DecodedReceivers)]
        errors: list[tuple[str | None, str] | None] = [
            None if isinstance(d, DecodedReceivers) else (d.field, d.message) for d in decoded]
        cols: dict[str, Any] = {k: np.full(n, np.nan) for k in FLOAT_COLUMNS}
        used: list[list[str] | None] = [None] * n
        ellipses: list[dict | None] = [None] * n
        if good:
            caps = [decoded[i] for i in good]
            group = stack_captures([(d.iq, d.slots) for d in caps],  # type: ignore[union-attr]
                                   len(self._network), [self._confidence] * len(good))
            [g] = infer(preprocess([group], self._network), self._model, self._ref)
            postprocess(g, self._network, self._n_vertices)
            assert g.results is not None and g.mean_enu_m is not None
            assert g.cov_enu_m2 is not None
            rows = np.asarray(good)
            cols["east_m"][rows], cols["north_m"][rows] = g.mean_enu_m[:, 0], g.mean_enu_m[:, 1]
            cols["cov_ee_m2"][rows] = g.cov_enu_m2[:, 0, 0]
            cols["cov_en_m2"][rows] = g.cov_enu_m2[:, 0, 1]
            cols["cov_nn_m2"][rows] = g.cov_enu_m2[:, 1, 1]
            for i, res, err in zip(good, g.results, g.errors, strict=True):
                if res is None:
                    errors[i] = (err or {}).get("field"), (err or {}).get("message", "failed")
                    for k in FLOAT_COLUMNS:
                        cols[k][i] = np.nan
                    continue
                cols["latitude"][i] = res["position"]["latitude"]
                cols["longitude"][i] = res["position"]["longitude"]
                for k, v in res["uncertainty"].items():
                    cols[k][i] = v
                used[i] = res["receivers_used"]
                ellipses[i] = res["geojson"]["features"][1]["geometry"]
        names = table.column_names

        def passthrough(name: str) -> pa.Array:
            field = OUTPUT_SCHEMA.field(name)
            if name not in names:
                return pa.nulls(n, field.type)
            return table.column(name).combine_chunks().cast(field.type)

        return pa.table({
            "capture_id": passthrough("capture_id"),
            "geometry": pa.array(point_wkb(cols["longitude"], cols["latitude"]), pa.binary()),
            "ellipse": pa.array(ellipse_wkb(ellipses), pa.binary()),
            **{k: pa.array(cols[k], pa.float64(), from_pandas=True) for k in FLOAT_COLUMNS},
            "receivers_used": pa.array(used, pa.list_(pa.string())),
            "model_name": pa.array([self._ref.name] * n, pa.string()),
            "model_version": pa.array([self._ref.version] * n, pa.string()),
            "model_sha256": pa.array([self._model.sha256] * n, pa.string()),
            "error": pa.array([None if e is None else (f"{e[0]}: {e[1]}" if e[0] else e[1])
                               for e in errors], pa.string()),
            "error_field": pa.array([None if e is None else e[0] for e in errors], pa.string()),
            **{k: passthrough(k) for k in OPTIONAL_COLUMNS},
        }, schema=OUTPUT_SCHEMA)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data entry point; reports the batch's size and time to the job's stats actor."""
        t0 = time.time()  # wall clock: comparable across the actors of one machine
        out = self.localize(batch)
        if self._stats is not None:
            self._stats.add.remote(out.num_rows, t0, time.time())
        return out


class JobStats:
    """A Ray actor of the job: where the localizing actors ran and when they were busy."""

    def __init__(self) -> None:
        self.rows = 0
        self.first_start = float("inf")
        self.last_end = float("-inf")
        self.nodes: dict[str, int] = {}

    def actor_started(self, node_ip: str) -> None:
        self.nodes[node_ip] = self.nodes.get(node_ip, 0) + 1

    def add(self, rows: int, t_start: float, t_end: float) -> None:
        self.rows += rows
        self.first_start = min(self.first_start, t_start)
        self.last_end = max(self.last_end, t_end)

    def summary(self) -> dict:
        busy = self.last_end - self.first_start
        return {"rows": self.rows, "busy_s": busy if busy > 0 else None,
                "actors_by_node": dict(self.nodes)}


# -- input and output locations -----------------------------------------------------------------

def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path within it."""
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise BatchError(f"{location}: not a location pyarrow can open ({exc})") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _visible(relative_path: str) -> bool:
    """Not a hidden or metadata file or folder (pyarrow, Spark: a leading '.' or '_')."""
    return not any(part.startswith((".", "_")) for part in relative_path.split("/"))


SIGMF_BLOCK = 64  # recording sets read per task


def sigmf_input(source: str) -> list[str] | None:
    """The recording sets of a local directory of SigMF recording sets (None: not one)."""
    from serve_app.io.sigmf import recording_sets

    p = Path(source)
    if not p.is_dir() or any(p.rglob("*.parquet")):
        return None
    return [str(x) for x in recording_sets(p)] or None


@functools.cache
def _network(receivers_path: str | None = None) -> Any:
    return load_network(receivers_path)


def read_recording_sets(batch: pa.Table) -> pa.Table:
    """Capture rows of a batch of recording-set paths (a Ray Data UDF; a bad set → its error)."""
    from serve_app.io.sigmf import captures_table

    return captures_table(batch.column("path").to_pylist(), _network())


def resolve_input(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a file, a directory (recursively), a glob or a URI of one."""
    fs, path = _filesystem(source)
    if _GLOB.search(path):
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB.search(p))
        base = "/".join(parts[:first]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and fnmatch.fnmatchcase(i.path, path))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and _visible(i.path[len(path):].lstrip("/"))
                           and i.path.endswith(".parquet"))
        else:
            raise BatchError(f"{source}: no such file or directory")
    if not files:
        raise BatchError(f"{source}: no Parquet files there")
    return fs, files


def _check_file(fs: pafs.FileSystem, path: str) -> tuple[int, set[str]]:
    """(rows, optional columns present) of one input file; BatchError naming it otherwise."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise BatchError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in CAPTURE_COLUMNS if c not in schema.names]
    if missing:
        raise BatchError(f"{path}: not a capture dataset: no column(s) {', '.join(missing)} "
                         "(docs/batch.md)")

    def bad(name: str, want: str) -> BatchError:
        return BatchError(f"{path}: column {name} is {schema.field(name).type}, expected {want}")

    def is_list_of(t: pa.DataType, pred: Any) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pred(t.value_type)

    types = {n: schema.field(n).type for n in schema.names}
    text = (pa.types.is_string, pa.types.is_large_string)
    if not any(p(types["capture_id"]) for p in text):
        raise bad("capture_id", "string")
    if not is_list_of(types["receiver_ids"], lambda t: any(p(t) for p in text)):
        raise bad("receiver_ids", "list<string>")
    if not is_list_of(types["iq"], lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise bad("iq", "list<binary>")
    if not any(p(types["datatype"]) for p in text):
        raise bad("datatype", "string (a SigMF datatype such as cf32_le)")
    for name in ("sample_rate_hz", "center_freq_hz"):
        if not (pa.types.is_floating(types[name]) or pa.types.is_integer(types[name])):
            raise bad(name, "a number")
    return rows, {c for c in OPTIONAL_COLUMNS if c in schema.names}


def check_input(fs: pafs.FileSystem, files: list[str]) -> tuple[int, list[str]]:
    """Total rows and the optional columns every file has; reads the files' footers only."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        checked = list(pool.map(lambda p: _check_file(fs, p), files))
    optional = set(OPTIONAL_COLUMNS)
    for _, cols in checked:
        optional &= cols
    return sum(r for r, _ in checked), [c for c in OPTIONAL_COLUMNS if c in optional]


def _output_state(fs: pafs.FileSystem, path: str) -> str:
    """'absent', 'complete' (a finished job's output) or 'foreign' (anything else)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "absent"
    if info.type == pafs.FileType.Directory and \
            fs.get_file_info(f"{path}/{SUCCESS_FILE}").type == pafs.FileType.File:
        return "complete"
    return "foreign"


def _remove_staging(fs: pafs.FileSystem, path: str) -> list[str]:
    """Remove what stopped runs left beside `path` (their staging directories).

    A run stopped between the two renames of `overwrite` left the old complete output
    aside: it is put back, not removed.
    """
    parent, name = path.rstrip("/").rsplit("/", 1) if "/" in path.rstrip("/") else ("", path)
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(parent or ".", allow_not_found=True)):
        if not (info.base_name.startswith(name + STAGING_MARK)
                and info.type == pafs.FileType.Directory):
            continue
        if info.base_name.startswith(f"{name}{STAGING_MARK}replaced-") \
                and _output_state(fs, path) == "absent" \
                and _output_state(fs, info.path) == "complete":
            fs.move(info.path, path)
            continue
        fs.delete_dir(info.path)
        removed.append(info.path)
    return removed


def read_summary(output: str) -> dict:
    """The summary a completed job stored in its output's _SUCCESS file."""
    fs, path = _filesystem(output)
    with fs.open_input_stream(f"{path}/{SUCCESS_FILE}") as f:
        return json.loads(f.read())


def _count(fs: pafs.FileSystem, path: str) -> tuple[int, int, int]:
    """(rows, rows with an error, files) of a GeoParquet output; reads two small columns."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    d = pads.dataset(path, filesystem=fs, format="parquet")
    return (d.count_rows(), d.count_rows(filter=pc.field("error").is_valid()), len(d.files))


def _spilled_mib() -> float | None:
    """MiB this Ray instance spilled to disk so far (None if Ray does not say)."""
    try:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
        m = re.search(r"Spilled ([\d.]+) MiB", text)
    except Exception:  # an internal API: a missing figure must not fail the job
        return None
    return float(m.group(1)) if m else 0.0


def _read_error(exc: Exception, files: list[str]) -> BatchError:
    """The error of a failed read, naming the input file (Ray's task error text names it)."""
    text = str(exc)
    causes = re.findall(r"(?m)^\s*(?:pyarrow\.lib\.)?(\w*(?:Arrow\w*|Error)): (.+)$", text)
    reason = ": ".join(causes[-1]) if causes else type(exc).__name__
    named = [f for f in files if f in text]
    if named:
        return BatchError(f"{named[0]}: corrupt Parquet data ({reason})")
    return BatchError(f"reading the input failed ({reason})")


# -- the job ------------------------------------------------------------------------------------

def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_actors: int | None = None,
    min_actors: int = 1,
    num_cpus: float = 1.0,
    io_cpus: float = 0.0,
    model_path: str | None = None,
    confidence_level: float = DEFAULT_CONFIDENCE,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    overwrite: bool = False,
    progress: bool = True,
    object_store_mib: int | None = None,
) -> dict:
    """Localize every capture of `input_path` into the GeoParquet dataset `output_path`.

    Uses the Ray cluster this process is connected to (or RAY_ADDRESS), else starts a local
    instance and shuts it down at the end. The actor pool autoscales from `min_actors` to
    `max_actors` (default: the cluster's CPUs / num_cpus) actors of `num_cpus` CPUs, spread
    over the nodes (Ray Data's default scheduling). Read and write tasks reserve `io_cpus`
    each, none by default: they mostly move bytes, and any CPU they reserve is one that
    Ray Data's resource budget keeps from the actor pool (with 0.25, two 1-CPU actors never
    started on a 2-CPU machine). Returns the summary (also stored in OUTPUT/_SUCCESS).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    t0 = time.perf_counter()
    sets = sigmf_input(str(input_path))
    if sets is not None:  # a directory of SigMF recording sets: one capture each
        files, n_rows, optional = sets, len(sets), ["timestamp"]
    else:
        in_fs, files = resolve_input(str(input_path))
        n_rows, optional = check_input(in_fs, files)
    out_fs, out = _filesystem(str(output_path))
    state = _output_state(out_fs, out)
    if state == "foreign":
        raise BatchError(f"{output_path}: exists and is not the output of a completed "
                         "`rfloc batch`; remove it or choose another OUTPUT")
    if state == "complete" and not overwrite:
        return {**read_summary(str(output_path)), "skipped": True}
    removed = _remove_staging(out_fs, out)
    if removed:
        logger.warning("removed %d unfinished run(s) of %s: %s", len(removed), output_path,
                       ", ".join(removed))
    staging = f"{out}{STAGING_MARK}{uuid.uuid4().hex[:12]}"

    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 object_store_memory=object_store_mib * 2**20 if object_store_mib else None)
        started = True
    try:
        cpus = ray.cluster_resources().get("CPU", 1)
        # What other work on a shared cluster (a Serve application, say) leaves free now.
        free = ray.available_resources().get("CPU", 0)
        if max_actors is None:
            max_actors = max(1, int(cpus // num_cpus))
        min_actors = min(min_actors, max_actors)
        if min_actors * num_cpus > free - 1:
            # Ray Data lists the input files in a 1-CPU task while the first actors start.
            raise BatchError(f"{min_actors} actor(s) of {num_cpus:g} CPU would leave no CPU of "
                             f"the {free:g} free (of the cluster's {cpus:g}) for listing the "
                             "input; lower --num-cpus or --min-actors")
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = progress
        stats_actor: Any = ray.remote(num_cpus=0)(JobStats)
        stats = stats_actor.remote()
        ds: Any
        # As many read tasks at once as actors: read tasks that reserve no CPU are otherwise
        # launched for every input at once, filling the object store with blocks that wait.
        if sets is not None:  # SigMF recording sets: read in the workers, a block per task
            # Reading a set (~4 ms of CPU) costs more than localizing it: twice as many read
            # tasks as actors, each block of 64 sets ~17 MB.
            ds = ray.data.from_items([{"path": p} for p in sets],
                                     override_num_blocks=max(1, -(-len(sets) // SIGMF_BLOCK)))
            ds = ds.map_batches(read_recording_sets, batch_size=SIGMF_BLOCK,
                                batch_format="pyarrow", num_cpus=io_cpus,
                                concurrency=2 * max_actors)
        else:
            # Reading Parquet outpaces localizing many times over.
            ds = ray.data.read_parquet(files, filesystem=in_fs, num_cpus=io_cpus,
                                       concurrency=max_actors).select_columns(
                [*CAPTURE_COLUMNS, *optional])
        ds = ds.map_batches(
            BatchLocalizer,
            batch_size=batch_size,
            batch_format="pyarrow",
            # Not initial_size=max_actors: actors holding every CPU from the start leave
            # none for Ray Data's file-listing task (1 CPU), and the job never starts.
            compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            num_cpus=num_cpus,
            fn_constructor_kwargs={"model_path": str(model_path) if model_path else None,
                                   "confidence_level": confidence_level, "stats": stats},
        )
        t_run = time.perf_counter()
        try:
            ds.write_parquet(staging, filesystem=out_fs, schema=OUTPUT_SCHEMA,
                             min_rows_per_file=rows_per_file, compression="zstd",
                             ray_remote_args={"num_cpus": io_cpus})
        except pa.ArrowException as exc:  # a read task met data its footer did not promise
            raise _read_error(exc, files) from None
        t_end = time.perf_counter()
        job: dict = ray.get(stats.summary.remote())
        spilled = _spilled_mib()
    finally:
        if started:
            ray.shutdown()

    rows, failed, n_files = _count(out_fs, staging)
    if rows != n_rows:
        raise BatchError(f"wrote {rows} rows for {n_rows} captures; {staging} kept for a look")
    summary = {
        "captures": n_rows, "failed": failed, "output": str(output_path), "files": n_files,
        "input_files": len(files), "startup_s": round(t_run - t0, 3),
        "run_s": round(t_end - t_run, 3),
        "captures_s": round(n_rows / (t_end - t_run), 1),
        # first batch in to last batch out in the actors: what the pool sustains once up
        "busy_captures_s": round(n_rows / job["busy_s"], 1) if job["busy_s"] else None,
        "actors_by_node": job["actors_by_node"], "max_actors": max_actors,
        "batch_size": batch_size, "spilled_mib": spilled,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": False,
    }
    with out_fs.open_output_stream(f"{staging}/{SUCCESS_FILE}") as f:
        f.write(json.dumps(summary, indent=1).encode())
    if state == "complete":  # overwrite: the old output goes only once the new one is whole
        old = f"{out}{STAGING_MARK}replaced-{uuid.uuid4().hex[:12]}"
        out_fs.move(out, old)
        out_fs.move(staging, out)
        out_fs.delete_dir(old)
    else:
        out_fs.move(staging, out)
    return summary
