"""Size limits refuse oversize input before the heavy work (no Ray: the decoding core)."""

from __future__ import annotations

import time

import orjson
import pytest

from serve_app.constants import N_SAMPLES
from serve_app.decode import (
    CAPTURE_MAX_ARRAYS,
    CAPTURE_MAX_OBJECTS,
    decode_capture,
    decode_raw_batch,
    decode_raw_body,
)
from serve_app.errors import InvalidInput
from serve_app.schemas import MAX_BATCH_CAPTURES, MAX_RECEIVERS


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
