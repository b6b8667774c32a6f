"""Confidence ellipses from position covariances and their RFC 7946 GeoJSON rendering.

Conventions used throughout:

* Covariances are in square metres on local tangent axes ``(east, north)``.
* ``theta`` is the *mathematical* angle of the major axis: degrees counter-clockwise from
  east, in ``[0, 180)``.
* ``orientation_deg`` is the *compass bearing* of the major axis: degrees clockwise from
  north, in ``[0, 180)``; ``orientation_deg = (90 - theta) mod 180``.
* The ellipse for probability ``p`` has semi-axes ``k * sqrt(lambda)`` with
  ``k = sqrt(-2 ln(1 - p))`` (the chi-square quantile with 2 degrees of freedom).

Polygon vertices are solved on the WGS84 ellipsoid with the geodesic direct problem, so
large ellipses and high latitudes are not distorted by a spherical small-offset formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyproj
from numpy.typing import ArrayLike, NDArray

from serve_app.constants import DEFAULT_CONFIDENCE

__all__ = [
    "CHI2_2DOF_K",
    "Ellipse",
    "chi2_scale",
    "ellipse_from_cov",
    "ellipse_ring",
    "ellipses_from_covs",
    "geojson_feature_collection",
]

# One geodesic solver for the process: building it parses the ellipsoid definition.
_GEOD = pyproj.Geod(ellps="WGS84")

# RFC 7946 recommends ~7 decimals (about 1 cm); more only bloats the payload.
COORD_DECIMALS = 7
MIN_VERTICES = 4
# Relative tolerance on |cov[0,1] - cov[1,0]|; serialisation round-trips differ in the last ulp.
_SYMMETRY_RTOL = 1e-9


def chi2_scale(p: float) -> float:
    """Scale factor k = sqrt(-2 ln(1 - p)) of the 2-D Gaussian ellipse holding probability p."""
    p = _check_level(p)
    return math.sqrt(-2.0 * math.log1p(-p))


def _check_level(p: float) -> float:
    # bool is an int subclass; a level of True/False is always a caller bug.
    if isinstance(p, bool) or not isinstance(p, int | float | np.floating | np.integer):
        raise ValueError(f"confidence level must be a number, got {type(p).__name__}")
    p = float(p)
    if not (0.0 < p < 1.0):
        raise ValueError(f"confidence level must be in the open interval (0, 1), got {p!r}")
    return p


CHI2_2DOF_K = chi2_scale(DEFAULT_CONFIDENCE)
"""k at the default confidence level (0.95 -> 2.4477)."""


@dataclass(frozen=True)
class Ellipse:
    """Confidence ellipse of a 2-D position estimate in metres on (east, north) axes.

    ``theta`` is the math angle of the major axis (degrees CCW from east, [0, 180));
    ``orientation_deg`` is its compass bearing (degrees clockwise from north, [0, 180)).
    """

    sigma_x: float  # sqrt(cov[0, 0]), metres east
    sigma_y: float  # sqrt(cov[1, 1]), metres north
    rho: float  # correlation coefficient of east and north
    theta: float  # major axis, degrees CCW from east, [0, 180)
    semi_major_m: float
    semi_minor_m: float
    orientation_deg: float  # major axis, compass bearing clockwise from north, [0, 180)
    confidence_level: float
    area_m2: float  # pi * semi_major_m * semi_minor_m

    def as_dict(self) -> dict[str, float]:
        """All fields as plain Python floats (JSON-ready)."""
        return {name: float(value) for name, value in asdict(self).items()}


def _mod180(angle_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Reduce angles to [0, 180) exactly."""
    reduced = np.mod(angle_deg, 180.0)
    # np.mod(-1e-17, 180) rounds to 180.0, which is outside the half-open range.
    reduced = np.where(reduced >= 180.0, 0.0, reduced)
    return reduced + 0.0  # turns -0.0 into 0.0


