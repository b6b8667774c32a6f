"""The batch formats without Ray: Parquet capture rows in, GeoParquet rows out, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from serve_app.batch import BatchError, BatchLocalizer, check_input, resolve_input
from serve_app.capture_parquet import (
    CAPTURE_SCHEMA,
    IQ_DATATYPES,
    binary_list_views,
    decode_receivers,
    iq_to_bytes,
    write_capture_dataset,
)
from serve_app.errors import InvalidInput
from serve_app.geoparquet import OUTPUT_SCHEMA


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """64 simulated captures in two files, some with fewer receivers than the network."""
    d = tmp_path_factory.mktemp("captures")
    write_capture_dataset(d, 64, seed=7, shards=2, max_missing=3)
    return d


@pytest.fixture(scope="module")
def localizer():
    return BatchLocalizer()


@pytest.mark.parametrize("datatype", sorted(IQ_DATATYPES))
def test_every_datatype_round_trips(network, datatype):
    rng = np.random.default_rng(1)
    iq = (rng.normal(0, 0.2, (3, 4800)) + 1j * rng.normal(0, 0.2, (3, 4800))).astype(np.complex64)
    blobs = [iq_to_bytes(row, datatype) for row in iq]
    d = decode_receivers(network.ids[:3], blobs, datatype, 48_000, 145.5e6, network)
    step = IQ_DATATYPES[datatype].scale
    np.testing.assert_allclose(d.iq, iq, atol=max(step, 1e-7))
    np.testing.assert_array_equal(d.slots, [0, 1, 2])


@pytest.mark.parametrize("change, field", [
    ({"datatype": "cf16_le"}, "datatype"),
    ({"receiver_ids": ["torino", "milano", "atlantis"]}, "receiver_ids[2]"),
    ({"receiver_ids": ["torino", "milano", "torino"]}, "receiver_ids[2]"),
    ({"receiver_ids": ["torino", "milano"], "iq": "two"}, "receiver_ids"),
    ({"iq": "short"}, "iq[1]"),
    ({"iq": "nan"}, "iq[0]"),
    ({"iq": "count"}, "iq"),
    ({"sample_rate_hz": 44_100.0}, "sample_rate_hz"),
    ({"sample_rate_hz": float("nan")}, "sample_rate_hz"),
    ({"center_freq_hz": 433.0e6}, "center_freq_hz"),
])
def test_decode_receivers_names_the_bad_field(network, change, field):
    ids = change.get("receiver_ids", ["torino", "milano", "genova"])
    iq = np.full((3, 4800), 0.01 + 0.01j, np.complex64)
    blobs = [iq_to_bytes(row, "cf32_le") for row in iq]
    if change.get("iq") == "short":
        blobs[1] = blobs[1][:-8]
    elif change.get("iq") == "nan":
        blobs[0] = iq_to_bytes(np.full(4800, np.nan, np.complex64), "cf32_le")
    elif change.get("iq") in ("count", "two"):
        blobs = blobs[:2]
    with pytest.raises(InvalidInput) as exc:
        decode_receivers(ids, blobs, change.get("datatype", "cf32_le"),
                         change.get("sample_rate_hz", 48_000.0),
                         change.get("center_freq_hz", 145.5e6), network)
    assert exc.value.field == field, exc.value


def test_binary_list_views_are_the_values_of_a_sliced_column():
    col = pa.array([[b"ab", b"c"], None, [], [b"defg"]], pa.list_(pa.binary()))
    for arr in (col, col.slice(1), pa.chunked_array([col.slice(0, 2), col.slice(2)])):
        got = [None if r is None else [bytes(v) for v in r] for r in binary_list_views(arr)]
        assert got == arr.to_pylist()


def test_capture_dataset_is_plain_parquet(captures):
    t = pq.read_table(captures)
    assert t.num_rows == 64 and t.schema.equals(CAPTURE_SCHEMA)
    lengths = {len(r) for r in t.column("receiver_ids").to_pylist()}
    assert min(lengths) < 7 <= max(lengths)  # fewer receivers are normal rows
    df = pq.read_table(captures, columns=["capture_id", "datatype"]).to_pandas()
    assert df["capture_id"].is_unique and set(df["datatype"]) == {"cf32_le"}


def _good_and_bad(captures) -> pa.Table:
    """Four good captures, then one bad row per kind of problem."""
    good = pq.read_table(captures).slice(0, 4)
    row = good.slice(0, 1).to_pylist()[0]
    bad = []
    for i, change in enumerate([{"datatype": "bogus"},
                                {"receiver_ids": ["atlantis", *row["receiver_ids"][1:]]},
                                {"iq": [row["iq"][0][:100], *row["iq"][1:]]},
                                {"iq": None},
                                {"sample_rate_hz": 1.0},
                                {"receiver_ids": row["receiver_ids"][:2], "iq": row["iq"][:2]}]):
        bad.append({**row, "capture_id": f"bad-{i}", **change})
    schema = CAPTURE_SCHEMA.set(CAPTURE_SCHEMA.get_field_index("iq"),
                                pa.field("iq", pa.list_(pa.binary())))  # nullable here
    return pa.concat_tables([good.cast(schema), pa.Table.from_pylist(bad, schema)])


def test_bad_rows_get_their_error_and_do_not_touch_the_others(localizer, captures):
    table = _good_and_bad(captures)
    out = localizer.localize(table)
    assert out.schema.equals(OUTPUT_SCHEMA, check_metadata=True)
    rows = out.to_pylist()
    assert [r["capture_id"] for r in rows] == table.column("capture_id").to_pylist()
    fields = [r["error_field"] for r in rows]
    assert fields == [None] * 4 + ["datatype", "receiver_ids[0]", "iq[0]", "iq",
                                   "sample_rate_hz", "receiver_ids"]
    for r in rows[4:]:
        assert r["error"].startswith(r["error_field"] + ": ")
        assert r["geometry"] is None and r["ellipse"] is None and r["latitude"] is None
    # the good rows are what they are alone
    alone = localizer.localize(table.slice(0, 4)).to_pylist()
    for a, b in zip(alone, rows[:4], strict=True):
        assert a["geometry"] == b["geometry"] and a["ellipse"] == b["ellipse"]
        point = shapely.from_wkb(b["geometry"])
        assert (point.x, point.y) == (b["longitude"], b["latitude"])
        ring = shapely.from_wkb(b["ellipse"])
        assert ring.geom_type == "Polygon" and ring.contains(point)


def test_output_rows_are_geoparquet(localizer, captures, tmp_path):
    gpd = pytest.importorskip("geopandas")
    out = localizer.localize(pq.read_table(captures).slice(0, 16))
    pq.write_table(out, tmp_path / "part.parquet")
    geo = json.loads(pq.read_schema(tmp_path / "part.parquet").metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    g = gpd.read_parquet(tmp_path / "part.parquet")
    assert g.geometry.name == "geometry" and g.crs.to_string() == "OGC:CRS84"
    np.testing.assert_array_equal(g.geometry.x.to_numpy(), out.column("longitude").to_numpy())
    assert set(g["ellipse"].geom_type) == {"Polygon"}
    assert g.set_geometry("ellipse").contains(g.geometry).all()


def test_input_resolution_and_corrupt_or_foreign_files(captures, tmp_path):
    fs, files = resolve_input(str(captures))
    assert len(files) == 2
    assert check_input(fs, files)[0] == 64
    assert resolve_input(str(captures / "*-00001-*.parquet"))[1] == [files[1]]
    assert resolve_input(files[0])[1] == [files[0]]
    with pytest.raises(BatchError, match="no such file"):
        resolve_input(str(tmp_path / "nowhere"))

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(Path(files[0]).read_bytes()[:100_000])
    with pytest.raises(BatchError, match=f"{truncated}: not a readable Parquet file"):
        check_input(fs, [files[0], str(truncated)])
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(BatchError, match=f"{foreign}: not a capture dataset: no column"):
        check_input(fs, [str(foreign)])
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pq.read_table(files[0]).set_column(
        3, "datatype", pa.array([1] * 32)), wrong)
    with pytest.raises(BatchError, match=f"{wrong}: column datatype is int64"):
        check_input(fs, [str(wrong)])
