"""P: Seldon MLServer with the project's core as a custom runtime (load/peers/run.py starts it).

`POST /predict` and `POST /predict/batch` are custom handlers taking N's JSON body as it
is. Each request becomes a V2 inference request with one BYTES element (the body) and one
BOOL (a batch body or not), sent through MLServer's adaptive batching; `predict` answers
every body of the merged request in one pass of `PeerCore` and gives back, per body, its
HTTP status (INT32) and JSON answer (BYTES), which the handler returns as they are.

Where the handler runs depends on `parallel_workers`: with 0 it runs in the server's
process and `self.predict` is the batched one MLServer set up after `load()`. With
workers, MLServer sends a custom handler's call to a worker as it is (unbatched): the
handler then sets up MLServer's own adaptive batching in that worker on its first call, so
requests are batched there. No `from __future__ import annotations`: FastAPI reads the
handlers' annotations through MLServer's wrapper, whose module does not know these names.
"""

from fastapi import Depends, Request
from fastapi.responses import Response
from mlserver import MLModel
from mlserver.batching import load_batching
from mlserver.context import model_context
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput
from peer_core import PeerCore

BODY, BATCH, STATUS, ANSWER = "body", "batch", "status", "answer"


async def raw_body(request: Request) -> bytes:
    """The request body, unparsed (a picklable argument for a worker)."""
    return await request.body()


def to_request(body: bytes, batch: bool) -> InferenceRequest:
    """One HTTP request as a V2 inference request of one element per input."""
    return InferenceRequest(inputs=[
        RequestInput(name=BODY, datatype="BYTES", shape=[1], data=[body]),
        RequestInput(name=BATCH, datatype="BOOL", shape=[1], data=[batch]),
    ])


class RflocRuntime(MLModel):
    """The localization core behind MLServer's adaptive batching."""

    async def load(self) -> bool:
        self.core = PeerCore()
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Answer every body of a (merged) request in one vectorized pass."""
        inputs = {i.name: getattr(i.data, "root", i.data) for i in payload.inputs}
        bodies, batch = list(inputs[BODY]), [bool(b) for b in inputs[BATCH]]
        answers = self.core.answer(bodies, batch)
        n = len(answers)
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name=STATUS, datatype="INT32", shape=[n],
                           data=[s for s, _ in answers]),
            ResponseOutput(name=ANSWER, datatype="BYTES", shape=[n],
                           data=[a for _, a in answers]),
        ])

    async def _answer(self, body: bytes, batch: bool) -> Response:
        if self.settings.max_batch_size > 1 and not hasattr(self, "__adaptive_batching__"):
            await load_batching(self)  # in a parallel worker (see the module's docstring)
        with model_context(self.settings):  # as MLServer's own infer: batching logs metrics
            res = await self.predict(to_request(body, batch))
        out = {o.name: getattr(o.data, "root", o.data) for o in res.outputs}
        return Response(out[ANSWER][0], status_code=int(out[STATUS][0]),
                        media_type="application/json")

    @custom_handler(rest_path="/predict")
    async def predict_json(self, body: bytes = Depends(raw_body)) -> Response:
        """Localize one capture: N's body and answer."""
        return await self._answer(body, False)

    @custom_handler(rest_path="/predict/batch")
    async def predict_batch_json(self, body: bytes = Depends(raw_body)) -> Response:
        """Localize several captures: N's batch body and answer.

        With the model setting `parameters.extra.batch_bodies` "direct" a batch body, a
        batch already, skips the adaptive batching and runs on its own.
        """
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        if extra.get("batch_bodies") == "direct":
            [(status, answer)] = self.core.answer([body], [True])
            return Response(answer, status_code=status, media_type="application/json")
        return await self._answer(body, True)
