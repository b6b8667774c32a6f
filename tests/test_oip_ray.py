"""The Open Inference Protocol of the shipped config, spoken by tritonclient (HTTP and gRPC)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serve_app.samples import make_samples
from tests.test_oip import oip_tensors

pytestmark = pytest.mark.ray

NAME = "localization_model"


@pytest.fixture(scope="module")
def samples():
    return make_samples(2, seed=23, max_missing=2)


@pytest.fixture(scope="module")
def http_client(app_url):
    client = httpclient.InferenceServerClient(app_url.removeprefix("http://"),
                                              network_timeout=120.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(app_grpc):
    client = grpcclient.InferenceServerClient(app_grpc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def alias_version(app_url) -> str:
    return httpx.get(app_url + "/model/info", timeout=60).json()["alias_version"]


def _inputs(module, iq, ids, binary=True):
    out = [module.InferInput("IQ", list(iq.shape), "FP32"),
           module.InferInput("RECEIVER_IDS", list(ids.shape), "BYTES")]
    kw = {"binary_data": binary} if module is httpclient else {}
    out[0].set_data_from_numpy(iq, **kw)
    out[1].set_data_from_numpy(ids, **kw)
    return out


def _predict_position(app_url, samples, i) -> list[float]:
    r = httpx.post(app_url + "/predict", json={**samples.requests[i], "cache": False},
                   timeout=120)
    assert r.status_code == 200, r.text
    return [r.json()["position"]["latitude"], r.json()["position"]["longitude"]]


def test_health_and_metadata(http_client, grpc_client, alias_version):
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert grpc_client.get_server_metadata().name == "rfloc-serve"
    meta = http_client.get_model_metadata(NAME)
    assert alias_version in meta["versions"]
    assert {t["name"] for t in meta["inputs"]} == {"IQ", "RECEIVER_IDS", "PRESENT",
                                                   "CONFIDENCE_LEVEL"}
    gmeta = grpc_client.get_model_metadata(NAME, alias_version)
    assert list(gmeta.versions) == [alias_version]
    assert [t.name for t in gmeta.outputs] == ["POSITION", "COVARIANCE_ENU", "ELLIPSE",
                                               "GEOJSON"]
    assert http_client.is_model_ready(NAME) and grpc_client.is_model_ready(NAME, alias_version)
    assert not http_client.is_model_ready("no_such_model")
    with pytest.raises(InferenceServerException, match="no version 999"):
        http_client.get_model_metadata(NAME, "999")
    with pytest.raises(InferenceServerException) as exc:
        grpc_client.get_model_metadata("no_such_model")
    assert exc.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_equals_predict(app_url, http_client, samples, network, binary):
    iq, ids = oip_tensors(samples, network, [0, 1])
    result = http_client.infer(NAME, _inputs(httpclient, iq, ids, binary),
                               parameters={"cache": False})
    pos = result.as_numpy("POSITION")
    assert pos.shape == (2, 2) and result.as_numpy("COVARIANCE_ENU").shape == (2, 2, 2)
    for b in range(2):
        assert pos[b].tolist() == _predict_position(app_url, samples, b)


def test_grpc_infer_equals_predict(app_url, grpc_client, samples, network):
    iq, ids = oip_tensors(samples, network, [1])
    result = grpc_client.infer(NAME, _inputs(grpcclient, iq[0], ids[0]))
    assert result.as_numpy("POSITION").tolist() == _predict_position(app_url, samples, 1)
    assert result.as_numpy("ELLIPSE").shape == (3,)
    assert result.as_numpy("GEOJSON").shape == (1,)


def test_pinned_version(http_client, grpc_client, samples, network, alias_version,
                        admin_headers):
    iq, ids = oip_tensors(samples, network, [0])
    admin = {k.lower(): v for k, v in admin_headers.items()}  # gRPC metadata keys: lower case
    for client, module in ((http_client, httpclient), (grpc_client, grpcclient)):
        for spelling in (alias_version, "00" + alias_version):  # one version, normalised
            result = client.infer(NAME, _inputs(module, iq[0], ids[0]), model_version=spelling)
            response = result.get_response()
            version = (response["model_version"] if module is httpclient
                       else response.model_version)
            assert version == alias_version
        with pytest.raises(InferenceServerException, match="needs the admin token"):
            client.infer(NAME, _inputs(module, iq[0], ids[0]), model_version="999")
        with pytest.raises(InferenceServerException, match="no version 999"):
            client.infer(NAME, _inputs(module, iq[0], ids[0]), model_version="999",
                         headers=dict(admin))  # the HTTP client writes into it


def _bad_requests(iq, ids):
    """(name, IQ array, IQ datatype, receiver ids, tensor the error must name)."""
    unknown = ids.copy()
    unknown[0] = "atlantis"
    return [
        ("wrong shape", np.ascontiguousarray(iq[:, :100]), "FP32", ids, "IQ"),
        ("wrong datatype", iq.astype(np.float64), "FP64", ids, "IQ"),
        ("unknown receiver", iq, "FP32", unknown, "RECEIVER_IDS[0]"),
    ]


@pytest.mark.parametrize("proto, statuses", [
    ("http", ("400", "422")), ("grpc", ("StatusCode.INVALID_ARGUMENT",))])
def test_bad_tensors(proto, statuses, request, samples, network):
    client = request.getfixturevalue(f"{proto}_client")
    module = httpclient if proto == "http" else grpcclient
    iq, ids = oip_tensors(samples, network, [0])
    for name, x, dtype, rx, tensor in _bad_requests(iq[0], ids[0]):
        inputs = [module.InferInput("IQ", list(x.shape), dtype),
                  module.InferInput("RECEIVER_IDS", list(rx.shape), "BYTES")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(rx)
        with pytest.raises(InferenceServerException) as exc:
            client.infer(NAME, inputs)
        assert exc.value.status() in statuses, name
        assert exc.value.message().startswith(f"{tensor}:"), (name, exc.value.message())


def test_oip_body_limit_and_json_error(app_url):
    r = httpx.post(app_url + f"/v2/models/{NAME}/infer", content=b'{"inputs": 7}', timeout=60)
    assert r.status_code == 400 and r.json() == {
        "error": "inputs: the request must be a JSON object with an 'inputs' list"}
    r = httpx.post(app_url + "/v2/models/other/infer", json={"inputs": []}, timeout=60)
    assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