def _covariance_problems(covs: NDArray[np.float64]) -> list[str | None]:
    """Per-matrix reason why it is not a valid covariance, or None when it is."""
    problems: list[str | None] = []
    for cov in covs:
        if not np.all(np.isfinite(cov)):
            problems.append("covariance has non-finite entries")
            continue
        scale = float(np.max(np.abs(cov)))
        if abs(cov[0, 1] - cov[1, 0]) > _SYMMETRY_RTOL * scale:
            problems.append(
                f"covariance is not symmetric (cov[0,1]={cov[0, 1]!r}, cov[1,0]={cov[1, 0]!r})"
            )
            continue
        eigenvalues = np.linalg.eigvalsh(cov)
        if eigenvalues[0] <= 0.0:
            problems.append(
                f"covariance is not positive definite (eigenvalues {eigenvalues.tolist()})"
            )
            continue
        problems.append(None)
    return problems


def _as_cov_stack(cov_m2: ArrayLike) -> NDArray[np.float64]:
    try:
        covs = np.asarray(cov_m2, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"covariance is not numeric: {exc}") from exc
    if covs.ndim != 3 or covs.shape[1:] != (2, 2):
        raise ValueError(f"covariances must have shape (N, 2, 2), got {covs.shape}")
    return covs


def ellipses_from_covs(
    cov_m2: ArrayLike, confidence_level: float | ArrayLike = DEFAULT_CONFIDENCE
) -> dict[str, NDArray[np.float64]]:
    """Vectorised `ellipse_from_cov` over an (N, 2, 2) stack; returns the Ellipse fields as (N,)."""
    covs = _as_cov_stack(cov_m2)
    n = covs.shape[0]
    problems = _covariance_problems(covs)
    bad = [f"[{i}] {msg}" for i, msg in enumerate(problems) if msg is not None]
    if bad:
        # Index every bad slot so a batching caller can fail just those requests.
        raise ValueError("invalid covariance(s): " + "; ".join(bad))

    levels = np.broadcast_to(np.asarray(confidence_level, dtype=np.float64), (n,))
    k = np.array([chi2_scale(float(p)) for p in levels], dtype=np.float64)

    # eigh returns ascending eigenvalues, so column 1 is the major axis.
    eigenvalues = np.linalg.eigh(covs)[0] if n else np.empty((0, 2))
    semi_minor_m = k * np.sqrt(eigenvalues[:, 0])
    semi_major_m = k * np.sqrt(eigenvalues[:, 1])

    cxx, cyy, cxy = covs[:, 0, 0], covs[:, 1, 1], 0.5 * (covs[:, 0, 1] + covs[:, 1, 0])
    # Closed form of the major-eigenvector angle: unlike eigh's eigenvector it is continuous
    # and gives 0 for a circle instead of an arbitrary basis vector.
    theta = _mod180(np.degrees(0.5 * np.arctan2(2.0 * cxy, cxx - cyy)))
    sigma_x = np.sqrt(cxx)
    sigma_y = np.sqrt(cyy)
    return {
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "rho": cxy / (sigma_x * sigma_y),
        "theta": theta,
        "semi_major_m": semi_major_m,
        "semi_minor_m": semi_minor_m,
        "orientation_deg": _mod180(90.0 - theta),
        "confidence_level": levels.astype(np.float64, copy=True),
        "area_m2": math.pi * semi_major_m * semi_minor_m,
    }


def ellipse_from_cov(cov_m2: ArrayLike, confidence_level: float = DEFAULT_CONFIDENCE) -> Ellipse:
    """Confidence ellipse at `confidence_level` of a 2x2 (east, north) covariance in m^2."""
    _check_level(confidence_level)
    cov = np.asarray(cov_m2, dtype=np.float64)
    if cov.shape != (2, 2):
        raise ValueError(f"covariance must have shape (2, 2), got {cov.shape}")
    problem = _covariance_problems(cov[np.newaxis])[0]
    if problem is not None:
        raise ValueError(problem)
    fields = ellipses_from_covs(cov[np.newaxis], confidence_level)
    return Ellipse(**{name: float(values[0]) for name, values in fields.items()})


