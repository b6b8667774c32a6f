"""Unit tests of confidence ellipses and their GeoJSON rendering (real pyproj, no cluster)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyproj
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from serve_app.uncertainty import (
    CHI2_2DOF_K,
    Ellipse,
    chi2_scale,
    ellipse_from_cov,
    ellipse_ring,
    ellipses_from_covs,
    geojson_feature_collection,
)

GEOD = pyproj.Geod(ellps="WGS84")

sigmas_m = st.floats(min_value=1.0, max_value=1e4, allow_nan=False, allow_infinity=False)
rhos = st.floats(min_value=-0.99, max_value=0.99, allow_nan=False, allow_infinity=False)
levels = st.floats(min_value=0.01, max_value=0.999, allow_nan=False, allow_infinity=False)
angles_deg = st.floats(min_value=-360.0, max_value=360.0, allow_nan=False, allow_infinity=False)


def make_cov(sigma_x_m: float, sigma_y_m: float, rho: float) -> np.ndarray:
    cxy = rho * sigma_x_m * sigma_y_m
    return np.array([[sigma_x_m**2, cxy], [cxy, sigma_y_m**2]])


def rotation(phi_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(phi_deg)), math.sin(math.radians(phi_deg))
    return np.array([[c, -s], [s, c]])


def circular_diff_180(a_deg: float, b_deg: float) -> float:
    """Distance between two axis angles, which are only defined modulo 180 degrees."""
    d = (a_deg - b_deg) % 180.0
    return min(d, 180.0 - d)


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace area of a closed [lon, lat] ring with longitudes unwrapped; > 0 when CCW."""
    lons = np.unwrap(np.array([p[0] for p in ring]), period=360.0)
    lats = np.array([p[1] for p in ring])
    return 0.5 * float(np.sum(lons[:-1] * lats[1:] - lons[1:] * lats[:-1]))


def expected_radius_m(ellipse: Ellipse, azimuth_deg: float) -> float:
    """Distance from the centre to the ellipse boundary along a compass bearing."""
    az = math.radians(azimuth_deg)
    east, north = math.sin(az), math.cos(az)
    th = math.radians(ellipse.theta)
    # Coordinates of the unit direction in the ellipse's own (major, minor) frame.
    u = east * math.cos(th) + north * math.sin(th)
    v = -east * math.sin(th) + north * math.cos(th)
    return 1.0 / math.sqrt((u / ellipse.semi_major_m) ** 2 + (v / ellipse.semi_minor_m) ** 2)


def polygon_rings(feature_collection: dict[str, Any]) -> list[list[list[float]]]:
    geometry = feature_collection["features"][1]["geometry"]
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"][0]]
    assert geometry["type"] == "MultiPolygon"
    return [polygon[0] for polygon in geometry["coordinates"]]


def assert_valid_ring(ring: list[list[float]]) -> None:
    assert len(ring) >= 4
    assert ring[0] == ring[-1]
    assert all(len(p) == 2 for p in ring)
    assert all(-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0 for lon, lat in ring)
    assert signed_area(ring) > 0.0


# --- chi-square scale ------------------------------------------------------------------------


def test_chi2_scale_reference_levels() -> None:
    assert chi2_scale(0.3935) == pytest.approx(1.0, abs=1e-3)
    assert chi2_scale(0.95) == pytest.approx(2.4477, abs=1e-4)
    assert pytest.approx(2.4477, abs=1e-4) == CHI2_2DOF_K


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_chi2_scale_rejects_levels_outside_open_unit_interval(level: float) -> None:
    with pytest.raises(ValueError, match="confidence level"):
        chi2_scale(level)


@pytest.mark.parametrize("level", [0.0, 1.0, 2.0, -0.5])
def test_ellipse_rejects_bad_level(level: float) -> None:
    with pytest.raises(ValueError, match="confidence level"):
        ellipse_from_cov(np.diag([1.0, 1.0]), level)
    with pytest.raises(ValueError, match="confidence level"):
        ellipses_from_covs(np.diag([1.0, 1.0])[np.newaxis], level)


