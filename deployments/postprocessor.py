"""Postprocessor: ENU mean + covariance → lat/lon, ellipse, GeoJSON."""

from __future__ import annotations

from ray import serve

from deployments.metrics import PostprocessorMetrics
from serve_app.pipeline import Group, postprocess
from serve_app.receivers import load_network


@serve.deployment
class Postprocessor:
    """Uncertainty ellipses and GeoJSON for a group of model outputs."""

    def __init__(self, receivers_path: str | None = None) -> None:
        self._network = load_network(receivers_path)
        self._metrics = PostprocessorMetrics()

    async def __call__(self, group: Group) -> Group:
        # On the replica's event loop: a group's ellipses and GeoJSON are pure Python
        # (~0.2 ms a capture) that a worker thread would run under the same GIL, after a
        # hand-off that costs more CPU than it frees (docs/performance.md).
        out = postprocess(group, self._network)
        self._metrics.postprocessed(out)
        return out
