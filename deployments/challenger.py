"""Challenger: sampled requests also run on another alias's model, off the response path.

The client only ever gets the champion's answer; the challenger's distance from it and its
latency become metrics (rfloc_challenger_*), so a candidate can be judged on live traffic
before it is promoted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pyproj import Geod

from deployments.metrics import IngressMetrics
from serve_app.errors import RflocError

logger = logging.getLogger("ray.serve")
_GEOD = Geod(ellps="WGS84")

RunChain = Callable[[str], Awaitable[Any]]  # challenger version -> the chain's Group


class Challenger:
    """Samples requests, shadows them on the challenger version, records the comparison."""

    def __init__(self, metrics: IngressMetrics) -> None:
        self._metrics = metrics
        self.alias: str | None = None
        self.version: str | None = None
        self._fraction = 0.0
        self._max_inflight = 4
        self._tasks: set[asyncio.Task] = set()
        self.stats = {"ok": 0, "error": 0, "skipped": 0}
        self.last_distances_km: list[float] = []

    def info(self) -> dict:
        """For /model/info."""
        return {"alias": self.alias, "version": self.version, "fraction": self._fraction,
                "runs": dict(self.stats), "last_distances_km": self.last_distances_km}

    def configure(self, alias: str | None, fraction: float, max_inflight: int) -> None:
        """Apply the Ingress user_config."""
        if alias != self.alias:
            self.version = None
        self.alias, self._fraction, self._max_inflight = alias, fraction, max_inflight

    def resolve(self, registry: Any) -> None:
        """Follow the challenger alias (called from the Ingress's registry poll)."""
        if self.alias is None:
            self.version = None
            return
        try:
            self.version = registry.get_alias(self.alias)
        except RflocError as exc:
            logger.warning("challenger alias %r not resolved: %s", self.alias, exc)

    def maybe_shadow(self, run_chain: RunChain, champion: list[dict | None]) -> None:
        """With the configured probability, start a shadow run; never blocks or raises."""
        version = self.version
        if version is None or self._fraction <= 0 or random.random() >= self._fraction:
            return
        if len(self._tasks) >= self._max_inflight:
            self._record("skipped")
            return
        task = asyncio.get_running_loop().create_task(self._shadow(run_chain, version, champion))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, run_chain: RunChain, version: str,
                      champion: list[dict | None]) -> None:
        t0 = time.perf_counter()
        try:
            group = await run_chain(version)
        except Exception as exc:  # a shadow failure must never reach a client
            logger.warning("challenger version %s failed: %s", version, exc)
            self._record("error")
            return
        ms = (time.perf_counter() - t0) * 1000.0
        distances = []
        for ours, theirs in zip(champion, group.results or (), strict=False):
            if ours is None or theirs is None:
                continue
            a, b = ours["position"], theirs["position"]
            _, _, d_m = _GEOD.inv(a["longitude"], a["latitude"], b["longitude"], b["latitude"])
            distances.append(d_m / 1000.0)
        self.last_distances_km = distances
        self._record("ok", version, distances, ms)

    def _record(self, outcome: str, *args: Any) -> None:
        self.stats[outcome] += 1
        self._metrics.challenger(outcome, *args)
