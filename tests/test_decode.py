"""Unit tests of the API schemas and capture decoding (no Ray)."""

from __future__ import annotations

import base64
import copy
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serve_app.constants import N_SAMPLES
from serve_app.decode import (
    CANONICAL_TAG,
    DecodedCapture,
    decode_capture,
    decode_raw_batch,
    decode_raw_body,
    encode_capture,
    loc_to_field,
    parse_json,
    validate_capture,
)
from serve_app.errors import InvalidInput
from serve_app.receivers import ReceiverNetwork, load_network
from serve_app.schemas import (
    MAX_BATCH_CAPTURES,
    MAX_RECEIVERS,
    BatchRequest,
    CaptureRequest,
    ErrorResponse,
    PredictResponse,
    Uncertainty,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    return load_network()


def _random_iq(
    n_rx: int, n_samples: int = N_SAMPLES, seed: int = 0, scale: float = 0.05
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_rx, n_samples)) + 1j * rng.standard_normal((n_rx, n_samples))
    return (scale * z).astype(np.complex64)


@pytest.fixture(scope="module")
def iq7() -> np.ndarray:
    return _random_iq(7)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _decode_body(body: bytes, network: ReceiverNetwork) -> DecodedCapture:
    """The ingress path: validate the JSON body, then decode the model."""
    return decode_capture(decode_raw_body(body), network)


def _decode_both(request: dict[str, Any], network: ReceiverNetwork) -> list[DecodedCapture]:
    """Decode through the pydantic path and the raw-dict fast path."""
    body = orjson.dumps(request)
    return [_decode_body(body, network), decode_capture(orjson.loads(body), network)]


# --- round trips ---------------------------------------------------------------------------


