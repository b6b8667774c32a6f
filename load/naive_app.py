"""N of DESIGN.md: the naive single-process design, the baseline the Serve app is measured against.

One FastAPI app under uvicorn (1 worker) doing, per request, exactly the service's work —
decode_raw_body → decode_capture → stack_captures → preprocess → infer → postprocess with the
shipped ONNX model loaded directly — with no cross-request batching, no Ray, no cache.
Answers have the shape of the service's (`model` names the file, version "local").

    python load/naive_app.py --port 8100
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve_app.decode import decode_capture, decode_raw_batch, decode_raw_body
from serve_app.errors import InvalidInput, batch_item_error, error_body
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import Group, infer, postprocess, preprocess, stack_captures
from serve_app.receivers import load_network
from serve_app.schemas import CaptureRequest

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "localization_model.onnx"
MODEL_REF = {"name": "localization_model", "version": "local", "alias": None}

app = FastAPI(title="rfloc naive baseline")
_network = load_network()
_model = OnnxLocalizer(MODEL_PATH, _network.ids)


def _error(exc: InvalidInput) -> Response:
    body = {"error": {"field": exc.field, "message": exc.message, "status": exc.status_code}}
    return Response(orjson.dumps(body), status_code=exc.status_code,
                    media_type="application/json")


def _run(reqs: list[CaptureRequest | InvalidInput], prefix: bool) -> list[dict]:
    """Per-item outcomes {"ok", "result" | "error"} in order, like the service's ingress."""
    t0 = time.perf_counter()
    out: list[dict | None] = [None] * len(reqs)
    todo, captures, confidence = [], [], []
    for i, req in enumerate(reqs):
        try:
            if isinstance(req, InvalidInput):
                raise req
            d = decode_capture(req, _network)
        except InvalidInput as exc:
            # decode_raw_batch prefixed its own errors; decode_capture's need it here.
            index = i if prefix and not isinstance(req, InvalidInput) else None
            out[i] = {"ok": False, "error": error_body(exc, index)}
            continue
        todo.append(i)
        captures.append((d.iq, d.slots))
        confidence.append(req.confidence_level)
    if todo:
        group: Group = preprocess([stack_captures(captures, len(_network), confidence)],
                                  _network)[0]
        infer([group], _model, MODEL_REF)
        postprocess(group, _network)
        assert group.results is not None
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for j, i in enumerate(todo):
            err = group.errors[j]
            if err is not None:
                out[i] = {"ok": False, "error": batch_item_error(err, i) if prefix else err}
                continue
            timing = {**group.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
            out[i] = {"ok": True, "result": {
                **group.results[j], "model": MODEL_REF, "cache_hit": False,
                "timing_ms": timing, "request_id": uuid.uuid4().hex, "timestamp": stamp}}
    return out  # type: ignore[return-value]


# The handlers do their CPU work inline on the event loop on purpose: this is the naive
# one-process design, and with a single worker a thread hop would only add overhead.
@app.post("/predict")
async def predict(request: Request) -> Response:
    """Localize one capture."""
    try:
        req = decode_raw_body(await request.body())
    except InvalidInput as exc:
        return _error(exc)
    [item] = _run([req], prefix=False)
    if not item["ok"]:
        e = item["error"]
        return _error(InvalidInput(e["field"], e["message"], e["status"]))
    return Response(orjson.dumps(item["result"]), media_type="application/json")


@app.post("/predict/batch")
async def predict_batch(request: Request) -> Response:
    """Localize several captures; a bad capture gets its own error entry."""
    try:
        reqs = decode_raw_batch(await request.body())
    except InvalidInput as exc:
        return _error(exc)
    items = _run(reqs, prefix=True)
    results = [{"index": i, **it} for i, it in enumerate(items)]
    return Response(orjson.dumps({"results": results}), media_type="application/json")


@app.get("/health")
async def health() -> dict:
    """Always ready once imported: the model loads at import."""
    return {"status": "ok", "model": MODEL_REF}


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
