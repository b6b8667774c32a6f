"""Scene simulator: transmitters, log-distance path loss with shadowing, NBFM IQ per receiver.

The physics is the contract of DESIGN.md ("Receiver network and physics"); the training data,
the tests and the load generators all come from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.constants import (
    CARRIER_OFFSET_RANGE_HZ,
    EXPONENT_RANGE,
    FREE_SPACE_LOSS_1KM_DB,
    N_SAMPLES,
    NBFM_DEVIATION_HZ,
    SAMPLE_RATE_HZ,
    SHADOWING_SIGMA_DB,
    TX_MARGIN_M,
    TX_POWER_RANGE_DBM,
    noise_power_dbm,
)
from serve_app.receivers import ReceiverNetwork

MIN_DISTANCE_M = 100.0
_N_TONES = 3
_TONE_RANGE_HZ = (300.0, 3000.0)


@dataclass
class Scenes:
    """A batch of simulated scenes; arrays are [B] or [B, R] (R = receivers of the network)."""

    tx_enu_m: np.ndarray  # [B, 2] east, north
    tx_power_dbm: np.ndarray  # [B]
    exponent: np.ndarray  # [B]
    shadowing_db: np.ndarray  # [B, R]
    rx_power_dbm: np.ndarray  # [B, R] signal power at each receiver
    carrier_offset_hz: np.ndarray  # [B]
    present: np.ndarray  # [B, R] bool: receiver took part in the capture

    def __len__(self) -> int:
        return int(self.tx_power_dbm.shape[0])


def path_loss_db(distance_m: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Log-distance path loss without shadowing: 75.7 dB + 10 n log10(d / 1 km)."""
    d_km = np.maximum(distance_m, MIN_DISTANCE_M) / 1000.0
    return FREE_SPACE_LOSS_1KM_DB + 10.0 * exponent * np.log10(d_km)


def sample_scenes(
    network: ReceiverNetwork,
    n: int,
    rng: np.random.Generator,
    *,
    max_missing: int = 0,
    p_missing: float = 0.5,
    exact_missing: int | None = None,
    shadowing_sigma_db: float = SHADOWING_SIGMA_DB,
) -> Scenes:
    """Draw `n` scenes; with `max_missing` > 0 a fraction `p_missing` lose 1..max_missing receivers.

    `exact_missing` instead removes exactly that many random receivers from every scene.
    """
    r = len(network)
    min_e, min_n, max_e, max_n = network.bbox_enu_m
    east = rng.uniform(min_e - TX_MARGIN_M, max_e + TX_MARGIN_M, n)
    north = rng.uniform(min_n - TX_MARGIN_M, max_n + TX_MARGIN_M, n)
    tx = np.stack([east, north], axis=-1)
    tx_power = rng.uniform(*TX_POWER_RANGE_DBM, n)
    exponent = rng.uniform(*EXPONENT_RANGE, n)
    shadowing = rng.normal(0.0, shadowing_sigma_db, (n, r))
    offset = rng.uniform(*CARRIER_OFFSET_RANGE_HZ, n)
    dist = np.linalg.norm(tx[:, None, :] - network.enu_m[None, :, :], axis=-1)
    rx_power = tx_power[:, None] - path_loss_db(dist, exponent[:, None]) - shadowing
    present = np.ones((n, r), dtype=bool)
    if max_missing > 0 or exact_missing:
        if exact_missing is not None:
            n_missing = np.full(n, exact_missing)
        else:
            n_missing = np.where(
                rng.random(n) < p_missing, rng.integers(1, max_missing + 1, n), 0
            )
        order = np.argsort(rng.random((n, r)), axis=1)
        ranks = np.argsort(order, axis=1)
        present = ranks >= n_missing[:, None]
    return Scenes(tx, tx_power, exponent, shadowing, rx_power, offset, present)


def synthesize_iq(
    network: ReceiverNetwork,
    scenes: Scenes,
    rng: np.random.Generator,
    *,
    n_samples: int = N_SAMPLES,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
) -> np.ndarray:
    """Complex64 IQ [B, R, S] for the scenes: one NBFM emission, per-link power, thermal noise.

    Normalized so that 10·log10(mean|iq|²) + calibration_db is the received power in dBm.
    Receivers absent from a scene get all-zero IQ (callers drop them from requests).
    """
    b, r = scenes.rx_power_dbm.shape
    t = np.arange(n_samples, dtype=np.float64) / sample_rate_hz
    # NBFM: a few audio tones; the phase is the closed-form integral of the deviation.
    tone_hz = rng.uniform(*_TONE_RANGE_HZ, (b, _N_TONES))
    tone_amp = rng.dirichlet(np.ones(_N_TONES), b)
    tone_phase = rng.uniform(0.0, 2.0 * np.pi, (b, _N_TONES))
    beta = NBFM_DEVIATION_HZ * tone_amp / tone_hz
    phase = 2.0 * np.pi * scenes.carrier_offset_hz[:, None] * t[None, :]
    for k in range(_N_TONES):
        phase += beta[:, k, None] * np.sin(
            2.0 * np.pi * tone_hz[:, k, None] * t[None, :] + tone_phase[:, k, None]
        )
    emission = np.exp(1j * phase).astype(np.complex64)  # [B, S], unit power

    link_phase = rng.uniform(0.0, 2.0 * np.pi, (b, r))
    amp_mw = np.sqrt(10.0 ** (scenes.rx_power_dbm / 10.0)) * np.exp(1j * link_phase)
    scale = 10.0 ** (-network.calibration_db / 20.0)  # mW amplitude → capture units
    iq = (amp_mw * scale[None, :]).astype(np.complex64)[:, :, None] * emission[:, None, :]
    noise_std = np.sqrt(10.0 ** (noise_power_dbm(sample_rate_hz) / 10.0) / 2.0) * scale
    noise = rng.standard_normal((b, r, n_samples, 2), dtype=np.float32)
    noise *= noise_std.astype(np.float32)[None, :, None, None]
    iq += noise.view(np.complex64)[..., 0]
    iq[~scenes.present] = 0
    return iq
