"""Pydantic models of the HTTP API (requests, responses, errors); see DESIGN.md "HTTP API"."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from serve_app.constants import CENTER_FREQ_HZ, DEFAULT_CONFIDENCE, N_SAMPLES, SAMPLE_RATE_HZ

MAX_RECEIVERS = 32
MAX_BATCH_CAPTURES = 64
MAX_RECEIVER_ID_LEN = 64
MAX_SESSION_ID_LEN = 128
MAX_MODEL_VERSION_LEN = 16
# The widest IQ encoding is complex64 (SigMF cf32_le): 8 bytes per complex sample.
MAX_IQ_SAMPLE_BYTES = 8
# Longest iq_b64 accepted for decoding: the base64 of N_SAMPLES + 1 samples of the widest
# encoding (51,212 characters; a valid capture is 51,200). A longer string is refused before
# it is decoded; one sample of slack keeps the precise message ("got 4801 samples", "not a
# multiple of 8") for a near miss.
MAX_IQ_B64_CHARS = 4 * math.ceil((N_SAMPLES + 1) * MAX_IQ_SAMPLE_BYTES / 3)
# Largest POST /predict body read: MAX_RECEIVERS x N_SAMPLES [I, Q] pairs of full-precision
# doubles (~52 bytes a pair, 8 MB; indented JSON ~14 MB) fit; the same capture in iq_b64 is
# 1.6 MB. A larger body is refused with 413 before it is parsed.
MAX_CAPTURE_BODY_BYTES = 16 * 1024 * 1024

# Error type raised by validators that blame one field of the model they validate; the
# field goes in ctx["field"] so that `loc_to_field` can append it to the error location.
FIELD_ERROR_TYPE = "rfloc_field"

# SigMF datatype names of interleaved complex samples, and the first spellings as aliases
# (complex64 = cf32_le, int16 = ci16_le); their scaling is in serve_app/io/datatypes.py.
IqDtype = Literal["cf32_le", "ci16_le", "ci8", "cu8", "complex64", "int16"]
FLOAT_DTYPES = ("complex64", "cf32_le")


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error that names `field` of the model being validated."""
    return PydanticCustomError(FIELD_ERROR_TYPE, message, {"field": field})


class ReceiverCapture(BaseModel):
    """The IQ capture of one receiver: exactly one of `iq` or `iq_b64`."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1,
        max_length=MAX_RECEIVER_ID_LEN,
        description="Receiver id, one of GET /receivers.",
    )
    iq: list[tuple[float, float]] | None = Field(
        default=None,
        description="IQ samples as [[I, Q], ...] float pairs (the seed's JSON form).",
    )
    iq_b64: str | None = Field(
        default=None,
        max_length=MAX_IQ_B64_CHARS,
        description="IQ samples, base64 of interleaved I,Q in `dtype` (default little-endian "
        "complex64).",
    )
    dtype: IqDtype = Field(
        default="complex64",
        description="Sample type of iq_b64 (SigMF names), mapped to normalized IQ as: "
        "cf32_le (alias complex64) as is; ci16_le (alias int16) x/32768; ci8 x/128; "
        "cu8 (x-127.5)/128. Applies to iq_b64 only.",
    )

    @model_validator(mode="after")
    def _one_iq_source(self) -> ReceiverCapture:
        if self.iq is not None and self.iq_b64 is not None:
            raise field_error("iq_b64", "give exactly one of 'iq' or 'iq_b64', not both")
        if self.iq is None and self.iq_b64 is None:
            raise field_error("iq", "one of 'iq' or 'iq_b64' is required")
        if self.iq is not None and self.dtype not in FLOAT_DTYPES:
            raise field_error("dtype", "dtype applies to 'iq_b64' only; 'iq' pairs are floats")
        return self


class CaptureRequest(BaseModel):
    """One capture: the receivers' IQ plus capture parameters (POST /predict)."""

    model_config = ConfigDict(extra="forbid")

    receivers: list[ReceiverCapture] = Field(
        min_length=1,
        max_length=MAX_RECEIVERS,
        description="Per-receiver captures; at least 3 distinct known receivers.",
    )
    sample_rate_hz: float = Field(
        default=SAMPLE_RATE_HZ,
        allow_inf_nan=False,
        description="Sample rate in Hz; must equal the network's (48000).",
    )
    center_freq_hz: float = Field(
        default=float(CENTER_FREQ_HZ),
        allow_inf_nan=False,
        description="Centre frequency in Hz; within 1 MHz of the network's.",
    )
    confidence_level: float = Field(
        default=DEFAULT_CONFIDENCE,
        gt=0.0,
        lt=1.0,
        description="Probability mass of the reported uncertainty ellipse, in (0, 1).",
    )
    session_id: str | None = Field(
        default=None,
        max_length=MAX_SESSION_ID_LEN,
        description="Optional client session id.",
    )
    cache: bool = Field(default=True, description="Use the result cache for this request.")
    model_version: str | None = Field(
        default=None,
        pattern=r"^[0-9]+$",
        max_length=MAX_MODEL_VERSION_LEN,
        description="Pin a registered model version (digits) instead of the serving alias.",
    )


