"""Size limits refuse oversize input before the heavy work (no Ray: the decoding core)."""

from __future__ import annotations

import base64
import json
import time

import orjson
import pytest

import serve_app.decode
from serve_app.constants import N_SAMPLES
from serve_app.decode import (
    CAPTURE_MAX_ARRAYS,
    CAPTURE_MAX_OBJECTS,
    decode_capture,
    decode_raw_batch,
    decode_raw_body,
    validate_capture,
)
from serve_app.errors import InvalidInput
from serve_app.schemas import (
    MAX_BATCH_CAPTURES,
    MAX_CAPTURE_BODY_BYTES,
    MAX_IQ_B64_CHARS,
    MAX_IQ_SAMPLE_BYTES,
    MAX_RECEIVERS,
)


def _refusal(fn, body) -> tuple[InvalidInput, float]:
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput) as exc:
        fn(body)
    return exc.value, time.perf_counter() - t0


def _parse_s(body: bytes) -> float:
    t0 = time.perf_counter()
    orjson.loads(body)
    return time.perf_counter() - t0


def test_millions_of_iq_pairs_are_refused_before_parsing():
    pairs = [[0.001, -0.002]] * 300_000
    body = orjson.dumps({"receivers": [{"id": i, "iq": pairs}
                                       for i in ("torino", "milano", "genova")]})
    exc, refuse_s = _refusal(decode_raw_body, body)
    assert (exc.status_code, exc.field) == (413, "body") and "samples" in exc.message
    assert refuse_s < _parse_s(body) / 5, "refused by counting, not by parsing"


def test_a_million_receivers_are_refused_before_parsing():
    body = b'{"receivers": [' + b",".join([b'{"id":"a","iq_b64":"AAAA"}'] * 300_000) + b"]}"
    exc, refuse_s = _refusal(decode_raw_body, body)
    assert (exc.status_code, exc.field) == (413, "body")
    assert refuse_s < _parse_s(body) / 5


def test_a_million_batch_captures_are_refused_before_parsing():
    body = b'{"captures": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    exc, refuse_s = _refusal(decode_raw_batch, body)
    assert (exc.status_code, exc.field) == (413, "body")
    assert refuse_s < _parse_s(body) / 5


def test_moderate_excess_still_gets_the_precise_field_error(network):
    rx = {"id": "torino", "iq_b64": "AAAA"}
    exc, _ = _refusal(decode_raw_body, orjson.dumps({"receivers": [rx] * (MAX_RECEIVERS + 1)}))
    assert (exc.status_code, exc.field) == (422, "receivers")
    long = [{"id": i, "iq": [[0.0, 0.0]] * (N_SAMPLES + 1)} for i in ("torino", "milano", "genova")]
    exc, _ = _refusal(lambda b: decode_capture(decode_raw_body(b), network),
                      orjson.dumps({"receivers": long}))
    assert (exc.status_code, exc.field) == (422, "receivers[0].iq")
    exc, _ = _refusal(decode_raw_batch, orjson.dumps({"captures": [{}] * (MAX_BATCH_CAPTURES + 1)}))
    assert exc.field == "captures"


def test_the_largest_valid_shape_passes_the_bracket_count():
    # MAX_RECEIVERS receivers of N_SAMPLES pairs each, with brackets in the strings as well.
    rx = {"id": "[{" * 32, "iq": [[0.0, 0.0]] * N_SAMPLES}
    body = orjson.dumps({"receivers": [rx] * MAX_RECEIVERS, "session_id": "[{" * 64})
    assert body.count(b"[") <= 1 + CAPTURE_MAX_ARRAYS
    assert body.count(b"{") <= 1 + CAPTURE_MAX_OBJECTS
    req = decode_raw_body(body)  # pydantic accepts the shape; decode_capture judges the ids
    assert len(req.receivers) == MAX_RECEIVERS


def test_str_bodies_are_counted_too():
    body = orjson.dumps({"receivers": [{"id": "a", "iq_b64": "AAAA"}] * 10_000}).decode()
    exc, _ = _refusal(decode_raw_body, body)
    assert (exc.status_code, exc.field) == (413, "body")


def test_iq_b64_limit_is_the_largest_valid_capture_plus_one_sample():
    assert len(base64.b64encode(bytes((N_SAMPLES + 1) * MAX_IQ_SAMPLE_BYTES))) == MAX_IQ_B64_CHARS
    assert len(base64.b64encode(bytes(N_SAMPLES * MAX_IQ_SAMPLE_BYTES))) == 51_200


@pytest.mark.parametrize("path", ["model", "dict"])
def test_a_long_iq_b64_is_refused_before_it_is_decoded(network, sample_requests, path,
                                                       monkeypatch):
    good = sample_requests["b64"][0]
    decoded = []
    real = serve_app.decode.pybase64.b64decode
    monkeypatch.setattr(serve_app.decode.pybase64, "b64decode",
                        lambda text, **kw: decoded.append(len(text)) or real(text, **kw))
    for chars in (MAX_IQ_B64_CHARS + 4, 45 * 1000 * 1000):
        rx = [{**good["receivers"][0], "iq_b64": "A" * chars}, *good["receivers"][1:]]
        body = {**good, "receivers": rx}
        with pytest.raises(InvalidInput) as exc:
            decode_capture(validate_capture(body) if path == "model" else body, network)
        assert (exc.value.status_code, exc.value.field) == (422, "receivers[0].iq_b64")
    assert all(n <= MAX_IQ_B64_CHARS for n in decoded), decoded  # only the good receivers


def test_a_near_miss_still_gets_the_precise_message(network, sample_requests):
    good = sample_requests["b64"][0]
    one_more = base64.b64encode(bytes((N_SAMPLES + 1) * 8)).decode()
    body = {**good, "receivers": [{**good["receivers"][0], "iq_b64": one_more},
                                  *good["receivers"][1:]]}
    with pytest.raises(InvalidInput) as exc:
        decode_capture(body, network)
    assert f"got {N_SAMPLES + 1} samples" in exc.value.message


def test_the_largest_valid_capture_fits_the_predict_body_limit():
    # 32 receivers x 4,800 [I, Q] pairs of full-precision doubles, indented as json.dumps
    # does it: the most generous encoding a client is likely to send.
    pair = [-0.012345678901234567, -1.2345678901234567e-05]
    rx = {"id": "torino", "iq": [pair] * N_SAMPLES}
    body = json.dumps({"receivers": [rx] * MAX_RECEIVERS}, indent=1).encode()
    assert 8_000_000 < len(body) < MAX_CAPTURE_BODY_BYTES
    assert len(decode_raw_body(body).receivers) == MAX_RECEIVERS


def test_a_predict_body_over_the_limit_is_refused_before_parsing():
    body = b'{"receivers": [], "session_id": "' + b"x" * MAX_CAPTURE_BODY_BYTES + b'"}'
    exc, refuse_s = _refusal(decode_raw_body, body)
    assert (exc.status_code, exc.field) == (413, "body")
    assert refuse_s < 0.05
