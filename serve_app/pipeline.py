"""The localization pipeline as plain functions over groups of captures (no Ray).

A *group* is the captures of one HTTP request (1 for /predict, up to the batch limit for
/predict/batch). Every stage works vectorized on a whole group, or on several groups at
once when the Serve deployments batch them. An item that fails keeps its own error and
travels on untouched, so one bad capture never fails the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from serve_app.constants import MIN_RECEIVERS
from serve_app.errors import error_dict
from serve_app.features import extract_features
from serve_app.model import OnnxLocalizer
from serve_app.receivers import ReceiverNetwork
from serve_app.schemas import ModelRef
from serve_app.uncertainty import ellipse_from_cov, geojson_feature_collection


@dataclass
class CaptureGroup:
    """Decoded captures in network slot layout (one request's, or several stacked)."""

    iq: np.ndarray  # [k, R, S] complex64, zero rows for absent receivers
    present: np.ndarray  # [k, R] bool
    confidence_level: np.ndarray  # [k]

    def __len__(self) -> int:
        return int(self.present.shape[0])


@dataclass
class Group:
    """A group's state after preprocessing; later stages fill in their fields."""

    features: np.ndarray  # [k, R, 3] float32
    detected: np.ndarray  # [k, R] bool
    confidence_level: np.ndarray  # [k]
    errors: list[dict | None]  # per item: {"field", "message", "status"} or None
    timing_ms: dict[str, float] = field(default_factory=dict)
    mean_enu_m: np.ndarray | None = None  # [k, 2]
    cov_enu_m2: np.ndarray | None = None  # [k, 2, 2]
    model: ModelRef | None = None  # the model that ran the group
    results: list[dict | None] | None = None

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> np.ndarray:
        """Items still without an error."""
        return np.array([e is None for e in self.errors], bool)


def n_captures(groups: list[CaptureGroup] | list[Group]) -> int:
    """Captures in a list of groups: the size Serve's batching counts (`batch_size_fn`)."""
    return sum(len(g) for g in groups)


def stack_captures(
    captures: list[tuple[np.ndarray, np.ndarray]], n_receivers: int, confidence: list[float]
) -> CaptureGroup:
    """Place (iq [n_present, S], slots [n_present]) captures into one [k, R, S] array."""
    n_samples = captures[0][0].shape[1]
    iq = np.zeros((len(captures), n_receivers, n_samples), np.complex64)
    present = np.zeros((len(captures), n_receivers), bool)
    for i, (x, slots) in enumerate(captures):
        iq[i, slots] = x
        present[i, slots] = True
    return CaptureGroup(iq, present, np.asarray(confidence, np.float64))


def split_group(group: Group, sizes: list[int]) -> list[Group]:
    """Cut the answer for several requests' stacked captures: one Group per request, in order."""
    if len(sizes) == 1:
        return [group]
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        start += n
        out.append(Group(
            group.features[sl], group.detected[sl], group.confidence_level[sl],
            group.errors[sl], dict(group.timing_ms),
            None if group.mean_enu_m is None else group.mean_enu_m[sl],
            None if group.cov_enu_m2 is None else group.cov_enu_m2[sl],
            group.model, None if group.results is None else group.results[sl],
        ))
    return out


def preprocess(groups: list[CaptureGroup], network: ReceiverNetwork) -> list[Group]:
    """Features for several groups in one vectorized pass."""
    t0 = time.perf_counter()
    iq = np.concatenate([g.iq for g in groups]) if len(groups) > 1 else groups[0].iq
    present = np.concatenate([g.present for g in groups])
    feats = extract_features(iq, network.calibration_db, present)
    x = feats.model_input()
    n_det = feats.detected.sum(axis=1)
    ms = (time.perf_counter() - t0) * 1000.0
    out, start = [], 0
    for g in groups:
        sl = slice(start, start + len(g))
        start += len(g)
        errors: list[dict | None] = [
            None if n >= MIN_RECEIVERS else error_dict(
                "receivers",
                f"only {int(n)} receiver(s) detected a signal (in-channel SNR >= 3 dB); at "
                f"least {MIN_RECEIVERS} are needed to localize", 422)
            for n in n_det[sl]
        ]
        out.append(Group(x[sl], feats.detected[sl], g.confidence_level, errors,
                         {"preprocess": ms}))
    return out


def infer(groups: list[Group], model: OnnxLocalizer, model_ref: ModelRef) -> list[Group]:
    """Run the model once over the good items of several groups."""
    t0 = time.perf_counter()
    oks = [g.ok for g in groups]
    x = np.concatenate([g.features[ok] for g, ok in zip(groups, oks, strict=True)])
    if len(x):
        mean, cov = model.predict(x)
    else:
        mean, cov = np.zeros((0, 2)), np.zeros((0, 2, 2))
    ms = (time.perf_counter() - t0) * 1000.0
    start = 0
    for g, ok in zip(groups, oks, strict=True):
        n = int(ok.sum())
        g.mean_enu_m = np.full((len(g), 2), np.nan)
        g.cov_enu_m2 = np.full((len(g), 2, 2), np.nan)
        g.mean_enu_m[ok] = mean[start : start + n]
        g.cov_enu_m2[ok] = cov[start : start + n]
        start += n
        g.model = model_ref
        g.timing_ms["inference"] = ms
    return groups


def postprocess(group: Group, network: ReceiverNetwork, n_vertices: int = 64) -> Group:
    """Position, ellipse and GeoJSON for every good item of a group."""
    t0 = time.perf_counter()
    assert group.mean_enu_m is not None and group.cov_enu_m2 is not None
    lat, lon = network.to_geodetic(group.mean_enu_m[:, 0], group.mean_enu_m[:, 1])
    results: list[dict | None] = []
    for i, err in enumerate(group.errors):
        if err is not None:
            results.append(None)
            continue
        try:
            ell = ellipse_from_cov(group.cov_enu_m2[i], float(group.confidence_level[i]))
        except ValueError as exc:
            group.errors[i] = error_dict(None, f"model output rejected: {exc}", 503)
            results.append(None)
            continue
        la, lo = float(lat[i]), float(lon[i])
        results.append({
            "position": {"latitude": la, "longitude": lo},
            "uncertainty": ell.as_dict(),
            "geojson": geojson_feature_collection(la, lo, ell, n_vertices=n_vertices),
            "receivers_used": [network.ids[j] for j in np.flatnonzero(group.detected[i])],
        })
    group.results = results
    group.timing_ms["postprocess"] = (time.perf_counter() - t0) * 1000.0
    return group
