"""Scene simulator, feature extraction, simulated datasets and the RSS baselines (no Ray)."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serve_app.baselines import crb_rmse_m, expected_power_dbm, ml_fit, weighted_centroid
from serve_app.constants import (
    CARRIER_OFFSET_RANGE_HZ,
    CHANNEL_BW_HZ,
    EXPONENT_RANGE,
    N_SAMPLES,
    SAMPLE_RATE_HZ,
    SHADOWING_SIGMA_DB,
    TX_MARGIN_M,
    TX_POWER_RANGE_DBM,
    noise_power_dbm,
)
from serve_app.dataset import CHUNK, simulate_dataset
from serve_app.features import (
    FEATURE_NAMES,
    N_FEATURES,
    SEGMENT_LEN,
    Features,
    extract_features,
    welch_psd,
)
from serve_app.receivers import NetworkSpec, ReceiverNetwork, load_network
from serve_app.simulate import Scenes, sample_scenes, synthesize_iq

NOISE_DBM = -121.2  # DESIGN.md: -174 dBm/Hz + 10 log10(48 kHz) + 6 dB NF
NOISE_IN_CHANNEL_DBM = NOISE_DBM - 10.0 * math.log10(SAMPLE_RATE_HZ / CHANNEL_BW_HZ)
N_FEATURE_SCENES = 300


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    """The shipped default network (module-local: these tests need no shared conftest)."""
    return load_network()


def true_snr_db(scenes: Scenes) -> np.ndarray:
    """In-channel SNR from the simulator's truth."""
    return scenes.rx_power_dbm - NOISE_IN_CHANNEL_DBM