# --- ellipse parameters ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(sigmas_m, sigmas_m, rhos, levels)
def test_semi_axes_are_k_sqrt_eigenvalues(sx: float, sy: float, rho: float, p: float) -> None:
    cov = make_cov(sx, sy, rho)
    ellipse = ellipse_from_cov(cov, p)
    # Closed-form eigenvalues; the minor one via det / major avoids cancellation.
    trace, det = cov[0, 0] + cov[1, 1], np.linalg.det(cov)
    lam_major = 0.5 * (trace + math.hypot(cov[0, 0] - cov[1, 1], 2.0 * cov[0, 1]))
    lam_minor = det / lam_major
    k = math.sqrt(-2.0 * math.log(1.0 - p))
    assert ellipse.semi_major_m == pytest.approx(k * math.sqrt(lam_major), rel=1e-9)
    assert ellipse.semi_minor_m == pytest.approx(k * math.sqrt(lam_minor), rel=1e-6)
    assert ellipse.semi_major_m >= ellipse.semi_minor_m > 0.0
    assert ellipse.area_m2 == pytest.approx(
        math.pi * ellipse.semi_major_m * ellipse.semi_minor_m, rel=1e-12
    )
    assert ellipse.sigma_x == pytest.approx(sx, rel=1e-12)
    assert ellipse.sigma_y == pytest.approx(sy, rel=1e-12)
    assert ellipse.rho == pytest.approx(rho, rel=1e-9, abs=1e-12)
    assert ellipse.confidence_level == p
    assert 0.0 <= ellipse.theta < 180.0
    assert 0.0 <= ellipse.orientation_deg < 180.0
    assert circular_diff_180(ellipse.orientation_deg, 90.0 - ellipse.theta) < 1e-9


@settings(max_examples=200, deadline=None)
@given(sigmas_m, sigmas_m, rhos, angles_deg)
def test_rotating_covariance_rotates_axis(sx: float, sy: float, rho: float, phi: float) -> None:
    cov = make_cov(sx, sy, rho)
    base = ellipse_from_cov(cov)
    # A near-circular ellipse has no well-defined axis to rotate.
    assume(base.semi_major_m > 1.05 * base.semi_minor_m)
    r = rotation(phi)
    rotated_cov = r @ cov @ r.T
    rotated_cov = 0.5 * (rotated_cov + rotated_cov.T)
    rotated = ellipse_from_cov(rotated_cov)
    assert circular_diff_180(rotated.theta, base.theta + phi) < 1e-6
    assert circular_diff_180(rotated.orientation_deg, base.orientation_deg - phi) < 1e-6
    assert rotated.semi_major_m == pytest.approx(base.semi_major_m, rel=1e-9)
    assert rotated.semi_minor_m == pytest.approx(base.semi_minor_m, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(sigmas_m, sigmas_m, rhos, levels, levels)
def test_level_scales_semi_axes_by_chi2_ratio(
    sx: float, sy: float, rho: float, p1: float, p2: float
) -> None:
    cov = make_cov(sx, sy, rho)
    e1, e2 = ellipse_from_cov(cov, p1), ellipse_from_cov(cov, p2)
    ratio = chi2_scale(p1) / chi2_scale(p2)
    assert e1.semi_major_m / e2.semi_major_m == pytest.approx(ratio, rel=1e-12)
    assert e1.semi_minor_m / e2.semi_minor_m == pytest.approx(ratio, rel=1e-12)
    assert e1.theta == e2.theta
    assert e1.area_m2 / e2.area_m2 == pytest.approx(ratio**2, rel=1e-12)


def test_k_is_one_at_0_3935() -> None:
    ellipse = ellipse_from_cov(np.diag([30.0**2, 20.0**2]), 0.3935)
    assert ellipse.semi_major_m == pytest.approx(30.0, rel=1e-3)
    assert ellipse.semi_minor_m == pytest.approx(20.0, rel=1e-3)


def test_east_elongated_ellipse() -> None:
    ellipse = ellipse_from_cov(np.diag([100.0**2, 50.0**2]))
    assert ellipse.theta == 0.0
    assert ellipse.orientation_deg == 90.0
    assert ellipse.semi_major_m == pytest.approx(100.0 * 2.4477, rel=1e-4)
    assert ellipse.semi_minor_m == pytest.approx(50.0 * 2.4477, rel=1e-4)
    assert ellipse.rho == 0.0


def test_north_elongated_ellipse() -> None:
    ellipse = ellipse_from_cov(np.diag([50.0**2, 100.0**2]))
    assert ellipse.theta == 90.0
    assert ellipse.orientation_deg == 0.0


def test_positive_correlation_points_north_east() -> None:
    ellipse = ellipse_from_cov(make_cov(100.0, 100.0, 0.5))
    assert ellipse.theta == pytest.approx(45.0)
    assert ellipse.orientation_deg == pytest.approx(45.0)
    ellipse = ellipse_from_cov(make_cov(100.0, 100.0, -0.5))
    assert ellipse.theta == pytest.approx(135.0)
    assert ellipse.orientation_deg == pytest.approx(135.0)


def test_as_dict_has_every_field_as_float() -> None:
    d = ellipse_from_cov(np.diag([4.0, 1.0]), 0.9).as_dict()
    assert set(d) == {
        "sigma_x",
        "sigma_y",
        "rho",
        "theta",
        "semi_major_m",
        "semi_minor_m",
        "orientation_deg",
        "confidence_level",
        "area_m2",
    }
    assert all(type(v) is float for v in d.values())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(sigmas_m, sigmas_m, rhos, levels), min_size=1, max_size=8))
