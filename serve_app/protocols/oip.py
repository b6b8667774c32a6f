"""The Open Inference Protocol (KServe v2) as a front door of the service: REST and gRPC.

Tensors (docs/oip.md):

inputs   IQ                FP32  [R, S, 2] or [B, R, S, 2]   I and Q of each receiver
         RECEIVER_IDS      BYTES [R] or [B, R]               receiver ids; "" = absent
         PRESENT           BOOL  [R] or [B, R]   optional    False = absent receiver
         CONFIDENCE_LEVEL  FP64  [1] or [B]      optional    ellipse probability (0.95)
outputs  POSITION          FP64  [2] or [B, 2]               latitude, longitude (deg)
         COVARIANCE_ENU    FP64  [2, 2] or [B, 2, 2]         east/north covariance (m^2)
         ELLIPSE           FP64  [3] or [B, 3]               semi-major m, semi-minor m,
                                                             orientation deg from north
         GEOJSON           BYTES [1] or [B]                  the rfloc FeatureCollection

Request parameters `sample_rate_hz`, `center_freq_hz` and `cache` mean what the JSON
API's fields of those names mean. The REST side speaks JSON tensors and Triton's binary
tensor extension (`Inference-Header-Content-Length`); the gRPC side builds the
`inference.GRPCInferenceService` messages of the `tritonclient` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pydantic_core
from pydantic import BaseModel, Field

from serve_app.constants import CENTER_FREQ_HZ, DEFAULT_CONFIDENCE, N_SAMPLES, SAMPLE_RATE_HZ
from serve_app.decode import decode_arrays
from serve_app.errors import InvalidInput, Unavailable, http_error
from serve_app.protocols import Answer
from serve_app.receivers import ReceiverNetwork
from serve_app.schemas import MAX_RECEIVER_ID_LEN, MAX_RECEIVERS
from serve_app.service import Capture, LocalizationService, Outcome

PROTOCOL_VERSION = "2"
SERVER_NAME = "rfloc-serve"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"

INPUTS = {"IQ": "FP32", "RECEIVER_IDS": "BYTES", "PRESENT": "BOOL", "CONFIDENCE_LEVEL": "FP64"}
OUTPUTS = {"POSITION": ("FP64", [2]), "COVARIANCE_ENU": ("FP64", [2, 2]),
           "ELLIPSE": ("FP64", [3]), "GEOJSON": ("BYTES", [1])}
PARAMETERS = {"sample_rate_hz": float, "center_freq_hz": float, "cache": bool}
_NUMPY: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
                                     "BOOL": np.dtype("?")}


class ErrorResponse(BaseModel):
    """The protocol's error body: one message, starting with the tensor at fault."""

    error: str = Field(description="e.g. \"RECEIVER_IDS[0]: unknown receiver 'x'; ...\"")


@dataclass
class Tensor:
    """A named tensor: BYTES as an object array of `bytes`, the rest as numpy numbers."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class InferRequest:
    """A decoded infer request, whichever transport it came by."""

    inputs: dict[str, Tensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[tuple[str, bool]] | None = None  # (name, binary) requested; None: all
    binary_output: bool = False  # binary when an output does not say


def _bad(name: str, message: str, status: int = 400) -> InvalidInput:
    return InvalidInput(name, message, status)


# -- metadata --------------------------------------------------------------------------------

def server_metadata() -> dict:
    """GET /v2."""
    return {"name": SERVER_NAME, "version": PROTOCOL_VERSION, "extensions": EXTENSIONS}


def model_metadata(name: str, versions: list[str]) -> dict:
    """GET /v2/models/{name}: the registry's versions and the tensors (-1: any size)."""
    return {
        "name": name, "versions": versions, "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "IQ", "datatype": "FP32", "shape": [-1, -1, N_SAMPLES, 2]},
            {"name": "RECEIVER_IDS", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "PRESENT", "datatype": "BOOL", "shape": [-1, -1]},
            {"name": "CONFIDENCE_LEVEL", "datatype": "FP64", "shape": [-1]},
        ],
        "outputs": [{"name": n, "datatype": dt, "shape": [-1, *shape]}
                    for n, (dt, shape) in OUTPUTS.items()],
    }


