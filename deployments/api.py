"""The FastAPI app the Ingress serves: its routes live in ingress.py and oip.py."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from deployments.map_page import router as map_router
from deployments.metrics import RequestMetricsMiddleware
from serve_app.errors import InvalidInput, http_error
from serve_app.protocols import Answer
from serve_app.schemas import ErrorResponse
from serve_app.service import Held

logger = logging.getLogger("ray.serve")

ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 413, 422, 503)
}

app = FastAPI(
    title="rfloc-serve",
    description="Localize a radio transmitter from the IQ captures of a receiver network.",
    version="0.1.0",
    docs_url=None,  # the Ingress serves /docs only when args.docs_ui enables it
    redoc_url=None,
)
app.add_middleware(RequestMetricsMiddleware)  # reads the replica's self._metrics
app.include_router(map_router)  # GET /map, its assets and /map/sample


def respond(answer: Answer) -> Response:
    """A front door's answer as a Starlette response."""
    return Response(answer.body, status_code=answer.status, media_type=answer.media_type,
                    headers=answer.headers or None)


async def read_body(request: Request, limit: int, held: Held | None = None) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes.

    Streamed: no more than `limit` bytes are ever read. `held` counts them against the
    replica's bytes in flight (503 when full): a declared length at once, before reading.
    """
    declared = request.headers.get("content-length")
    known = int(declared) if declared is not None and declared.isdigit() else None
    if known is not None and known > limit:
        raise InvalidInput("body", f"request body of {declared} bytes exceeds the limit "
                                   f"of {limit}", 413)
    if held is not None and known is not None:
        held.add(known)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidInput("body", f"request body exceeds the limit of {limit} bytes", 413)
        if held is not None and (known is None or size > known):
            held.add(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path)
    status, body, headers = http_error(exc)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers or None)


# The bodies are parsed by hand (decode.py), so FastAPI does not list their models: the
# request schemas and the models they refer to are added to the components here.
_BODY_SCHEMAS: dict[str, Any] = {}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `openapi_extra` declaring `model` as the JSON request body."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _BODY_SCHEMAS.update(schema.pop("$defs", {}))
    _BODY_SCHEMAS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_BODY_SCHEMAS)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]