def test_b64_round_trip_is_exact(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    for dec in _decode_both(encode_capture(iq7, network.ids, form="b64"), network):
        assert dec.iq.dtype == np.complex64 and dec.iq.shape == (7, N_SAMPLES)
        assert dec.iq.flags.c_contiguous
        np.testing.assert_array_equal(dec.iq, iq7)
        assert dec.receiver_ids == network.ids
        assert dec.slots.dtype == np.int64
        np.testing.assert_array_equal(dec.slots, np.arange(7))


def test_pairs_round_trip_is_exact_in_float32(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    for dec in _decode_both(encode_capture(iq7, network.ids, form="pairs"), network):
        np.testing.assert_array_equal(dec.iq, iq7)


def test_int16_round_trip_within_quantization(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    request = encode_capture(iq7, network.ids, form="int16")
    assert all(r["dtype"] == "int16" for r in request["receivers"])
    for dec in _decode_both(request, network):
        err = np.abs(dec.iq.view(np.float32) - iq7.view(np.float32)).max()
        assert err <= 0.5 / 32768 + 1e-9


def test_int16_scaling_is_exact_for_known_counts(network: ReceiverNetwork) -> None:
    counts = np.zeros((3, N_SAMPLES, 2), "<i2")
    counts[:, 0] = [-32768, 32767]
    counts[:, 1] = [16384, -1]
    receivers = [
        {"id": rid, "iq_b64": _b64(counts[i].tobytes()), "dtype": "int16"}
        for i, rid in enumerate(network.ids[:3])
    ]
    dec = _decode_body(orjson.dumps({"receivers": receivers}), network)
    assert dec.iq[0, 0] == np.complex64(-1.0 + 1j * 32767 / 32768)
    assert dec.iq[2, 1] == np.complex64(0.5 - 1j / 32768)


# Every sample type of the API (SigMF names), its step and its known-code decodings.
DTYPE_STEPS = {"cf32_le": 0.0, "complex64": 0.0, "ci16_le": 1 / 32768, "int16": 1 / 32768,
               "ci8": 1 / 128, "cu8": 1 / 128}
KNOWN_CODES = [
    ("ci16_le", "<i2", [-32768, 32767, 1, 0], [-1.0, 32767 / 32768, 1 / 32768, 0.0]),
    ("ci8", "i1", [-128, 127, 64, -1], [-1.0, 127 / 128, 0.5, -1 / 128]),
    ("cu8", "u1", [0, 255, 127, 128], [-127.5 / 128, 127.5 / 128, -0.5 / 128, 0.5 / 128]),
]


@pytest.mark.parametrize("dtype", list(DTYPE_STEPS))
def test_every_dtype_round_trip_within_half_a_step(
    network: ReceiverNetwork, iq7: np.ndarray, dtype: str
) -> None:
    request = encode_capture(iq7, network.ids, form=dtype)
    assert all(r["dtype"] == dtype for r in request["receivers"])
    for dec in _decode_both(request, network):
        err = np.abs(dec.iq.view(np.float32) - iq7.view(np.float32)).max()
        assert err <= DTYPE_STEPS[dtype] / 2 * (1 + 1e-6)


@pytest.mark.parametrize(("dtype", "component", "codes", "values"), KNOWN_CODES,
                         ids=[c[0] for c in KNOWN_CODES])
def test_integer_dtypes_decode_known_codes_exactly(
    network: ReceiverNetwork, dtype: str, component: str, codes: list[int], values: list[float]
) -> None:
    raw = np.zeros(2 * N_SAMPLES, component)
    raw[: len(codes)] = codes
    rx = {"iq_b64": _b64(raw.tobytes()), "dtype": dtype}
    dec = _decode_body(orjson.dumps({"receivers": [{"id": rid, **rx}
                                                   for rid in network.ids[:3]]}), network)
    np.testing.assert_array_equal(dec.iq[0, :2].view(np.float32), np.float32(values))


def test_cu8_midpoint_is_zero_so_full_range_codes_average_to_zero(network: ReceiverNetwork
                                                                  ) -> None:
    codes = np.tile(np.arange(256, dtype=np.uint8), 2 * N_SAMPLES // 256 + 1)[: 2 * N_SAMPLES]
    rx = {"iq_b64": _b64(codes.tobytes()), "dtype": "cu8"}
    dec = _decode_body(orjson.dumps({"receivers": [{"id": rid, **rx}
                                                   for rid in network.ids[:3]]}), network)
    parts = dec.iq[0].view(np.float32)[: 256 * (2 * N_SAMPLES // 256)]  # whole 0..255 cycles
    assert float(parts.mean()) == 0.0
    assert parts.min() == -parts.max()


def test_aliases_decode_like_their_sigmf_names(network: ReceiverNetwork, iq7: np.ndarray
                                               ) -> None:
    for alias, name in (("complex64", "cf32_le"), ("int16", "ci16_le")):
        a, b = (decode_capture(encode_capture(iq7, network.ids, form=f), network)
                for f in (alias, name))
        np.testing.assert_array_equal(a.iq, b.iq)
        assert a.canonical == b.canonical  # the same cache key


@pytest.mark.parametrize("dtype", ["ci16_le", "ci8", "cu8"])
@pytest.mark.parametrize("amplitude", [0.9, 0.1, 0.02])
def test_power_dbm_same_from_every_dtype_within_quantisation(
    network: ReceiverNetwork, dtype: str, amplitude: float
) -> None:
    """10·log10(mean|iq|²) + calibration_db of a tone: each type against complex64."""
    rng = np.random.default_rng(11)
    t = np.arange(N_SAMPLES) / 48_000
    phase = 2 * np.pi * rng.uniform(300, 3000, (3, 1)) * t + rng.uniform(0, 6.3, (3, 1))
    iq = (amplitude * np.exp(1j * phase)).astype(np.complex64)
    ids = network.ids[:3]
    cal = network.calibration_db[:3]

    def power_dbm(form: str) -> np.ndarray:
        dec = decode_capture(encode_capture(iq, ids, form=form), network)
        return 10 * np.log10(np.mean(np.abs(dec.iq.astype(np.complex128)) ** 2, axis=1)) + cal

    # Each component is off by at most step/2, |error| <= step/sqrt(2): the power of a tone
    # of amplitude A is within 20·log10(1 ± step/(sqrt(2)·A)) of the exact one.
    bound_db = 20 * np.log10(1 + DTYPE_STEPS[dtype] / (np.sqrt(2) * amplitude))
    diff = np.abs(power_dbm(dtype) - power_dbm("cf32_le"))
    assert diff.max() <= bound_db, (diff, bound_db)


def test_subset_in_any_order_keeps_request_order_and_slots(network: ReceiverNetwork) -> None:
    ids = ["genova", "torino", "milano", "coazze"]
    iq = _random_iq(4, seed=3)
    dec = _decode_body(orjson.dumps(encode_capture(iq, ids)), network)
    assert dec.receiver_ids == ids
    np.testing.assert_array_equal(dec.slots, [network.index(r) for r in ids])
    np.testing.assert_array_equal(dec.iq, iq)


def test_canonical_bytes_identical_for_b64_and_pairs(
    network: ReceiverNetwork, iq7: np.ndarray
) -> None:
    a = _decode_body(orjson.dumps(encode_capture(iq7, network.ids, form="b64")), network)
    b = _decode_body(orjson.dumps(encode_capture(iq7, network.ids, form="pairs")), network)
    c = decode_capture(encode_capture(iq7, network.ids, form="pairs"), network)
    assert a.canonical == b.canonical == c.canonical
    assert a.canonical.startswith(CANONICAL_TAG)


def test_canonical_bytes_independent_of_receiver_order(
    network: ReceiverNetwork, iq7: np.ndarray
) -> None:
    perm = np.random.default_rng(1).permutation(7)
    ids = [network.ids[i] for i in perm]
    shuffled = decode_capture(encode_capture(iq7[perm], ids), network)
    ordered = decode_capture(encode_capture(iq7, network.ids), network)
    assert shuffled.receiver_ids == ids
    assert shuffled.canonical == ordered.canonical
    mixed = encode_capture(iq7, network.ids, form="b64")
    mixed["receivers"][2:5] = encode_capture(iq7[2:5], network.ids[2:5], form="pairs")["receivers"]
    mixed["receivers"].reverse()
    assert decode_capture(mixed, network).canonical == ordered.canonical


def test_canonical_bytes_change_with_content(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    base = decode_capture(encode_capture(iq7, network.ids), network).canonical
    changed = iq7.copy()
    changed[3, 17] += np.complex64(1e-3)
    assert decode_capture(encode_capture(changed, network.ids), network).canonical != base
    freq = encode_capture(iq7, network.ids, center_freq_hz=145_600_000)
    assert decode_capture(freq, network).canonical != base
    subset = decode_capture(encode_capture(iq7[:6], network.ids[:6]), network).canonical
    assert subset != base
    # confidence level is a postprocessing parameter, not part of the capture
    conf = encode_capture(iq7, network.ids, confidence_level=0.5)
    assert decode_capture(conf, network).canonical == base


def test_request_defaults_and_encode_extra(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    request = encode_capture(
        iq7[:3],
        network.ids[:3],
        confidence_level=0.68,
        session_id="abc",
        cache=False,
        model_version="3",
    )
    req = decode_raw_body(orjson.dumps(request))
    assert (req.confidence_level, req.session_id, req.cache, req.model_version) == (
        0.68,
        "abc",
        False,
        "3",
    )
    minimal = {"receivers": [{"id": r["id"], "iq_b64": r["iq_b64"]} for r in request["receivers"]]}
    req = decode_raw_body(orjson.dumps(minimal))
    assert (req.sample_rate_hz, req.center_freq_hz, req.confidence_level, req.cache) == (
        48000,
        145.5e6,
        0.95,
        True,
    )
    assert req.receivers[0].dtype == "complex64"
    with pytest.raises(ValueError):
        encode_capture(iq7, network.ids[:3])
    with pytest.raises(ValueError):
        encode_capture(iq7, network.ids, form="hex")  # type: ignore[arg-type]


def test_b64_decode_is_fast(network: ReceiverNetwork, iq7: np.ndarray) -> None:
    req = decode_raw_body(orjson.dumps(encode_capture(iq7, network.ids)))
    best_s = min(timeit.repeat(lambda: decode_capture(req, network), number=5, repeat=20)) / 5
    assert best_s < 1e-3, f"decode took {best_s * 1e3:.3f} ms"


# --- bad input: every class names its field --------------------------------------------------

Mutator = Callable[[dict[str, Any]], None]


def _set_rx(i: int, **kv: Any) -> Mutator:
    def mutate(req: dict[str, Any]) -> None:
        req["receivers"][i].update(kv)

    return mutate


def _set(**kv: Any) -> Mutator:
    def mutate(req: dict[str, Any]) -> None:
        req.update(kv)

    return mutate


def _with_iq(i: int, value: complex, form: str = "b64", n: int = N_SAMPLES) -> Mutator:
    def mutate(req: dict[str, Any]) -> None:
        iq = _random_iq(1, n, seed=9)
        iq[0, min(100, n - 1)] = value
        rid = req["receivers"][i]["id"]
        req["receivers"][i] = encode_capture(iq, [rid], form=form)["receivers"][0]  # type: ignore[arg-type]

    return mutate


def _drop_to(n: int) -> Mutator:
    def mutate(req: dict[str, Any]) -> None:
        del req["receivers"][n:]

    return mutate


def _odd_pair(req: dict[str, Any]) -> None:
    req["receivers"][0]["iq"][5] = [1.0, 2.0, 3.0]


def _duplicate(req: dict[str, Any]) -> None:
    req["receivers"][3]["id"] = req["receivers"][1]["id"]


def _both(req: dict[str, Any]) -> None:
    req["receivers"][0]["iq"] = [[0.0, 0.0]] * N_SAMPLES


def _neither(req: dict[str, Any]) -> None:
    del req["receivers"][0]["iq_b64"]


def _too_many_receivers(req: dict[str, Any]) -> None:
    req["receivers"] = req["receivers"] * 5


# (case id, request form, mutation, expected field, message fragment, checked on JSON body)
BAD_CASES: list[tuple[str, str, Mutator, str, str]] = [
    ("unknown-receiver", "b64", _set_rx(2, id="atlantis"), "receivers[2].id", "unknown receiver"),
    ("two-receivers", "b64", _drop_to(2), "receivers", "at least 3"),
    ("duplicate-receiver", "b64", _duplicate, "receivers[3].id", "duplicate receiver"),
    ("bad-base64", "b64", _set_rx(1, iq_b64="!!not*base64!!"), "receivers[1].iq_b64", "base64"),
    ("bad-base64-padding", "b64", _set_rx(1, iq_b64="QUJD="), "receivers[1].iq_b64", "base64"),
    (
        "odd-byte-length",
        "b64",
        _set_rx(4, iq_b64=_b64(bytes(N_SAMPLES * 8 + 3))),
        "receivers[4].iq_b64",
        "multiple of 8",
    ),
    (
        "int16-odd-byte-length",
        "b64",
        _set_rx(4, iq_b64=_b64(bytes(N_SAMPLES * 4 + 2)), dtype="int16"),
        "receivers[4].iq_b64",
        "multiple of 4",
    ),
    ("odd-iq-pair", "pairs", _odd_pair, "receivers[0].iq", ""),
    ("nan-b64", "b64", _with_iq(4, complex(np.nan, 0)), "receivers[4].iq_b64", "non-finite"),
    ("inf-b64", "b64", _with_iq(5, complex(0, np.inf)), "receivers[5].iq_b64", "non-finite"),
    ("huge-b64", "b64", _with_iq(6, 1e7 + 0j), "receivers[6].iq_b64", "magnitude"),
    ("huge-pairs", "pairs", _with_iq(6, 1e7 + 0j, "pairs"), "receivers[6].iq", "magnitude"),
    ("empty-b64", "b64", _set_rx(2, iq_b64=""), "receivers[2].iq_b64", "empty"),
    ("empty-pairs", "pairs", _set_rx(2, iq=[]), "receivers[2].iq", "empty"),
    (
        "short-b64",
        "b64",
        _with_iq(3, 0j, n=N_SAMPLES - 1),
        "receivers[3].iq_b64",
        f"got {N_SAMPLES - 1} samples, expected {N_SAMPLES}",
    ),
    (
        "long-pairs",
        "pairs",
        _with_iq(3, 0j, "pairs", n=N_SAMPLES + 7),
        "receivers[3].iq",
        f"got {N_SAMPLES + 7} samples, expected {N_SAMPLES}",
    ),
    ("sample-rate", "b64", _set(sample_rate_hz=44100), "sample_rate_hz", "48000"),
    ("center-freq", "b64", _set(center_freq_hz=147.6e6), "center_freq_hz", "1 MHz"),
    ("confidence-0", "b64", _set(confidence_level=0), "confidence_level", ""),
    ("confidence-1.5", "b64", _set(confidence_level=1.5), "confidence_level", ""),
    ("receivers-not-list", "b64", _set(receivers="x"), "receivers", ""),
    ("receiver-not-object", "b64", _set(receivers=[5, 6, 7]), "receivers[0]", ""),
    ("id-not-string", "b64", _set_rx(1, id=17), "receivers[1].id", ""),
    ("both-iq-forms", "b64", _both, "receivers[0].iq_b64", "exactly one"),
    ("no-iq", "b64", _neither, "receivers[0].iq", "one of"),
    ("int16-pairs", "pairs", _set_rx(0, dtype="int16"), "receivers[0].dtype", "iq_b64"),
    ("cu8-pairs", "pairs", _set_rx(0, dtype="cu8"), "receivers[0].dtype", "iq_b64"),
    ("bad-dtype", "b64", _set_rx(0, dtype="float64"), "receivers[0].dtype", ""),
    ("sigmf-dtype-unsupported", "b64", _set_rx(1, dtype="cf64_le"), "receivers[1].dtype",
     "'cu8'"),
    (
        "ci8-odd-byte-length",
        "b64",
        _set_rx(4, iq_b64=_b64(bytes(N_SAMPLES * 2 + 1)), dtype="ci8"),
        "receivers[4].iq_b64",
        "multiple of 2",
    ),
    (
        "cu8-short",
        "b64",
        _set_rx(4, iq_b64=_b64(bytes(N_SAMPLES * 2 - 2)), dtype="cu8"),
        "receivers[4].iq_b64",
        f"got {N_SAMPLES - 1} samples",
    ),
    ("extra-field", "b64", _set(colour="blue"), "colour", ""),
    ("extra-receiver-field", "b64", _set_rx(1, gain=3), "receivers[1].gain", ""),
    ("too-many-receivers", "b64", _too_many_receivers, "receivers", str(MAX_RECEIVERS)),
    ("model-version", "b64", _set(model_version="latest"), "model_version", ""),
    ("session-too-long", "b64", _set(session_id="s" * 129), "session_id", ""),
]


@pytest.fixture(scope="module")
def valid_requests(network: ReceiverNetwork, iq7: np.ndarray) -> dict[str, dict[str, Any]]:
    return {form: encode_capture(iq7, network.ids, form=form) for form in ("b64", "pairs")}


@pytest.mark.parametrize(
    ("form", "mutate", "field", "fragment"),
    [c[1:] for c in BAD_CASES],
    ids=[c[0] for c in BAD_CASES],
)
def test_bad_input_names_field(
    network: ReceiverNetwork,
    valid_requests: dict[str, Any],
    form: str,
    mutate: Mutator,
    field: str,
    fragment: str,
) -> None:
    request = copy.deepcopy(valid_requests[form])
    mutate(request)
    body = orjson.dumps(request)  # NaN/Inf only reach the JSON through iq_b64
    with pytest.raises(InvalidInput) as body_exc:
        _decode_body(body, network)
    with pytest.raises(InvalidInput) as dict_exc:
        decode_capture(orjson.loads(body), network)
    for exc in (body_exc.value, dict_exc.value):
        assert exc.field == field or exc.field.startswith(field + "["), exc
        assert fragment in exc.message, exc
        assert exc.status_code == 422
    if fragment == "unknown receiver":
        assert all(rid in body_exc.value.message for rid in network.ids)


@pytest.mark.parametrize("value", [complex(np.nan, 0), complex(0, -np.inf), complex(np.inf, 1)])
def test_non_finite_pairs_from_python_are_rejected(
    network: ReceiverNetwork, iq7: np.ndarray, value: complex
) -> None:
    iq = iq7.copy()
    iq[2, 4000] = value
    request = encode_capture(iq, network.ids, form="pairs")
    for req in (CaptureRequest.model_validate(request), request):
        with pytest.raises(InvalidInput) as exc:
            decode_capture(req, network)
        assert exc.value.field == "receivers[2].iq"
        assert "non-finite" in exc.value.message


def test_odd_pair_error_from_pydantic(valid_requests: dict[str, Any]) -> None:
    request = copy.deepcopy(valid_requests["pairs"])
    _odd_pair(request)
    with pytest.raises(InvalidInput) as exc:
        decode_raw_body(orjson.dumps(request))
    assert exc.value.field == "receivers[0].iq[5]"
    assert "at most 2" in exc.value.message


def test_center_freq_within_tolerance_is_accepted(
    network: ReceiverNetwork, iq7: np.ndarray
) -> None:
    request = encode_capture(iq7, network.ids, center_freq_hz=145_500_000 - 999_000)
    for dec in _decode_both(request, network):
        assert dec.iq.shape == (7, N_SAMPLES)


@pytest.mark.parametrize(
    "body", [b"", b"{", b"not json", b'{"receivers": [}', b"\xff\xfe", b"[" * 3000]
)
def test_malformed_json_is_400_on_body(body: bytes) -> None:
    for parse in (decode_raw_body, parse_json):
        with pytest.raises(InvalidInput) as exc:
            parse(body)
        assert (exc.value.field, exc.value.status_code) == ("body", 400)


def _batch_body_with(capture: dict[str, Any], field: str, raw: bytes) -> bytes:
    """A one-capture batch body whose capture ends with `"field": raw` (raw JSON text)."""
    body = orjson.dumps({"captures": [capture]})
    assert body.endswith(b"}]}")
    return body[:-3] + b', "' + field.encode() + b'": ' + raw + b"}]}"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_literals_are_400_on_body(valid_requests: dict[str, Any],
                                                  literal: bytes) -> None:
    body = _batch_body_with(valid_requests["b64"], "confidence_level", literal)
    with pytest.raises(InvalidInput) as exc:
        decode_raw_batch(body)
    assert (exc.value.field, exc.value.status_code) == ("body", 400)


@pytest.mark.parametrize(("field", "number"), [("confidence_level", b"1e999"),
                                               ("sample_rate_hz", b"-1e400")])
def test_numbers_beyond_a_double_are_refused_on_their_field(
        valid_requests: dict[str, Any], field: str, number: bytes) -> None:
    [item] = decode_raw_batch(_batch_body_with(valid_requests["b64"], field, number))
    assert isinstance(item, InvalidInput)
    assert (item.field, item.status_code) == (f"captures[0].{field}", 422)


@pytest.mark.parametrize("body", [b"[]", b"42", b'"x"', b"null", b"{}"])
def test_wrong_top_level_is_422(network: ReceiverNetwork, body: bytes) -> None:
    with pytest.raises(InvalidInput) as exc:
        decode_raw_body(body)
    assert exc.value.status_code == 422
    assert exc.value.field in ("body", "receivers")
    with pytest.raises(InvalidInput):
        decode_capture(orjson.loads(body), network)


def test_oversize_body_is_413() -> None:
    with pytest.raises(InvalidInput) as exc:
        decode_raw_body(b" " * 101, max_body_bytes=100)
    assert (exc.value.field, exc.value.status_code) == ("body", 413)


# --- batches ---------------------------------------------------------------------------------


def test_batch_items_fail_independently(
    network: ReceiverNetwork, valid_requests: dict[str, Any]
) -> None:
    bad = copy.deepcopy(valid_requests["b64"])
    bad["receivers"][1]["iq_b64"] = 12
    good = valid_requests["b64"]
    items = decode_raw_batch(orjson.dumps({"captures": [good, bad, good, {"receivers": "x"}]}))
    assert [type(x) for x in items] == [CaptureRequest, InvalidInput, CaptureRequest, InvalidInput]
    assert isinstance(items[1], InvalidInput) and isinstance(items[3], InvalidInput)
    assert items[1].field == "captures[1].receivers[1].iq_b64"
    assert items[3].field == "captures[3].receivers"
    assert isinstance(items[2], CaptureRequest)
    assert decode_capture(items[2], network).iq.shape == (7, N_SAMPLES)


def test_too_many_batch_items(valid_requests: dict[str, Any]) -> None:
    small = {"receivers": valid_requests["b64"]["receivers"][:3]}
    captures = [small] * (MAX_BATCH_CAPTURES + 1)
    with pytest.raises(InvalidInput) as exc:
        decode_raw_batch(orjson.dumps({"captures": captures}))
    assert exc.value.field == "captures" and str(MAX_BATCH_CAPTURES) in exc.value.message
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"captures": captures})
    assert len(BatchRequest.model_validate({"captures": captures[:-1]}).captures) == 64


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "body"),
        (b'{"captures": []}', "captures"),
        (b'{"captures": 3}', "captures"),
        (b"{}", "captures"),
        (b'{"captures": [{}], "x": 1}', "x"),
        (b"{", "body"),
    ],
)
def test_bad_batch_envelope(body: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        decode_raw_batch(body)
    assert exc.value.field == field


# --- schemas ---------------------------------------------------------------------------------


def test_loc_to_field() -> None:
    assert loc_to_field(("receivers", 2, "iq_b64")) == "receivers[2].iq_b64"
    assert loc_to_field(("receivers", 0, "iq", 5, 2)) == "receivers[0].iq[5][2]"
    assert loc_to_field(()) == "body"
    assert loc_to_field(("receivers",), prefix="captures[3]") == "captures[3].receivers"


def test_validate_capture_prefix(valid_requests: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as exc:
        validate_capture({**valid_requests["b64"], "confidence_level": 2}, prefix="captures[7]")
    assert exc.value.field == "captures[7].confidence_level"


def test_response_models_round_trip() -> None:
    example = {
        "position": {"latitude": 45.1, "longitude": 8.2},
        "uncertainty": {
            "sigma_x": 12000.0,
            "sigma_y": 9000.0,
            "rho": 0.2,
            "theta": 31.0,
            "semi_major_m": 30000.0,
            "semi_minor_m": 21000.0,
            "orientation_deg": 59.0,
            "confidence_level": 0.95,
            "area_m2": 1.9e9,
        },
        "geojson": {"type": "FeatureCollection", "features": []},
        "receivers_used": ["torino", "milano"],
        "model": {"name": "localization_model", "version": "3", "alias": "production",
                  "sha256": "ab" * 32},
        "cache_hit": False,
        "timing_ms": {"preprocess": 0.8, "inference": 0.2, "postprocess": 0.3, "total": 4.1},
        "request_id": "r-1",
        "timestamp": "2026-11-27T10:00:00Z",
    }
    resp = PredictResponse.model_validate(example)
    dumped = orjson.loads(resp.model_dump_json())
    assert dumped["timestamp"] == "2026-11-27T10:00:00Z"
    assert dumped["model"] == example["model"]
    assert PredictResponse.model_validate(dumped) == resp
    for name, info in Uncertainty.model_fields.items():
        assert info.description, name
    assert "counter-clockwise from east" in (Uncertainty.model_fields["theta"].description or "")
    assert "clockwise from north" in (Uncertainty.model_fields["orientation_deg"].description or "")


def test_http_error_of_invalid_input_matches_the_schema() -> None:
    from serve_app.errors import http_error

    status, body, headers = http_error(InvalidInput("receivers[1].id", "unknown receiver 'x'"))
    assert status == 422 and headers == {}
    assert ErrorResponse.model_validate(body).model_dump() == body == {
        "error": {"field": "receivers[1].id", "message": "unknown receiver 'x'", "status": 422}
    }


def test_openapi_schema_builds() -> None:
    schema = CaptureRequest.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["receivers"]["maxItems"] == MAX_RECEIVERS
    BatchRequest.model_json_schema()
    PredictResponse.model_json_schema()


# --- fuzzing: only InvalidInput ever escapes -------------------------------------------------


def _only_invalid(fn: Callable[[], Any]) -> Any:
    try:
        result = fn()
    except InvalidInput as exc:
        assert exc.field and isinstance(exc.message, str)
        assert exc.status_code in (400, 413, 422)
        event(f"InvalidInput {exc.status_code}")
        return None
    event("accepted")
    return result


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)

FUZZ_SAMPLES = 8  # small sample count so random payloads sometimes have the right size


def _ids(network: ReceiverNetwork) -> st.SearchStrategy[str]:
    return st.sampled_from(network.ids) | st.text(max_size=8)


floats_any = st.floats(allow_nan=True, allow_infinity=True, width=64)
pair_lists = st.lists(
    st.lists(floats_any | st.integers(-(2**70), 2**70), min_size=0, max_size=3),
    min_size=0,
    max_size=FUZZ_SAMPLES + 2,
)
# Byte counts around the valid ones (8 samples: 64 bytes complex64, 32 bytes int16).
_sizes = st.sampled_from([0, 1, 4, 8, 31, 32, 33, 36, 63, 64, 65, 72])
b64_payloads = (
    _sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n)).map(_b64)
    | st.lists(
        st.floats(width=32), min_size=2 * FUZZ_SAMPLES - 2, max_size=2 * FUZZ_SAMPLES + 2
    ).map(lambda xs: _b64(np.array(xs, "<f4").tobytes()))
    | st.text(alphabet="ABCDEFGHabcdefgh0123456789+/=\n -_é", max_size=90)
)


@st.composite
def raw_captures(draw: st.DrawFn, network: ReceiverNetwork) -> dict[str, Any]:
    receivers = []
    for _ in range(draw(st.integers(0, 9))):
        rx: dict[str, Any] = {"id": draw(_ids(network))}
        kind = draw(st.sampled_from(["b64", "pairs", "both", "none", "junk"]))
        if kind in ("b64", "both"):
            rx["iq_b64"] = draw(b64_payloads)
        if kind in ("pairs", "both"):
            rx["iq"] = draw(pair_lists)
        if kind == "junk":
            rx[draw(st.sampled_from(["iq", "iq_b64", "dtype", "id", "x"]))] = draw(json_values)
        if draw(st.booleans()):
            rx["dtype"] = draw(st.sampled_from(["complex64", "int16", "ci8", "cu8", "float"]))
        receivers.append(rx)
    request: dict[str, Any] = {"receivers": receivers}
    if draw(st.booleans()):
        request["sample_rate_hz"] = draw(st.sampled_from([48000, 44100.0, -1, "48000"]))
    if draw(st.booleans()):
        request["confidence_level"] = draw(floats_any)
    if draw(st.booleans()):
        request[draw(st.sampled_from(["center_freq_hz", "cache", "model_version", "zz"]))] = draw(
            json_values
        )
    return request


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_decode_raw_body_random_bytes(data: bytes) -> None:
    _only_invalid(lambda: decode_raw_body(data))
    _only_invalid(lambda: decode_raw_batch(data))


@FUZZ
@given(json_values)
def test_fuzz_random_json_documents(network: ReceiverNetwork, value: Any) -> None:
    body = orjson.dumps(value)
    _only_invalid(lambda: decode_capture(decode_raw_body(body), network))
    _only_invalid(lambda: decode_capture(value, network))
    _only_invalid(lambda: decode_raw_batch(body))


@FUZZ
@given(st.data())
def test_fuzz_decode_capture_random_receivers(
    network: ReceiverNetwork, data: st.DataObject
) -> None:
    request = data.draw(raw_captures(network))
    for decoded in (
        _only_invalid(lambda: decode_capture(request, network, n_samples=FUZZ_SAMPLES)),
        _only_invalid(
            lambda: decode_capture(validate_capture(request), network, n_samples=FUZZ_SAMPLES)
        ),
    ):
        if decoded is not None:
            assert decoded.iq.shape == (len(request["receivers"]), FUZZ_SAMPLES)
            assert np.isfinite(decoded.iq).all()
    try:
        body = orjson.dumps(request)
    except orjson.JSONEncodeError:  # e.g. integers beyond 64 bits
        return
    _only_invalid(lambda: decode_capture(decode_raw_body(body), network, n_samples=FUZZ_SAMPLES))


@FUZZ
@given(b64_payloads, st.sampled_from(list(DTYPE_STEPS)), st.integers(0, 2))
def test_fuzz_iq_b64_payloads(network: ReceiverNetwork, payload: str, dtype: str, row: int) -> None:
    iq = _random_iq(3, FUZZ_SAMPLES, seed=2)
    request = encode_capture(iq, network.ids[:3])
    request["receivers"][row].update(iq_b64=payload, dtype=dtype)
    decoded = _only_invalid(lambda: decode_capture(request, network, n_samples=FUZZ_SAMPLES))
    if decoded is not None:
        assert decoded.iq.shape == (3, FUZZ_SAMPLES)


@FUZZ
@given(pair_lists, st.integers(0, 2))
def test_fuzz_iq_pair_shapes(network: ReceiverNetwork, pairs: list[list[Any]], row: int) -> None:
    request = encode_capture(_random_iq(3, FUZZ_SAMPLES, seed=4), network.ids[:3], form="pairs")
    request["receivers"][row]["iq"] = pairs
    decoded = _only_invalid(lambda: decode_capture(request, network, n_samples=FUZZ_SAMPLES))
    model = _only_invalid(lambda: validate_capture(request))
    if model is not None:
        _only_invalid(lambda: decode_capture(model, network, n_samples=FUZZ_SAMPLES))
    if decoded is not None:
        np.testing.assert_array_equal(
            decoded.iq[row].view(np.float32).reshape(-1, 2), np.asarray(pairs, np.float32)
        )


def test_odd_extra_keys_are_quoted(network: ReceiverNetwork) -> None:
    for obj in ({"": 1}, {"a.b": 1}):
        with pytest.raises(InvalidInput) as raw_exc:
            decode_capture(obj, network)
        with pytest.raises(InvalidInput) as body_exc:
            decode_raw_body(orjson.dumps(obj))
        key = next(iter(obj))
        assert raw_exc.value.field == body_exc.value.field == f'["{key}"]'


def test_reported_field_does_not_depend_on_pydantics_error_order() -> None:
    from pydantic import ValidationError

    from serve_app.decode import validation_error_to_invalid

    line_errors = [
        {"type": "missing", "loc": ("receivers",), "input": {}},
        {"type": "less_than", "loc": ("confidence_level",), "input": 2, "ctx": {"lt": 1.0}},
        {"type": "extra_forbidden", "loc": ("reciever",), "input": 1},
        {"type": "missing", "loc": ("receivers", 1, "id"), "input": {}},
    ]
    fields = set()
    for errors in (line_errors, line_errors[::-1], line_errors[1:], line_errors[:2][::-1]):
        exc = ValidationError.from_exception_data("CaptureRequest", errors)
        fields.add((len(errors), validation_error_to_invalid(exc).field))
    # An unknown key first; then fields in declaration order, whatever order pydantic used.
    assert fields == {(4, "reciever"), (3, "reciever"), (2, "receivers")}
    for body in (b'{"reciever": [], "confidence_level": 2}', b'{"confidence_level": 2}'):
        with pytest.raises(InvalidInput) as exc_info:
            decode_raw_body(body)
        assert exc_info.value.field == ("reciever" if b"reciever" in body else "receivers")


def test_batch_item_errors_are_prefixed_once() -> None:
    from serve_app.errors import batch_item_error, error_body

    exc = InvalidInput("receivers[1].iq_b64", "bad base64")
    assert error_body(exc) == {"field": "receivers[1].iq_b64", "message": "bad base64",
                               "status": 422}
    assert error_body(exc, 3)["field"] == "captures[3].receivers[1].iq_b64"
    err = {"field": "receivers", "message": "only 2 detected", "status": 422}
    assert batch_item_error(err, 0)["field"] == "captures[0].receivers"
    assert batch_item_error({**err, "field": None}, 0)["field"] is None
