"""Training helpers and the reproducible training script (skipped without the [train] extra)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from serve_app.features import N_FEATURES
from serve_app.model import OnnxLocalizer, sha256_file
from serve_app.receivers import ReceiverNetwork, load_network

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def network() -> ReceiverNetwork:
    return load_network()


@pytest.fixture(scope="module")
def train() -> ModuleType:
    pytest.importorskip("torch")
    from serve_app import train

    return train


def exact_chi2_2dof(n: int) -> np.ndarray:
    """n evenly spaced quantiles of the chi-squared distribution with 2 degrees of freedom."""
    u = (np.arange(n) + 0.5) / n
    return -2.0 * np.log1p(-u)


@pytest.mark.parametrize("levels", [(0.68, 0.95), (0.3935,), (0.5, 0.9, 0.99)])
def test_calibrate_scale_is_one_for_exact_chi2(train: ModuleType, levels) -> None:
    assert train.calibrate_scale(exact_chi2_2dof(20_000), levels) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("factor", [0.3, 0.7, 1.6, 4.0])
def test_calibrate_scale_follows_a_scaled_distribution(train: ModuleType, factor: float) -> None:
    m2 = factor * exact_chi2_2dof(20_000)
    scale = train.calibrate_scale(m2, (0.68, 0.95))
    assert scale == pytest.approx(factor, rel=0.01)
    # After scaling, the ellipses cover what they claim.
    for p in (0.68, 0.95):
        assert np.mean(m2 <= scale * -2.0 * math.log(1.0 - p)) == pytest.approx(p, abs=0.005)


def test_calibrate_scale_on_random_gaussian_errors(train: ModuleType) -> None:
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.5], [1.5, 2.0]]) * 1e8
    err = rng.multivariate_normal([0.0, 0.0], 2.5 * cov, 20_000)
    m2 = train.mahalanobis2(np.zeros_like(err), np.broadcast_to(cov, (20_000, 2, 2)), err)
    assert train.calibrate_scale(m2, (0.68, 0.95)) == pytest.approx(2.5, rel=0.05)


def test_mahalanobis_and_nll_match_the_gaussian_density(train: ModuleType) -> None:
    import torch
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(1)
    mean = rng.normal(0, 3e4, (6, 2))
    a = rng.normal(0, 2e4, (6, 2, 2))
    cov = a @ a.transpose(0, 2, 1) + np.eye(2) * 1e6
    target = mean + rng.normal(0, 2e4, (6, 2))
    m2 = train.mahalanobis2(mean, cov, target)
    logpdf = np.array([multivariate_normal(mean[i], cov[i]).logpdf(target[i]) for i in range(6)])
    expected_m2 = [float(d @ np.linalg.solve(c, d)) for d, c in zip(target - mean, cov,
                                                                   strict=True)]
    np.testing.assert_allclose(m2, expected_m2, rtol=1e-9)
    nll = train.gaussian_nll(torch.from_numpy(mean), torch.from_numpy(cov),
                             torch.from_numpy(target))
    # In units of SCALE_M: drops log(2 pi) and 2 log(SCALE_M) from -log p.
    expected = np.mean(-logpdf) - math.log(2 * math.pi) - 2 * math.log(train.SCALE_M)
    assert float(nll) == pytest.approx(expected, rel=1e-9)


def test_network_outputs_a_valid_covariance(train: ModuleType) -> None:
    import torch

    torch.manual_seed(0)
    net = train.LocalizationNet(7, hidden=16).eval()
    x = torch.zeros(5, 7, N_FEATURES)
    x[:, :4, 0] = torch.linspace(-110, -70, 4)
    x[:, :4, 1] = 20.0
    x[:, :4, 2] = 1.0
    with torch.no_grad():
        mean, cov = net(x)
        net.cov_scale.fill_(2.0)
        _, cov2 = net(x)
    assert mean.shape == (5, 2) and cov.shape == (5, 2, 2)
    c = cov.double().numpy()
    np.testing.assert_array_equal(c[:, 0, 1], c[:, 1, 0])
    assert (np.linalg.eigvalsh(c) > 0).all()
    assert (np.sqrt(c[:, [0, 1], [0, 1]]) >= train.MIN_SIGMA_M * (1 - 1e-6)).all()
    np.testing.assert_allclose(cov2.numpy(), 2.0 * cov.numpy(), rtol=1e-6)


def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "serve_app.train", "--n-train", "600", "--n-val", "300",
            "--epochs", "1", "--workers", "1", "--out", str(out)]


@pytest.mark.slow
def test_training_is_bit_reproducible_and_serves(train: ModuleType, tmp_path: Path,
                                                 network: ReceiverNetwork) -> None:
    outs = [tmp_path / "run_a", tmp_path / "run_b"]
    # Both runs at once: each is single-threaded, so they do not disturb each other.
    procs = [subprocess.Popen(_train_cmd(out), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for out in outs]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        assert "DeprecationWarning" not in log
    a, b = (out / "localization_model.onnx" for out in outs)
    assert a.read_bytes() == b.read_bytes()
    summary = json.loads((outs[0] / "training_summary.json").read_text())
    assert summary["onnx_sha256"] == sha256_file(a)
    assert summary["n_train"] == 600
    assert all(0.2 <= s <= 5.0 for s in np.atleast_1d(summary["cov_scale"]))

    model = OnnxLocalizer(a, network.ids, expected_sha256=summary["onnx_sha256"])
    assert model.receiver_ids == network.ids
    assert model.enu_origin == {"latitude": network.origin_lat,
                                "longitude": network.origin_lon, "altitude_m": 0.0}
    from serve_app.dataset import simulate_dataset

    golden = simulate_dataset(64, 5, workers=1).features
    model.validate(golden)
    mean, cov = model.predict(golden)
    assert mean.shape == (64, 2) and cov.shape == (64, 2, 2)

    # The evaluation script runs on it and writes the model card.
    from serve_app import evaluate

    assert evaluate.main([str(a), "--n", "40", "--workers", "1", "--out", str(outs[0])]) == 0
    card = json.loads((outs[0] / "model_card.json").read_text())
    assert card["onnx_sha256"] == summary["onnx_sha256"]
    assert card["receivers"] == network.ids
    assert [row["missing_receivers"] for row in card["evaluation"]] == [0, 1, 2, 3]
    assert "| 0 |" in (outs[0] / "README.md").read_text()