def _check_centre(lat: float, lon: float) -> tuple[float, float]:
    lat, lon = float(lat), float(lon)
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"latitude must be within [-90, 90], got {lat!r}")
    if not math.isfinite(lon):
        raise ValueError(f"longitude must be finite, got {lon!r}")
    return lat, _normalize_lon(lon)


def _normalize_lon(lon_deg: float) -> float:
    """Longitude in [-180, 180], keeping +180 as is rather than folding it to -180."""
    if -180.0 <= lon_deg <= 180.0:
        return lon_deg
    return (lon_deg + 180.0) % 360.0 - 180.0


def _signed_area(lons: NDArray[np.float64], lats: NDArray[np.float64]) -> float:
    """Shoelace area in degree^2 of an open ring; positive when counter-clockwise."""
    return 0.5 * float(np.sum(lons * np.roll(lats, -1)) - np.sum(np.roll(lons, -1) * lats))


def _unwrapped_ring(
    lat: float, lon: float, ellipse: Ellipse, n_vertices: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Open CCW ring (lons, lats) with longitudes continuous around the centre (may pass ±180)."""
    if isinstance(n_vertices, bool) or not isinstance(n_vertices, int | np.integer):
        raise ValueError(f"n_vertices must be an integer, got {type(n_vertices).__name__}")
    if n_vertices < MIN_VERTICES:
        raise ValueError(f"n_vertices must be at least {MIN_VERTICES}, got {n_vertices}")
    a_m, b_m = float(ellipse.semi_major_m), float(ellipse.semi_minor_m)
    if not (math.isfinite(a_m) and math.isfinite(b_m) and a_m > 0.0 and b_m > 0.0):
        raise ValueError(f"ellipse semi-axes must be finite and positive, got {a_m}, {b_m}")
    lat, lon = _check_centre(lat, lon)

    t = np.linspace(0.0, 2.0 * math.pi, int(n_vertices), endpoint=False)
    theta_rad = math.radians(ellipse.theta)
    cos_th, sin_th = math.cos(theta_rad), math.sin(theta_rad)
    x_m, y_m = a_m * np.cos(t), b_m * np.sin(t)
    east_m = cos_th * x_m - sin_th * y_m
    north_m = sin_th * x_m + cos_th * y_m
    dist_m = np.hypot(east_m, north_m)
    azimuth_deg = np.degrees(np.arctan2(east_m, north_m))

    lons, lats, _ = _GEOD.fwd(
        np.full(n_vertices, lon), np.full(n_vertices, lat), azimuth_deg, dist_m
    )
    lons = np.asarray(lons, dtype=np.float64)
    lats = np.asarray(lats, dtype=np.float64)

    # Anchor the first vertex within 180 degrees of the centre, then follow the ring so the
    # longitudes stay continuous; a jump at ±180 would otherwise corrupt the area sign.
    first = lon + ((lons[0] - lon + 180.0) % 360.0 - 180.0)
    lons = np.unwrap(np.concatenate([[first], lons[1:]]), period=360.0)
    closing_jump = (lons[0] - lons[-1] + 180.0) % 360.0 - 180.0
    if abs(lons[-1] + closing_jump - lons[0]) > 1e-6:
        # Longitude winds through 360 degrees: the ellipse contains a pole and has no
        # meaningful lon/lat polygon.
        raise ValueError("uncertainty ellipse encloses a pole; cannot render it as a polygon")

    if _signed_area(lons, lats) < 0.0:
        lons, lats = lons[::-1].copy(), lats[::-1].copy()
    return lons, lats


def _closed_rounded(lons: Iterable[float], lats: Iterable[float]) -> list[list[float]]:
    """Closed ring of rounded [lon, lat] positions; closure is applied after rounding."""
    ring = [
        [round(float(x), COORD_DECIMALS) + 0.0, round(float(y), COORD_DECIMALS) + 0.0]
        for x, y in zip(lons, lats, strict=True)
    ]
    ring.append(list(ring[0]))
    return ring


def ellipse_ring(
    lat: float, lon: float, ellipse: Ellipse, n_vertices: int = 64
) -> list[list[float]]:
    """Closed counter-clockwise ring of [lon, lat] vertices of `ellipse` centred at (lat, lon)."""
    # A ring crossing the antimeridian jumps between ±180 here; the GeoJSON builder splits it.
    lons, lats = _unwrapped_ring(lat, lon, ellipse, n_vertices)
    return _closed_rounded([_normalize_lon(float(x)) for x in lons], lats)


def _clip_at_meridian(
    lons: NDArray[np.float64], lats: NDArray[np.float64], meridian_deg: float, keep_west: bool
) -> tuple[list[float], list[float]]:
    """Sutherland-Hodgman clip of an open ring against one meridian; keeps orientation."""

    def inside(x: float) -> bool:
        return x <= meridian_deg if keep_west else x >= meridian_deg

    out_lons: list[float] = []
    out_lats: list[float] = []
    n = len(lons)
    for i in range(n):
        x0, y0 = float(lons[i]), float(lats[i])
        x1, y1 = float(lons[(i + 1) % n]), float(lats[(i + 1) % n])
        if inside(x0):
            out_lons.append(x0)
            out_lats.append(y0)
        if inside(x0) != inside(x1):
            # Straight-line interpolation in lon/lat, matching how GeoJSON edges are drawn.
            frac = (meridian_deg - x0) / (x1 - x0)
            y = y0 + frac * (y1 - y0)
            # A vertex lying exactly on the meridian would otherwise be emitted twice.
            if not (out_lons and out_lons[-1] == meridian_deg and out_lats[-1] == y):
                out_lons.append(meridian_deg)
                out_lats.append(y)
    return out_lons, out_lats


def _ellipse_geometry(lat: float, lon: float, ellipse: Ellipse, n_vertices: int) -> dict[str, Any]:
    lons, lats = _unwrapped_ring(lat, lon, ellipse, n_vertices)
    if lons.max() <= 180.0 and lons.min() >= -180.0:
        return {"type": "Polygon", "coordinates": [_closed_rounded(lons, lats)]}

    # The ring spans less than 360 degrees, so it crosses exactly one of ±180.
    meridian = 180.0 if lons.max() > 180.0 else -180.0
    polygons = []
    for keep_west in (True, False):
        part_lons, part_lats = _clip_at_meridian(lons, lats, meridian, keep_west)
        if len(part_lons) < 3:
            continue
        part = np.asarray(part_lons)
        # Bring the part beyond the meridian back into [-180, 180]; the cut edge lands on ∓180.
        if meridian == 180.0 and not keep_west:
            part = part - 360.0
        elif meridian == -180.0 and keep_west:
            part = part + 360.0
        polygons.append([_closed_rounded(part, part_lats)])
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def geojson_feature_collection(
    lat: float,
    lon: float,
    ellipse: Ellipse,
    properties: dict[str, Any] | None = None,
    n_vertices: int = 64,
) -> dict[str, Any]:
    """RFC 7946 FeatureCollection: the position Point and its uncertainty ellipse polygon."""
    extra = dict(properties or {})
    centre_lat, centre_lon = _check_centre(lat, lon)
    point = {
        "type": "Feature",
        "geometry": {
            "type": "Point",
            "coordinates": [round(centre_lon, COORD_DECIMALS), round(centre_lat, COORD_DECIMALS)],
        },
        "properties": {"kind": "position", **extra},
    }
    area = {
        "type": "Feature",
        "geometry": _ellipse_geometry(lat, lon, ellipse, n_vertices),
        "properties": {
            "kind": "uncertainty_ellipse",
            "confidence_level": float(ellipse.confidence_level),
            "semi_major_m": float(ellipse.semi_major_m),
            "semi_minor_m": float(ellipse.semi_minor_m),
            "orientation_deg": float(ellipse.orientation_deg),
            **extra,
        },
    }
    return {"type": "FeatureCollection", "features": [point, area]}
