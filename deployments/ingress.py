"""Ingress: the HTTP and gRPC front doors over the service core, and the chain's handles."""

# No `from __future__ import annotations` here: Serve's class-based FastAPI view needs the
# routes' annotations (Request) as objects, or FastAPI takes `request` for a query field.
import asyncio
import hmac
import logging
import threading
from collections.abc import Callable

import orjson
from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api import ERRORS, app, body_schema, read_body, respond
from deployments.chain import Chain
from deployments.challenger import Challenger
from deployments.metrics import IngressMetrics
from deployments.oip import OpenInferenceProtocol
from serve_app.cache import make_cache
from serve_app.errors import InvalidInput, Unavailable
from serve_app.lifecycle import AliasWatcher, make_registry, public_info
from serve_app.protocols import rest
from serve_app.receivers import load_network
from serve_app.schemas import (
    MAX_CAPTURE_BODY_BYTES,
    BatchRequest,
    BatchResponse,
    CaptureRequest,
    PredictResponse,
)
from serve_app.service import Batching, BytesInFlight, LocalizationService, PinRules
from serve_app.settings import AppArgs, EnvSettings, IngressConfig

logger = logging.getLogger("ray.serve")

# The Swagger UI page loads its script and style from jsDelivr: nothing else may load.
DOCS_CSP = ("default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src https://cdn.jsdelivr.net; img-src https://fastapi.tiangolo.com data:; "
            "connect-src 'self'; frame-ancestors 'none'")


def _bearer(authorization: str | None) -> str | None:
    """The token of a `Bearer <token>` Authorization value, else None."""
    scheme, _, given = (authorization or "").partition(" ")
    return given if scheme.lower() == "bearer" and given else None


def _batching(cfg: IngressConfig) -> Batching:
    return Batching(cfg.max_batch_size, cfg.max_batches_in_flight, cfg.overlap_min_captures)


