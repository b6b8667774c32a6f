"""Preprocessor: IQ → per-receiver features, batched across requests."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.metrics import PreprocessorMetrics
from serve_app.pipeline import CaptureGroup, Group, n_captures, preprocess
from serve_app.receivers import load_network
from serve_app.settings import BatchConfig


@serve.deployment
class Preprocessor:
    """Vectorized feature extraction over every capture of a batch of requests."""

    def __init__(self, receivers_path: str | None = None) -> None:
        self._network = load_network(receivers_path)
        self._metrics = PreprocessorMetrics()

    def reconfigure(self, config: dict) -> None:
        cfg = BatchConfig.model_validate(config or {})
        self.featurize.set_max_batch_size(cfg.max_batch_size)
        self.featurize.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=n_captures)
    async def featurize(self, groups: list[CaptureGroup]) -> list[Group]:
        self._metrics.batch_started(groups)
        out = await asyncio.to_thread(preprocess, groups, self._network)
        self._metrics.preprocessed(out)
        return out

    async def __call__(self, group: CaptureGroup) -> Group:
        with self._metrics.queued(group):
            return await self.featurize(group)
