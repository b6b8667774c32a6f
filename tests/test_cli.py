"""The `rfloc` registry commands against a real embedded MLflow registry (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "localization_model.onnx"


@pytest.fixture
def rfloc(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RFLOC_STATE_DIR"] = str(tmp_path / "state")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "serve_app.cli", *args], env=env,
                           capture_output=True, text=True, timeout=180)
        if ok:
            assert p.returncode == 0, p.stdout + p.stderr
        return p

    return run


def test_register_promote_models_rollback(rfloc, tmp_path):
    assert "registered localization_model version 1" in rfloc("register", str(MODEL)).stdout
    assert "version 2" in rfloc("register", str(MODEL), "--description", "again").stdout
    rfloc("promote", "1", "--alias", "production")
    rfloc("promote", "2", "--alias", "production")
    rows = json.loads(rfloc("models", "--json").stdout)
    by_version = {r["version"]: r for r in rows}
    assert by_version["2"]["aliases"] == ["production"]
    assert by_version["1"]["accuracy"]["median_m"] > 0  # the model card's figures
    table = rfloc("models").stdout
    assert "production" in table and "version" in table
    assert "-> version 1" in rfloc("rollback", "--alias", "production").stdout
    p = rfloc("rollback", "--alias", "production", ok=False)
    assert p.returncode == 2 and "no previous version" in p.stderr


def test_register_refuses_a_file_that_is_not_a_model(rfloc, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    p = rfloc("register", str(bogus), ok=False)
    assert p.returncode == 2 and "not a loadable ONNX model" in p.stderr


def test_simulate_writes_requests_and_truth(rfloc, tmp_path):
    out, truth = tmp_path / "batch.json", tmp_path / "truth.json"
    rfloc("simulate", "--n", "3", "--form", "pairs", "--out", str(out), "--truth", str(truth))
    body = json.loads(out.read_text())
    assert len(body["captures"]) == 3 and "iq" in body["captures"][0]["receivers"][0]
    assert len(json.loads(truth.read_text())) == 3


def test_simulate_parquet_then_batch_refuses_a_foreign_file(rfloc, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "captures"
    p = rfloc("simulate", "--parquet", str(d), "--n", "80", "--shards", "2", "--datatype",
              "ci16_le")
    assert "wrote 80 capture(s)" in p.stdout
    t = pq.read_table(d)
    assert t.num_rows == 80 and set(t.column("datatype").to_pylist()) == {"ci16_le"}
    assert len(list(d.glob("*.parquet"))) == 2
    foreign = d / "zz-notes.parquet"
    pq.write_table(pa.table({"note": ["not captures"]}), foreign)
    p = rfloc("batch", str(d), str(tmp_path / "out"), ok=False)  # fails before Ray starts
    assert p.returncode == 2
    assert f"rfloc batch: {foreign}: not a capture dataset: no column(s) capture_id" in p.stderr
    assert not (tmp_path / "out").exists()
