"""Feature extraction: IQ [B, R, S] → per-receiver signal power, noise floor, SNR, detection.

Vectorized over the batch with numpy. Serving and training both call `extract_features`,
so the model sees the same estimator in both (no training/serving skew).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from serve_app.constants import (
    CARRIER_OFFSET_RANGE_HZ,
    CHANNEL_BW_HZ,
    SAMPLE_RATE_HZ,
    SNR_DETECT_DB,
)

FEATURE_SPEC_VERSION = "rss-v1"
FEATURE_NAMES = ("power_dbm", "snr_db", "detected")
N_FEATURES = len(FEATURE_NAMES)
SEGMENT_LEN = 480  # 10 ms Welch segments → 100 Hz bins at 48 kHz
_GUARD_HZ = 1_000.0  # between the channel edge and the bins used for the noise floor
_FLOOR = 1e-30


@dataclass
class Features:
    """Per-receiver estimates; every array is [B, R]."""

    power_dbm: np.ndarray  # in-channel signal power, noise subtracted
    noise_dbm: np.ndarray  # noise floor over the whole captured band
    snr_db: np.ndarray  # in-channel SNR
    detected: np.ndarray  # bool: present and SNR >= threshold
    carrier_offset_hz: np.ndarray  # [B] estimated carrier offset, shared by the capture

    def model_input(self) -> np.ndarray:
        """ONNX input [B, R, 3] float32: (power_dbm, snr_db, detected), zero where masked."""
        det = self.detected
        out = np.zeros(det.shape + (N_FEATURES,), np.float32)
        out[..., 0] = np.where(det, self.power_dbm, 0.0)
        out[..., 1] = np.where(det, self.snr_db, 0.0)
        out[..., 2] = det
        return out


def _window(n: int) -> np.ndarray:
    return np.hanning(n + 1)[:-1].astype(np.float32)  # periodic Hann


_WINDOW = _window(SEGMENT_LEN)


def welch_psd(iq: np.ndarray, workers: int = 1) -> np.ndarray:
    """Power per FFT bin [B, R, SEGMENT_LEN], DC-centred; bins sum to mean|iq|² for white noise."""
    b, r, s = iq.shape
    n_seg = s // SEGMENT_LEN
    if n_seg < 1:
        raise ValueError(f"need at least {SEGMENT_LEN} samples per receiver, got {s}")
    seg = iq[:, :, : n_seg * SEGMENT_LEN].astype(np.complex64, copy=False)
    seg = seg.reshape(b, r, n_seg, SEGMENT_LEN) * _WINDOW
    # scipy.fft keeps complex64 (numpy's fft upcasts to complex128 and is ~3x slower here).
    spec = scipy.fft.fft(seg, axis=-1, overwrite_x=True, workers=workers)
    power = (spec.real**2 + spec.imag**2).sum(axis=2).astype(np.float64)
    power /= n_seg * SEGMENT_LEN * float(np.sum(_WINDOW.astype(np.float64) ** 2))
    return np.fft.fftshift(power, axes=-1)


def extract_features(
    iq: np.ndarray,
    calibration_db: np.ndarray,
    present: np.ndarray | None = None,
    *,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
    snr_threshold_db: float = SNR_DETECT_DB,
    workers: int = 1,
) -> Features:
    """Estimate per-receiver power/noise/SNR from complex IQ [B, R, S] (absent slots ignored)."""
    if iq.ndim != 3:
        raise ValueError(f"iq must be [batch, receivers, samples], got shape {iq.shape}")
    b, r, _ = iq.shape
    present = np.ones((b, r), bool) if present is None else np.asarray(present, bool)
    psd = welch_psd(iq, workers)  # [B, R, K] float64
    k = psd.shape[-1]
    bin_hz = sample_rate_hz / k
    freqs = (np.arange(k) - k // 2) * bin_hz
    half_ch = CHANNEL_BW_HZ / 2.0

    # The carrier offset is shared by the whole capture: search it on the sum of the
    # noise-normalized spectra of the present receivers (helps the weak ones).
    median = np.median(psd, axis=-1, keepdims=True)
    norm = np.where(present[..., None], psd / np.maximum(median, _FLOOR), 0.0).sum(axis=1)
    lo, hi = CARRIER_OFFSET_RANGE_HZ
    candidates = np.arange(lo - _GUARD_HZ, hi + _GUARD_HZ + bin_hz / 2, bin_hz)
    in_ch = np.abs(freqs[None, :] - candidates[:, None]) <= half_ch  # [C, K]
    score = norm @ in_ch.T.astype(np.float64)  # [B, C]
    carrier = candidates[np.argmax(score, axis=1)]  # [B]

    offset = np.abs(freqs[None, :] - carrier[:, None])  # [B, K]
    ch_mask = (offset <= half_ch)[:, None, :]
    noise_mask = (offset > half_ch + _GUARD_HZ)[:, None, :]
    n_ch = ch_mask.sum(axis=-1)
    noise_per_bin = (psd * noise_mask).sum(axis=-1) / noise_mask.sum(axis=-1)
    ch_power = (psd * ch_mask).sum(axis=-1)
    noise_ch = noise_per_bin * n_ch
    signal = np.maximum(ch_power - noise_ch, _FLOOR)
    snr_db = 10.0 * np.log10(signal / np.maximum(noise_ch, _FLOOR))
    cal = np.asarray(calibration_db, np.float64)[None, :]
    power_dbm = 10.0 * np.log10(signal) + cal
    noise_dbm = 10.0 * np.log10(np.maximum(noise_per_bin * k, _FLOOR)) + cal
    detected = present & (snr_db >= snr_threshold_db)
    # The window search only finds *a* channel holding the emission: for a narrow NBFM
    # spectrum many windows tie (errors up to ~1.3 kHz). NBFM spectra are symmetric about
    # the carrier, so report the centroid of the noise-normalized excess power in the window.
    # (The channel mask, hence power and SNR, deliberately stays the one of the search.)
    # Only detecting receivers contribute (the others add noise only), all present if none.
    use = np.where(detected.any(axis=1, keepdims=True), detected, present)
    excess = np.where(use[..., None] & ch_mask,
                      psd / np.maximum(noise_per_bin, _FLOOR)[..., None] - 1.0, 0.0)
    weight = np.maximum(excess, 0.0).sum(axis=1)  # [B, K]
    total = weight.sum(axis=-1)
    # Row-wise sum, not a matmul: identical results whatever the batch size.
    centroid = (weight * freqs).sum(axis=-1) / np.where(total > 0, total, 1.0)
    carrier = np.where(total > 0, centroid, carrier)
    return Features(power_dbm, noise_dbm, snr_db, detected, carrier)
