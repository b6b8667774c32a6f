"""SigMF recording sets: written files pass `sigmf`'s validation, read back into captures that
localize like the same capture sent as complex64 JSON, and every fault names file and field."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyproj import Geod
from sigmf.sigmffile import fromfile
from sigmf.validate import main as sigmf_validate

from load.harness.inprocess import localize
from serve_app.constants import N_SAMPLES, SAMPLE_RATE_HZ
from serve_app.decode import decode_capture, encode_capture
from serve_app.io.datatypes import SAMPLE_TYPES
from serve_app.io.sigmf import (
    GAIN_KEY,
    RECEIVER_ID_KEY,
    RecordingError,
    captures_table,
    format_datetime,
    iter_recording_sets,
    parse_datetime,
    read_recording_set,
    recording_sets,
    write_recording_set,
    write_simulated_sets,
)
from serve_app.model import OnnxLocalizer
from serve_app.receivers import ReceiverNetwork, load_network

MODEL = Path(__file__).resolve().parent.parent / "models" / "localization_model.onnx"
GEOD = Geod(ellps="WGS84")
# Position difference from the same capture sent as complex64 JSON, by sample type (stated
# in docs/recordings.md; measured over 200 scenes: cf32_le 0, ci16_le max 0.36 m, ci8 and
# cu8 P95 0.37 km, max 1.01 km) and the largest change of a receiver's power.
POSITION_TOL_M = {"cf32_le": 0.0, "ci16_le": 1.0, "ci8": 1500.0, "cu8": 1500.0}
POWER_TOL_DB = {"cf32_le": 0.0, "ci16_le": 1e-4, "ci8": 0.01, "cu8": 0.01}


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    return load_network()


@pytest.fixture(scope="module")
def model(network: ReceiverNetwork) -> OnnxLocalizer:
    return OnnxLocalizer(MODEL, network.ids)


def _validate_with_sigmf(meta_paths: list[Path]) -> None:
    assert meta_paths
    sigmf_validate([str(p) for p in meta_paths])  # the `sigmf_validate` command: exit 1 if not
    for meta_path in meta_paths:
        rec = fromfile(meta_path)  # verifies core:sha512 against the data file
        rec.validate()
        assert rec.get_global_field("core:extensions")[0]["name"] == "rfloc"


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
@pytest.mark.parametrize("datatype", list(SAMPLE_TYPES))
def test_round_trip_localizes_like_complex64_json(
    tmp_path: Path, network: ReceiverNetwork, model: OnnxLocalizer, datatype: str, archive: bool
) -> None:
    sim = write_simulated_sets(tmp_path / "sets", 6, seed=5, network=network,
                               datatype=datatype, archive=archive, max_missing=2)
    if archive:
        assert all(p.suffix == ".sigmf" and p.is_file() for p in sim.paths)
        with tarfile.open(sim.paths[0]) as tar:
            tar.extractall(tmp_path / "x", filter="data")
        _validate_with_sigmf(sorted((tmp_path / "x").rglob("*.sigmf-meta")))
    else:
        _validate_with_sigmf(sorted(sim.paths[0].glob("*.sigmf-meta")))
    localized = 0
    for i, path in enumerate(sim.paths):
        capture = read_recording_set(path, network)
        ids = [network.ids[j] for j in np.flatnonzero(sim.present[i])]
        assert capture.receiver_ids == ids
        assert capture.sample_rate_hz == SAMPLE_RATE_HZ
        via_sigmf, power_sigmf = localize(capture.to_request(), network, model)
        assert sim.iq is not None
        via_json, power_json = localize(encode_capture(sim.iq[i][sim.present[i]], ids),
                                         network, model)
        assert np.abs(power_sigmf - power_json).max() <= POWER_TOL_DB[datatype]
        assert (via_sigmf is None) == (via_json is None)
        if via_json is None:
            continue
        localized += 1
        a, b = via_sigmf["position"], via_json["position"]  # type: ignore[index]
        dist_m = GEOD.inv(a["longitude"], a["latitude"], b["longitude"], b["latitude"])[2]
        assert dist_m <= POSITION_TOL_M[datatype], (i, dist_m)
        assert via_sigmf["receivers_used"] == via_json["receivers_used"]  # type: ignore[index]
    assert localized >= 4


def test_integer_recordings_carry_the_gain_that_fits_them(tmp_path: Path,
                                                         network: ReceiverNetwork) -> None:
    sim = write_simulated_sets(tmp_path, 1, seed=2, network=network, datatype="cu8")
    for meta_path in sim.paths[0].glob("*.sigmf-meta"):
        meta = json.loads(meta_path.read_text())
        gain_db = meta["global"][GAIN_KEY]
        codes = np.frombuffer(meta_path.with_suffix(".sigmf-data").read_bytes(), np.uint8)
        peak = np.abs(codes.astype(np.float64) - 127.5).max() / 128
        assert 0.8 <= peak <= 0.91, (meta_path.name, gain_db, peak)  # headroom 0.9, 0.1 dB steps
    capture = read_recording_set(sim.paths[0], network)
    assert set(capture.datatypes) == {"cf32_le"}  # the gain is taken out before sending


def test_recording_without_gain_is_sent_in_its_own_type(tmp_path: Path,
                                                        network: ReceiverNetwork) -> None:
    rng = np.random.default_rng(0)
    rec = {rid: (0.1 * rng.standard_normal(N_SAMPLES) + 0j).astype(np.complex64)
           for rid in network.ids[:3]}
    path = write_recording_set(tmp_path / "set", rec, network, datatype="cu8",
                               sample_rate_hz=SAMPLE_RATE_HZ, center_freq_hz=145.5e6,
                               start_s=dict.fromkeys(rec, 1e9), auto_gain=False)
    capture = read_recording_set(path, network)
    assert capture.datatypes == ["cu8"] * 3 and len(capture.iq[0]) == 2 * N_SAMPLES
    body = capture.to_request()
    assert body["receivers"][0]["dtype"] == "cu8"
    decoded = decode_capture(body, network)
    sent = np.stack(list(rec.values()))
    assert np.abs(decoded.iq.view(np.float32) - sent.view(np.float32)).max() <= 0.5 / 128


def test_directory_and_archive_give_the_same_capture(tmp_path: Path,
                                                     network: ReceiverNetwork) -> None:
    a = write_simulated_sets(tmp_path / "a", 1, seed=9, network=network, start_s=1.8e9)
    b = write_simulated_sets(tmp_path / "b", 1, seed=9, network=network, start_s=1.8e9,
                             archive=True)
    ca, cb = (read_recording_set(s.paths[0], network) for s in (a, b))
    assert ca.iq == cb.iq and ca.receiver_ids == cb.receiver_ids and ca.start == cb.start


def test_compressed_archive_reads_like_the_plain_one(tmp_path: Path,
                                                    network: ReceiverNetwork) -> None:
    import gzip

    sim = write_simulated_sets(tmp_path, 1, seed=9, network=network, archive=True)
    packed = tmp_path / "0000.sigmf.gz"
    packed.write_bytes(gzip.compress(sim.paths[0].read_bytes()))
    plain, gz = (read_recording_set(p, network) for p in (sim.paths[0], packed))
    assert gz.iq == plain.iq and gz.receiver_ids == plain.receiver_ids


def test_truth_annotation_and_metadata(tmp_path: Path, network: ReceiverNetwork) -> None:
    sim = write_simulated_sets(tmp_path, 1, seed=4, network=network, datatype="ci8")
    meta = json.loads((sim.paths[0] / "torino.sigmf-meta").read_text())
    g = meta["global"]
    assert g["core:datatype"] == "ci8" and g[RECEIVER_ID_KEY] == "torino"
    assert g["core:geolocation"]["coordinates"][:2] == [7.672, 45.044]
    assert parse_datetime(meta["captures"][0]["core:datetime"]) > 1.7e9
    [note] = meta["annotations"]
    assert note["core:sample_count"] == N_SAMPLES
    assert (note["core:latitude"], note["core:longitude"]) == pytest.approx(
        tuple(sim.truth_latlon[0]))
    assert 30 <= note["rfloc:tx_power_dbm"] <= 47


# --- the capture window -------------------------------------------------------------------


def _ramp_set(tmp_path: Path, network: ReceiverNetwork, starts_s: list[float],
              lengths: list[int]) -> Path:
    """Three cf32 recordings whose sample k of receiver r is k + r·1j (exact in float32)."""
    rec = {rid: (np.arange(n) + 1j * r).astype(np.complex64)
           for r, (rid, n) in enumerate(zip(network.ids[:3], lengths, strict=True))}
    return write_recording_set(tmp_path / "ramp", rec, network, datatype="cf32_le",
                               sample_rate_hz=SAMPLE_RATE_HZ, center_freq_hz=145.5e6,
                               start_s=dict(zip(rec, starts_s, strict=True)))


def test_window_starts_at_the_overlap_of_the_recordings(tmp_path: Path,
                                                        network: ReceiverNetwork) -> None:
    t0 = 1.8e9
    # Receiver 1 starts last, 120 samples after receiver 0 and 6 after receiver 2.
    path = _ramp_set(tmp_path, network, [t0, t0 + 120 / 48_000, t0 + 114 / 48_000],
                     [400, 300, 300])
    capture = read_recording_set(path, network, n_samples=50)
    iq = capture.to_complex64()
    assert iq.real[:, 0].tolist() == [120, 0, 6]
    assert iq.real[:, -1].tolist() == [169, 49, 55]
    assert capture.start == format_datetime(t0 + 120 / 48_000)


def test_start_picks_the_window_and_too_few_samples_names_the_file(
    tmp_path: Path, network: ReceiverNetwork
) -> None:
    t0 = 1.8e9
    path = _ramp_set(tmp_path, network, [t0, t0, t0], [400, 300, 200])
    later = format_datetime(t0 + 96 / 48_000)
    capture = read_recording_set(path, network, start=later, n_samples=100)
    assert capture.to_complex64().real[:, 0].tolist() == [96, 96, 96]
    with pytest.raises(RecordingError) as exc:
        read_recording_set(path, network, start=later, n_samples=150)
    assert exc.value.path.endswith(f"{network.ids[2]}.sigmf-data")
    assert "too few samples: 104 from the window start" in exc.value.message
    with pytest.raises(RecordingError) as exc:
        read_recording_set(path, network, start=format_datetime(t0 - 0.001), n_samples=10)
    assert exc.value.key == "captures[0].core:datetime"
    with pytest.raises(RecordingError, match="ISO 8601"):
        read_recording_set(path, network, start="yesterday")


def test_window_is_read_from_the_capture_segment_covering_it(tmp_path: Path,
                                                            network: ReceiverNetwork) -> None:
    t0 = 1.8e9
    path = _ramp_set(tmp_path, network, [t0, t0, t0], [400, 400, 400])
    # The receivers paused: their samples from 200 on were taken 1 s later.
    for meta_path in path.glob("*.sigmf-meta"):
        meta = json.loads(meta_path.read_text())
        meta["captures"].append({"core:sample_start": 200,
                                 "core:datetime": format_datetime(t0 + 1)})
        meta_path.write_text(json.dumps(meta))
    assert read_recording_set(path, network, n_samples=100).to_complex64().real[0, 0] == 0
    later = read_recording_set(path, network, start=format_datetime(t0 + 1 + 24 / 48_000),
                               n_samples=100)
    assert later.to_complex64().real[:, 0].tolist() == [224, 224, 224]
    err = _fault(path, network, n_samples=250)
    assert err.path.endswith(f"{network.ids[0]}.sigmf-meta") and err.key == "captures"
    assert "crosses the capture segment starting at sample 200" in err.message


# --- faults: each names the file and the field --------------------------------------------


@pytest.fixture
def one_set(tmp_path: Path, network: ReceiverNetwork) -> Path:
    sim = write_simulated_sets(tmp_path / "sets", 1, seed=3, network=network, datatype="ci16_le")
    return sim.paths[0]


def _edit(meta_path: Path, **changes: Any) -> None:
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        target = meta["global"] if section == "g" else meta["captures"][0]
        if value is None:
            target.pop(field.replace("_", ":", 1), None)
        else:
            target[field.replace("_", ":", 1)] = value
    meta_path.write_text(json.dumps(meta))


def _fault(path: Path, network: ReceiverNetwork, **kwargs: Any) -> RecordingError:
    with pytest.raises(RecordingError) as exc:
        read_recording_set(path, network, **kwargs)
    return exc.value


def test_unknown_datatype(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "milano.sigmf-meta", g__core_datatype="cf64_le")
    err = _fault(one_set, network)
    assert err.path.endswith("milano.sigmf-meta") and err.key == "global.core:datatype"
    assert "'cf64_le' is not supported" in err.message and "cu8" in err.message


def test_metadata_failing_sigmf_validation(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "genova.sigmf-meta", g__core_sample_rate="fast")
    err = _fault(one_set, network)
    assert err.path.endswith("genova.sigmf-meta") and err.key == "global.core:sample_rate"
    assert "fails SigMF validation" in err.message


def test_sample_rate_mismatch(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "torino.sigmf-meta", g__core_sample_rate=44_100)
    err = _fault(one_set, network)
    assert err.path.endswith("torino.sigmf-meta") and err.key == "global.core:sample_rate"
    assert "44100 Hz" in err.message and "48000" in err.message


def test_recording_matched_by_geolocation_alone(one_set: Path, network: ReceiverNetwork) -> None:
    before = read_recording_set(one_set, network)
    for meta_path in one_set.glob("*.sigmf-meta"):
        _edit(meta_path, g__rfloc_receiver_id=None)
    after = read_recording_set(one_set, network)
    assert after.receiver_ids == before.receiver_ids and after.iq == before.iq


def test_recording_matching_no_receiver(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "milano.sigmf-meta", g__rfloc_receiver_id=None,
          g__core_geolocation={"type": "Point", "coordinates": [9.2, 45.5]})
    err = _fault(one_set, network)
    assert err.path.endswith("milano.sigmf-meta") and err.key == "global.core:geolocation"
    assert "matches no receiver: the nearest, milano, is 6." in err.message
    assert read_recording_set(one_set, network, match_distance_m=7000.0).receiver_ids


def test_recording_naming_an_unknown_receiver(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "coazze.sigmf-meta", g__rfloc_receiver_id="atlantis")
    err = _fault(one_set, network)
    assert err.path.endswith("coazze.sigmf-meta") and err.key == f"global.{RECEIVER_ID_KEY}"
    assert "'atlantis'" in err.message


def test_two_recordings_for_one_receiver(one_set: Path, network: ReceiverNetwork) -> None:
    for ext in (".sigmf-meta", ".sigmf-data"):
        shutil.copy(one_set / f"torino{ext}", one_set / f"torino_again{ext}")
    err = _fault(one_set, network)
    assert err.path.endswith("torino_again.sigmf-meta")
    assert err.key == f"global.{RECEIVER_ID_KEY}"
    assert "second recording of receiver 'torino'" in err.message
    assert "torino.sigmf-meta" in err.message


def test_truncated_data_file(one_set: Path, network: ReceiverNetwork) -> None:
    data = one_set / "genova.sigmf-data"
    data.write_bytes(data.read_bytes()[:-1])  # part of a sample
    err = _fault(one_set, network)
    assert err.path.endswith("genova.sigmf-data") and err.key == "global.core:datatype"
    assert "truncated" in err.message
    data.write_bytes(data.read_bytes()[: -3 - 4 * 100])  # whole samples: the checksum
    err = _fault(one_set, network)
    assert err.path.endswith("genova.sigmf-data") and err.key == "global.core:sha512"


def test_too_few_samples(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "giaveno.sigmf-meta", g__core_sha512=None)
    data = one_set / "giaveno.sigmf-data"
    data.write_bytes(data.read_bytes()[: 4 * 1000])
    err = _fault(one_set, network)
    assert err.path.endswith("giaveno.sigmf-data") and "too few samples" in err.message


def test_missing_datetime_and_data_file(one_set: Path, network: ReceiverNetwork) -> None:
    _edit(one_set / "torino.sigmf-meta", c__core_datetime=None)
    err = _fault(one_set, network)
    assert err.path.endswith("torino.sigmf-meta") and err.key == "captures[0].core:datetime"
    (one_set / "milano.sigmf-data").unlink()
    err = _fault(one_set, network)
    assert err.path.endswith("milano.sigmf-meta") and "milano.sigmf-data is missing" in err.message


def test_too_few_recordings_and_not_a_set(tmp_path: Path, one_set: Path,
                                          network: ReceiverNetwork) -> None:
    for meta_path in sorted(one_set.glob("*.sigmf-meta"))[2:]:
        meta_path.unlink()
    assert "at least 3" in _fault(one_set, network).message
    (tmp_path / "empty").mkdir()
    assert "holds no SigMF recordings" in _fault(tmp_path / "empty", network).message
    (tmp_path / "bad.sigmf").write_bytes(b"not a tar")
    assert "not a readable SigMF archive" in _fault(tmp_path / "bad.sigmf", network).message


def test_captures_table_has_a_row_per_set_and_the_error_of_a_bad_one(
    tmp_path: Path, network: ReceiverNetwork
) -> None:
    sim = write_simulated_sets(tmp_path, 3, seed=6, network=network, datatype="cf32_le",
                               start_s=1.8e9)
    _edit(sim.paths[2] / "genova.sigmf-meta", g__core_datatype="cf64_le")
    table = captures_table(recording_sets(tmp_path), network)
    assert table.column("capture_id").to_pylist() == ["0000", "0001", "0002"]
    assert table.column("read_error").to_pylist()[:2] == [None, None]
    field = table.column("read_error_field").to_pylist()[2]
    assert field == f"{sim.paths[2] / 'genova.sigmf-meta'}: global.core:datatype"
    assert "'cf64_le' is not supported" in table.column("read_error").to_pylist()[2]
    row = table.slice(1, 1).to_pylist()[0]
    assert sim.iq is not None
    ids = [network.ids[j] for j in np.flatnonzero(sim.present[1])]
    assert row["receiver_ids"] == ids and row["datatype"] == "cf32_le"
    np.testing.assert_array_equal(
        np.stack([np.frombuffer(b, np.complex64) for b in row["iq"]]),
        sim.iq[1][sim.present[1]])
    assert row["timestamp"].timestamp() == 1.8e9 + 1


def test_iter_recording_sets_yields_one_capture_or_error_per_set(
    tmp_path: Path, network: ReceiverNetwork
) -> None:
    sim = write_simulated_sets(tmp_path, 3, seed=6, network=network, datatype="cu8")
    (sim.paths[1] / "milano.sigmf-data").write_bytes(b"\x00")
    (tmp_path / "notes.txt").write_text("not a set")
    items = list(iter_recording_sets(tmp_path, network))
    assert [type(x).__name__ for x in items] == ["SetCapture", "RecordingError", "SetCapture"]
    assert items[0].source == str(sim.paths[0])  # type: ignore[union-attr]


def test_to_row_is_one_capture_of_one_datatype(tmp_path: Path, network: ReceiverNetwork) -> None:
    rng = np.random.default_rng(1)
    rec = {rid: (0.2 * rng.standard_normal(N_SAMPLES) + 0j).astype(np.complex64)
           for rid in network.ids[:3]}
    common: dict[str, Any] = {"sample_rate_hz": SAMPLE_RATE_HZ, "center_freq_hz": 145.5e6,
                              "start_s": dict.fromkeys(rec, 1.8e9), "auto_gain": False}
    path = write_recording_set(tmp_path / "set", rec, network, datatype="ci8", **common)
    row = read_recording_set(path, network).to_row()
    assert row["capture_id"] == "set" and row["datatype"] == "ci8"
    assert row["receiver_ids"] == network.ids[:3] and len(row["iq"][0]) == 2 * N_SAMPLES
    assert row["timestamp"].timestamp() == 1.8e9
    # One receiver in another type: the whole capture goes as cf32_le, values kept.
    write_recording_set(tmp_path / "other", {network.ids[0]: rec[network.ids[0]]}, network,
                        datatype="ci16_le", **common)
    shutil.copy(tmp_path / "other" / f"{network.ids[0]}.sigmf-meta", path)
    shutil.copy(tmp_path / "other" / f"{network.ids[0]}.sigmf-data", path)
    mixed = read_recording_set(path, network)
    row = mixed.to_row()
    assert mixed.datatypes == ["ci16_le", "ci8", "ci8"] and row["datatype"] == "cf32_le"
    np.testing.assert_array_equal(np.frombuffer(row["iq"][1], np.complex64),
                                  SAMPLE_TYPES["ci8"].to_complex64(mixed.iq[1]))


def test_readme_metadata_template_reads_and_its_error_example_is_the_real_message(
    tmp_path: Path, network: ReceiverNetwork
) -> None:
    """The README's "Your own recordings" metadata, as written, for three receivers."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Your own recordings", 1)[1]
    template = json.loads(re.search(r"```json\n(.+?)```", section, re.S).group(1))  # type: ignore[union-attr]
    rng = np.random.default_rng(3)
    myset = tmp_path / "myset"
    myset.mkdir()
    for rid in ("torino", "milano", "genova"):
        meta = json.loads(json.dumps(template))
        meta["global"][RECEIVER_ID_KEY] = rid
        (myset / f"{rid}.sigmf-meta").write_text(json.dumps(meta))
        (myset / f"{rid}.sigmf-data").write_bytes(rng.integers(0, 256, 2 * N_SAMPLES + 100,
                                                               np.uint8).tobytes())
    _validate_with_sigmf(sorted(myset.glob("*.sigmf-meta")))
    capture = read_recording_set(myset, network)
    assert capture.receiver_ids == ["torino", "milano", "genova"]
    assert capture.datatypes == ["cu8"] * 3 and capture.start == "2026-11-30T17:00:00.000000Z"
    meta_path = myset / "milano.sigmf-meta"
    meta = json.loads(meta_path.read_text())
    meta["global"]["core:sample_rate"] = 44100
    meta_path.write_text(json.dumps(meta))
    example = re.search(r"`(myset/milano\.sigmf-meta: .+?)`", section).group(1)  # type: ignore[union-attr]
    with pytest.raises(RecordingError) as exc:
        read_recording_set(myset, network)
    assert str(exc.value) == example.replace("myset/", f"{myset}/")
