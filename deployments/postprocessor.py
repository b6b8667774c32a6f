"""Postprocessor: ENU mean + covariance → lat/lon, ellipse, GeoJSON."""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.pipeline import Group, postprocess
from serve_app.receivers import load_network


@serve.deployment
class Postprocessor:
    """Uncertainty ellipses and GeoJSON for a group of model outputs."""

    def __init__(self, receivers_path: str | None = None) -> None:
        self._network = load_network(receivers_path)

    async def __call__(self, group: Group) -> Group:
        return await asyncio.to_thread(postprocess, group, self._network)
