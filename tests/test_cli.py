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


@pytest.fixture(scope="module")
def naive_service():
    """The single-process FastAPI app of load/naive_app.py on a free loopback port (no Ray)."""
    import time

    import httpx

    from load.harness import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "load" / "naive_app.py"), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "naive app did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("dtype", ["cf32_le", "ci16_le", "ci8", "cu8"])
def test_predict_a_sigmf_recording_set_like_its_complex64_json(rfloc, tmp_path, naive_service,
                                                               dtype):
    """simulate --sigmf → rfloc predict DIR over HTTP = the same capture as complex64 JSON."""
    import numpy as np
    from pyproj import Geod

    from serve_app.decode import encode_capture
    from serve_app.io.sigmf import write_simulated_sets
    from serve_app.receivers import load_network

    out = rfloc("simulate", "--sigmf", str(tmp_path / "sets"), "--n", "2", "--seed", "8",
                "--dtype", dtype).stdout
    assert f"wrote 2 recording set(s) of {dtype}" in out
    # The same scenes again, in process, for the complex64 JSON of each capture window.
    net = load_network()
    sim = write_simulated_sets(tmp_path / "again", 2, 8, network=net, datatype=dtype)
    # docs/recordings.md: what each type's quantisation may move the position
    tolerance_m = {"cf32_le": 0.0, "ci16_le": 1.0, "ci8": 1500.0, "cu8": 1500.0}[dtype]
    assert sim.iq is not None
    for i in range(2):
        ids = [net.ids[j] for j in np.flatnonzero(sim.present[i])]
        request = tmp_path / f"capture{i}.json"
        request.write_text(json.dumps(encode_capture(sim.iq[i][sim.present[i]], ids)))
        [via_json] = json.loads(rfloc("predict", str(request), "--url", naive_service).stdout)
        p = rfloc("predict", str(tmp_path / "sets" / f"{i:04d}"), "--url", naive_service)
        [via_sigmf] = json.loads(p.stdout)
        assert f"{len(ids)} recordings" in p.stderr
        a, b = via_sigmf["position"], via_json["position"]
        dist_m = Geod(ellps="WGS84").inv(a["longitude"], a["latitude"], b["longitude"],
                                         b["latitude"])[2]
        assert dist_m <= tolerance_m
        assert via_sigmf["receivers_used"] == via_json["receivers_used"]


def test_predict_names_the_file_and_field_of_a_bad_recording(rfloc, tmp_path):
    rfloc("simulate", "--sigmf", str(tmp_path / "sets"), "--archive", "--dtype", "ci8")
    archive = tmp_path / "sets" / "0000.sigmf"
    assert archive.is_file()
    p = rfloc("predict", str(archive), "--start", "last tuesday", ok=False)
    assert p.returncode == 2 and "0000.sigmf: start:" in p.stderr and "ISO 8601" in p.stderr


def test_predict_names_the_recording_the_service_refuses(rfloc, tmp_path, naive_service):
    import numpy as np

    rfloc("simulate", "--sigmf", str(tmp_path / "sets"), "--dtype", "cf32_le")
    data = tmp_path / "sets" / "0000" / "milano.sigmf-data"
    samples = np.frombuffer(data.read_bytes(), np.complex64).copy()
    samples[1000:] = np.nan  # SigMF is fine with it (checksum updated), the service is not
    data.write_bytes(samples.tobytes())
    meta_path = data.with_suffix(".sigmf-meta")
    meta = json.loads(meta_path.read_text())
    del meta["global"]["core:sha512"]
    meta_path.write_text(json.dumps(meta))
    p = rfloc("predict", str(tmp_path / "sets" / "0000"), "--url", naive_service, ok=False)
    assert p.returncode == 1
    error = json.loads(p.stdout)["error"]
    assert "non-finite" in error["message"] and error["file"] == str(meta_path)
