"""Receiver network: loading `receivers.yaml` and the network's local ENU frame."""

from __future__ import annotations

from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pyproj import Transformer

from serve_app.constants import CENTER_FREQ_HZ
from serve_app.errors import ConfigError

DEFAULT_RECEIVERS_PATH = Path(__file__).resolve().parent.parent / "configs" / "receivers.yaml"
_GEODETIC_ITERATIONS = 4


class Receiver(BaseModel):
    """One receiver site."""

    model_config = ConfigDict(extra="forbid")  # a misspelt calibration_db must not pass

    id: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_\-]+$")
    name: str
    latitude: float = Field(ge=-90.0, le=90.0)
    longitude: float = Field(ge=-180.0, le=180.0)
    altitude_m: float = Field(default=0.0, ge=-500.0, le=9000.0)
    calibration_db: float = 0.0


class NetworkSpec(BaseModel):
    """The contents of `receivers.yaml`."""

    model_config = ConfigDict(extra="forbid")

    center_freq_hz: float = CENTER_FREQ_HZ
    receivers: list[Receiver] = Field(min_length=3)

    @field_validator("receivers")
    @classmethod
    def _unique_ids(cls, receivers: list[Receiver]) -> list[Receiver]:
        seen: set[str] = set()
        for i, r in enumerate(receivers):
            if r.id in seen:
                raise ValueError(f"receivers[{i}]: duplicate receiver id {r.id!r}")
            seen.add(r.id)
        return receivers


class ReceiverNetwork:
    """A validated receiver network with an ENU frame centred on the receivers' centroid."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.receivers = list(spec.receivers)
        self.ids: list[str] = [r.id for r in self.receivers]
        self._index = {rid: i for i, rid in enumerate(self.ids)}
        self.origin_lat = float(np.mean([r.latitude for r in self.receivers]))
        self.origin_lon = float(np.mean([r.longitude for r in self.receivers]))
        self.origin_alt_m = 0.0
        pipeline = (
            "+proj=pipeline +step +proj=cart +ellps=WGS84 "
            f"+step +proj=topocentric +ellps=WGS84 +lat_0={self.origin_lat} "
            f"+lon_0={self.origin_lon} +h_0={self.origin_alt_m}"
        )
        self._to_enu = Transformer.from_pipeline(pipeline)
        self.calibration_db = np.array([r.calibration_db for r in self.receivers], np.float64)
        self.enu_m = np.stack(self.to_enu(
            np.array([r.latitude for r in self.receivers]),
            np.array([r.longitude for r in self.receivers]),
        ), axis=-1)

    def __len__(self) -> int:
        return len(self.receivers)

    def index(self, receiver_id: str) -> int:
        """Slot of a receiver id; KeyError if unknown."""
        return self._index[receiver_id]

    def to_enu(self, lat: np.ndarray | float, lon: np.ndarray | float
               ) -> tuple[np.ndarray, np.ndarray]:
        """Geodetic (degrees, on the ellipsoid) → local east, north in metres."""
        lat_a, lon_a = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        e, n, _ = self._to_enu.transform(lon_a, lat_a, np.zeros_like(lat_a))
        return np.asarray(e), np.asarray(n)

    def to_geodetic(self, east_m: np.ndarray | float, north_m: np.ndarray | float
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Local east, north in metres → latitude, longitude in degrees (inverse of `to_enu`)."""
        e, n = np.asarray(east_m, np.float64), np.asarray(north_m, np.float64)
        # `to_enu` drops the up component of points on the ellipsoid (about −d²/2R: −0.8 km at
        # 100 km), so inverting with up = 0 lands ~10 m off at the network's edge. Find the
        # ellipsoid point with these east/north: iterate on its up component (the error
        # shrinks by ~d/R per step).
        up = np.zeros_like(e)
        for _ in range(_GEODETIC_ITERATIONS):
            lon, lat, _ = self._to_enu.transform(e, n, up, direction="INVERSE")
            _, _, up = self._to_enu.transform(lon, lat, np.zeros_like(e))
        lon, lat, _ = self._to_enu.transform(e, n, up, direction="INVERSE")
        return np.asarray(lat), np.asarray(lon)

    @cached_property
    def bbox_enu_m(self) -> tuple[float, float, float, float]:
        """(min_e, min_n, max_e, max_n) of the receivers in ENU metres."""
        lo, hi = self.enu_m.min(axis=0), self.enu_m.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def describe(self) -> list[dict]:
        """JSON-ready list of the receivers."""
        return [r.model_dump() for r in self.receivers]


def load_network(path: str | Path | None = None) -> ReceiverNetwork:
    """Load and validate a receivers file (default: the shipped `configs/receivers.yaml`)."""
    p = Path(path) if path is not None else DEFAULT_RECEIVERS_PATH
    if not p.exists():
        p_pkg = resources.files("serve_app").joinpath("receivers.yaml")
        if path is None and p_pkg.is_file():
            p = Path(str(p_pkg))
        else:
            raise ConfigError(f"receivers file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, binary
        raise ConfigError(f"{p}: cannot read receivers file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    try:
        spec = NetworkSpec.model_validate(raw)
    except ValidationError as exc:
        errs = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{p}: invalid receivers file: {errs}") from exc
    return ReceiverNetwork(spec)