# -- tensors -> captures ---------------------------------------------------------------------

def _tensor(name: str, datatype: str, shape: list[int], data: np.ndarray) -> Tensor:
    if name not in INPUTS:
        raise _bad(name, f"unknown input; the inputs are {', '.join(INPUTS)}")
    if datatype != INPUTS[name]:
        raise _bad(name, f"datatype must be {INPUTS[name]}, got {datatype}")
    if any(d < 0 for d in shape) or int(np.prod(shape)) != data.size:
        raise _bad(name, f"shape {shape} does not match its {data.size} elements")
    return Tensor(name, datatype, list(shape), data.reshape(shape))


def _from_bytes(name: str, datatype: str, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise _bad(name, "truncated BYTES element length")
            n = int.from_bytes(raw[i : i + 4], "little")
            if i + 4 + n > len(raw):
                raise _bad(name, "BYTES element runs past the tensor's data")
            items.append(raw[i + 4 : i + 4 + n])
            i += 4 + n
        return np.array(items, dtype=object) if items else np.empty(0, object)
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise _bad(name, f"datatype must be {INPUTS.get(name, 'known')}, got {datatype}")
    if len(raw) % dtype.itemsize:
        raise _bad(name, f"{len(raw)} bytes is not a whole number of {datatype} elements")
    return np.frombuffer(raw, dtype)


def _from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    flat = data if isinstance(data, list) else [data]
    if datatype == "BYTES":
        out = []
        for x in np.asarray(flat, dtype=object).reshape(-1):
            if not isinstance(x, str):
                raise _bad(name, "BYTES data must be strings")
            out.append(x.encode())
        return np.array(out, dtype=object) if out else np.empty(0, object)
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise _bad(name, f"datatype must be {INPUTS.get(name, 'known')}, got {datatype}")
    try:
        arr = np.asarray(flat)
        if datatype == "BOOL" and arr.dtype != np.bool_ and arr.size:
            raise ValueError
        return arr.astype(dtype).reshape(-1)
    except (ValueError, TypeError):
        raise _bad(name, f"data must be {datatype} numbers") from None


def _check_shapes(t: dict[str, Tensor]) -> tuple[bool, int, int]:
    """Whether the request is batched, its batch size and its receiver rows."""
    if "IQ" not in t or "RECEIVER_IDS" not in t:
        missing = "IQ" if "IQ" not in t else "RECEIVER_IDS"
        raise _bad(missing, "required input is missing")
    iq = t["IQ"].shape
    if len(iq) not in (3, 4) or iq[-1] != 2 or iq[-2] != N_SAMPLES:
        raise _bad("IQ", f"shape must be [R, {N_SAMPLES}, 2] or [B, R, {N_SAMPLES}, 2], "
                         f"got {iq}")
    batched = len(iq) == 4
    lead = iq[:-2]
    n_batch, n_rows = (lead[0], lead[1]) if batched else (1, lead[0])
    if n_batch < 1:
        raise _bad("IQ", "holds no capture (batch dimension 0)")
    if not 1 <= n_rows <= MAX_RECEIVERS:
        raise _bad("IQ", f"must hold 1 to {MAX_RECEIVERS} receivers, got {n_rows}")
    for name in ("RECEIVER_IDS", "PRESENT"):
        if name in t and t[name].shape != list(lead):
            raise _bad(name, f"shape must be {list(lead)} (IQ's leading dimensions), "
                             f"got {t[name].shape}")
    if "CONFIDENCE_LEVEL" in t:
        shape = t["CONFIDENCE_LEVEL"].shape
        if shape not in ([n_batch], [n_batch, 1]) and not (not batched and shape == []):
            raise _bad("CONFIDENCE_LEVEL", f"shape must be [{n_batch}], got {shape}")
    return batched, n_batch, n_rows


_FIELD = re.compile(r"^receivers\[(\d+)\]\.(id|iq)")


def _rename(exc: InvalidInput, b: int | None, columns: list[int]) -> InvalidInput:
    """An error of the capture decoder, naming the tensor element instead of the JSON field."""
    at = "" if b is None else f"{b}, "
    m = _FIELD.match(exc.field or "")
    if m:
        tensor = "RECEIVER_IDS" if m.group(2) == "id" else "IQ"
        name = f"{tensor}[{at}{columns[int(m.group(1))]}]"
    elif exc.field == "receivers":
        name = "RECEIVER_IDS" if b is None else f"RECEIVER_IDS[{b}]"
    elif exc.field == "confidence_level":
        name = "CONFIDENCE_LEVEL" if b is None else f"CONFIDENCE_LEVEL[{b}]"
    elif exc.field in PARAMETERS:
        name = f"parameters.{exc.field}"
    else:
        name = exc.field
    return InvalidInput(name, exc.message, exc.status_code)


def to_captures(req: InferRequest, network: ReceiverNetwork) -> tuple[list[Capture], bool]:
    """The captures of an infer request, and whether it was batched ([B, ...] tensors)."""
    t = req.inputs
    batched, n_batch, n_rows = _check_shapes(t)
    iq = t["IQ"].data.reshape(n_batch, n_rows, N_SAMPLES, 2)
    if not iq.flags.c_contiguous or iq.dtype != np.float32:
        iq = np.ascontiguousarray(iq, np.float32)
    ids = t["RECEIVER_IDS"].data.reshape(n_batch, n_rows)
    present = (t["PRESENT"].data.reshape(n_batch, n_rows) if "PRESENT" in t
               else np.ones((n_batch, n_rows), bool))
    confidence = (t["CONFIDENCE_LEVEL"].data.reshape(-1) if "CONFIDENCE_LEVEL" in t
                  else np.full(n_batch, DEFAULT_CONFIDENCE))
    p = req.parameters
    rate_hz = float(p.get("sample_rate_hz", SAMPLE_RATE_HZ))
    freq_hz = float(p.get("center_freq_hz", CENTER_FREQ_HZ))
    use_cache = bool(p.get("cache", True))
    captures = []
    for b in range(n_batch):
        at = f"{b}, " if batched else ""
        columns, names = [], []
        for r in range(n_rows):
            try:
                rid = ids[b, r].decode() if isinstance(ids[b, r], bytes) else str(ids[b, r])
            except UnicodeDecodeError:
                raise _bad(f"RECEIVER_IDS[{at}{r}]", "is not UTF-8") from None
            if len(rid) > MAX_RECEIVER_ID_LEN:
                raise _bad(f"RECEIVER_IDS[{at}{r}]",
                           f"longer than {MAX_RECEIVER_ID_LEN} characters")
            if rid and present[b, r]:
                columns.append(r)
                names.append(rid)
        rows = iq[b, columns].view(np.complex64)[..., 0]  # [n_present, S]
        try:
            decoded = decode_arrays(rows, names, network, sample_rate_hz=rate_hz,
                                    center_freq_hz=freq_hz,
                                    confidence_level=float(confidence[b]))
        except InvalidInput as exc:
            raise _rename(exc, b if batched else None, columns) from None
        captures.append(Capture(decoded, float(confidence[b]), use_cache))
    return captures, batched


def _parameters(raw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        kind = PARAMETERS.get(key)
        if kind is None:
            continue  # binary_data_output, priority, timeout …: not ours to refuse
        if kind is bool and not isinstance(value, bool) or kind is float and (
                isinstance(value, bool) or not isinstance(value, int | float)):
            raise _bad(f"parameters.{key}", f"must be a {kind.__name__}")
        out[key] = value
    return out


# -- REST ---------------------------------------------------------------------------------------

def parse_rest(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request body: JSON, or a JSON header plus binary tensor data."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(HEADER_LENGTH, f"must be a byte count within the body, got "
                                      f"{header_length!r}")
        split = int(header_length)
    else:
        split = len(body)
    try:
        head = pydantic_core.from_json(body[:split], allow_inf_nan=False)
    except ValueError as exc:
        raise _bad("body", f"malformed JSON: {exc}") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise _bad("inputs", "the request must be a JSON object with an 'inputs' list")
    offset, inputs = split, {}
    for i, spec in enumerate(head["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad(f"inputs[{i}]", "must be an object with name, datatype, shape, data")
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise _bad(name, "shape must be a list of integers")
        if name in inputs:
            raise _bad(name, "given twice")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise _bad(name, f"binary_data_size {size!r} runs past the body")
            data = _from_bytes(name, str(datatype), body[offset : offset + size])
            offset += size
        elif "data" in spec:
            data = _from_json(name, str(datatype), spec["data"])
        else:
            raise _bad(name, "has neither data nor binary_data_size")
        inputs[name] = _tensor(name, str(datatype), shape, data)
    if offset != len(body):
        raise _bad("body", f"{len(body) - offset} bytes of binary data belong to no input")
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters", "must be an object")
    outputs = None
    if head.get("outputs") is not None:
        outputs = []
        for o in head["outputs"]:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in OUTPUTS:
                raise _bad(f"outputs.{name}", f"unknown output; the outputs are "
                                              f"{', '.join(OUTPUTS)}")
            outputs.append((name, bool((o.get("parameters") or {}).get("binary_data",
                                                                       False))))
    rid = head.get("id", "")
    return InferRequest(inputs, str(rid) if rid is not None else "", _parameters(params),
                        outputs, bool(params.get("binary_data_output", False)))


def output_tensors(outcomes: list[Outcome], batched: bool) -> list[Tensor]:
    """POSITION, COVARIANCE_ENU, ELLIPSE, GEOJSON of successful outcomes."""
    res = [o.result for o in outcomes if o.result is not None]
    pos = np.array([[r["position"]["latitude"], r["position"]["longitude"]] for r in res])
    cov = np.empty((len(res), 2, 2))
    ell = np.empty((len(res), 3))
    for i, r in enumerate(res):
        u = r["uncertainty"]
        c = u["rho"] * u["sigma_x"] * u["sigma_y"]
        cov[i] = [[u["sigma_x"] ** 2, c], [c, u["sigma_y"] ** 2]]
        ell[i] = [u["semi_major_m"], u["semi_minor_m"], u["orientation_deg"]]
    geo: np.ndarray = np.empty((len(res), 1), dtype=object)
    geo[:, 0] = [orjson.dumps(r["geojson"]) for r in res]
    arrays = {"POSITION": pos, "COVARIANCE_ENU": cov, "ELLIPSE": ell, "GEOJSON": geo}
    out = []
    for name, (datatype, _) in OUTPUTS.items():
        a = arrays[name] if batched else arrays[name][0]
        if name == "GEOJSON" and batched:
            a = a.reshape(-1)
        out.append(Tensor(name, datatype, list(a.shape), a))
    return out


def _raw(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(len(x).to_bytes(4, "little") + x for x in t.data.reshape(-1))
    return np.ascontiguousarray(t.data, _NUMPY[t.datatype]).tobytes()


def rest_answer(model_name: str, version: str, req: InferRequest, tensors: list[Tensor]) -> Answer:
    """The infer response: JSON tensors, or a JSON header and binary data after it."""
    wanted = req.outputs if req.outputs is not None else [(t.name, req.binary_output)
                                                          for t in tensors]
    by_name = {t.name: t for t in tensors}
    outputs, blobs = [], []
    for name, binary in wanted:
        t = by_name[name]
        spec: dict[str, Any] = {"name": name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            blob = _raw(t)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.datatype == "BYTES":
            spec["data"] = [x.decode() for x in t.data.reshape(-1)]
        else:
            spec["data"] = t.data.reshape(-1).tolist()
        outputs.append(spec)
    head = orjson.dumps({"model_name": model_name, "model_version": version,
                         "id": req.id, "outputs": outputs})
    if not blobs:
        return Answer(200, head)
    return Answer(200, head + b"".join(blobs), {HEADER_LENGTH: str(len(head))},
                  "application/octet-stream")


def error_answer(exc: BaseException) -> Answer:
    """A domain error as the protocol's `{"error": "..."}`; the message names the tensor."""
    status, body, headers = http_error(exc)
    err = body["error"]
    message = f"{err['field']}: {err['message']}" if err["field"] else err["message"]
    return Answer(status, orjson.dumps({"error": message}), headers)


async def infer(service: LocalizationService, network: ReceiverNetwork, req: InferRequest,
                model_name: str, version: str | None, *,
                admin: bool = False) -> tuple[list[Tensor], str]:
    """Run a decoded request: its output tensors and the version that answered.

    One capture's error fails the request (the protocol has no per-item errors); it is
    raised as `InvalidInput` naming the tensor (and the capture, when batched), or as
    `Unavailable` when it is the service's.
    """
    t = req.inputs
    if "IQ" in t and len(t["IQ"].shape) == 4:
        service.admit(t["IQ"].shape[0], "IQ")
    captures, batched = to_captures(req, network)
    outcomes = await service.localize(captures, version, pinned_field="model_version",
                                      admin=admin)
    for b, o in enumerate(outcomes):
        if o.error is not None:
            err = o.error
            where = "IQ" if err["field"] in (None, "receivers") else err["field"]
            if batched:
                where = f"{where}[{b}]"
            if err["status"] >= 500:
                raise Unavailable(f"{where}: {err['message']}")
            raise InvalidInput(where, err["message"], err["status"])
    first = outcomes[0].result if outcomes else None
    served = first["model"]["version"] if first is not None else (version or "")
    return output_tensors(outcomes, batched), str(served)


# -- gRPC --------------------------------------------------------------------------------------

def parse_grpc(request: Any) -> InferRequest:
    """A `ModelInferRequest`: raw_input_contents (what tritonclient sends) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _bad("raw_input_contents", f"{len(raw)} buffers for {len(request.inputs)} inputs")
    inputs: dict[str, Tensor] = {}
    for i, spec in enumerate(request.inputs):
        name, datatype, shape = spec.name, spec.datatype, [int(d) for d in spec.shape]
        if name in inputs:
            raise _bad(name, "given twice")
        if raw:
            data = _from_bytes(name, datatype, raw[i])
        else:
            c = spec.contents
            if datatype == "BYTES":
                data = np.array(list(c.bytes_contents), dtype=object)
            elif datatype in _NUMPY:
                src = {"FP32": c.fp32_contents, "FP64": c.fp64_contents,
                       "BOOL": c.bool_contents}[datatype]
                data = np.asarray(list(src), _NUMPY[datatype])
            else:
                raise _bad(name, f"datatype must be {INPUTS.get(name, 'known')}, got "
                                 f"{datatype}")
        inputs[name] = _tensor(name, datatype, shape, data)
    params: dict[str, Any] = {}
    for key, p in request.parameters.items():
        which = p.WhichOneof("parameter_choice")
        params[key] = getattr(p, which) if which else None
    outputs = None
    if len(request.outputs):
        outputs = []
        for o in request.outputs:
            if o.name not in OUTPUTS:
                raise _bad(f"outputs.{o.name}", f"unknown output; the outputs are "
                                                f"{', '.join(OUTPUTS)}")
            outputs.append((o.name, True))
    return InferRequest(inputs, request.id, _parameters(params), outputs, True)


def grpc_response(model_name: str, version: str, req: InferRequest,
                  tensors: list[Tensor]) -> Any:
    """A `ModelInferResponse` with the outputs in raw_output_contents."""
    from serve_app.protocols.oip_grpc import service_pb2

    names = [n for n, _ in req.outputs] if req.outputs is not None else [t.name for t in tensors]
    by_name = {t.name: t for t in tensors}
    resp = service_pb2.ModelInferResponse(model_name=model_name, model_version=version,
                                          id=req.id)
    for name in names:
        t = by_name[name]
        resp.outputs.add(name=name, datatype=t.datatype, shape=t.shape)
        resp.raw_output_contents.append(_raw(t))
    return resp


def grpc_status(exc: BaseException) -> tuple[Any, str]:
    """The gRPC status code and details of a domain error (by its HTTP status)."""
    import grpc

    status, body, _ = http_error(exc)
    err = body["error"]
    details = f"{err['field']}: {err['message']}" if err["field"] else err["message"]
    code = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
            404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            503: grpc.StatusCode.UNAVAILABLE}.get(status)
    if code is None:
        code = grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL
    return code, details