class BatchRequest(BaseModel):
    """Several captures in one request (POST /predict/batch)."""

    model_config = ConfigDict(extra="forbid")

    captures: list[CaptureRequest] = Field(min_length=1, max_length=MAX_BATCH_CAPTURES)


class Position(BaseModel):
    """Estimated transmitter position on WGS84."""

    latitude: float = Field(description="Latitude in degrees (WGS84), north positive.")
    longitude: float = Field(description="Longitude in degrees (WGS84), east positive.")


class Uncertainty(BaseModel):
    """Bivariate Gaussian position uncertainty in the local east/north plane."""

    sigma_x: float = Field(description="Standard deviation along east, metres.")
    sigma_y: float = Field(description="Standard deviation along north, metres.")
    rho: float = Field(description="East/north correlation coefficient, in (-1, 1).")
    theta: float = Field(
        description="Mathematical angle of the ellipse's major axis, degrees counter-clockwise "
        "from east (the seed's convention).",
    )
    semi_major_m: float = Field(
        description="Semi-major axis of the confidence ellipse at confidence_level, metres.",
    )
    semi_minor_m: float = Field(
        description="Semi-minor axis of the confidence ellipse at confidence_level, metres.",
    )
    orientation_deg: float = Field(
        description="Compass bearing of the major axis, degrees clockwise from north, in [0, 180).",
    )
    confidence_level: float = Field(
        description="Probability that the ellipse contains the transmitter, in (0, 1).",
    )
    area_m2: float = Field(description="Area of the confidence ellipse, square metres.")


class ModelRef(BaseModel):
    """The registered model that produced a result: the service's one model identity.

    Frozen: a holder swaps a whole new ref, so readers never see half of an update.
    """

    model_config = ConfigDict(protected_namespaces=(), frozen=True)

    name: str
    version: str
    alias: str | None = None
    sha256: str | None = Field(default=None, description="sha256 of the ONNX file served.")


class ErrorBody(BaseModel):
    """An error: the offending field (dotted path) if any, a message and the HTTP status."""

    field: str | None = Field(default=None, description="Dotted path, e.g. receivers[2].iq_b64.")
    message: str
    status: int


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx response."""

    error: ErrorBody


class PredictResponse(BaseModel):
    """The localization of one capture."""

    model_config = ConfigDict(protected_namespaces=())

    position: Position
    uncertainty: Uncertainty
    geojson: dict[str, Any] = Field(
        description="RFC 7946 FeatureCollection: the position Point and the ellipse Polygon.",
    )
    receivers_used: list[str] = Field(description="Receivers that detected the signal.")
    model: ModelRef
    cache_hit: bool
    timing_ms: dict[str, float] = Field(
        description="Stage timings in milliseconds (preprocess, inference, postprocess, total).",
    )
    request_id: str
    timestamp: datetime = Field(description="UTC time of the response, ISO 8601.")


class BatchItem(BaseModel):
    """The outcome of one capture of a batch: a result or its own error."""

    index: int = Field(ge=0, description="Position of the capture in the request.")
    ok: bool
    result: PredictResponse | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    """Per-capture outcomes, in request order."""

    results: list[BatchItem]
