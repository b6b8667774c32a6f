"""Ingress: FastAPI HTTP API — validation, cache, the deployment chain, error mapping."""


import asyncio
import dataclasses
import hmac
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.challenger import Challenger
from deployments.map_page import router as map_router
from deployments.metrics import IngressMetrics, RequestMetricsMiddleware
from serve_app.cache import cache_key, make_cache
from serve_app.coalesce import Coalescer
from serve_app.decode import decode_capture, decode_raw_batch, decode_raw_body
from serve_app.errors import (
    InvalidInput,
    ModelError,
    RegistryUnavailable,
    batch_item_error,
    error_body,
)
from serve_app.lifecycle import make_registry
from serve_app.pipeline import (
    CaptureGroup,
    Group,
    split_group,
    stack_captures,
)
from serve_app.receivers import load_network
from serve_app.schemas import (
    BatchRequest,
    BatchResponse,
    CaptureRequest,
    ErrorResponse,
    PredictResponse,
)
from serve_app.settings import AppArgs, EnvSettings, IngressConfig

logger = logging.getLogger("ray.serve")

RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError)
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 413, 422, 503)
}

app = FastAPI(
    title="rfloc-serve",
    description="Localize a radio transmitter from the IQ captures of a receiver network.",
    version="0.1.0",
)
app.add_middleware(RequestMetricsMiddleware)  # reads the replica's self._metrics


def _error(status: int, field: str | None, message: str, headers: dict | None = None) -> Response:
    body = {"error": {"field": field, "message": message, "status": status}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": {"field": None, "message": "internal error", "status": 500}},
                        status_code=500)



def _replica_failure(exc: BaseException | None) -> bool:
    """A replica died under this call, directly or upstream of a chained handle call."""
    # Serve's router reports an upstream replica's death (a DeploymentResponse passed to the
    # next deployment) as a RayServeException caused by the ActorDiedError.
    while exc is not None:
        if isinstance(exc, RETRYABLE):
            return True
        exc = exc.__cause__
    return False


# A body up to this size parses in well under a millisecond on the event loop (a standard
# iq_b64 capture is 359 kB), cheaper than the hand-off to a worker thread; larger ones (the
# iq pairs form, batches) parse in a thread so the loop keeps serving other requests.
INLINE_PARSE_BYTES = 512 * 1024


async def _off_loop_if_large(parse: Callable[[bytes], Any], body: bytes) -> Any:
    if len(body) <= INLINE_PARSE_BYTES:
        return parse(body)
    return await asyncio.to_thread(parse, body)


@dataclasses.dataclass
class Pending:
    """One request's decoded captures waiting for a chain batch."""

    captures: list[tuple[np.ndarray, np.ndarray]]  # (iq [n_present, S], slots) per capture
    confidence: list[float]

    def __len__(self) -> int:
        return len(self.captures)


class Unavailable(Exception):
    """The service cannot answer now (overload, no replica, registry); maps to 503."""


def _domain_error(exc: Exception) -> Response:
    """The one place where domain errors become HTTP answers."""
    if isinstance(exc, InvalidInput):
        return _error(exc.status_code, exc.field, exc.message)
    if isinstance(exc, ModelError):  # only a pinned version can be unknown here
        return _error(404, "model_version", str(exc))
    return _error(503, None, str(exc), {"Retry-After": "1"})


app.include_router(map_router)  # GET /map, its assets and /map/sample

# The bodies are parsed by hand (decode.py), so FastAPI does not list their models: the
# request schemas and the models they refer to are added to the components here.
_BODY_SCHEMAS: dict[str, Any] = {}


