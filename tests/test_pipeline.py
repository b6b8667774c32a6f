"""The plain-function pipeline (stack → preprocess → infer → postprocess) on simulated IQ."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve_app.constants import N_SAMPLES
from serve_app.features import FEATURE_SPEC_VERSION, N_FEATURES, extract_features
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import CaptureGroup, infer, postprocess, preprocess, stack_captures
from serve_app.receivers import ReceiverNetwork, load_network
from serve_app.schemas import ModelRef
from serve_app.simulate import Scenes, synthesize_iq
from tests.test_model import build_tiny_onnx

MODEL_REF = ModelRef(name="localization_model", version="7", alias="production")
COV_M2 = ((4.0e8, 1.0e8), (1.0e8, 9.0e8))


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    return load_network()


@pytest.fixture(scope="module")
def model(network: ReceiverNetwork, tmp_path_factory: pytest.TempPathFactory) -> OnnxLocalizer:
    # mean = 1000 x slot-mean of (power, snr); cov = COV_M2
    path = build_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx", {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "receivers": json.dumps(network.ids),
        "enu_origin": json.dumps({"latitude": network.origin_lat,
                                  "longitude": network.origin_lon}),
    }, n_slots=len(network), cov_m2=COV_M2)
    return OnnxLocalizer(path, network.ids)


def scene_iq(network: ReceiverNetwork, tx_enu_m: list[tuple[float, float]],
             tx_power_dbm: list[float], seed: int) -> np.ndarray:
    """IQ [n, R, S] of transmitters at given places and powers (no shadowing, n = 3)."""
    n, r = len(tx_enu_m), len(network)
    tx = np.asarray(tx_enu_m, np.float64)
    power = np.asarray(tx_power_dbm, np.float64)
    d_km = np.linalg.norm(tx[:, None] - network.enu_m[None], axis=-1) / 1000.0
    rx = power[:, None] - 75.7 - 30.0 * np.log10(np.maximum(d_km, 0.1))
    scenes = Scenes(tx, power, np.full(n, 3.0), np.zeros((n, r)), rx,
                    np.linspace(-300.0, 300.0, n), np.ones((n, r), bool))
    return synthesize_iq(network, scenes, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def iq(network: ReceiverNetwork) -> np.ndarray:
    # 0: strong, central; 1: strong; 2: near genova, weak (only 1-2 receivers hear it);
    # 3: strong, central, used with a subset of receivers.
    return scene_iq(network, [(0.0, 0.0), (-30e3, 20e3), (63e3, -70e3), (10e3, 5e3)],
                    [45.0, 40.0, -12.0, 45.0], seed=5)


def test_stack_captures_places_receivers_in_their_slots(iq: np.ndarray) -> None:
    slots_a, slots_b = np.array([0, 1, 2, 3, 4, 5, 6]), np.array([6, 0, 3])
    group = stack_captures([(iq[0, slots_a], slots_a), (iq[1, slots_b], slots_b)], 7,
                           [0.95, 0.68])
    assert isinstance(group, CaptureGroup) and len(group) == 2
    assert group.iq.shape == (2, 7, N_SAMPLES) and group.iq.dtype == np.complex64
    np.testing.assert_array_equal(group.iq[0], iq[0])
    np.testing.assert_array_equal(group.iq[1, [0, 3, 6]], iq[1, [0, 3, 6]])
    assert not group.iq[1, [1, 2, 4, 5]].any()
    np.testing.assert_array_equal(group.present[1], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(group.confidence_level, [0.95, 0.68])


def _capture(iq: np.ndarray, i: int, slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(slots)
    return iq[i, s], s


def test_end_to_end_results_in_order_with_per_item_errors(
    network: ReceiverNetwork, model: OnnxLocalizer, iq: np.ndarray
) -> None:
    captures = [
        _capture(iq, 0, list(range(7))),
        _capture(iq, 1, [2, 4]),  # only two receivers sent: cannot localize
        _capture(iq, 2, list(range(7))),  # all sent, too few hear the transmitter
        _capture(iq, 3, [1, 2, 3, 5]),
    ]
    confidence = [0.95, 0.95, 0.5, 0.68]
    group = stack_captures(captures, len(network), confidence)
    [pre] = preprocess([group], network)
    assert len(pre) == 4 and pre.features.shape == (4, 7, N_FEATURES)
    assert "preprocess" in pre.timing_ms
    np.testing.assert_array_equal(pre.ok, [True, False, False, True])
    for i, n_heard in ((1, 2), (2, int(pre.detected[2].sum()))):
        err = pre.errors[i]
        assert err is not None and err["status"] == 422 and err["field"] == "receivers"
        assert f"only {n_heard} receiver(s)" in err["message"]
    assert pre.detected[2].sum() < 3

    [inf] = infer([pre], model, MODEL_REF)
    assert inf.model == MODEL_REF and "inference" in inf.timing_ms
    assert np.isnan(inf.mean_enu_m[[1, 2]]).all() and np.isnan(inf.cov_enu_m2[[1, 2]]).all()
    for i in (0, 3):  # each good item got its own answer
        mean_i, cov_i = model.predict(pre.features[i : i + 1])
        np.testing.assert_array_equal(inf.mean_enu_m[i], mean_i[0])
        np.testing.assert_array_equal(inf.cov_enu_m2[i], cov_i[0])

    out = postprocess(inf, network, n_vertices=32)
    assert "postprocess" in out.timing_ms
    results = out.results
    assert results is not None and len(results) == 4
    assert results[1] is None and results[2] is None
    assert out.errors[1]["status"] == 422 and out.errors[2]["status"] == 422
    for i in (0, 3):
        res = results[i]
        assert res is not None and out.errors[i] is None
        lat, lon = network.to_geodetic(inf.mean_enu_m[i, 0], inf.mean_enu_m[i, 1])
        assert res["position"] == {"latitude": pytest.approx(float(lat)),
                                   "longitude": pytest.approx(float(lon))}
        unc = res["uncertainty"]
        assert unc["confidence_level"] == confidence[i]
        assert unc["sigma_x"] == pytest.approx(2e4) and unc["sigma_y"] == pytest.approx(3e4)
        gj = res["geojson"]
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
        point = gj["features"][0]["geometry"]
        assert point["type"] == "Point"
        assert point["coordinates"] == [pytest.approx(float(lon), abs=1e-6),
                                        pytest.approx(float(lat), abs=1e-6)]
        assert gj["features"][1]["geometry"]["type"] == "Polygon"
        ring = gj["features"][1]["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert res["receivers_used"] == [network.ids[j] for j in np.flatnonzero(pre.detected[i])]
    assert results[0]["receivers_used"] == network.ids  # a strong central transmitter
    assert results[3]["receivers_used"] == [network.ids[j] for j in (1, 2, 3, 5)]


def test_several_groups_batched_equal_groups_alone(
    network: ReceiverNetwork, model: OnnxLocalizer, iq: np.ndarray
) -> None:
    def groups() -> list[CaptureGroup]:
        return [
            stack_captures([_capture(iq, 0, list(range(7))), _capture(iq, 2, list(range(7)))],
                           7, [0.95, 0.95]),
            stack_captures([_capture(iq, 3, [0, 2, 4, 6])], 7, [0.9]),
            stack_captures([_capture(iq, 1, [0, 1]), _capture(iq, 1, list(range(7)))],
                           7, [0.95, 0.95]),
        ]

    together = [postprocess(g, network) for g in infer(preprocess(groups(), network), model,
                                                         MODEL_REF)]
    alone = [postprocess(infer(preprocess([g], network), model, MODEL_REF)[0], network)
             for g in groups()]
    assert [len(g) for g in together] == [2, 1, 2]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.mean_enu_m, b.mean_enu_m)
        assert a.errors == b.errors
        assert a.results == b.results
    assert [r is None for g in together for r in g.results] == [False, True, False, True, False]
    # The features are the plain feature extraction of the stacked IQ.
    g = groups()[1]
    expected = extract_features(g.iq, network.calibration_db, g.present).model_input()
    np.testing.assert_array_equal(together[1].features, expected)


def test_group_where_every_item_fails(network: ReceiverNetwork, model: OnnxLocalizer,
                                      iq: np.ndarray) -> None:
    group = stack_captures([_capture(iq, 0, [0, 1]), _capture(iq, 2, list(range(7)))], 7,
                           [0.95, 0.95])
    [out] = infer(preprocess([group], network), model, MODEL_REF)
    out = postprocess(out, network)
    assert out.results == [None, None]
    assert all(e is not None and e["status"] == 422 for e in out.errors)


def test_invalid_model_output_fails_only_its_item(network: ReceiverNetwork,
                                                  model: OnnxLocalizer, iq: np.ndarray) -> None:
    group = stack_captures([_capture(iq, i, list(range(7))) for i in (0, 1, 3)], 7,
                           [0.95] * 3)
    [out] = infer(preprocess([group], network), model, MODEL_REF)
    out.cov_enu_m2[1] = [[1.0, 2.0], [2.0, 1.0]]  # indefinite
    out = postprocess(out, network)
    assert out.results[0] is not None and out.results[2] is not None
    assert out.results[1] is None
    assert out.errors[1]["status"] == 503 and "model output rejected" in out.errors[1]["message"]
