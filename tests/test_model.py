"""OnnxLocalizer: contract checks and validation on tiny real ONNX models built in tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from serve_app.errors import ModelError
from serve_app.features import FEATURE_SPEC_VERSION, N_FEATURES
from serve_app.model import COV_OUTPUT, INPUT_NAME, MEAN_OUTPUT, OnnxLocalizer, sha256_file
from serve_app.receivers import ReceiverNetwork, load_network

MakeModel = Callable[..., Path]
DEFAULT_COV_M2 = ((4.0e8, 1.0e8), (1.0e8, 9.0e8))  # sigma 20 km east, 30 km north


def contract_metadata(network: ReceiverNetwork) -> dict[str, str]:
    """The metadata_props a model must carry to be served on `network`."""
    return {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "receivers": json.dumps(network.ids),
        "enu_origin": json.dumps({"latitude": network.origin_lat,
                                  "longitude": network.origin_lon,
                                  "altitude_m": network.origin_alt_m}),
    }


def build_tiny_onnx(
    path: Path,
    metadata: dict[str, str],
    *,
    input_name: str = INPUT_NAME,
    n_slots: int = 7,
    n_features: int = N_FEATURES,
    output_names: Sequence[str] = (MEAN_OUTPUT, COV_OUTPUT),
    mean_scale: float = 1000.0,
    cov_m2: Any = DEFAULT_COV_M2,
) -> Path:
    """A real ONNX model: mean = mean_scale * (slot-mean of the first two features),
    cov = the constant `cov_m2` expanded over the batch."""
    mean_name, cov_name = output_names
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_slots, n_features])
    mean = helper.make_tensor_value_info(mean_name, TensorProto.FLOAT, ["N", 2])
    cov = helper.make_tensor_value_info(cov_name, TensorProto.FLOAT, ["N", 2, 2])
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [mean_scale]),
        helper.make_tensor("cov_const", TensorProto.FLOAT, [1, 2, 2],
                           np.asarray(cov_m2, np.float32).ravel().tolist()),
        helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("i1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("i2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("two_two", TensorProto.INT64, [2], [2, 2]),
    ]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Slice", ["pooled", "i0", "i2", "i1"], ["first_two"]),
        helper.make_node("Mul", ["first_two", "scale"], [mean_name]),
        helper.make_node("Shape", [input_name], ["shape"]),
        helper.make_node("Slice", ["shape", "i0", "i1", "i0"], ["batch"]),
        helper.make_node("Concat", ["batch", "two_two"], ["cov_shape"], axis=0),
        helper.make_node("Expand", ["cov_const", "cov_shape"], [cov_name]),
    ]
    graph = helper.make_graph(nodes, "tiny_localizer", [x], [mean, cov], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    """The shipped default network (module-local: these tests need no shared conftest)."""
    return load_network()


@pytest.fixture
def model_metadata(network: ReceiverNetwork) -> dict[str, str]:
    """A fresh copy of the contract metadata for the shipped network (tests edit it)."""
    return contract_metadata(network)


@pytest.fixture
def tiny_onnx(tmp_path: Path, network: ReceiverNetwork) -> MakeModel:
    """Factory: `tiny_onnx(name="model.onnx", metadata=None, **build options)` → path."""

    def make(name: str = "model.onnx", metadata: dict[str, str] | None = None,
             **options: Any) -> Path:
        meta = contract_metadata(network) if metadata is None else metadata
        return build_tiny_onnx(tmp_path / name, meta, **options)

    return make


@pytest.fixture
def golden() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((5, 7, N_FEATURES), np.float32)
    x[..., 0] = rng.uniform(-120, -60, (5, 7))
    x[..., 1] = rng.uniform(3, 40, (5, 7))
    x[..., 2] = 1.0
    return x


def test_loads_checks_and_predicts(tiny_onnx: MakeModel, network: ReceiverNetwork,
                                   golden: np.ndarray) -> None:
    path = tiny_onnx()
    model = OnnxLocalizer(path, network.ids, expected_sha256=sha256_file(path))
    assert model.receiver_ids == network.ids
    assert model.enu_origin["latitude"] == pytest.approx(network.origin_lat)
    assert model.metadata["feature_spec_version"] == FEATURE_SPEC_VERSION
    assert len(model.sha256) == 64
    mean, cov = model.predict(golden)
    assert mean.shape == (5, 2) and cov.shape == (5, 2, 2)
    assert mean.dtype == np.float64 and cov.dtype == np.float64
    np.testing.assert_allclose(mean, 1000.0 * golden[..., :2].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(cov, np.broadcast_to([[4e8, 1e8], [1e8, 9e8]], (5, 2, 2)))
    model.validate(golden)
    # Any batch size, including one; float64 and non-contiguous inputs are accepted.
    one_mean, _ = model.predict(golden[2:3].astype(np.float64))
    np.testing.assert_allclose(one_mean, mean[2:3], rtol=1e-6)
    strided = np.asfortranarray(golden)
    np.testing.assert_allclose(model.predict(strided)[0], mean, rtol=1e-6)


def test_without_a_network_only_the_model_contract_is_checked(tiny_onnx: MakeModel,
                                                               model_metadata: dict) -> None:
    model_metadata["receivers"] = json.dumps(["a", "b", "c", "d", "e", "f", "g"])
    model = OnnxLocalizer(tiny_onnx(metadata=model_metadata))
    assert model.receiver_ids == ["a", "b", "c", "d", "e", "f", "g"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"input_name": "x"}, "inputs ['x'] != ['features']"),
        ({"n_features": 4}, "expected [N, R, 3]"),
        ({"n_slots": 6}, "6 receiver slots, network has 7"),
        ({"output_names": (MEAN_OUTPUT, "covariance")}, "missing output 'cov_enu_m2'"),
        ({"output_names": ("position", "cov_enu_m2")}, "missing output 'mean_enu_m'"),
    ],
    ids=["input-name", "feature-count", "slot-count", "missing-cov", "missing-mean"],
)
def test_refuses_signature_mismatch(tiny_onnx: MakeModel, network: ReceiverNetwork,
                                    options: dict, fragment: str) -> None:
    path = tiny_onnx(**options)
    with pytest.raises(ModelError, match="signature mismatch") as info:
        OnnxLocalizer(path, network.ids)
    assert fragment in str(info.value)
    assert path.name in str(info.value)


def test_refuses_wrong_feature_spec_version(tiny_onnx: MakeModel, network: ReceiverNetwork,
                                            model_metadata: dict) -> None:
    model_metadata["feature_spec_version"] = "rss-v0"
    with pytest.raises(ModelError, match="feature_spec_version 'rss-v0'"):
        OnnxLocalizer(tiny_onnx(metadata=model_metadata), network.ids)
    del model_metadata["feature_spec_version"]
    with pytest.raises(ModelError, match="feature_spec_version None"):
        OnnxLocalizer(tiny_onnx(metadata=model_metadata), network.ids)


@pytest.mark.parametrize(
    ("receivers", "fragment"),
    [
        (lambda ids: json.dumps(ids[::-1]), "do not match the network"),
        (lambda ids: json.dumps(ids[:6] + ["elsewhere"]), "do not match the network"),
        (lambda ids: None, "do not match the network"),
        (lambda ids: "giaveno,coazze", "'receivers' is not valid JSON"),
        (lambda ids: json.dumps({"ids": ids}), "'receivers' must be a JSON list"),
    ],
    ids=["reordered", "unknown-id", "absent", "not-json", "not-a-list"],
)
def test_refuses_wrong_receivers_metadata(tiny_onnx: MakeModel, network: ReceiverNetwork,
                                          model_metadata: dict, receivers, fragment) -> None:
    value = receivers(network.ids)
    if value is None:
        del model_metadata["receivers"]
    else:
        model_metadata["receivers"] = value
    with pytest.raises(ModelError) as info:
        OnnxLocalizer(tiny_onnx(metadata=model_metadata), network.ids)
    assert fragment in str(info.value)


def test_refuses_bad_enu_origin_metadata(tiny_onnx: MakeModel, model_metadata: dict) -> None:
    model_metadata["enu_origin"] = "{latitude: 45"
    with pytest.raises(ModelError, match="'enu_origin' is not valid JSON"):
        OnnxLocalizer(tiny_onnx(metadata=model_metadata))


def test_refuses_a_non_onnx_file(tmp_path: Path, network: ReceiverNetwork) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf\x00\xff")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxLocalizer(path, network.ids)


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        OnnxLocalizer(tmp_path / "absent.onnx")


def test_refuses_sha256_mismatch(tiny_onnx: MakeModel, network: ReceiverNetwork) -> None:
    path = tiny_onnx()
    wrong = "0" * 64
    with pytest.raises(ModelError, match="sha256") as info:
        OnnxLocalizer(path, network.ids, expected_sha256=wrong)
    assert wrong in str(info.value) and sha256_file(path) in str(info.value)


@pytest.mark.parametrize(
    ("cov", "fragment"),
    [
        ([[np.nan, 0.0], [0.0, 1.0]], "non-finite outputs"),
        ([[1.0, 2.0], [2.0, 1.0]], "not symmetric positive definite"),
        ([[-1.0, 0.0], [0.0, -1.0]], "not symmetric positive definite"),
        ([[1.0, 0.5], [-0.5, 1.0]], "not symmetric positive definite"),
        ([[0.0, 0.0], [0.0, 0.0]], "not symmetric positive definite"),
    ],
    ids=["nan", "indefinite", "negative-definite", "asymmetric", "zero"],
)
def test_validate_refuses_bad_covariance(tiny_onnx: MakeModel, network: ReceiverNetwork,
                                         golden: np.ndarray, cov, fragment: str) -> None:
    model = OnnxLocalizer(tiny_onnx(cov_m2=cov), network.ids)  # the signature is fine
    with pytest.raises(ModelError, match=fragment):
        model.validate(golden)


def test_validate_refuses_nan_and_absurd_positions(tiny_onnx: MakeModel,
                                                   network: ReceiverNetwork,
                                                   golden: np.ndarray) -> None:
    model = OnnxLocalizer(tiny_onnx(mean_scale=float("nan")), network.ids)
    with pytest.raises(ModelError, match="non-finite"):
        model.validate(golden)
    model = OnnxLocalizer(tiny_onnx(name="far.onnx", mean_scale=1e6), network.ids)
    with pytest.raises(ModelError, match="positions beyond"):
        model.validate(golden)


def test_validate_wraps_runtime_failures(tiny_onnx: MakeModel, network: ReceiverNetwork) -> None:
    model = OnnxLocalizer(tiny_onnx(), network.ids)
    with pytest.raises(ModelError, match="failed on golden inputs"):
        model.validate(np.zeros((2, 5, N_FEATURES), np.float32))  # 5 slots, model has 7