def simulate(network: ReceiverNetwork, n: int, seed: int, *, weaken_db: tuple[float, float]
             | None = None, **kwargs: object) -> tuple[Scenes, np.ndarray]:
    """Scenes and their IQ; `weaken_db` lowers every link of a scene by U(lo, hi) dB."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(network, n, rng, **kwargs)  # type: ignore[arg-type]
    if weaken_db is not None:
        scenes.rx_power_dbm -= rng.uniform(*weaken_db, (n, 1))
    return scenes, synthesize_iq(network, scenes, rng)


def _with_features(network: ReceiverNetwork, scenes: Scenes, iq: np.ndarray
                   ) -> tuple[Scenes, np.ndarray, Features]:
    return scenes, iq, extract_features(iq, network.calibration_db, scenes.present)


@pytest.fixture(scope="module")
def simulated(network: ReceiverNetwork) -> tuple[Scenes, np.ndarray, Features]:
    """A few hundred scenes of the design physics (0..3 receivers missing), with features.

    Most links are strong on this network; see `weak` for the detection threshold."""
    return _with_features(network, *simulate(network, N_FEATURE_SCENES, seed=2026,
                                             max_missing=3))


@pytest.fixture(scope="module")
def weak(network: ReceiverNetwork) -> tuple[Scenes, np.ndarray, Features]:
    """The same physics 20-50 dB weaker, so hundreds of links sit around the threshold."""
    return _with_features(network, *simulate(network, N_FEATURE_SCENES, seed=2027,
                                             max_missing=3, weaken_db=(20.0, 50.0)))


@pytest.fixture(scope="module", params=["design", "weak"])
def any_scenes(request: pytest.FixtureRequest) -> tuple[Scenes, np.ndarray, Features]:
    return request.getfixturevalue({"design": "simulated", "weak": "weak"}[request.param])


def test_constants_match_design() -> None:
    assert noise_power_dbm() == pytest.approx(NOISE_DBM, abs=0.05)
    assert (SAMPLE_RATE_HZ, N_SAMPLES) == (48_000, 4_800)


# ----------------------------------------------------------------------------- simulate


def test_simulation_is_seeded(network: ReceiverNetwork) -> None:
    a_scenes, a_iq = simulate(network, 20, seed=7, max_missing=2)
    b_scenes, b_iq = simulate(network, 20, seed=7, max_missing=2)
    for f in fields(Scenes):
        np.testing.assert_array_equal(getattr(a_scenes, f.name), getattr(b_scenes, f.name))
    np.testing.assert_array_equal(a_iq, b_iq)
    c_scenes, c_iq = simulate(network, 20, seed=8, max_missing=2)
    assert not np.array_equal(a_scenes.tx_enu_m, c_scenes.tx_enu_m)
    assert not np.array_equal(a_iq, c_iq)


def test_rx_power_follows_log_distance_path_loss(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 500, np.random.default_rng(11))
    d_m = np.linalg.norm(scenes.tx_enu_m[:, None, :] - network.enu_m[None], axis=-1)
    assert d_m.min() > 100.0  # the simulator's 100 m floor never applies here
    path_loss = 75.7 + 10.0 * scenes.exponent[:, None] * np.log10(d_m / 1000.0)
    expected = scenes.tx_power_dbm[:, None] - path_loss - scenes.shadowing_db
    np.testing.assert_allclose(scenes.rx_power_dbm, expected, rtol=0, atol=1e-9)


def test_scene_parameters_follow_design_distributions(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 4000, np.random.default_rng(12))
    min_e, min_n, max_e, max_n = network.bbox_enu_m
    e, n = scenes.tx_enu_m[:, 0], scenes.tx_enu_m[:, 1]
    assert (e >= min_e - TX_MARGIN_M).all() and (e <= max_e + TX_MARGIN_M).all()
    assert (n >= min_n - TX_MARGIN_M).all() and (n <= max_n + TX_MARGIN_M).all()
    # Uniform over the whole box: the margins are used, not only the receivers' hull.
    assert e.min() < min_e - 0.8 * TX_MARGIN_M and e.max() > max_e + 0.8 * TX_MARGIN_M
    assert n.min() < min_n - 0.8 * TX_MARGIN_M and n.max() > max_n + 0.8 * TX_MARGIN_M
    for values, (lo, hi) in ((scenes.tx_power_dbm, TX_POWER_RANGE_DBM),
                             (scenes.exponent, EXPONENT_RANGE),
                             (scenes.carrier_offset_hz, CARRIER_OFFSET_RANGE_HZ)):
        assert values.min() >= lo and values.max() <= hi
        assert values.min() < lo + 0.01 * (hi - lo) and values.max() > hi - 0.01 * (hi - lo)
    assert scenes.shadowing_db.shape == (4000, 7)
    assert scenes.shadowing_db.std() == pytest.approx(SHADOWING_SIGMA_DB, rel=0.03)
    assert abs(scenes.shadowing_db.mean()) < 0.1
    assert scenes.present.all()


def _network_with_calibration(calibration_db: list[float]) -> ReceiverNetwork:
    receivers = [
        {"id": f"rx{i}", "name": f"rx{i}", "latitude": 45.0 + 0.2 * (i % 3),
         "longitude": 7.5 + 0.3 * i, "calibration_db": cal}
        for i, cal in enumerate(calibration_db)
    ]
    return ReceiverNetwork(NetworkSpec.model_validate({"receivers": receivers}))


@pytest.mark.parametrize("calibration_db", [None, [-50.0, -70.0, -90.0, 0.0]],
                         ids=["shipped", "mixed-calibration"])
def test_iq_power_is_signal_plus_noise(network: ReceiverNetwork,
                                       calibration_db: list[float] | None) -> None:
    net = network if calibration_db is None else _network_with_calibration(calibration_db)
    scenes, iq = simulate(net, 200, seed=13, weaken_db=(0.0, 60.0))
    assert iq.dtype == np.complex64 and iq.shape == (200, len(net), N_SAMPLES)
    measured = 10.0 * np.log10(np.mean(np.abs(iq.astype(np.complex128)) ** 2, axis=-1))
    measured += net.calibration_db[None, :]
    expected = 10.0 * np.log10(10.0 ** (scenes.rx_power_dbm / 10.0) + 10.0 ** (NOISE_DBM / 10.0))
    assert np.abs(measured - expected).max() < 0.3
    # Both regimes occur: noise-dominated and signal-dominated links.
    assert (scenes.rx_power_dbm < NOISE_DBM - 10).any()
    assert (scenes.rx_power_dbm > NOISE_DBM + 10).any()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_exact_missing_removes_exactly_k_receivers(network: ReceiverNetwork, k: int) -> None:
    scenes, iq = simulate(network, 200, seed=20 + k, exact_missing=k)
    assert (scenes.present.sum(axis=1) == len(network) - k).all()
    if k:
        assert (~scenes.present).any(axis=0).all()  # every receiver goes missing sometimes
    energy = np.abs(iq).sum(axis=-1)
    assert (energy[~scenes.present] == 0).all()
    assert (energy[scenes.present] > 0).all()


def test_max_missing_drops_up_to_max(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 1000, np.random.default_rng(30), max_missing=3,
                           p_missing=0.5)
    n_present = scenes.present.sum(axis=1)
    assert n_present.min() == len(network) - 3 and n_present.max() == len(network)
    assert np.mean(n_present == len(network)) == pytest.approx(0.5, abs=0.06)


# ----------------------------------------------------------------------------- features


@settings(max_examples=50, deadline=None)
@given(amplitude=st.floats(1e-4, 1e3), freq_hz=st.floats(-20_000.0, 20_000.0),
       phase=st.floats(0.0, 2 * math.pi), n_seg=st.integers(1, 12))
def test_welch_bins_sum_to_mean_power_of_a_constant_envelope(
    amplitude: float, freq_hz: float, phase: float, n_seg: int
) -> None:
    # Parseval with the window: exact for any signal with a constant envelope.
    t = np.arange(n_seg * SEGMENT_LEN) / SAMPLE_RATE_HZ
    iq = (amplitude * np.exp(1j * (2 * np.pi * freq_hz * t + phase))).astype(np.complex64)
    psd = welch_psd(iq[None, None, :])
    assert psd.shape == (1, 1, SEGMENT_LEN)
    assert psd.sum() == pytest.approx(amplitude**2, rel=1e-4)
    peak_hz = (np.argmax(psd[0, 0]) - SEGMENT_LEN // 2) * SAMPLE_RATE_HZ / SEGMENT_LEN
    assert abs(peak_hz - freq_hz) <= SAMPLE_RATE_HZ / SEGMENT_LEN


def test_welch_bins_sum_to_mean_power_of_white_noise() -> None:
    rng = np.random.default_rng(3)
    iq = (rng.standard_normal((4, 2, N_SAMPLES)) + 1j * rng.standard_normal((4, 2, N_SAMPLES)))
    psd = welch_psd(iq * 0.01)
    np.testing.assert_allclose(psd.sum(-1), np.mean(np.abs(iq * 0.01) ** 2, -1), rtol=0.05)


def test_extract_features_rejects_bad_shapes(network: ReceiverNetwork) -> None:
    with pytest.raises(ValueError, match="batch, receivers, samples"):
        extract_features(np.zeros((7, N_SAMPLES), np.complex64), network.calibration_db)
    with pytest.raises(ValueError, match="at least"):
        extract_features(np.zeros((1, 7, SEGMENT_LEN - 1), np.complex64), network.calibration_db)


def test_power_recovered_within_1db_at_snr_10db(any_scenes) -> None:
    scenes, _, feats = any_scenes
    strong = scenes.present & (true_snr_db(scenes) >= 10.0)
    assert strong.sum() > 300
    err = feats.power_dbm - scenes.rx_power_dbm
    assert np.abs(err[strong]).max() < 1.0
    assert (feats.detected[strong]).all()


def test_power_and_snr_sane_near_the_detection_threshold(weak) -> None:
    # Just above the 3 dB threshold the noise subtraction dominates the estimate: it must
    # stay unbiased and close, not collapse to the floor or jump.
    scenes, _, feats = weak
    snr = true_snr_db(scenes)
    near = scenes.present & (snr >= 2.0) & (snr < 8.0)
    assert near.sum() >= 100
    assert np.abs(feats.power_dbm - scenes.rx_power_dbm)[near].max() < 1.0
    assert np.abs(feats.snr_db - snr)[near].max() < 1.0
    assert abs(np.mean((feats.power_dbm - scenes.rx_power_dbm)[near])) < 0.2
    # Every detected receiver has a finite, sane power estimate.
    det = feats.detected
    assert np.isfinite(feats.power_dbm[det]).all()
    assert np.abs(feats.power_dbm - scenes.rx_power_dbm)[det].max() < 1.0
    # The noise floor over the band is the thermal noise (below ~30 dB SNR: above it the
    # NBFM sidebands beyond the guard band leak into the noise bins and SNR saturates).
    moderate = scenes.present & (snr < 20.0)
    assert np.abs(feats.noise_dbm[moderate] - NOISE_DBM).max() < 0.5


def test_detection_mask(any_scenes) -> None:
    scenes, _, feats = any_scenes
    snr = true_snr_db(scenes)
    truth = scenes.present & (snr >= 3.0)
    assert np.mean(feats.detected == truth) >= 0.99
    assert np.mean(feats.detected[scenes.present] == truth[scenes.present]) >= 0.99
    assert feats.detected[scenes.present & (snr >= 6.0)].all()
    assert not feats.detected[scenes.present & (snr <= 0.0)].any()
    assert not feats.detected[~scenes.present].any()
    assert (~scenes.present).sum() > 50


def test_weak_sample_straddles_the_threshold(weak) -> None:
    scenes, _, feats = weak
    snr = true_snr_db(scenes)[scenes.present]
    assert (snr <= 0.0).sum() > 300 and ((snr > 0.0) & (snr < 6.0)).sum() > 100
    assert (snr >= 10.0).sum() > 300


def test_absent_receivers_never_detected_even_with_signal(network: ReceiverNetwork) -> None:
    # The slot mask wins over the IQ: a strong signal in an absent slot is ignored.
    scenes, iq = simulate(network, 30, seed=41)
    present = np.ones_like(scenes.present)
    present[:, ::2] = False
    feats = extract_features(iq, network.calibration_db, present)
    assert not feats.detected[:, ::2].any()
    assert feats.detected[:, 1::2].any()
    # What an absent slot holds does not change the estimates of the present ones.
    zeroed = iq.copy()
    zeroed[:, ::2] = 0
    other = extract_features(zeroed, network.calibration_db, present)
    np.testing.assert_array_equal(other.power_dbm[:, 1::2], feats.power_dbm[:, 1::2])
    np.testing.assert_array_equal(other.detected, feats.detected)
    np.testing.assert_array_equal(other.carrier_offset_hz, feats.carrier_offset_hz)


def test_carrier_offset_within_200hz(any_scenes) -> None:
    scenes, _, feats = any_scenes
    strong = (scenes.present & (true_snr_db(scenes) >= 10.0)).any(axis=1)
    assert strong.sum() > 100
    err = np.abs(feats.carrier_offset_hz - scenes.carrier_offset_hz)
    assert err[strong].max() < 200.0


def test_model_input_shape_dtype_and_masking(simulated) -> None:
    scenes, _, feats = simulated
    x = feats.model_input()
    assert x.shape == (len(scenes), 7, N_FEATURES) and x.dtype == np.float32
    assert FEATURE_NAMES == ("power_dbm", "snr_db", "detected")
    det = feats.detected
    np.testing.assert_array_equal(x[..., 2], det.astype(np.float32))
    assert (x[~det] == 0).all()
    np.testing.assert_allclose(x[det][:, 0], feats.power_dbm[det], rtol=1e-6)
    np.testing.assert_allclose(x[det][:, 1], feats.snr_db[det], rtol=1e-5, atol=1e-5)
    assert np.isfinite(x).all()


def test_pure_noise_is_never_detected(network: ReceiverNetwork) -> None:
    scenes, _ = simulate(network, 50, seed=43)
    scenes.rx_power_dbm[:] = -400.0  # no emission at all
    iq = synthesize_iq(network, scenes, np.random.default_rng(44))
    feats = extract_features(iq, network.calibration_db)
    assert not feats.detected.any()
    assert feats.snr_db.max() < 0.0
    assert np.isfinite(feats.model_input()).all() and not feats.model_input().any()


def test_all_zero_capture_is_not_detected(network: ReceiverNetwork) -> None:
    feats = extract_features(np.zeros((2, 7, N_SAMPLES), np.complex64), network.calibration_db)
    assert not feats.detected.any()
    assert not feats.model_input().any()


def test_batch_equals_concatenation_of_items(network: ReceiverNetwork) -> None:
    scenes, iq = simulate(network, 9, seed=45, max_missing=3)
    whole = extract_features(iq, network.calibration_db, scenes.present)
    items = [extract_features(iq[i : i + 1], network.calibration_db, scenes.present[i : i + 1])
             for i in range(len(scenes))]
    parts = [extract_features(iq[a:b], network.calibration_db, scenes.present[a:b])
             for a, b in ((0, 4), (4, 9))]
    for f in fields(Features):
        expected = getattr(whole, f.name)
        np.testing.assert_array_equal(np.concatenate([getattr(x, f.name) for x in items]),
                                      expected, err_msg=f.name)
        np.testing.assert_array_equal(np.concatenate([getattr(x, f.name) for x in parts]),
                                      expected, err_msg=f.name)
    # FFT threads do not change the answer either.
    threaded = extract_features(iq, network.calibration_db, scenes.present, workers=2)
    np.testing.assert_array_equal(threaded.power_dbm, whole.power_dbm)


# ----------------------------------------------------------------------------- dataset


def test_simulate_dataset_is_identical_for_any_worker_count() -> None:
    n = CHUNK + 100  # two chunks
    one = simulate_dataset(n, 99, workers=1, max_missing=4)
    two = simulate_dataset(n, 99, workers=2, max_missing=4)
    assert len(one) == n
    for f in fields(one):
        np.testing.assert_array_equal(getattr(one, f.name), getattr(two, f.name), err_msg=f.name)
    assert one.features.shape == (n, 7, N_FEATURES) and one.features.dtype == np.float32
    detected = one.features[..., 2] == 1.0
    np.testing.assert_array_equal(np.isfinite(one.power_dbm), detected)
    # The two chunks come from different streams.
    assert not np.array_equal(one.target_enu_m[:100], one.target_enu_m[CHUNK:])
    other = simulate_dataset(200, 100, workers=1)
    assert not np.array_equal(other.target_enu_m, one.target_enu_m[:200])


def test_simulate_dataset_exact_missing() -> None:
    ds = simulate_dataset(50, 5, workers=1, exact_missing=2)
    assert (ds.features[..., 2].sum(axis=1) <= 5).all()


# ----------------------------------------------------------------------------- baselines


def _noiseless_power(network: ReceiverNetwork, scenes: Scenes) -> np.ndarray:
    d_m = np.linalg.norm(scenes.tx_enu_m[:, None, :] - network.enu_m[None], axis=-1)
    return np.stack([expected_power_dbm(p, d, n) for p, d, n
                     in zip(scenes.tx_power_dbm, d_m, scenes.exponent, strict=True)])


def test_expected_power_matches_the_simulator(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 50, np.random.default_rng(50), shadowing_sigma_db=0.0)
    np.testing.assert_allclose(_noiseless_power(network, scenes), scenes.rx_power_dbm, atol=1e-9)


def test_ml_fit_recovers_noiseless_scenes(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 12, np.random.default_rng(51), shadowing_sigma_db=0.0)
    power = _noiseless_power(network, scenes)
    power[6:, [1, 4]] = np.nan  # five receivers are still enough without noise
    est = ml_fit(power, network)
    assert est.shape == (12, 2)
    assert np.linalg.norm(est - scenes.tx_enu_m, axis=1).max() < 1_000.0


@settings(max_examples=100, deadline=None)
@given(power=hnp.arrays(np.float64, 7, elements=st.floats(-140.0, -30.0)),
       missing=hnp.arrays(bool, 7), exponent=st.floats(*EXPONENT_RANGE))
def test_weighted_centroid_stays_inside_the_bbox(power: np.ndarray, missing: np.ndarray,
                                                  exponent: float) -> None:
    network = load_network()
    missing[0] = False  # at least one detection
    power = np.where(missing, np.nan, power)[None, :]
    est = weighted_centroid(power, network.enu_m, exponent)[0]
    min_e, min_n, max_e, max_n = network.bbox_enu_m
    assert min_e - 1e-6 <= est[0] <= max_e + 1e-6
    assert min_n - 1e-6 <= est[1] <= max_n + 1e-6


def test_weighted_centroid_pulls_towards_the_strongest(network: ReceiverNetwork) -> None:
    power = np.full((1, 7), -120.0)
    power[0, network.index("milano")] = -60.0
    est = weighted_centroid(power, network.enu_m)[0]
    assert np.linalg.norm(est - network.enu_m[network.index("milano")]) < 100.0


def test_crb_positive_finite_and_larger_with_unknowns(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 200, np.random.default_rng(52))
    detected = np.ones((200, 7), bool)
    args = (scenes.tx_enu_m, scenes.exponent, detected, network, SHADOWING_SIGMA_DB)
    unknown = crb_rmse_m(*args)
    known = crb_rmse_m(*args, unknown_power=False, unknown_exponent=False)
    power_only = crb_rmse_m(*args, unknown_exponent=False)
    for crb in (unknown, known, power_only):
        assert np.isfinite(crb).all() and (crb > 0).all()
    assert (unknown >= power_only * (1 - 1e-9)).all() and (power_only >= known * (1 - 1e-9)).all()
    assert np.median(unknown) > np.median(known) * 1.2
    # Tens of kilometres on this network (DESIGN.md quotes ~29 km median over scenes).
    assert 5_000.0 < np.median(unknown) < 100_000.0
    # Linear in sigma.
    np.testing.assert_allclose(crb_rmse_m(scenes.tx_enu_m, scenes.exponent, detected, network,
                                          2 * SHADOWING_SIGMA_DB), 2 * unknown, rtol=1e-9)


def test_crb_infinite_with_too_few_detections(network: ReceiverNetwork) -> None:
    scenes = sample_scenes(network, 3, np.random.default_rng(53))
    detected = np.zeros((3, 7), bool)
    detected[:, :3] = True  # 3 links cannot pin 2 coordinates + power + exponent
    crb = crb_rmse_m(scenes.tx_enu_m, scenes.exponent, detected, network, 6.0)
    assert np.isinf(crb).all()
    known = crb_rmse_m(scenes.tx_enu_m, scenes.exponent, detected, network, 6.0,
                       unknown_power=False, unknown_exponent=False)
    assert np.isfinite(known).all()