def test_vectorised_matches_scalar(items: list[tuple[float, float, float, float]]) -> None:
    covs = np.stack([make_cov(sx, sy, rho) for sx, sy, rho, _ in items])
    ps = np.array([p for *_, p in items])
    batch = ellipses_from_covs(covs, ps)
    for i, (sx, sy, rho, p) in enumerate(items):
        single = ellipse_from_cov(make_cov(sx, sy, rho), p).as_dict()
        for name, value in single.items():
            assert batch[name].shape == (len(items),)
            assert batch[name][i] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_vectorised_accepts_scalar_level() -> None:
    batch = ellipses_from_covs(np.stack([np.diag([4.0, 1.0]), np.diag([1.0, 9.0])]), 0.95)
    np.testing.assert_allclose(batch["semi_major_m"], [2.0 * CHI2_2DOF_K, 3.0 * CHI2_2DOF_K])
    np.testing.assert_array_equal(batch["confidence_level"], [0.95, 0.95])
    np.testing.assert_array_equal(batch["orientation_deg"], [90.0, 0.0])


@pytest.mark.parametrize(
    ("cov", "reason"),
    [
        ([[1.0, 0.5], [0.2, 1.0]], "not symmetric"),
        ([[1.0, math.nan], [math.nan, 1.0]], "non-finite"),
        ([[math.inf, 0.0], [0.0, 1.0]], "non-finite"),
        ([[1.0, 2.0], [2.0, 1.0]], "not positive definite"),
        ([[1.0, 1.0], [1.0, 1.0]], "not positive definite"),
        ([[0.0, 0.0], [0.0, 0.0]], "not positive definite"),
        ([[-1.0, 0.0], [0.0, -1.0]], "not positive definite"),
    ],
)
def test_invalid_covariance_raises(cov: list[list[float]], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ellipse_from_cov(np.array(cov))


def test_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        ellipse_from_cov(np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        ellipses_from_covs(np.eye(2))


def test_vectorised_error_names_the_bad_slot() -> None:
    covs = np.stack([np.eye(2), np.array([[1.0, 2.0], [2.0, 1.0]]), np.eye(2)])
    with pytest.raises(ValueError, match=r"\[1\] covariance is not positive definite"):
        ellipses_from_covs(covs, 0.95)


# --- rings and GeoJSON -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lat", "lon", "cov"),
    [
        (48.85, 2.35, make_cov(8_000.0, 2_000.0, 0.6)),
        (-33.9, 151.2, make_cov(500.0, 1_500.0, -0.3)),
        (70.0, -20.0, make_cov(40_000.0, 15_000.0, 0.0)),
        (0.0, 0.0, make_cov(100.0, 100.0, 0.0)),
    ],
)
def test_vertices_lie_at_geodesic_distance(lat: float, lon: float, cov: np.ndarray) -> None:
    ellipse = ellipse_from_cov(cov)
    ring = ellipse_ring(lat, lon, ellipse, n_vertices=72)
    assert_valid_ring(ring)
    assert len(ring) == 73
    for vlon, vlat in ring[:-1]:
        azimuth, _, dist_m = GEOD.inv(lon, lat, vlon, vlat)
        assert dist_m == pytest.approx(expected_radius_m(ellipse, azimuth), rel=0.005)


def test_major_axis_vertex_is_along_orientation() -> None:
    ellipse = ellipse_from_cov(make_cov(10_000.0, 3_000.0, 0.4))
    lat, lon = 45.0, 7.0
    first_lon, first_lat = ellipse_ring(lat, lon, ellipse)[0]
    azimuth, _, dist_m = GEOD.inv(lon, lat, first_lon, first_lat)
    assert circular_diff_180(azimuth, ellipse.orientation_deg) < 1e-3
    assert dist_m == pytest.approx(ellipse.semi_major_m, rel=1e-6)


def test_feature_collection_structure_and_lon_lat_order() -> None:
    ellipse = ellipse_from_cov(make_cov(3_000.0, 1_000.0, 0.2), 0.9)
    fc = geojson_feature_collection(10.0, 150.0, ellipse, properties={"request_id": "abc"})
    assert fc["type"] == "FeatureCollection"
    point, area = fc["features"]
    assert point["type"] == area["type"] == "Feature"
    assert point["geometry"] == {"type": "Point", "coordinates": [150.0, 10.0]}
    assert point["properties"] == {"kind": "position", "request_id": "abc"}
    assert area["geometry"]["type"] == "Polygon"
    assert area["properties"] == {
        "kind": "uncertainty_ellipse",
        "confidence_level": 0.9,
        "semi_major_m": ellipse.semi_major_m,
        "semi_minor_m": ellipse.semi_minor_m,
        "orientation_deg": ellipse.orientation_deg,
        "request_id": "abc",
    }
    (ring,) = polygon_rings(fc)
    assert_valid_ring(ring)
    # lon 150 would be an impossible latitude if the order were swapped.
    for vlon, vlat in ring:
        assert abs(vlat) <= 90.0
        assert vlon == pytest.approx(150.0, abs=0.1)
        assert vlat == pytest.approx(10.0, abs=0.1)
    # RFC 7946 precision: at most 7 decimals.
    assert all(round(c, 7) == c for p in ring for c in p)


@pytest.mark.parametrize("lon", [179.9, -179.9])
def test_antimeridian_crossing_gives_multipolygon(lon: float) -> None:
    ellipse = ellipse_from_cov(make_cov(30_000.0, 10_000.0, 0.3))
    fc = geojson_feature_collection(-17.0, lon, ellipse)
    geometry = fc["features"][1]["geometry"]
    assert geometry["type"] == "MultiPolygon"
    rings = polygon_rings(fc)
    assert len(rings) == 2
    for ring in rings:
        assert_valid_ring(ring)
    # One piece touches +180, the other -180, and they meet on the same latitudes.
    cut_lats = []
    for ring in rings:
        edge = [lat for lon_, lat in ring if abs(lon_) == 180.0]
        assert len(edge) >= 2
        cut_lats.append(sorted(set(edge)))
    assert cut_lats[0] == pytest.approx(cut_lats[1], abs=1e-7)
    assert {math.copysign(1.0, r[0][0]) for r in rings} == {1.0, -1.0}


def test_antimeridian_ring_vertices_keep_geodesic_distance() -> None:
    lat, lon = 65.0, 179.9
    ellipse = ellipse_from_cov(make_cov(60_000.0, 20_000.0, -0.5))
    ring = ellipse_ring(lat, lon, ellipse, n_vertices=48)
    assert ring[0] == ring[-1]
    assert all(-180.0 <= p[0] <= 180.0 for p in ring)
    assert signed_area(ring) > 0.0
    for vlon, vlat in ring[:-1]:
        azimuth, _, dist_m = GEOD.inv(lon, lat, vlon, vlat)
        assert dist_m == pytest.approx(expected_radius_m(ellipse, azimuth), rel=0.005)


def test_near_antimeridian_without_crossing_stays_polygon() -> None:
    fc = geojson_feature_collection(0.0, 179.0, ellipse_from_cov(np.diag([100.0**2, 100.0**2])))
    assert fc["features"][1]["geometry"]["type"] == "Polygon"
    (ring,) = polygon_rings(fc)
    assert_valid_ring(ring)


@settings(max_examples=100, deadline=None)
@given(
    st.floats(min_value=-80.0, max_value=80.0),
    st.floats(min_value=-180.0, max_value=180.0),
    st.floats(min_value=10.0, max_value=1e5),
    st.floats(min_value=10.0, max_value=1e5),
    rhos,
)
def test_geojson_rings_always_valid(
    lat: float, lon: float, sx: float, sy: float, rho: float
) -> None:
    ellipse = ellipse_from_cov(make_cov(sx, sy, rho))
    fc = geojson_feature_collection(lat, lon, ellipse, n_vertices=32)
    for ring in polygon_rings(fc):
        assert_valid_ring(ring)


def test_ellipse_enclosing_a_pole_raises() -> None:
    ellipse = ellipse_from_cov(np.diag([50_000.0**2, 50_000.0**2]))
    with pytest.raises(ValueError, match="pole"):
        geojson_feature_collection(89.9, 10.0, ellipse)


@pytest.mark.parametrize(("lat", "lon"), [(91.0, 0.0), (math.nan, 0.0), (0.0, math.inf)])
def test_bad_centre_raises(lat: float, lon: float) -> None:
    with pytest.raises(ValueError, match="itude"):
        geojson_feature_collection(lat, lon, ellipse_from_cov(np.eye(2)))


def test_too_few_vertices_raises() -> None:
    with pytest.raises(ValueError, match="n_vertices"):
        ellipse_ring(0.0, 0.0, ellipse_from_cov(np.eye(2)), n_vertices=2)
