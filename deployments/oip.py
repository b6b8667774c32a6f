"""The Open Inference Protocol routes (REST) and gRPC methods of the Ingress.

A mixin of the Ingress: it uses the Ingress's service, network, alias watcher, model
handle and body limit. The wire formats are in serve_app/protocols/oip.py; the gRPC
proxy finds the methods below by their RPC names (configs/serve_config.yaml
`grpc_options.grpc_servicer_functions`).
"""

from __future__ import annotations

import asyncio
import time
from enum import Enum
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from deployments.api import app, read_body, respond
from deployments.metrics import GRPC_INFER
from serve_app.errors import DOMAIN_ERRORS, InvalidInput, ModelError, http_error
from serve_app.protocols import off_loop_if_large, oip
from serve_app.protocols.oip_grpc import service_pb2 as pb

_VERSION_DIGITS = 16  # like the JSON API's model_version
READY_TIMEOUT_S = 5.0
TAGS: list[str | Enum] = ["Open Inference Protocol"]
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": oip.ErrorResponse} for c in (400, 403, 404, 413, 422, 503)}
NOT_READY: dict[int | str, dict[str, Any]] = {503: {"description": "Not ready."}}


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _grpc_error(grpc_context: Any, exc: BaseException) -> None:
    code, details = oip.grpc_status(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(details)


def _metadata(grpc_context: Any, key: str) -> str | None:
    """A gRPC request's metadata value (None without a context or the key)."""
    if grpc_context is None:
        return None
    for k, value in grpc_context.invocation_metadata():
        if k.lower() == key:
            return value
    return None


class OpenInferenceProtocol:
    """OIP front door: health, metadata, readiness and infer over REST and gRPC."""

    _service: Any
    _network: Any
    _watcher: Any
    _model: Any
    _args: Any
    _metrics: Any
    _is_admin: Any
    _inflight: Any

    # -- shared by both transports ------------------------------------------------------------

    async def _ready(self) -> bool:
        try:
            info = await asyncio.wait_for(self._model.info.remote(), READY_TIMEOUT_S)
        except Exception:  # any failure to reach a model replica means not ready
            return False
        return info.get("model") is not None

    async def _versions(self, name: str, version: str | None) -> list[str]:
        """The registry's versions of model `name`; unknown name or version -> 404."""
        if name != self._args.model_name:
            raise InvalidInput("model_name", f"unknown model {name!r}; this server serves "
                                             f"{self._args.model_name!r}", 404)
        versions = list(self._watcher.versions)
        if version is not None and version not in versions:
            if not (version.isdigit() and len(version) <= _VERSION_DIGITS):
                raise InvalidInput("model_version", "must be a version number (digits)", 400)
            await asyncio.to_thread(self._watcher.check)  # registered since the last poll?
            versions = list(self._watcher.versions)
            if version not in versions:
                raise ModelError(f"model {name!r} has no version {version}")
        return versions

    async def _infer(self, req: oip.InferRequest, name: str, version: str | None,
                     authorization: str | None) -> tuple[list[oip.Tensor], str]:
        admin = self._is_admin(authorization)
        if name != self._args.model_name:  # the model's name is checked before its version
            await self._versions(name, None)
        version = self._service.pin(version, "model_version", admin)  # the pinning policy
        await self._versions(name, version)
        return await oip.infer(self._service, self._network, req, name, version, admin=admin)

    # -- REST -------------------------------------------------------------------------------------

    @app.get("/v2/health/live", tags=TAGS)
    async def oip_live(self) -> Response:
        """Liveness: the server answers."""
        return _json({"live": True})

    @app.get("/v2/health/ready", tags=TAGS, responses=NOT_READY)
    async def oip_ready(self) -> Response:
        """Readiness: a model replica serves a model."""
        ready = await self._ready()
        return Response(orjson.dumps({"ready": ready}), status_code=200 if ready else 503,
                        media_type="application/json")

    @app.get("/v2", tags=TAGS)
    async def oip_server_metadata(self) -> Response:
        """Server metadata: name, protocol version, extensions."""
        return _json(oip.server_metadata())

    @app.get("/v2/models/{name}", tags=TAGS, responses=ERRORS)
    async def oip_model_metadata(self, name: str) -> Response:
        """Model metadata: the registry's versions and the input and output tensors."""
        return await self._metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=TAGS, responses=ERRORS)
    async def oip_model_version_metadata(self, name: str, version: str) -> Response:
        """Model metadata of one registered version."""
        return await self._metadata(name, version)

    async def _metadata(self, name: str, version: str | None) -> Response:
        try:
            versions = await self._versions(name, version)
        except DOMAIN_ERRORS as exc:
            return respond(oip.error_answer(exc))
        return _json(oip.model_metadata(name, [version] if version else versions))

    @app.get("/v2/models/{name}/ready", tags=TAGS, responses={**ERRORS, **NOT_READY})
    async def oip_model_ready(self, name: str) -> Response:
        """Model readiness (the alias's model is loaded)."""
        return await self._model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=TAGS,
             responses={**ERRORS, **NOT_READY})
    async def oip_model_version_ready(self, name: str, version: str) -> Response:
        """Version readiness: registered (pinned versions load on their first request)."""
        return await self._model_ready(name, version)

    async def _model_ready(self, name: str, version: str | None) -> Response:
        try:
            await self._versions(name, version)
        except DOMAIN_ERRORS as exc:
            return respond(oip.error_answer(exc))
        ready = await self._ready()
        return Response(orjson.dumps({"name": name, "ready": ready}),
                        status_code=200 if ready else 503, media_type="application/json")

    @app.post("/v2/models/{name}/infer", tags=TAGS, responses=ERRORS)
    async def oip_infer(self, name: str, request: Request) -> Response:
        """Localize: IQ and RECEIVER_IDS in; POSITION, COVARIANCE_ENU, ELLIPSE, GEOJSON out."""
        return await self._rest_infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=TAGS, responses=ERRORS)
    async def oip_version_infer(self, name: str, version: str, request: Request) -> Response:
        """Infer on a pinned model version (like the JSON API's model_version)."""
        return await self._rest_infer(name, version, request)

    async def _rest_infer(self, name: str, version: str | None, request: Request) -> Response:
        with self._inflight.hold() as held:
            try:
                body = await read_body(request, self._args.max_body_bytes, held)
                req = await off_loop_if_large(oip.parse_rest, body,
                                              request.headers.get(oip.HEADER_LENGTH))
                tensors, served = await self._infer(req, name, version,
                                                    request.headers.get("authorization"))
            except DOMAIN_ERRORS as exc:
                return respond(oip.error_answer(exc))
            return respond(oip.rest_answer(name, served, req, tensors))

    # -- gRPC (inference.GRPCInferenceService) ---------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._ready())

    async def ServerMetadata(self, request: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         grpc_context: Any = None) -> pb.ModelReadyResponse:
        try:
            await self._versions(request.name, request.version or None)
        except DOMAIN_ERRORS as exc:
            _grpc_error(grpc_context, exc)
            return pb.ModelReadyResponse()
        return pb.ModelReadyResponse(ready=await self._ready())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            grpc_context: Any = None) -> pb.ModelMetadataResponse:
        try:
            versions = await self._versions(request.name, request.version or None)
        except DOMAIN_ERRORS as exc:
            _grpc_error(grpc_context, exc)
            return pb.ModelMetadataResponse()
        meta = oip.model_metadata(request.name,
                                  [request.version] if request.version else versions)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         grpc_context: Any = None) -> pb.ModelInferResponse:
        t0 = time.perf_counter()
        status = 500
        with self._inflight.hold() as held:
            try:
                size = request.ByteSize()
                if size > self._args.max_body_bytes:
                    raise InvalidInput("body", f"request of {size} bytes exceeds the limit of "
                                               f"{self._args.max_body_bytes}", 413)
                held.add(size)
                req = oip.parse_grpc(request)
                version = request.model_version or None
                tensors, served = await self._infer(req, request.model_name, version,
                                                    _metadata(grpc_context, "authorization"))
                status = 200
            except DOMAIN_ERRORS as exc:
                status = http_error(exc)[0]
                _grpc_error(grpc_context, exc)
                return pb.ModelInferResponse()
            finally:  # counted like the HTTP routes: rfloc_requests, and stage "total"
                self._metrics.request(GRPC_INFER, status, (time.perf_counter() - t0) * 1000.0)
            return oip.grpc_response(request.model_name, served, req, tensors)
