"""The chain Preprocessor -> LocalizationModel -> Postprocessor through Serve handles."""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from serve_app.errors import Unavailable
from serve_app.lifecycle import AliasWatcher
from serve_app.pipeline import CaptureGroup, Group
from serve_app.settings import AppArgs

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError)


def _replica_failure(exc: BaseException | None) -> bool:
    """A replica died under this call, directly or upstream of a chained handle call."""
    # Serve's router reports an upstream replica's death (a DeploymentResponse passed to the
    # next deployment) as a RayServeException caused by the ActorDiedError.
    while exc is not None:
        if isinstance(exc, RETRYABLE):
            return True
        exc = exc.__cause__
    return False


class Chain:
    """The service's chain: one call runs a group through the three deployments.

    Handles are passed down as `DeploymentResponse`s, not awaited hop by hop. The model
    replicas learn from each call which version the alias names (`AliasWatcher`), and a
    pinned version goes through model multiplexing.
    """

    def __init__(self, preprocessor: DeploymentHandle, model: DeploymentHandle,
                 postprocessor: DeploymentHandle, watcher: AliasWatcher, args: AppArgs) -> None:
        # The groups are plain dataclasses of numpy arrays, dicts and pydantic models, all
        # importable: the standard pickle (C) serializes them for the gRPC hops without
        # cloudpickle's per-object Python hook (docs/performance.md).
        pre, model, post = (h.options(request_serialization="pickle",
                                      response_serialization="pickle")
                            for h in (preprocessor, model, postprocessor))
        self._pre, self._model, self._post = pre, model, post
        self._watcher, self._args = watcher, args

    async def __call__(self, group: CaptureGroup, pinned: str | None) -> Group:
        """Run the chain once, retrying failed replicas and tries that hang.

        A try gets `chain_timeout_s`: one sent to a hung replica, or to a node that is gone
        but not yet declared dead, is cancelled and sent again (Serve routes it to a live
        replica if there is one), so it does not hold its requests, nor those coalesced
        behind it, for as long as Ray takes to notice. Tries stop after `chain_budget_s`
        (while Serve waits for a replacement replica, say) or `retries` replica failures,
        with a 503.
        """
        model = self._model.options(multiplexed_model_id=pinned) if pinned else self._model
        ref = self._watcher.ref  # one read: the alias and its version belong together
        alias, version = (ref.alias, ref.version) if ref else (self._watcher.alias, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._args.chain_budget_s
        failures = 0
        while True:
            calls = []
            until = min(loop.time() + self._args.chain_timeout_s, deadline)
            deadline_of_try = asyncio.timeout_at(until)
            try:
                async with deadline_of_try:
                    calls.append(self._pre.remote(group))
                    calls.append(model.remote(calls[0], alias, version))
                    calls.append(self._post.remote(calls[1]))
                    return await calls[2]
            except BackPressureError as exc:
                raise Unavailable(f"overloaded: {exc}") from exc
            except TimeoutError as exc:
                if not deadline_of_try.expired():  # raised down the chain: not ours to retry
                    raise
                for call in calls:
                    call.cancel()
                if until >= deadline:
                    raise Unavailable(f"no answer down the chain within "
                                      f"{self._args.chain_budget_s:g} s") from exc
                logger.warning("retrying a try with no answer within %g s",
                               self._args.chain_timeout_s)
            except (*RETRYABLE, RayServeException) as exc:
                if not _replica_failure(exc):
                    raise
                failures += 1
                if failures > self._args.retries:
                    raise Unavailable(f"replica failure after {failures} attempts") from exc
                logger.warning("retrying after replica failure: %s", exc)
                await asyncio.sleep(0.05 * failures)
