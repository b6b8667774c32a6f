"""Open Inference Protocol wire formats over the service core (no Ray): tritonclient's
request bodies in, its parser on the answers; the same positions as the JSON API."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from serve_app.errors import InvalidInput
from serve_app.model import OnnxLocalizer
from serve_app.protocols import oip, rest
from serve_app.samples import make_samples
from serve_app.service import LocalizationService
from serve_app.settings import DEFAULT_MODEL_DIR
from tests.test_service import FakeChain

NAME = "localization_model"


@pytest.fixture(scope="module")
def samples():
    return make_samples(3, seed=9, max_missing=2)


@pytest.fixture
def service(network):
    model = OnnxLocalizer(DEFAULT_MODEL_DIR / "localization_model.onnx", network.ids)
    return LocalizationService(FakeChain(network, model), len(network), max_captures=8)


def oip_tensors(samples, network, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """IQ [B, R, S, 2] float32 and RECEIVER_IDS [B, R] of the samples (absent: "")."""
    iq = samples.iq[rows].view(np.float32).reshape(len(rows), len(network), -1, 2)
    present = samples.scenes.present[rows]
    ids = np.array([[rid if p else "" for rid, p in zip(network.ids, row, strict=True)]
                    for row in present], dtype=object)
    return np.ascontiguousarray(iq), ids


def _inputs(iq, ids, binary: bool, confidence=None):
    out = [httpclient.InferInput("IQ", list(iq.shape), "FP32"),
           httpclient.InferInput("RECEIVER_IDS", list(ids.shape), "BYTES")]
    out[0].set_data_from_numpy(iq, binary_data=binary)
    out[1].set_data_from_numpy(ids, binary_data=binary)
    if confidence is not None:
        out.append(httpclient.InferInput("CONFIDENCE_LEVEL", list(confidence.shape), "FP64"))
        out[2].set_data_from_numpy(confidence, binary_data=binary)
    return out


def _rest_infer(service, network, inputs, outputs=None):
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs)
    req = oip.parse_rest(body, None if json_size is None else str(json_size))
    tensors, version = asyncio.run(oip.infer(service, network, req, NAME, None))
    answer = oip.rest_answer(NAME, version, req, tensors)
    length = answer.headers.get(oip.HEADER_LENGTH)
    return httpclient.InferenceServerClient.parse_response_body(
        answer.body, header_length=None if length is None else int(length))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_the_json_api(service, network, samples, binary):
    iq, ids = oip_tensors(samples, network, [0, 1, 2])
    conf = np.array([0.95, 0.5, 0.95])
    result = _rest_infer(service, network, _inputs(iq, ids, binary, conf))
    assert result.get_response()["model_version"] == "3"
    pos, cov = result.as_numpy("POSITION"), result.as_numpy("COVARIANCE_ENU")
    ell, geo = result.as_numpy("ELLIPSE"), result.as_numpy("GEOJSON")
    assert pos.shape == (3, 2) and cov.shape == (3, 2, 2) and ell.shape == (3, 3)
    for b in range(3):
        body = {**samples.requests[b], "confidence_level": float(conf[b])}
        want = orjson.loads(asyncio.run(rest.predict(service, network,
                                                     orjson.dumps(body))).body)
        assert pos[b].tolist() == [want["position"]["latitude"], want["position"]["longitude"]]
        u = want["uncertainty"]
        assert ell[b].tolist() == [u["semi_major_m"], u["semi_minor_m"], u["orientation_deg"]]
        assert cov[b, 0, 0] == pytest.approx(u["sigma_x"] ** 2)
        assert cov[b, 0, 1] == cov[b, 1, 0] == pytest.approx(u["rho"] * u["sigma_x"] * u["sigma_y"])
        assert orjson.loads(geo[b]) == want["geojson"]


def test_a_single_capture_and_a_chosen_output(service, network, samples):
    iq, ids = oip_tensors(samples, network, [1])
    out = httpclient.InferRequestedOutput("POSITION", binary_data=False)
    result = _rest_infer(service, network, _inputs(iq[0], ids[0], True), outputs=[out])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["POSITION"]
    assert result.as_numpy("POSITION").shape == (2,)


def test_present_false_and_empty_ids_are_absent(service, network, samples):
    iq, ids = oip_tensors(samples, network, [2])
    present = ids[0] != ""
    ids_all = np.array(network.ids, dtype=object)  # ids everywhere, PRESENT says who heard
    inputs = _inputs(iq[0], ids_all, True)
    inputs.append(httpclient.InferInput("PRESENT", [len(network)], "BOOL"))
    inputs[2].set_data_from_numpy(present)
    a = _rest_infer(service, network, inputs).as_numpy("POSITION")
    b = _rest_infer(service, network, _inputs(iq[0], ids[0], True)).as_numpy("POSITION")
    assert a.tolist() == b.tolist()


def _error(service, network, inputs) -> InvalidInput:
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    with pytest.raises(InvalidInput) as exc:
        req = oip.parse_rest(body, None if json_size is None else str(json_size))
        asyncio.run(oip.infer(service, network, req, NAME, None))
    return exc.value


def test_bad_tensors_name_the_tensor(service, network, samples):
    iq, ids = oip_tensors(samples, network, [0, 1])
    short = np.ascontiguousarray(iq[:, :, :100])
    assert _error(service, network, _inputs(short, ids, True)).field == "IQ"
    wrong_type = httpclient.InferInput("IQ", list(iq.shape), "FP64")
    wrong_type.set_data_from_numpy(iq.astype(np.float64))
    e = _error(service, network, [wrong_type, _inputs(iq, ids, True)[1]])
    assert e.field == "IQ" and "FP32" in e.message and e.status_code == 400
    atlantis = ids.copy()
    atlantis[1, 0] = "atlantis"
    e = _error(service, network, _inputs(iq, atlantis, True))
    assert e.field == "RECEIVER_IDS[1, 0]" and "unknown receiver" in e.message
    nan = iq.copy()
    nan[0, 3, 7, 0] = np.nan
    ids_full = np.array([network.ids, network.ids], dtype=object)
    e = _error(service, network, _inputs(nan, ids_full, True))
    assert e.field == "IQ[0, 3]" and "non-finite" in e.message
    e = _error(service, network, _inputs(iq, ids[:, :3], True))
    assert e.field == "RECEIVER_IDS" and "leading dimensions" in e.message
    e = _error(service, network, _inputs(iq, ids, True, np.array([0.95, 1.5])))
    assert e.field == "CONFIDENCE_LEVEL[1]"
    many = np.ascontiguousarray(np.repeat(iq[:1], 9, axis=0))
    e = _error(service, network, _inputs(many, np.repeat(ids[:1], 9, axis=0), True))
    assert e.field == "IQ" and e.status_code == 413


def test_malformed_bodies(service, network):
    for body, length in ((b"{", None), (b'{"inputs": 3}', None), (b'{"inputs": []}', "99")):
        with pytest.raises(InvalidInput) as exc:
            oip.parse_rest(body, length)
        assert exc.value.status_code == 400


def test_error_answer_is_the_protocols():
    answer = oip.error_answer(InvalidInput("RECEIVER_IDS[0]", "unknown receiver 'x'", 422))
    assert answer.status == 422
    with pytest.raises(InferenceServerException, match=r"RECEIVER_IDS\[0\]: unknown"):
        httpclient._utils._raise_if_error(_Resp(answer.status, answer.body))


class _Resp:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self._body = status, body

    def read(self) -> bytes:
        return self._body


def test_metadata_lists_the_tensors():
    meta = oip.model_metadata(NAME, ["2", "1"])
    assert meta["versions"] == ["2", "1"]
    assert {t["name"]: t["datatype"] for t in meta["inputs"]} == oip.INPUTS
    assert [t["name"] for t in meta["outputs"]] == list(oip.OUTPUTS)
    pb.ModelMetadataResponse(  # the gRPC message takes the same fields
        name=NAME, versions=meta["versions"], platform=meta["platform"],
        inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]])
