"""Physical and capture constants shared by the simulator, features and the API."""

import math

SAMPLE_RATE_HZ = 48_000
N_SAMPLES = 4_800
CENTER_FREQ_HZ = 145_500_000
CHANNEL_BW_HZ = 12_500.0
NOISE_FIGURE_DB = 6.0
THERMAL_NOISE_DBM_PER_HZ = -174.0
SNR_DETECT_DB = 3.0
MIN_RECEIVERS = 3
FREE_SPACE_LOSS_1KM_DB = 75.7
SHADOWING_SIGMA_DB = 6.0
EXPONENT_RANGE = (2.7, 3.5)
TX_POWER_RANGE_DBM = (30.0, 47.0)
CARRIER_OFFSET_RANGE_HZ = (-500.0, 500.0)
TX_MARGIN_M = 10_000.0
NBFM_DEVIATION_HZ = 2_500.0
DEFAULT_CONFIDENCE = 0.95


def noise_power_dbm(bandwidth_hz: float = SAMPLE_RATE_HZ) -> float:
    """Thermal noise power over `bandwidth_hz` with the receivers' noise figure."""
    return THERMAL_NOISE_DBM_PER_HZ + 10.0 * math.log10(bandwidth_hz) + NOISE_FIGURE_DB
