"""`rfloc batch` over a directory of SigMF recording sets: one capture each, streaming."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from serve_app.batch import DEFAULT_MODEL_PATH, run_batch
from serve_app.decode import decode_capture
from serve_app.io.sigmf import read_recording_set, write_simulated_sets
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import infer, postprocess, preprocess, stack_captures

pytestmark = pytest.mark.ray

SMALL = {"num_cpus": 0.1, "io_cpus": 0.05, "max_actors": 2, "progress": False}


def test_batch_over_recording_sets_matches_predict_and_keeps_a_bad_sets_error(
    ray_cluster, network, tmp_path
):
    sets = tmp_path / "recordings"
    sim = write_simulated_sets(sets, 20, seed=4, network=network, datatype="cu8",
                               max_missing=2, start_s=1.8e9, keep_iq=False)
    bad = sorted(sim.paths[3].glob("*.sigmf-meta"))[-1]
    meta = json.loads(bad.read_text())
    meta["global"]["core:datatype"] = "cf64_le"
    bad.write_text(json.dumps(meta))

    summary = run_batch(sets, tmp_path / "out", batch_size=8, **SMALL)
    assert summary["captures"] == 20 and summary["input_files"] == 20
    rows = {r["capture_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == [f"{i:04d}" for i in range(20)]
    assert rows["0003"]["error_field"] == f"{bad}: global.core:datatype"
    assert "'cf64_le' is not supported" in rows["0003"]["error"]
    assert rows["0005"]["timestamp"].timestamp() == 1.8e9 + 5

    # The same captures the way `rfloc predict DIR` sends them, through the core in process.
    model = OnnxLocalizer(DEFAULT_MODEL_PATH, network.ids)
    good = [p for p in sim.paths if p.name != "0003"]
    decoded = [decode_capture(read_recording_set(p, network).to_request(), network)
               for p in good]
    group = stack_captures([(d.iq, d.slots) for d in decoded], len(network),
                           [0.95] * len(decoded))
    [g] = infer(preprocess([group], network), model, {"name": "m", "version": "1"})
    postprocess(g, network)
    assert g.results is not None
    localized = 0
    for p, want in zip(good, g.results, strict=True):
        row = rows[p.name]
        if want is None:
            assert row["error"] is not None
            continue
        localized += 1
        assert row["error"] is None
        # float32 ONNX over batches of other sizes: equal to ~1e-8 degrees (millimetres)
        assert row["latitude"] == pytest.approx(want["position"]["latitude"], abs=1e-6)
        assert row["longitude"] == pytest.approx(want["position"]["longitude"], abs=1e-6)
        assert row["receivers_used"] == want["receivers_used"]
    assert localized >= 15
