"""Feature extraction speed: captures/s for batches of standard captures in one process.

    python load/bench_features.py [--batch 32] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from serve_app.features import extract_features
from serve_app.receivers import load_network
from serve_app.simulate import sample_scenes, synthesize_iq


def main() -> None:
    """Time extract_features on one batch, repeatedly; print captures/s."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    net = load_network()
    rng = np.random.default_rng(0)
    scenes = sample_scenes(net, a.batch, rng)
    iq = synthesize_iq(net, scenes, rng)  # [batch, 7, 4800] complex64
    extract_features(iq, net.calibration_db)  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        extract_features(iq, net.calibration_db)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   platform.processor())
    print(f"machine: {os.cpu_count()} cores, {cpu}, load {os.getloadavg()[0]:.2f}")
    print(f"batch {a.batch} x {iq.shape[1]} x {iq.shape[2]}: median {med * 1e3:.2f} ms, "
          f"p90 {np.percentile(times, 90) * 1e3:.2f} ms -> {a.batch / med:,.0f} captures/s "
          f"(one process, one thread)")


if __name__ == "__main__":
    main()
