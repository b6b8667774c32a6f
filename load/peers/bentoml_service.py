"""P: BentoML with the project's core as a batchable service (load/peers/run.py starts it).

`POST /predict` and `POST /predict/batch` are batchable APIs taking N's JSON body as it is:
their input spec hands BentoML's adaptive batching (its CorkDispatcher) the raw body as a
one-item list, so the batched method receives a list of bodies and answers them in one
pass of `PeerCore`; the output spec turns each body's (status, JSON answer) into the HTTP
answer. BentoML's default JSON input would parse the body into a pydantic model and wrap it
in a list field (another body than N's), and refuse bad input with its own errors.

Settings come from the environment (load/peers/run.py --set KEY=VALUE sets them):
RFLOC_BENTO_WORKERS (processes, default 1), RFLOC_BENTO_THREADS (threads running the
batched method, default 1), RFLOC_BENTO_MAX_BATCH (bodies per batch, default 32),
RFLOC_BENTO_MAX_LATENCY_MS (default 10000, see below), RFLOC_BENTO_ASYNC (1, the default:
the batched method runs on the event loop; 0: in BentoML's thread pool),
RFLOC_BENTO_BATCH_BODIES ("batched", the default, or "direct": /predict/batch is not a
batchable API, each batch body runs on its own).

BentoML's dispatcher cancels a queued request as soon as its estimated latency (queue wait
plus the fitted cost of the batch) passes `max_latency_ms`, and the request gets a 503
"process is overloaded"; a latency bound the closed-loop load can meet keeps that from
turning saturation into errors.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
from _bentoml_sdk.io_models import IORootModel
from peer_core import Answer, PeerCore
from starlette.requests import Request
from starlette.responses import Response

WORKERS = int(os.environ.get("RFLOC_BENTO_WORKERS", "1"))
THREADS = int(os.environ.get("RFLOC_BENTO_THREADS", "1"))
MAX_BATCH = int(os.environ.get("RFLOC_BENTO_MAX_BATCH", "32"))
MAX_LATENCY_MS = int(os.environ.get("RFLOC_BENTO_MAX_LATENCY_MS", "10000"))
ON_LOOP = os.environ.get("RFLOC_BENTO_ASYNC", "1") == "1"
BATCH_BODIES_BATCHED = os.environ.get("RFLOC_BENTO_BATCH_BODIES", "batched") == "batched"


class RawBody(IORootModel[list[bytes]]):
    """Input: the request body, unparsed, as a one-item batch."""

    __root_input__ = True

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> list[bytes]:  # noqa: ARG003
        return [await request.body()]


class JsonAnswer(IORootModel[list[Any]]):
    """Output: the one (status, JSON answer) of the request, as it is."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:  # noqa: ARG003
        [(status, body)] = obj
        return Response(body, status_code=status, media_type="application/json")


def _api(route: str, batchable: bool = True) -> Any:
    """An API at `route` taking and answering raw JSON bodies (a list of one, unbatched)."""
    return bentoml.api(route=route, batchable=batchable, max_batch_size=MAX_BATCH,
                       max_latency_ms=MAX_LATENCY_MS, input_spec=RawBody, output_spec=JsonAnswer)


@bentoml.service(
    name="rfloc_peer",
    workers=WORKERS,
    threads=THREADS,
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
)
class Localizer:
    """The localization core behind BentoML's adaptive batching."""

    def __init__(self) -> None:
        self.core = PeerCore()

    if ON_LOOP:
        @_api("/predict")
        async def predict(self, bodies: list[bytes]) -> list[Answer]:
            """Localize one capture per body: N's body and answer."""
            return self.core.answer(bodies, [False] * len(bodies))

        @_api("/predict/batch", BATCH_BODIES_BATCHED)
        async def predict_batch(self, bodies: list[bytes]) -> list[Answer]:
            """Localize several captures per body: N's batch body and answer."""
            return self.core.answer(bodies, [True] * len(bodies))
    else:
        @_api("/predict")
        def predict(self, bodies: list[bytes]) -> list[Answer]:
            """Localize one capture per body: N's body and answer."""
            return self.core.answer(bodies, [False] * len(bodies))

        @_api("/predict/batch", BATCH_BODIES_BATCHED)
        def predict_batch(self, bodies: list[bytes]) -> list[Answer]:
            """Localize several captures per body: N's batch body and answer."""
            return self.core.answer(bodies, [True] * len(bodies))
