"""Baselines and the Cramér–Rao bound for RSS localization with unknown power and exponent."""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from serve_app.constants import EXPONENT_RANGE, FREE_SPACE_LOSS_1KM_DB, TX_MARGIN_M
from serve_app.receivers import ReceiverNetwork

_LN10 = np.log(10.0)


def weighted_centroid(power_dbm: np.ndarray, rx_enu_m: np.ndarray, exponent: float = 3.1
                      ) -> np.ndarray:
    """Centroid of the detected receivers weighted by 1/d̂² (d̂ from power); NaN = missing."""
    ok = np.isfinite(power_dbm)
    rel = np.where(ok, power_dbm - np.nanmax(power_dbm, axis=1, keepdims=True), -np.inf)
    w = 10.0 ** (2.0 * rel / (10.0 * exponent))
    return (w @ rx_enu_m) / w.sum(axis=1, keepdims=True)


def _log_dist(points_m: np.ndarray, rx_enu_m: np.ndarray) -> np.ndarray:
    d_km = np.maximum(np.linalg.norm(points_m[:, None, :] - rx_enu_m[None], axis=-1), 100.0)
    return 10.0 * np.log10(d_km / 1000.0)


def ml_fit(power_dbm: np.ndarray, network: ReceiverNetwork, grid_step_m: float = 2_000.0
           ) -> np.ndarray:
    """Maximum-likelihood position with unknown transmit power and exponent (grid, then refine)."""
    rx = network.enu_m
    min_e, min_n, max_e, max_n = network.bbox_enu_m
    ge = np.arange(min_e - TX_MARGIN_M, max_e + TX_MARGIN_M + 1, grid_step_m)
    gn = np.arange(min_n - TX_MARGIN_M, max_n + TX_MARGIN_M + 1, grid_step_m)
    grid = np.stack(np.meshgrid(ge, gn), -1).reshape(-1, 2)
    dlog = _log_dist(grid, rx)  # [G, R]
    m = np.isfinite(power_dbm).astype(np.float64)
    p = np.nan_to_num(power_dbm)
    cnt = m.sum(1, keepdims=True)
    best_rss = np.full(len(p), np.inf)
    best = np.zeros((len(p), 3))
    for n_exp in np.linspace(*EXPONENT_RANGE, 9):
        # r_i = p_i + n·D_i; the transmit power is the mean of r, RSS its spread.
        s_r = (m * p).sum(1, keepdims=True) + n_exp * (m @ dlog.T)
        s_rr = (m * p * p).sum(1, keepdims=True) + 2 * n_exp * ((m * p) @ dlog.T) \
            + n_exp**2 * (m @ (dlog**2).T)
        rss = s_rr - s_r**2 / cnt  # [B, G]
        j = np.argmin(rss, axis=1)
        val = rss[np.arange(len(p)), j]
        better = val < best_rss
        best_rss[better] = val[better]
        best[better, :2] = grid[j[better]]
        best[better, 2] = n_exp
    out = np.empty((len(p), 2))
    for i in range(len(p)):
        ok = m[i] > 0

        def resid(theta: np.ndarray, i: int = i, ok: np.ndarray = ok) -> np.ndarray:
            d = _log_dist(theta[None, :2], rx[ok])[0]
            return p[i, ok] - (theta[2] - theta[3] * d)

        x0 = best[i, :2]
        n0 = best[i, 2]
        p0 = float(np.mean(p[i, ok] + n0 * _log_dist(x0[None], rx[ok])[0]))
        res = least_squares(
            resid, np.array([x0[0], x0[1], p0, n0]),
            bounds=([-np.inf, -np.inf, -np.inf, EXPONENT_RANGE[0]],
                    [np.inf, np.inf, np.inf, EXPONENT_RANGE[1]]),
            x_scale=[1e4, 1e4, 10.0, 0.3],
        )
        out[i] = res.x[:2]
    return out


def crb_rmse_m(target_enu_m: np.ndarray, exponent: np.ndarray, detected: np.ndarray,
               network: ReceiverNetwork, sigma_db: float, *, unknown_power: bool = True,
               unknown_exponent: bool = True) -> np.ndarray:
    """Per-scene Cramér–Rao bound on position RMSE (metres); power/exponent unknown or known."""
    rx = network.enu_m
    diff = target_enu_m[:, None, :] - rx[None]  # [B, R, 2]
    d2 = np.maximum((diff**2).sum(-1), 100.0**2)
    g = -10.0 * exponent[:, None, None] / _LN10 * diff / d2[..., None]  # dμ/d(x, y)
    dlog = 10.0 * np.log10(np.sqrt(d2) / 1000.0)
    cols = [g]
    if unknown_power:
        cols.append(np.ones(d2.shape + (1,)))
    if unknown_exponent:
        cols.append(-dlog[..., None])
    jac = np.concatenate(cols, axis=-1) * detected[..., None]  # [B, R, 2..4]
    fim = np.einsum("bri,brj->bij", jac, jac) / sigma_db**2
    out = np.full(len(target_enu_m), np.inf)
    ok = detected.sum(1) >= jac.shape[-1]
    inv = np.linalg.pinv(fim[ok])
    out[ok] = np.sqrt(np.maximum(inv[:, 0, 0] + inv[:, 1, 1], 0.0))
    return out


def expected_power_dbm(tx_power_dbm: float, distance_m: np.ndarray, exponent: float) -> np.ndarray:
    """Received power without shadowing."""
    d_km = np.maximum(distance_m, 100.0) / 1000.0
    return tx_power_dbm - FREE_SPACE_LOSS_1KM_DB - 10.0 * exponent * np.log10(d_km)
