"""Receiver network: the shipped config, the local ENU frame, and refusal of bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyproj
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.constants import TX_MARGIN_M
from serve_app.errors import ConfigError
from serve_app.receivers import ReceiverNetwork, load_network

GEOD = pyproj.Geod(ellps="WGS84")

DESIGN_TABLE = {  # DESIGN.md, "Receiver network and physics"
    "giaveno": (45.020, 7.290),
    "coazze": (45.030, 7.270),
    "torino": (45.044, 7.672),
    "montanaro": (45.234, 7.857),
    "milano": (45.478, 9.123),
    "passo_del_giovi": (44.561, 8.956),
    "genova": (44.395, 8.956),
}


def _entry(rid: str, lat: float = 45.0, lon: float = 8.0, **extra: object) -> str:
    fields = {"id": rid, "name": rid.title(), "latitude": lat, "longitude": lon,
              "altitude_m": 100.0, "calibration_db": -70.0, **extra}
    return "  - {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "receivers.yaml"
    path.write_text(text)
    return path



@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    """The shipped default network (module-local: these tests need no shared conftest)."""
    return load_network()

GOOD_ENTRIES = [_entry("rx_a", 45.0, 7.5), _entry("rx_b", 45.2, 8.0), _entry("rx_c", 44.8, 8.3)]


def test_shipped_network_matches_design_table(network: ReceiverNetwork) -> None:
    assert len(network) == 7
    assert network.ids == list(DESIGN_TABLE)
    for r in network.receivers:
        assert (r.latitude, r.longitude) == DESIGN_TABLE[r.id]
    assert network.enu_m.shape == (7, 2)
    assert network.calibration_db.shape == (7,)
    assert [network.index(rid) for rid in DESIGN_TABLE] == list(range(7))
    with pytest.raises(KeyError):
        network.index("nowhere")


def test_enu_origin_is_the_receivers_centroid(network: ReceiverNetwork) -> None:
    lats = [r.latitude for r in network.receivers]
    lons = [r.longitude for r in network.receivers]
    assert network.origin_lat == pytest.approx(np.mean(lats), abs=1e-12)
    assert network.origin_lon == pytest.approx(np.mean(lons), abs=1e-12)
    e, n = network.to_enu(network.origin_lat, network.origin_lon)
    assert abs(float(e)) < 1e-6 and abs(float(n)) < 1e-6
    # The receivers' ENU positions are centred too (to within the frame's curvature).
    assert np.abs(network.enu_m.mean(axis=0)).max() < 1_000.0


def test_enu_axes_point_east_and_north(network: ReceiverNetwork) -> None:
    lon, lat, _ = GEOD.fwd(network.origin_lon, network.origin_lat, 90.0, 10_000.0)
    e, n = network.to_enu(lat, lon)
    assert float(e) == pytest.approx(10_000.0, abs=1.0) and abs(float(n)) < 5.0
    lon, lat, _ = GEOD.fwd(network.origin_lon, network.origin_lat, 0.0, 10_000.0)
    e, n = network.to_enu(lat, lon)
    assert abs(float(e)) < 1e-6 and float(n) == pytest.approx(10_000.0, abs=1.0)


def test_receiver_positions_match_geodesic_distances(network: ReceiverNetwork) -> None:
    # Torino–Milano is ~125 km; the planar ENU distance must agree to < 0.1 %.
    i, j = network.index("torino"), network.index("milano")
    ri, rj = network.receivers[i], network.receivers[j]
    _, _, geodesic_m = GEOD.inv(ri.longitude, ri.latitude, rj.longitude, rj.latitude)
    planar_m = float(np.linalg.norm(network.enu_m[i] - network.enu_m[j]))
    assert planar_m == pytest.approx(geodesic_m, rel=1e-3)


def _margin_box(network: ReceiverNetwork, extra_m: float) -> tuple[float, float, float, float]:
    min_e, min_n, max_e, max_n = network.bbox_enu_m
    m = TX_MARGIN_M + extra_m
    return min_e - m, min_n - m, max_e + m, max_n + m


@settings(max_examples=200, deadline=None)
@given(u=st.floats(0.0, 1.0), v=st.floats(0.0, 1.0))
def test_enu_round_trip_within_1m(u: float, v: float) -> None:
    network = load_network()
    min_e, min_n, max_e, max_n = _margin_box(network, 100_000.0)
    east, north = min_e + u * (max_e - min_e), min_n + v * (max_n - min_n)
    lat, lon = network.to_geodetic(east, north)
    e2, n2 = network.to_enu(lat, lon)
    assert np.hypot(e2 - east, n2 - north) < 1.0
    lat2, lon2 = network.to_geodetic(e2, n2)
    _, _, dist_m = GEOD.inv(lon, lat, lon2, lat2)
    assert dist_m < 1.0


def test_enu_round_trip_from_geodetic_vectorized(network: ReceiverNetwork) -> None:
    lats = np.array([r.latitude for r in network.receivers] + [44.0, 46.2])
    lons = np.array([r.longitude for r in network.receivers] + [6.9, 9.8])
    e, n = network.to_enu(lats, lons)
    lat2, lon2 = network.to_geodetic(e, n)
    _, _, dist_m = GEOD.inv(lons, lats, lon2, lat2)
    assert dist_m.max() < 1.0
    # NaN (an item that failed upstream) stays NaN and does not disturb its neighbours.
    lat3, lon3 = network.to_geodetic(np.array([np.nan, e[0]]), np.array([0.0, n[0]]))
    assert np.isnan(lat3[0]) and lat3[1] == pytest.approx(lats[0], abs=1e-8)


def test_minimal_valid_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, "receivers:\n" + "".join(GOOD_ENTRIES))
    net = load_network(path)
    assert net.ids == ["rx_a", "rx_b", "rx_c"]
    assert net.calibration_db.tolist() == [-70.0, -70.0, -70.0]
    assert net.describe()[0]["id"] == "rx_a"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (GOOD_ENTRIES + [_entry("rx_b", 45.5, 8.5)], ["receivers[3]", "duplicate", "rx_b"]),
        ([_entry("rx_a"), _entry("rx_b", lat=95.0), _entry("rx_c")],
         ["receivers.1.latitude", "90"]),
        ([_entry("rx_a"), _entry("rx_b", lon=181.0), _entry("rx_c")],
         ["receivers.1.longitude"]),
        (GOOD_ENTRIES[:2], ["receivers", "at least 3"]),
        (GOOD_ENTRIES[:2] + ["  - {id: rx_c, latitude: 45.0, longitude: 8.0}\n"],
         ["receivers.2.name", "required"]),
        (GOOD_ENTRIES[:2] + ["  - {id: RX C, name: c, latitude: 45.0, longitude: 8.0}\n"],
         ["receivers.2.id"]),
    ],
    ids=["duplicate-id", "latitude-95", "longitude-181", "two-receivers", "missing-name",
         "bad-id"],
)
def test_invalid_entries_name_the_bad_entry(
    tmp_path: Path, entries: list[str], expected: list[str]
) -> None:
    path = _write(tmp_path, "receivers:\n" + "".join(entries))
    with pytest.raises(ConfigError) as info:
        load_network(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_bad_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "receivers: [ {id: rx_a, name: a\n  - :: ]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_network(path)


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "receivers: 3\n"])
def test_wrong_document_shape_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="invalid receivers file"):
        load_network(_write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_network(missing)
    assert "nope.yaml" in str(info.value)


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_network(tmp_path)  # a directory
    binary = tmp_path / "receivers.yaml"
    binary.write_bytes(b"receivers:\n  - \xff\xfe\x00garbage\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_network(binary)