@serve.deployment
@serve.ingress(app)
class Ingress(OpenInferenceProtocol):
    """Front doors (rfloc JSON, OIP REST and gRPC) over one LocalizationService."""

    def __init__(self, preprocessor: DeploymentHandle, model: DeploymentHandle,
                 postprocessor: DeploymentHandle, args: AppArgs) -> None:
        self._args = args
        self._env = EnvSettings()
        self._model = model
        self._network = load_network(self._args.receivers_path)
        self._cache = make_cache(self._env.redis_url, self._args.cache_ttl_s,
                                 self._args.cache_timeout_ms, self._args.local_cache_items)
        self._registry = make_registry(self._env, self._args.model_name,
                                       self._args.model_cache_versions)
        self._watcher = AliasWatcher(self._registry, self._args.model_alias)
        self._metrics = IngressMetrics()
        self._inflight = BytesInFlight(self._args.max_inflight_body_bytes)
        self._challenger = Challenger(self._metrics)
        self._service = LocalizationService(
            Chain(preprocessor, model, postprocessor, self._watcher, self._args),
            len(self._network), cache=self._cache,
            identity=lambda: self._watcher.ref, shadow=self._challenger.maybe_shadow,
            batching=_batching(IngressConfig()), max_captures=self._args.max_batch_captures,
            after_request=lambda: self._metrics.sync_cache(self._cache),
            pin_rules=self._pin_rules)
        self._poll_interval_s = 10.0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()

    def _pin_rules(self) -> PinRules:
        """What clients may pin now: configured, or the versions the alias has named."""
        w = self._watcher
        ref = w.ref
        if self._args.pinnable_versions is not None:
            versions = set(self._args.pinnable_versions)
        else:
            versions = set(w.history) | ({ref.version} if ref is not None else set())
        return PinRules(frozenset(versions), frozenset(self._args.pinnable_aliases), w.aliases)

    def _is_admin(self, authorization: str | None) -> bool:
        """Whether an Authorization value bears the admin token."""
        given = _bearer(authorization)
        return given is not None and self._token_matches(given)

    def _token_matches(self, given: str) -> bool:
        token = self._env.admin_token
        return token is not None and hmac.compare_digest(
            given.encode(), token.get_secret_value().encode())

    def reconfigure(self, config: dict) -> None:
        cfg = IngressConfig.model_validate(config or {})
        self._service.configure(_batching(cfg))
        self._poll_interval_s = cfg.poll_interval_s
        challenger = self._challenger.alias
        self._challenger.configure(cfg.challenger_alias, cfg.challenger_fraction,
                                   cfg.challenger_max_inflight)
        moved = self._watcher.configure(cfg.model_alias or self._args.model_alias)
        if moved or cfg.challenger_alias != challenger:
            self._check_alias()

    def _check_alias(self) -> None:
        self._watcher.check()
        if self._watcher.registry_ok:
            self._challenger.resolve(self._registry)

    def _poll(self) -> None:
        while True:
            self._check_alias()
            if self._stop.wait(self._poll_interval_s):
                return

    def __del__(self) -> None:
        self._stop.set()

    # -- the rfloc JSON API -----------------------------------------------------------------

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              openapi_extra=body_schema(CaptureRequest))
    async def predict(self, request: Request) -> Response:
        """Localize one capture."""
        # never read past what the largest valid capture needs
        limit = min(self._args.max_body_bytes, MAX_CAPTURE_BODY_BYTES)
        return await self._answer(request, limit, rest.predict)

    @app.post("/predict/batch", response_model=BatchResponse, responses=ERRORS,
              openapi_extra=body_schema(BatchRequest))
    async def predict_batch(self, request: Request) -> Response:
        """Localize several captures; a bad capture gets its own error entry."""
        return await self._answer(request, self._args.max_body_bytes, rest.predict_batch)

    async def _answer(self, request: Request, limit: int, handler: Callable) -> Response:
        """Read the body within `limit` and the bytes-in-flight budget, then `handler` it."""
        with self._inflight.hold() as held:
            try:
                body = await read_body(request, limit, held)
            except (InvalidInput, Unavailable) as exc:
                return respond(rest.error_answer(exc))
            pinned = request.headers.get(rest.PIN_HEADER)
            admin = self._is_admin(request.headers.get("authorization"))
            return respond(await handler(self._service, self._network, body, pinned, admin))

    @app.get("/receivers")
    async def receivers(self) -> dict:
        """The receiver network."""
        net = self._network
        return {"receivers": net.describe(), "enu_origin": {
            "latitude": net.origin_lat, "longitude": net.origin_lon}}

    @app.get("/model/info")
    async def model_info(self, request: Request) -> dict:
        """What a model replica serves, the alias the service follows, and reload history.

        With the admin token also the replica's PID and unredacted refusal reasons.
        """
        body = await self.info()
        if self._is_admin(request.headers.get("authorization")):
            return body
        return public_info(body)

    async def info(self) -> dict:
        """The admin view of /model/info (also for handle callers in the cluster)."""
        info = await self._model.info.remote()
        ref = self._watcher.ref
        return {**info, "alias": self._watcher.alias, "alias_version": ref and ref.version,
                "chain_batch_sizes": self._service.batch_sizes,
                "challenger": self._challenger.info(),
                "registry_ok": self._watcher.registry_ok and info.get("registry_ok", True)}

    @app.get("/docs", include_in_schema=False)
    async def docs(self) -> Response:
        """The Swagger UI, when args.docs_ui enables it (its assets come from a CDN)."""
        if not self._args.docs_ui:
            return respond(rest.error(404, None, "the API browser is off (args.docs_ui); the "
                                                 "OpenAPI document is at /openapi.json"))
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="rfloc-serve")
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/health")
    async def health(self) -> Response:
        """Readiness: a model is loaded. Registry and cache state in the details."""
        try:
            info = await asyncio.wait_for(self._model.info.remote(), timeout=5.0)
        except Exception as exc:  # any failure to reach a model replica means not ready
            logger.warning("health: no model replica answered: %r", exc)
            return respond(rest.error(503, None, "model not ready", {"Retry-After": "2"}))
        registry_ok = self._watcher.registry_ok and info.get("registry_ok", True)
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
        if not self._watcher.registry_ok:
            return respond(rest.error(503, None, "registry unreachable; still serving the "
                                      "loaded model", {"Retry-After": "5"}))
        result = await self._model.reload.remote(self._watcher.alias)
        ref = self._watcher.ref
        return Response(orjson.dumps({"alias": self._watcher.alias,
                                      "alias_version": ref and ref.version, **result}),
                        media_type="application/json")

    def _check_admin(self, request: Request) -> Response | None:
        token = self._env.admin_token
        if token is None:
            return respond(rest.error(403, None,
                                      "admin endpoints are disabled: set RFLOC_ADMIN_TOKEN"))
        given = _bearer(request.headers.get("authorization"))
        if given is None:
            return respond(rest.error(401, "Authorization", "bearer token required",
                                      {"WWW-Authenticate": "Bearer"}))
        if not self._token_matches(given):
            return respond(rest.error(403, "Authorization", "invalid token"))
        return None
