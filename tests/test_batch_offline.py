"""`rfloc batch` on the session's Ray cluster: Parquet in, GeoParquet out, reruns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from serve_app.batch import DEFAULT_MODEL_PATH, STAGING_MARK, BatchError, run_batch
from serve_app.capture_parquet import CAPTURE_SCHEMA, write_capture_dataset

pytestmark = pytest.mark.ray

N_CAPTURES = 96
# Small actors and tasks: the pool must fit beside whatever else the session runs.
SMALL = {"num_cpus": 0.1, "max_actors": 2, "progress": False}


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch") / "captures"
    write_capture_dataset(d, N_CAPTURES, seed=5, shards=3, max_missing=3)
    return d


def reference(table: pa.Table, network) -> dict[str, dict | None]:
    """The in-process predictor (L) on the same captures, sent the HTTP API's way."""
    from serve_app.decode import decode_capture, encode_capture
    from serve_app.model import OnnxLocalizer
    from serve_app.pipeline import infer, postprocess, preprocess, stack_captures

    decoded = []
    for row in table.to_pylist():
        iq = np.stack([np.frombuffer(b, "<c8") for b in row["iq"]])
        decoded.append(decode_capture(encode_capture(iq, row["receiver_ids"]), network))
    group = stack_captures([(d.iq, d.slots) for d in decoded], len(network),
                           [0.95] * len(decoded))
    model = OnnxLocalizer(DEFAULT_MODEL_PATH, network.ids)
    [g] = infer(preprocess([group], network), model, {"name": "m", "version": "1"})
    postprocess(g, network)
    return dict(zip(table.column("capture_id").to_pylist(), g.results, strict=True))


def assert_matches_reference(out_dir: Path, captures: Path, network) -> None:
    """geopandas reads the same points and ellipses as the in-process predictor gives."""
    gpd = pytest.importorskip("geopandas")
    g = gpd.read_parquet(out_dir)
    ref = reference(pq.read_table(captures), network)
    assert sorted(g["capture_id"]) == sorted(ref)  # every capture exactly once
    g = g.set_index("capture_id")
    ok = [k for k, r in ref.items() if r is not None]
    assert len(ok) >= N_CAPTURES - 6  # few captures have < 3 detecting receivers
    assert g.loc[[k for k in ref if k not in ok], "error"].notna().all()
    assert g.loc[ok, "error"].isna().all()
    lon = np.array([ref[k]["position"]["longitude"] for k in ok])
    lat = np.array([ref[k]["position"]["latitude"] for k in ok])
    np.testing.assert_allclose(g.loc[ok].geometry.x, lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(g.loc[ok].geometry.y, lat, rtol=0, atol=1e-9)
    for k in ok:
        want = shapely.geometry.shape(ref[k]["geojson"]["features"][1]["geometry"])
        assert shapely.equals_exact(g.loc[k, "ellipse"], want, tolerance=1e-9), k
        assert list(g.loc[k, "receivers_used"]) == ref[k]["receivers_used"]
        for col, v in ref[k]["uncertainty"].items():
            assert g.loc[k, col] == pytest.approx(v, rel=1e-9), col
    assert set(g["model_sha256"]) == {__import__("serve_app.model").model.sha256_file(
        DEFAULT_MODEL_PATH)}


def test_simulate_batch_geopandas_round_trip(ray_cluster, network, captures, tmp_path):
    out = tmp_path / "predictions"
    summary = run_batch(captures, out, batch_size=16, **SMALL)
    assert summary["captures"] == N_CAPTURES and summary["input_files"] == 3
    assert summary["files"] >= 1 and not summary["skipped"]
    assert summary["failed"] == int(pq.read_table(out, columns=["error"])
                                    .column("error").is_valid().to_numpy().sum())
    assert_matches_reference(out, captures, network)
    duckdb = pytest.importorskip("duckdb")
    [(n, kind)] = duckdb.connect().execute(
        f"select count(*), any_value(typeof(geometry)) from read_parquet('{out}/*.parquet')"
    ).fetchall()
    assert n == N_CAPTURES and kind.startswith("GEOMETRY")


def test_bad_rows_do_not_fail_the_job(ray_cluster, captures, tmp_path):
    good = pq.read_table(captures).slice(0, 8)
    row = good.slice(0, 1).to_pylist()[0]
    bad = [{**row, "capture_id": "bad-dtype", "datatype": "cf16_le"},
           {**row, "capture_id": "bad-receiver", "receiver_ids": ["x", *row["receiver_ids"][1:]]},
           {**row, "capture_id": "bad-length", "iq": [b"\0" * 8, *row["iq"][1:]]}]
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.concat_tables([good, pa.Table.from_pylist(bad, CAPTURE_SCHEMA)]), src)
    out = tmp_path / "out"
    summary = run_batch(src, out, **SMALL)
    assert summary["captures"] == 11 and summary["failed"] >= 3
    t = pq.read_table(out).to_pandas().set_index("capture_id")
    assert t.loc["bad-dtype", "error_field"] == "datatype"
    assert t.loc["bad-receiver", "error_field"] == "receiver_ids[0]"
    assert t.loc["bad-length", "error_field"] == "iq[0]"
    assert t.loc[good.column("capture_id").to_pylist(), "geometry"].notna().sum() >= 7


