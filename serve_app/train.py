"""Train the localization network on simulated features and export it to ONNX.

    python -m serve_app.train --out models/   # needs the [train] extra (PyTorch CPU)

The training features come from `serve_app.dataset`, i.e. from simulated IQ pushed through
the same `extract_features` that serving runs. With the same seed the export is
bit-for-bit identical (single-threaded, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from serve_app.dataset import simulate_dataset
from serve_app.features import FEATURE_NAMES, FEATURE_SPEC_VERSION
from serve_app.model import COV_OUTPUT, INPUT_NAME, MEAN_OUTPUT, sha256_file
from serve_app.receivers import load_network
from serve_app.uncertainty import chi2_scale

SCALE_M = 100_000.0  # network outputs are in units of 100 km
MIN_SIGMA_M = 200.0


class LocalizationNet(nn.Module):
    """Masked per-receiver features [N, R, 3] → ENU mean [N, 2] and covariance [N, 2, 2]."""

    def __init__(self, n_receivers: int, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4 * n_receivers, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 5),
        )
        # Calibrated covariance scale per number of detecting receivers (index 0..R).
        self.register_buffer("cov_scale", torch.ones(n_receivers + 1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        power, snr, det = features[..., 0], features[..., 1], features[..., 2]
        n_det = det.sum(-1, keepdim=True).clamp(min=1.0)
        # The transmit power is unknown: give the network powers relative to their mean too.
        mean_power = (power * det).sum(-1, keepdim=True) / n_det
        x = torch.cat(
            [(power - mean_power) * det / 10.0, (power + 100.0) * det / 20.0,
             snr * det / 20.0, det], dim=-1,
        )
        h = self.body(x)
        mean = h[:, :2] * SCALE_M
        log_sigma = h[:, 2:4] + math.log(SCALE_M)
        sigma = torch.exp(log_sigma.clamp(min=math.log(MIN_SIGMA_M), max=math.log(1e7)))
        rho = 0.98 * torch.tanh(h[:, 4])
        s_e, s_n = sigma[:, 0], sigma[:, 1]
        c_en = rho * s_e * s_n
        cov = torch.stack(
            [torch.stack([s_e * s_e, c_en], -1), torch.stack([c_en, s_n * s_n], -1)], -2
        )
        scale = self.get_buffer("cov_scale")[det.sum(-1).long()]
        return mean, cov * scale[:, None, None]


def gaussian_nll(mean: torch.Tensor, cov: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean bivariate Gaussian negative log-likelihood, in units of SCALE_M."""
    d = (target - mean) / SCALE_M
    c = cov / SCALE_M**2
    det = c[:, 0, 0] * c[:, 1, 1] - c[:, 0, 1] ** 2
    maha = (c[:, 1, 1] * d[:, 0] ** 2 - 2 * c[:, 0, 1] * d[:, 0] * d[:, 1]
            + c[:, 0, 0] * d[:, 1] ** 2) / det
    return (0.5 * maha + 0.5 * torch.log(det)).mean()


