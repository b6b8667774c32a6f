"""Capture decoding: request JSON → validated complex64 arrays and canonical cache-key bytes.

Every problem with a request is raised as `InvalidInput` naming the offending field with a
dotted path such as ``receivers[2].iq_b64``; nothing else escapes for any input.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pybase64
import pydantic_core
from pydantic import ValidationError

from serve_app.constants import (
    CENTER_FREQ_HZ,
    DEFAULT_CONFIDENCE,
    MIN_RECEIVERS,
    N_SAMPLES,
    SAMPLE_RATE_HZ,
)
from serve_app.errors import InvalidInput
from serve_app.io.datatypes import sample_type
from serve_app.receivers import ReceiverNetwork
from serve_app.schemas import (
    FIELD_ERROR_TYPE,
    MAX_BATCH_CAPTURES,
    MAX_CAPTURE_BODY_BYTES,
    MAX_RECEIVERS,
    CaptureRequest,
    ReceiverCapture,
)

CENTER_FREQ_TOLERANCE_HZ = 1e6
# Forms of `encode_capture` that send iq_b64 with that dtype.
ENCODE_FORMS = ("complex64", "int16", "cf32_le", "ci16_le", "ci8", "cu8")
# Prefix of the canonical bytes; bump when their layout changes so old cache keys never match.
CANONICAL_TAG = b"rfloc.capture.v1\x00"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# (receiver id, iq pairs or None, iq_b64 or None, dtype)
_RawReceiver = tuple[str, Any, str | None, str]


@dataclass
class DecodedCapture:
    """A decoded, validated capture."""

    iq: np.ndarray  # complex64 [n_present, n_samples], rows in request order
    receiver_ids: list[str]
    slots: np.ndarray  # int64 slot of each row's receiver in the network
    sample_rate_hz: float
    center_freq_hz: float

    @functools.cached_property
    def canonical(self) -> bytes:
        """Order-independent bytes identifying the capture (the cache key's input).

        Computed on first use: a request that skips the cache never copies its IQ for it.
        """
        return _canonical(self.iq, self.slots, self.sample_rate_hz, self.center_freq_hz)


def loc_to_field(loc: Sequence[int | str], prefix: str = "") -> str:
    """Join a pydantic error location into a dotted path: ('receivers', 2, 'iq') → receivers[2].iq.

    Keys that are not identifiers (client-chosen extra keys) are quoted: ``receivers[0]["a.b"]``.
    """
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.fullmatch(str(part)):
            out = f"{out}.{part}" if out else str(part)
        else:
            out += f"[{orjson.dumps(str(part)).decode()}]"
    return out or "body"


# Where each field stands in the request models: errors are ranked by it (below).
_FIELD_RANK = {
    name: rank
    for rank, name in enumerate([*CaptureRequest.model_fields, *ReceiverCapture.model_fields])
}


def _error_rank(err: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key of a pydantic error: unknown keys first, then fields in declaration order.

    pydantic's own order of several errors has changed between releases; the reported
    field must not. An unknown key comes first since it usually explains the rest (a
    misspelt ``reciever`` is also a missing ``receivers``).
    """
    unknown = len(_FIELD_RANK)
    parts = tuple(
        (0, part, "") if isinstance(part, int) else (1, _FIELD_RANK.get(part, unknown), part)
        for part in err["loc"]
    )
    return (err["type"] != "extra_forbidden", parts)


def validation_error_to_invalid(exc: ValidationError, prefix: str = "") -> InvalidInput:
    """The `InvalidInput` describing the first error (by `_error_rank`) of a `ValidationError`."""
    errors = sorted(exc.errors(include_url=False, include_input=False), key=_error_rank)
    if not errors:  # pragma: no cover - pydantic never raises an empty error list
        return InvalidInput(prefix or "body", "invalid request")
    err = errors[0]
    if err["type"] == "json_invalid":
        return InvalidInput(prefix or "body", f"malformed JSON: {err['msg']}", 400)
    loc = list(err["loc"])
    ctx = err.get("ctx") or {}
    if err["type"] == FIELD_ERROR_TYPE and "field" in ctx:
        loc.append(str(ctx["field"]))
    message = str(err["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return InvalidInput(loc_to_field(loc, prefix), message, 422)


def _check_size(body: bytes | str, max_body_bytes: int | None) -> None:
    if max_body_bytes is not None and len(body) > max_body_bytes:
        raise InvalidInput(
            "body", f"request body of {len(body)} bytes exceeds the limit of {max_body_bytes}", 413
        )


# Most JSON objects and arrays one capture can hold: itself and MAX_RECEIVERS receivers, each
# with N_SAMPLES [I, Q] pairs, plus slack for brackets inside strings. Parsing costs about
# 0.15 s per MB of [I, Q] pairs here, so a body holding millions of pairs or receivers is
# refused by counting brackets (~0.4 ms per MB) before it is parsed.
_BRACKET_SLACK = 4096
CAPTURE_MAX_OBJECTS = 1 + MAX_RECEIVERS + _BRACKET_SLACK
CAPTURE_MAX_ARRAYS = 1 + MAX_RECEIVERS * (N_SAMPLES + 1) + _BRACKET_SLACK


_COUNT_SLICE = 256 * 1024
_BRACE, _BRACKET = ord("{"), ord("[")


def _check_structure(body: bytes | str, captures: int) -> None:
    """Refuse a body with more JSON objects or arrays than `captures` valid captures hold."""
    if isinstance(body, bytes | bytearray):
        # numpy counts 3-5x faster than bytes.count; in slices that stay in the CPU cache.
        raw = np.frombuffer(body, np.uint8)
        objects = arrays = 0
        for start in range(0, len(raw), _COUNT_SLICE):
            part = raw[start : start + _COUNT_SLICE]
            objects += int(np.count_nonzero(part == _BRACE))
            arrays += int(np.count_nonzero(part == _BRACKET))
    else:
        objects, arrays = body.count("{"), body.count("[")
    if objects > 1 + captures * CAPTURE_MAX_OBJECTS or arrays > 1 + captures * CAPTURE_MAX_ARRAYS:
        raise InvalidInput(
            "body", f"holds {objects} JSON objects and {arrays} arrays, more than "
            f"{captures} capture(s) of at most {MAX_RECEIVERS} receivers x {N_SAMPLES} samples "
            "can", 413)


def decode_raw_body(
    body: bytes | str, *, max_body_bytes: int | None = MAX_CAPTURE_BODY_BYTES
) -> CaptureRequest:
    """Parse and validate a POST /predict body into a `CaptureRequest`.

    A body over `max_body_bytes` (default: what the largest valid capture needs) is refused
    with 413 before it is parsed.
    """
    _check_size(body, max_body_bytes)
    _check_structure(body, 1)
    # pydantic's single-pass JSON validation: measured 2x faster than orjson.loads followed by
    # model_validate for the `iq` pairs form (fewer GC-tracked temporaries), equal for iq_b64.
    try:
        return CaptureRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error_to_invalid(exc) from None


def parse_json(body: bytes | str, *, max_body_bytes: int | None = None) -> Any:
    """Parse a JSON body; malformed JSON → `InvalidInput('body', …, 400)`.

    pydantic's parser (jiter): on an 11 MB body of 32 captures' base64 strings it takes
    3.5 ms where orjson takes 8.5 and the standard library 5 (docs/performance.md).
    NaN and Infinity literals are refused, as JSON says; numbers too large for a double
    parse as inf, which the field validators refuse.
    """
    _check_size(body, max_body_bytes)
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidInput("body", f"malformed JSON: {exc}", 400) from None


def validate_capture(obj: Any, *, prefix: str = "") -> CaptureRequest:
    """Validate an already parsed capture object; error fields are prefixed with `prefix`."""
    try:
        return CaptureRequest.model_validate(obj)
    except ValidationError as exc:
        raise validation_error_to_invalid(exc, prefix) from None


def decode_raw_batch(
    body: bytes | str, *, max_body_bytes: int | None = None
) -> list[CaptureRequest | InvalidInput]:
    """Parse a POST /predict/batch body; each capture is validated on its own.

    A malformed envelope raises `InvalidInput`; a bad capture yields its `InvalidInput`
    (field prefixed ``captures[i].``) in its slot so that it does not fail the others.
    """
    _check_size(body, max_body_bytes)
    _check_structure(body, MAX_BATCH_CAPTURES)
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise InvalidInput("body", "expected a JSON object with a 'captures' list")
    for key in obj:
        if key != "captures":
            raise InvalidInput(loc_to_field([str(key)]), "Extra inputs are not permitted")
    if "captures" not in obj:
        raise InvalidInput("captures", "Field required")
    captures = obj["captures"]
    if not isinstance(captures, list):
        raise InvalidInput("captures", "must be a list of captures")
    if not 1 <= len(captures) <= MAX_BATCH_CAPTURES:
        raise InvalidInput(
            "captures", f"must hold 1 to {MAX_BATCH_CAPTURES} captures, got {len(captures)}"
        )
    out: list[CaptureRequest | InvalidInput] = []
    for i, item in enumerate(captures):
        try:
            out.append(validate_capture(item, prefix=f"captures[{i}]"))
        except InvalidInput as exc:
            out.append(exc)
    return out


def _unpack(req: CaptureRequest) -> tuple[list[_RawReceiver], float, float, float]:
    receivers: list[_RawReceiver] = [(r.id, r.iq, r.iq_b64, r.dtype) for r in req.receivers]
    return receivers, req.sample_rate_hz, req.center_freq_hz, req.confidence_level


def _check_receivers(receivers: list[_RawReceiver], network: ReceiverNetwork) -> np.ndarray:
    """Slots of the receivers; unknown, duplicate or too few receivers → InvalidInput."""
    slots = np.empty(len(receivers), np.int64)
    first_row: dict[str, int] = {}
    for i, (rid, _, _, _) in enumerate(receivers):
        try:
            slots[i] = network.index(rid)
        except KeyError:
            raise InvalidInput(
                f"receivers[{i}].id",
                f"unknown receiver {rid!r}; valid ids: {', '.join(network.ids)}",
            ) from None
        if rid in first_row:
            raise InvalidInput(
                f"receivers[{i}].id",
                f"duplicate receiver {rid!r} (also receivers[{first_row[rid]}])",
            )
        first_row[rid] = i
    if len(receivers) < MIN_RECEIVERS:
        raise InvalidInput(
            "receivers",
            f"at least {MIN_RECEIVERS} distinct receivers are required, got {len(receivers)}",
        )
    return slots


def _check_scalars(
    rate_hz: float,
    freq_hz: float,
    confidence: float,
    network: ReceiverNetwork,
    sample_rate_hz: float,
) -> None:
    # Written as `not (ok)` so that NaN fails every check.
    if not rate_hz == sample_rate_hz:
        raise InvalidInput(
            "sample_rate_hz",
            f"must be the network's sample rate {sample_rate_hz:g} Hz, got {rate_hz:g}",
        )
    net_freq_hz = float(network.spec.center_freq_hz)
    if not abs(freq_hz - net_freq_hz) <= CENTER_FREQ_TOLERANCE_HZ:
        raise InvalidInput(
            "center_freq_hz",
            f"must be within {CENTER_FREQ_TOLERANCE_HZ / 1e6:g} MHz of the network's "
            f"{net_freq_hz:.0f} Hz, got {freq_hz:g}",
        )
    if not 0.0 < confidence < 1.0:
        raise InvalidInput("confidence_level", f"must be in (0, 1), got {confidence:g}")


def _b64_chars(n_bytes: int) -> int:
    """Length of the padded base64 of `n_bytes` bytes."""
    return 4 * math.ceil(n_bytes / 3)


def _decode_b64(text: str, dtype: str, n_samples: int, field: str) -> np.ndarray:
    kind = sample_type(dtype)  # the schema admits only known names
    itemsize = kind.itemsize
    # Checked before decoding, so a hostile string costs no more than its length; one
    # sample of slack, as MAX_IQ_B64_CHARS, leaves near misses to the precise checks below.
    longest = _b64_chars((n_samples + 1) * itemsize)
    if len(text) > longest:
        raise InvalidInput(
            field, f"wrong sample count: {len(text)} base64 characters, far more than "
            f"{n_samples} {dtype} samples take ({_b64_chars(n_samples * itemsize)})")
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(field, f"not valid base64: {exc}") from None
    if not raw:
        raise InvalidInput(field, "is empty: no IQ samples")
    if len(raw) % itemsize:
        raise InvalidInput(
            field,
            f"decoded length {len(raw)} bytes is not a multiple of {itemsize} "
            f"(one {kind.name} I,Q sample)",
        )
    n = len(raw) // itemsize
    if n != n_samples:
        raise InvalidInput(field, f"wrong sample count: got {n} samples, expected {n_samples}")
    return kind.to_complex64(raw)


def _decode_pairs(pairs: Any, n_samples: int, field: str) -> np.ndarray:
    if not isinstance(pairs, list | tuple):
        raise InvalidInput(field, "must be a list of [I, Q] pairs")
    if not pairs:
        raise InvalidInput(field, "is empty: no IQ samples")
    if len(pairs) != n_samples:
        raise InvalidInput(
            field, f"wrong sample count: got {len(pairs)} samples, expected {n_samples}"
        )
    try:
        with np.errstate(all="ignore"):  # float32 overflow becomes inf, rejected below
            arr = np.asarray(pairs, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(field, "must be a list of [I, Q] number pairs") from None
    if arr.shape != (n_samples, 2):
        raise InvalidInput(field, "must be a list of [I, Q] number pairs")
    return np.ascontiguousarray(arr).view(np.complex64)[:, 0]


def _check_values(iq: np.ndarray, receivers: list[_RawReceiver], max_abs: float) -> None:
    # Peak |I| or |Q| per row: NaN propagates through max/min, so this finds NaN, Inf and
    # outliers; reductions only, no temporary as large as the capture.
    parts = iq.view(np.float32)
    peak = np.maximum(parts.max(axis=1), -parts.min(axis=1))
    bad = np.flatnonzero(~(peak <= max_abs))
    if bad.size:
        i = int(bad[0])
        field = f"receivers[{i}].{'iq_b64' if receivers[i][2] is not None else 'iq'}"
        if not math.isfinite(float(peak[i])):
            raise InvalidInput(field, "contains non-finite values (NaN or Inf)")
        raise InvalidInput(field, f"contains values of magnitude above {max_abs:g}")


def _canonical(iq: np.ndarray, slots: np.ndarray, rate_hz: float, freq_hz: float) -> bytes:
    """Tag, shape, slots and samples sorted by slot (little-endian), sample rate, centre freq."""
    order = np.argsort(slots, kind="stable")
    rows = iq if (order[1:] > order[:-1]).all() else iq[order]  # copy only if out of order
    return b"".join(
        (
            CANONICAL_TAG,
            np.array(iq.shape, "<i8").tobytes(),
            slots[order].astype("<i8").tobytes(),
            np.ascontiguousarray(rows, "<c8").reshape(-1).view(np.uint8).data,
            np.array([rate_hz, freq_hz], "<f8").tobytes(),
        )
    )


def decode_capture(
    req: CaptureRequest | Mapping[str, Any],
    network: ReceiverNetwork,
    *,
    n_samples: int = N_SAMPLES,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
    max_abs: float = 1e6,
) -> DecodedCapture:
    """Validate a capture (a `CaptureRequest` or its parsed-JSON dict) and decode its IQ."""
    if not isinstance(req, CaptureRequest):
        req = validate_capture(req)
    receivers, rate_hz, freq_hz, confidence = _unpack(req)
    slots = _check_receivers(receivers, network)
    _check_scalars(rate_hz, freq_hz, confidence, network, sample_rate_hz)
    iq = np.empty((len(receivers), n_samples), np.complex64)
    for i, (_, pairs, b64, dtype) in enumerate(receivers):
        if b64 is not None:
            iq[i] = _decode_b64(b64, dtype, n_samples, f"receivers[{i}].iq_b64")
        else:
            iq[i] = _decode_pairs(pairs, n_samples, f"receivers[{i}].iq")
    _check_values(iq, receivers, max_abs)
    return DecodedCapture(
        iq=iq,
        receiver_ids=[r[0] for r in receivers],
        slots=slots,
        sample_rate_hz=rate_hz,
        center_freq_hz=freq_hz,
    )


def decode_arrays(
    iq: np.ndarray,
    receiver_ids: Sequence[str],
    network: ReceiverNetwork,
    *,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
    center_freq_hz: float = float(CENTER_FREQ_HZ),
    confidence_level: float = DEFAULT_CONFIDENCE,
    max_abs: float = 1e6,
) -> DecodedCapture:
    """Validate a capture that arrives as arrays (IQ [R, S] complex64 and R receiver ids).

    The checks are `decode_capture`'s; errors name ``receivers[i].id``, ``receivers[i].iq``,
    ``receivers``, ``sample_rate_hz`` … as if the rows had come as a JSON request.
    """
    receivers: list[_RawReceiver] = [(rid, iq[i], None, "complex64")
                                     for i, rid in enumerate(receiver_ids)]
    slots = _check_receivers(receivers, network)
    _check_scalars(sample_rate_hz, center_freq_hz, confidence_level, network, SAMPLE_RATE_HZ)
    _check_values(iq, receivers, max_abs)
    return DecodedCapture(iq=iq, receiver_ids=list(receiver_ids), slots=slots,
                          sample_rate_hz=sample_rate_hz, center_freq_hz=center_freq_hz)


def iq_to_b64(row: np.ndarray, dtype: str = "complex64") -> str:
    """Base64 of one receiver's IQ in a sample type (serve_app.io.datatypes), e.g. ci16_le.

    Integer types round to the nearest code and clip at full scale (|I|, |Q| < 1).
    """
    return pybase64.b64encode(sample_type(dtype).from_complex64(row)).decode("ascii")


def encode_capture(
    iq: np.ndarray,
    receiver_ids: Sequence[str],
    *,
    form: str = "b64",
    confidence_level: float = DEFAULT_CONFIDENCE,
    **extra: Any,
) -> dict[str, Any]:
    """Build a POST /predict request dict from IQ [R, S] (complex64) and the receivers' ids.

    `form`: ``b64`` (complex64 base64), ``pairs`` (``iq``) or a dtype of `ENCODE_FORMS`.

    `extra` adds or overrides top-level fields (e.g. sample_rate_hz, session_id, cache).
    """
    arr = np.ascontiguousarray(iq, dtype=np.complex64)
    if arr.ndim != 2:
        raise ValueError(f"iq must be 2-D [receivers, samples], got shape {arr.shape}")
    if len(receiver_ids) != arr.shape[0]:
        raise ValueError(f"{len(receiver_ids)} receiver ids for {arr.shape[0]} IQ rows")
    receivers: list[dict[str, Any]] = []
    for rid, row in zip(receiver_ids, arr, strict=True):
        if form == "b64":
            receivers.append({"id": rid, "iq_b64": iq_to_b64(row)})
        elif form == "pairs":
            receivers.append({"id": rid, "iq": row.view(np.float32).reshape(-1, 2).tolist()})
        elif form in ENCODE_FORMS:
            receivers.append({"id": rid, "iq_b64": iq_to_b64(row, form), "dtype": form})
        else:
            raise ValueError(f"unknown form {form!r}; expected 'b64', 'pairs' or one of "
                             f"{', '.join(ENCODE_FORMS)}")
    body: dict[str, Any] = {
        "receivers": receivers,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "center_freq_hz": CENTER_FREQ_HZ,
        "confidence_level": confidence_level,
    }
    body.update(extra)
    return body