def _body_schema(model: type[BaseModel]) -> dict[str, str]:
    """A reference to `model` in the OpenAPI components (added by `_openapi`)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _BODY_SCHEMAS.update(schema.pop("$defs", {}))
    _BODY_SCHEMAS[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_BODY_SCHEMAS)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP front: validates input, answers from the cache, drives the deployment chain."""

    def __init__(self, preprocessor: DeploymentHandle, model: DeploymentHandle,
                 postprocessor: DeploymentHandle, args: dict) -> None:
        self._args = AppArgs.model_validate(args)
        self._env = EnvSettings()
        self._pre, self._model, self._post = preprocessor, model, postprocessor
        defaults = IngressConfig()
        self._batcher = Coalescer(self._chain_batch, max_size=defaults.max_batch_size,
                                  max_in_flight=defaults.max_batches_in_flight,
                                  min_overlap=defaults.overlap_min_captures, size=len)
        self._network = load_network(self._args.receivers_path)
        self._cache = make_cache(self._env.redis_url, self._args.cache_ttl_s,
                                 self._args.cache_timeout_ms, self._args.local_cache_items)
        self._registry = make_registry(self._env, self._args.model_name)
        self._metrics = IngressMetrics()
        self._challenger = Challenger(self._metrics)
        self._alias = self._args.model_alias
        self._alias_version: str | None = None
        self._alias_sha: str | None = None  # with the version, the cache's model identity
        self._registry_ok = True
        self._poll_interval_s = 10.0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="alias-poll", daemon=True)
        self._poller.start()

    def reconfigure(self, config: dict) -> None:
        cfg = IngressConfig.model_validate(config or {})
        self._batcher.configure(cfg.max_batch_size, cfg.max_batches_in_flight,
                                cfg.overlap_min_captures)
        self._poll_interval_s = cfg.poll_interval_s
        challenger = self._challenger.alias
        self._challenger.configure(cfg.challenger_alias, cfg.challenger_fraction,
                                   cfg.challenger_max_inflight)
        alias = cfg.model_alias or self._args.model_alias
        if alias != self._alias or cfg.challenger_alias != challenger:
            self._alias = alias
            self._check_alias()

    def _check_alias(self) -> None:
        try:
            version = self._registry.get_alias(self._alias)
            if version != self._alias_version or self._alias_sha is None:
                # A registry recreated from scratch reuses version numbers: the file's hash
                # keeps an old model's cached answers from passing for the new one's.
                self._alias_sha = self._registry.version_sha256(version) if version else None
            self._alias_version = version
            self._challenger.resolve(self._registry)
            self._registry_ok = True
        except RegistryUnavailable as exc:
            if self._registry_ok:
                logger.warning("registry unreachable: %s", exc)
            self._registry_ok = False

    def _poll(self) -> None:
        while True:
            self._check_alias()
            if self._stop.wait(self._poll_interval_s):
                return

    def __del__(self) -> None:
        self._stop.set()

    # -- the chain ---------------------------------------------------------------------------

    async def _run_chain(self, captures: list[tuple[np.ndarray, np.ndarray]],
                         confidence: list[float], pinned: str | None) -> Group:
        if pinned:
            group = stack_captures(captures, len(self._network), confidence)
            return await self._call_chain(group,
                                          self._model.options(multiplexed_model_id=pinned))
        return await self._batcher.submit(Pending(captures, confidence))

    # Concurrent requests cross the chain as one group (self._batcher decides which): the
    # three handle calls are paid per batch, not per request (docs/performance.md). Their
    # captures are stacked once, here, into the array the Preprocessor reads.
    async def _chain_batch(self, items: list[Pending]) -> list[Group]:
        group = stack_captures([c for p in items for c in p.captures], len(self._network),
                               [x for p in items for x in p.confidence])
        out = await self._call_chain(group, self._model)
        return split_group(out, [len(p) for p in items])

    async def _call_chain(self, group: CaptureGroup, model: DeploymentHandle) -> Group:
        """Run the chain once, retrying failed replicas and tries that hang.

        A try gets `chain_timeout_s`: one sent to a hung replica, or to a node that is gone
        but not yet declared dead, is cancelled and sent again (Serve routes it to a live
        replica if there is one), so it does not hold its requests, nor those coalesced
        behind it, for as long as Ray takes to notice. Tries stop after `chain_budget_s`
        (while Serve waits for a replacement replica, say) or `retries` replica failures,
        with a 503.
        """
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
                    calls.append(model.remote(calls[0], self._alias, self._alias_version))
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

    def _response(self, result: dict, model: dict, timing: dict, cache_hit: bool,
                  t0: float) -> dict:
        timing = {**timing, "total": (time.perf_counter() - t0) * 1000.0}
        return {**result, "model": model, "cache_hit": cache_hit, "timing_ms": timing,
                "request_id": uuid.uuid4().hex,
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}

    def _key(self, decoded, req: CaptureRequest, identity: tuple) -> str | None:
        """Cache key of an alias-served request; pinned versions bypass the cache."""
        version, sha = identity
        if self._cache is None or not req.cache or version is None or sha is None:
            return None
        return cache_key(f"{version}:{sha}", decoded.canonical, req.confidence_level)

    async def _predict_many(self, reqs: list[CaptureRequest | InvalidInput], pinned: str | None,
                            prefix: bool) -> list[dict]:
        """Per-item outcomes {"ok", "result" | "error"} for validated requests, in order."""
        t0 = time.perf_counter()
        identity = (self._alias_version, self._alias_sha)  # what the cache keys are made of
        out: list[dict | None] = [None] * len(reqs)
        todo: list[tuple[int, Any, CaptureRequest, str | None]] = []
        for i, req in enumerate(reqs):
            if isinstance(req, InvalidInput):  # decode_raw_batch prefixed it already
                out[i] = {"ok": False, "error": error_body(req)}
                continue
            try:
                decoded = decode_capture(req, self._network)
            except InvalidInput as exc:
                out[i] = {"ok": False, "error": error_body(exc, i if prefix else None)}
                continue
            key = None if pinned or req.model_version else self._key(decoded, req, identity)
            cached = await self._cache.get(key) if key else None
            if cached is not None:
                out[i] = {"ok": True, "result": self._response(
                    cached["result"], cached["model"], {}, True, t0)}
            else:
                todo.append((i, decoded, req, key))
        # One chain per distinct pinned version (usually just one chain).
        by_version: dict[str | None, list] = {}
        for item in todo:
            by_version.setdefault(pinned or item[2].model_version, []).append(item)
        for version, items in by_version.items():
            group = await self._run_chain(
                [(d.iq, d.slots) for _, d, _, _ in items],
                [r.confidence_level for _, _, r, _ in items], version)
            for j, (i, _, _, key) in enumerate(items):
                err = group.errors[j]
                if err is not None:
                    out[i] = {"ok": False, "error": batch_item_error(err, i) if prefix else err}
                    continue
                result = group.results[j]
                out[i] = {"ok": True, "result": self._response(
                    result, group.model, group.timing_ms, False, t0)}
                if key is not None and (group.model["version"], group.model.get("sha256")) \
                        == identity:
                    await self._cache.set(key, {"result": result, "model": group.model})
            if version is None:
                captures = [(d.iq, d.slots) for _, d, _, _ in items]
                confidence = [r.confidence_level for _, _, r, _ in items]
                self._challenger.maybe_shadow(
                    lambda v, c=captures, p=confidence: self._run_chain(c, p, v),
                    list(group.results or []))
        self._metrics.sync_cache(self._cache)
        return out  # type: ignore[return-value]

    # -- endpoints ---------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        limit = self._args.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidInput("body", f"request body of {declared} bytes exceeds the limit "
                                       f"of {limit}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InvalidInput("body", f"request body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": _body_schema(CaptureRequest)}}}})
    async def predict(self, request: Request) -> Response:
        """Localize one capture."""
        try:
            body = await self._body(request)
            req = await _off_loop_if_large(decode_raw_body, body)
            pinned = request.headers.get("serve_multiplexed_model_id") or req.model_version
            [item] = await self._predict_many([req], pinned, prefix=False)
        except (InvalidInput, ModelError, Unavailable) as exc:
            return _domain_error(exc)
        if not item["ok"]:
            e = item["error"]
            return _error(e["status"], e["field"], e["message"])
        return Response(orjson.dumps(item["result"]), media_type="application/json")

    @app.post("/predict/batch", response_model=BatchResponse, responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": _body_schema(BatchRequest)}}}})
    async def predict_batch(self, request: Request) -> Response:
        """Localize several captures; a bad capture gets its own error entry."""
        try:
            body = await self._body(request)
            reqs = await _off_loop_if_large(decode_raw_batch, body)
            if len(reqs) > self._args.max_batch_captures:
                raise InvalidInput("captures", f"at most {self._args.max_batch_captures} "
                                               f"captures per request, got {len(reqs)}", 413)
            pinned = request.headers.get("serve_multiplexed_model_id")
            items = await self._predict_many(reqs, pinned, prefix=True)
        except (InvalidInput, ModelError, Unavailable) as exc:
            return _domain_error(exc)
        results = [{"index": i, **it} for i, it in enumerate(items)]
        return Response(orjson.dumps({"results": results}), media_type="application/json")

    @app.get("/receivers")
    async def receivers(self) -> dict:
        """The receiver network."""
        net = self._network
        return {"receivers": net.describe(), "enu_origin": {
            "latitude": net.origin_lat, "longitude": net.origin_lon}}

    @app.get("/model/info")
    async def model_info(self) -> dict:
        """What a model replica serves, the alias the service follows, and reload history."""
        info = await self._model.info.remote()
        return {**info, "alias": self._alias, "alias_version": self._alias_version,
                "chain_batch_sizes": dict(self._batcher.sizes),
                "challenger": self._challenger.info(),
                "registry_ok": self._registry_ok and info.get("registry_ok", True)}

    @app.get("/health")
    async def health(self) -> Response:
        """Readiness: a model is loaded. Registry and cache state in the details."""
        try:
            info = await asyncio.wait_for(self._model.info.remote(), timeout=5.0)
        except Exception as exc:  # any failure to reach a model replica means not ready
            return _error(503, None, f"model not ready: {exc}", {"Retry-After": "2"})
        registry_ok = self._registry_ok and info.get("registry_ok", True)
        body = {
            "status": "ok" if registry_ok else "degraded",
            "model": info.get("model"),
            "registry": "ok" if registry_ok else "degraded",
            "cache": self._cache.health() if self._cache is not None else {"state": "off"},
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/model/reload", responses=ERRORS)
    async def reload(self, request: Request) -> Response:
        """Admin: re-resolve the alias now and swap every replica on its next request."""
        denied = self._check_admin(request)
        if denied is not None:
            return denied
        await asyncio.to_thread(self._check_alias)
        if not self._registry_ok:
            return _error(503, None, "registry unreachable; still serving the loaded model",
                          {"Retry-After": "5"})
        result = await self._model.reload.remote(self._alias)
        return Response(orjson.dumps({"alias": self._alias, "alias_version": self._alias_version,
                                      **result}), media_type="application/json")

    def _check_admin(self, request: Request) -> Response | None:
        token = self._env.admin_token
        if token is None:
            return _error(403, None, "admin endpoints are disabled: set RFLOC_ADMIN_TOKEN")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(401, "Authorization", "bearer token required",
                          {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return _error(403, "Authorization", "invalid token")
        return None
