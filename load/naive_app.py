"""N of DESIGN.md: the naive single-process design, the baseline the Serve app is measured against.

One FastAPI app under uvicorn (1 worker) doing, per request, exactly the service's work —
the same front door and service core (serve_app/protocols/rest.py, serve_app/service.py) with
preprocess → infer → postprocess run inline as the chain and the shipped ONNX model loaded
directly — with no cross-request batching, no Ray, no cache.
Answers have the shape of the service's (`model` names the file, version "local").

    python load/naive_app.py --port 8100
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve_app.errors import DOMAIN_ERRORS
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import CaptureGroup, Group, infer, postprocess, preprocess
from serve_app.protocols import Answer, oip, rest
from serve_app.receivers import load_network
from serve_app.schemas import ModelRef
from serve_app.service import LocalizationService

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "localization_model.onnx"
MODEL_REF = ModelRef(name="localization_model", version="local", alias=None)

app = FastAPI(title="rfloc naive baseline")
_network = load_network()
_model = OnnxLocalizer(MODEL_PATH, _network.ids)


async def _chain(group: CaptureGroup, pinned: str | None) -> Group:
    """The whole pipeline inline, in this process: no batching across requests, no Ray."""
    [out] = infer(preprocess([group], _network), _model, MODEL_REF)
    return postprocess(out, _network)


# The service's orchestration without its cache, shadow traffic or cross-request batching.
_service = LocalizationService(_chain, len(_network), batching=None)


def _respond(answer: Answer) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.media_type,
                    headers=answer.headers or None)


# The handlers do their CPU work on the event loop on purpose (only bodies over 512 kB
# parse in a thread, as in the service): this is the naive one-process design, and with a
# single worker a thread hop would only add overhead.
@app.post("/predict")
async def predict(request: Request) -> Response:
    """Localize one capture."""
    return _respond(await rest.predict(_service, _network, await request.body()))


@app.post("/predict/batch")
async def predict_batch(request: Request) -> Response:
    """Localize several captures; a bad capture gets its own error entry."""
    return _respond(await rest.predict_batch(_service, _network, await request.body()))


@app.post("/v2/models/{name}/infer")
async def oip_infer(name: str, request: Request) -> Response:
    """Localize over the Open Inference Protocol (REST: JSON or binary tensors)."""
    try:
        req = oip.parse_rest(await request.body(), request.headers.get(oip.HEADER_LENGTH))
        tensors, version = await oip.infer(_service, _network, req, name, None)
    except DOMAIN_ERRORS as exc:
        return _respond(oip.error_answer(exc))
    return _respond(oip.rest_answer(name, version, req, tensors))


@app.get("/health")
async def health() -> dict:
    """Always ready once imported: the model loads at import."""
    return {"status": "ok", "model": MODEL_REF.model_dump()}


def main() -> None:
    """Run the app under uvicorn, one worker, on loopback."""
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args()
    uvicorn.run(app, host=a.host, port=a.port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
