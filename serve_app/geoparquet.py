"""GeoParquet 1.1 output of `rfloc batch`: one row per capture (schema in docs/batch.md).

The predicted position is the primary geometry (`geometry`, a WKB Point), the uncertainty
ellipse a second geometry column (`ellipse`, a WKB Polygon, or a MultiPolygon where it
crosses the antimeridian), both in OGC:CRS84 (longitude, latitude on WGS84). The geometries
are encoded by shapely; the `geo` key of the file metadata follows the GeoParquet 1.1 spec,
so GeoParquet readers (geopandas, DuckDB, GDAL and so QGIS) open the files as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

GEOPARQUET_VERSION = "1.1.0"
GEO_METADATA = {
    "version": GEOPARQUET_VERSION,
    "primary_column": "geometry",
    "columns": {
        # No "crs": GeoParquet's default, OGC:CRS84 (lon/lat on WGS84).
        "geometry": {"encoding": "WKB", "geometry_types": ["Point"]},
        "ellipse": {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"]},
    },
}
UNCERTAINTY_COLUMNS = ("sigma_x", "sigma_y", "rho", "theta", "semi_major_m", "semi_minor_m",
                       "orientation_deg", "confidence_level", "area_m2")
FLOAT_COLUMNS = ("latitude", "longitude", "east_m", "north_m", "cov_ee_m2", "cov_en_m2",
                 "cov_nn_m2", *UNCERTAINTY_COLUMNS)
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("capture_id", pa.string()),
        pa.field("geometry", pa.binary()),
        pa.field("ellipse", pa.binary()),
        *(pa.field(name, pa.float64()) for name in FLOAT_COLUMNS),
        pa.field("receivers_used", pa.list_(pa.string())),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_field", pa.string()),
        pa.field("timestamp", pa.timestamp("us", tz="UTC")),
        pa.field("truth_latitude", pa.float64()),
        pa.field("truth_longitude", pa.float64()),
    ],
    metadata={b"geo": json.dumps(GEO_METADATA).encode()},
)


def ellipse_wkb(geometries: Sequence[dict[str, Any] | None]) -> list[bytes | None]:
    """WKB of GeoJSON Polygon/MultiPolygon geometries (None stays None)."""
    out: list[bytes | None] = [None] * len(geometries)
    rings = [(i, g["coordinates"][0]) for i, g in enumerate(geometries)
             if g is not None and g["type"] == "Polygon"]
    if rings and len({len(r) for _, r in rings}) == 1:  # the usual case: one vectorized call
        polys = shapely.polygons(np.asarray([r for _, r in rings], np.float64))
        for (i, _), wkb in zip(rings, shapely.to_wkb(polys), strict=True):
            out[i] = wkb
    else:
        rings = []
    done = {i for i, _ in rings}
    for i, g in enumerate(geometries):
        if g is not None and i not in done:
            out[i] = shapely.to_wkb(shapely.geometry.shape(g))
    return out


def point_wkb(lon: np.ndarray, lat: np.ndarray) -> list[bytes | None]:
    """WKB Points at (lon, lat); None where either is NaN."""
    ok = np.isfinite(lon) & np.isfinite(lat)
    wkb = shapely.to_wkb(shapely.points(np.where(ok, lon, 0.0), np.where(ok, lat, 0.0)))
    return [w if good else None for w, good in zip(wkb.tolist(), ok.tolist(), strict=True)]