def test_corrupt_file_is_an_error_naming_it(ray_cluster, captures, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted(captures.glob("*.parquet")):
        (src / f.name).write_bytes(f.read_bytes())
    corrupt = src / "zz-corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + os.urandom(4096))
    with pytest.raises(BatchError, match=f"{corrupt}: not a readable Parquet file"):
        run_batch(src, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()

    # A sound footer over damaged data: found by the read task, named all the same.
    corrupt.unlink()
    damaged = sorted(src.glob("*.parquet"))[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3:len(data) // 3 + 100_000] = os.urandom(100_000)
    damaged.write_bytes(bytes(data))
    with pytest.raises(BatchError, match=f"{damaged}: corrupt Parquet data"):
        run_batch(src, tmp_path / "out", **SMALL)
    assert not (tmp_path / "out").exists()


def test_stopped_run_then_rerun_writes_each_capture_once(ray_cluster, network, captures,
                                                         tmp_path):
    import ray

    out = tmp_path / "predictions"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "serve_app.cli", "batch", str(captures), str(out),
           "--batch-size", "8", "--num-cpus", "0.1", "--max-actors", "1", "--rows-per-file",
           "8", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        staged: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [p for p in tmp_path.glob(f"predictions{STAGING_MARK}*/*.parquet")]
            if staged:
                break
            time.sleep(0.1)
        assert staged, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGKILL)  # stopped hard, mid-write
    finally:
        proc.wait(timeout=60)
    assert not out.exists()  # a stopped run leaves no OUTPUT, only its staging directory

    summary = run_batch(captures, out, batch_size=16, **SMALL)
    assert summary["captures"] == N_CAPTURES and not summary["skipped"]
    assert not list(tmp_path.glob(f"predictions{STAGING_MARK}*"))  # the leftovers are gone
    assert_matches_reference(out, captures, network)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_batch(captures, out, **SMALL)  # complete: nothing to do
    assert again["skipped"] and again["captures"] == N_CAPTURES
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    replaced = run_batch(captures, out, overwrite=True, **SMALL)
    assert not replaced["skipped"]
    assert sorted(pq.read_table(out, columns=["capture_id"]).column("capture_id").to_pylist()) \
        == sorted(pq.read_table(captures, columns=["capture_id"]).column("capture_id")
                  .to_pylist())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BatchError, match="not the output of a completed"):
        run_batch(captures, foreign, **SMALL)


def test_a_pool_that_would_leave_no_cpu_is_refused(ray_cluster, captures, tmp_path):
    # Ray Data lists the files in a 1-CPU task: actors holding every free CPU (and on this
    # shared cluster the Serve app may hold some) would leave it waiting forever.
    import ray

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(BatchError, match="would leave no CPU"):
        run_batch(captures, tmp_path / "out", min_actors=int(cpus), max_actors=int(cpus),
                  num_cpus=1.0, progress=False)
    assert not list(tmp_path.iterdir())
