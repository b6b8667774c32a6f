"""Simulated datasets of model inputs: scenes → IQ → the serving feature extraction."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from serve_app.features import extract_features
from serve_app.receivers import load_network
from serve_app.simulate import sample_scenes, synthesize_iq

CHUNK = 500


@dataclass
class Dataset:
    """Model inputs with the truth they were simulated from."""

    features: np.ndarray  # [N, R, 3] float32, the ONNX input
    power_dbm: np.ndarray  # [N, R] estimated signal power (NaN where not detected)
    target_enu_m: np.ndarray  # [N, 2]
    tx_power_dbm: np.ndarray  # [N]
    exponent: np.ndarray  # [N]

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _chunk(args: tuple) -> tuple[np.ndarray, ...]:
    receivers_path, n, seed, max_missing, exact_missing = args
    network = load_network(receivers_path)
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(network, n, rng, max_missing=max_missing, exact_missing=exact_missing)
    iq = synthesize_iq(network, scenes, rng)
    feats = extract_features(iq, network.calibration_db, scenes.present)
    power = np.where(feats.detected, feats.power_dbm, np.nan)
    return (feats.model_input(), power, scenes.tx_enu_m, scenes.tx_power_dbm, scenes.exponent)


def simulate_dataset(
    n: int,
    seed: int,
    *,
    receivers_path: str | None = None,
    max_missing: int = 4,
    exact_missing: int | None = None,
    workers: int = 2,
    label: str = "scenes",
) -> Dataset:
    """Simulate `n` scenes in seeded chunks (identical for any worker count), with progress.

    Each worker process loads the network from `receivers_path` (default: the shipped one).
    """
    sizes = [min(CHUNK, n - i) for i in range(0, n, CHUNK)]
    seeds = np.random.SeedSequence(seed).spawn(len(sizes))
    jobs = [(receivers_path, s, ss, max_missing, exact_missing)
            for s, ss in zip(sizes, seeds, strict=True)]
    parts: list[tuple[np.ndarray, ...]] = []
    t0 = time.monotonic()
    done = 0

    def progress() -> None:
        rate = done / max(time.monotonic() - t0, 1e-9)
        sys.stderr.write(f"\r  simulating {label}: {done}/{n} ({rate:,.0f}/s)")
        sys.stderr.flush()

    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for part, size in zip(pool.map(_chunk, jobs), sizes, strict=True):
                parts.append(part)
                done += size
                progress()
    else:
        for job in jobs:
            parts.append(_chunk(job))
            done += job[1]
            progress()
    sys.stderr.write("\n")
    cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
    return Dataset(*cols)
