"""The rfloc JSON API (POST /predict, /predict/batch) as a front door of the service."""

from __future__ import annotations

import orjson

from serve_app.decode import decode_capture, decode_raw_batch, decode_raw_body
from serve_app.errors import (
    DOMAIN_ERRORS,
    InvalidInput,
    batch_item_error,
    error_dict,
    http_error,
)
from serve_app.protocols import Answer, off_loop_if_large
from serve_app.receivers import ReceiverNetwork
from serve_app.schemas import CaptureRequest
from serve_app.service import Capture, LocalizationService

# The header Serve's model multiplexing reads; a request-wide pin of the JSON API.
PIN_HEADER = "serve_multiplexed_model_id"


def error_answer(exc: BaseException) -> Answer:
    """A domain error as the API's `{"error": {"field", "message", "status"}}` answer."""
    status, body, headers = http_error(exc)
    return Answer(status, orjson.dumps(body), headers)


def error(status: int, field: str | None, message: str,
          headers: dict[str, str] | None = None) -> Answer:
    """An error answer of the API that no domain exception stands for (auth, readiness)."""
    return Answer(status, orjson.dumps({"error": error_dict(field, message, status)}),
                  headers or {})


def to_captures(reqs: list[CaptureRequest | InvalidInput], network: ReceiverNetwork,
                *, prefix: bool) -> list[Capture | InvalidInput]:
    """Decode validated requests; a bad one becomes its `InvalidInput` (batch: prefixed)."""
    out: list[Capture | InvalidInput] = []
    for i, req in enumerate(reqs):
        if isinstance(req, InvalidInput):  # decode_raw_batch prefixed it already
            out.append(req)
            continue
        try:
            decoded = decode_capture(req, network)
        except InvalidInput as exc:
            field = f"captures[{i}].{exc.field}" if prefix and exc.field else exc.field
            out.append(InvalidInput(field, exc.message, exc.status_code))
            continue
        out.append(Capture(decoded, req.confidence_level, req.cache, req.model_version))
    return out


async def predict(service: LocalizationService, network: ReceiverNetwork, body: bytes,
                  pinned: str | None = None, admin: bool = False) -> Answer:
    """POST /predict: one capture; `pinned` is the serve_multiplexed_model_id header.

    `admin`: the request bears the admin token (it may pin any version).
    """
    try:
        req = await off_loop_if_large(decode_raw_body, body)
        [outcome] = await service.localize(to_captures([req], network, prefix=False),
                                           pinned, pinned_field=PIN_HEADER, admin=admin)
    except DOMAIN_ERRORS as exc:
        return error_answer(exc)
    if outcome.error is not None:
        return Answer(outcome.error["status"], orjson.dumps({"error": outcome.error}))
    return Answer(200, orjson.dumps(outcome.result))


async def predict_batch(service: LocalizationService, network: ReceiverNetwork, body: bytes,
                        pinned: str | None = None, admin: bool = False) -> Answer:
    """POST /predict/batch: several captures; a bad one gets its own error entry."""
    try:
        reqs = await off_loop_if_large(decode_raw_batch, body)
        service.admit(len(reqs))
        items = to_captures(reqs, network, prefix=True)
        outcomes = await service.localize(items, pinned, pinned_field=PIN_HEADER, admin=admin,
                                          batch=True)
    except DOMAIN_ERRORS as exc:
        return error_answer(exc)
    results = []
    for i, (item, o) in enumerate(zip(items, outcomes, strict=True)):
        if o.error is None:
            results.append({"index": i, "ok": True, "result": o.result})
        else:  # errors of the chain name fields of the capture: place them in the batch
            error = o.error if isinstance(item, InvalidInput) else batch_item_error(o.error, i)
            results.append({"index": i, "ok": False, "error": error})
    return Answer(200, orjson.dumps({"results": results}))