def mahalanobis2(mean: np.ndarray, cov: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each target from its predicted Gaussian."""
    d = target - mean
    return np.einsum("ni,nij,nj->n", d, np.linalg.inv(cov), d)


def calibrate_scale(m2: np.ndarray, levels: tuple[float, ...]) -> float:
    """Covariance scale minimizing the coverage error over `levels`, in units of (1 - p).

    Weighting by 1 / (1 - p) makes a miss of 0.02 at p = 0.95 count as much as one of 0.13
    at p = 0.68: under-covering the tail is the error users pay for, so the fit prefers
    erring wide at 68 % to erring narrow at 95 %.
    """
    k2 = np.array([chi2_scale(p) ** 2 for p in levels])
    scales = np.exp(np.linspace(np.log(0.2), np.log(5.0), 2001))
    cover = (m2[None, None, :] <= scales[:, None, None] * k2[None, :, None]).mean(-1)
    p = np.array(levels)[None, :]
    err = (((cover - p) / (1.0 - p)) ** 2).sum(-1)
    return float(scales[int(np.argmin(err))])


def train(args: argparse.Namespace) -> dict:
    """Simulate, train, calibrate, export; returns the training summary."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    network = load_network(args.receivers)
    print(f"receivers: {', '.join(network.ids)}", flush=True)
    train_ds = simulate_dataset(args.n_train, args.seed, receivers_path=args.receivers,
                                workers=args.workers, label="training scenes")
    val_ds = simulate_dataset(args.n_val, args.seed + 1, receivers_path=args.receivers,
                              workers=args.workers, label="calibration scenes")
    x = torch.from_numpy(train_ds.features)
    y = torch.from_numpy(train_ds.target_enu_m.astype(np.float32))
    xv = torch.from_numpy(val_ds.features)
    yv = torch.from_numpy(val_ds.target_enu_m.astype(np.float32))

    model = LocalizationNet(len(network), args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            mean, cov = model(x[idx])
            loss = gaussian_nll(mean, cov, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            mv, cv = model(xv)
            val_nll = float(gaussian_nll(mv, cv, yv))
            med = float(torch.linalg.norm(mv - yv, dim=1).median())
        print(f"epoch {epoch + 1:3d}/{args.epochs}  train nll {total / len(x):7.4f}  "
              f"val nll {val_nll:7.4f}  val median error {med / 1000:6.1f} km  "
              f"({time.monotonic() - t0:5.0f} s)", flush=True)

    # Calibrate: per number of detecting receivers, one covariance scale that brings the
    # 68 % and 95 % ellipses as close to 68 % and 95 % coverage of the calibration scenes as
    # one scale allows (the NLL alone leaves the heavy-tailed errors under-covered).
    with torch.no_grad():
        mv, cv = model(xv)
    m2 = mahalanobis2(mv.numpy().astype(np.float64), cv.numpy().astype(np.float64),
                      val_ds.target_enu_m)
    n_det = val_ds.features[..., 2].sum(-1).astype(int)
    levels = tuple(args.calibration_levels)
    scales = np.full(len(network) + 1, calibrate_scale(m2, levels))  # rare counts: global
    for k in range(len(network) + 1):
        sel = n_det == k
        if sel.sum() >= 200:
            scales[k] = calibrate_scale(m2[sel], levels)
    model.get_buffer("cov_scale").copy_(torch.from_numpy(scales.astype(np.float32)))
    print("covariance calibration scales by detecting receivers: "
          + ", ".join(f"{k}: {v:.3f}" for k, v in enumerate(scales)), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "localization_model.onnx"
    export_onnx(model, network, onnx_path, args)
    summary = {
        "seed": args.seed, "n_train": args.n_train, "n_val": args.n_val,
        "epochs": args.epochs, "hidden": args.hidden, "cov_scale": scales.round(4).tolist(),
        "onnx_sha256": sha256_file(onnx_path),
    }
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB) "
          f"sha256 {summary['onnx_sha256']}", flush=True)
    return summary


def export_onnx(model: nn.Module, network, path: Path, args: argparse.Namespace) -> None:
    """Export with named outputs, a dynamic batch axis and the contract in metadata."""
    model.eval()
    dummy = torch.zeros(2, len(network), len(FEATURE_NAMES))
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but gives byte-identical files run to run.
        # (The warning is attributed to this module, not torch.onnx: filter on its text.)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), input_names=[INPUT_NAME],
            output_names=[MEAN_OUTPUT, COV_OUTPUT],
            dynamic_axes={INPUT_NAME: {0: "N"}, MEAN_OUTPUT: {0: "N"}, COV_OUTPUT: {0: "N"}},
            opset_version=17, dynamo=False,
        )
    proto = onnx.load(str(path))
    meta = {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "receivers": json.dumps(network.ids),
        "enu_origin": json.dumps({"latitude": network.origin_lat,
                                  "longitude": network.origin_lon,
                                  "altitude_m": network.origin_alt_m}),
        "outputs": json.dumps({MEAN_OUTPUT: "ENU east, north (m)",
                               COV_OUTPUT: "2x2 covariance (m^2), east-north"}),
        "training_data": json.dumps({"seed": args.seed, "n_train": args.n_train,
                                     "simulator": "serve_app.simulate (DESIGN.md physics)",
                                     "missing_receivers": "0-4, p=0.5"}),
    }
    del proto.metadata_props[:]
    for k, v in sorted(meta.items()):
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "rfloc-serve"
    proto.producer_version = ""
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the training script."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models")
    p.add_argument("--receivers", default=None, help="receivers.yaml (default: shipped)")
    p.add_argument("--seed", type=int, default=20261127)
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-val", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calibration-levels", type=float, nargs="+", default=[0.68, 0.95])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m serve_app.train`."""
    args = parse_args(argv)
    summary = train(args)
    Path(args.out, "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
