"""What each sample type's quantisation costs: SigMF round trip against complex64 JSON.

For every type, simulated scenes are written as SigMF recording sets, read back, and both
the read capture and the complex64 JSON of the same capture window go through the serving
core (decode → features → ONNX → postprocess, in process). Prints the position difference
and the largest change of a receiver's power (docs/recordings.md).

    python load/sigmf_roundtrip.py --n 200
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from harness.inprocess import localize  # load/ is on sys.path
from pyproj import Geod

from serve_app.decode import encode_capture
from serve_app.io.datatypes import SAMPLE_TYPES
from serve_app.io.sigmf import read_recording_set, write_simulated_sets
from serve_app.model import OnnxLocalizer
from serve_app.receivers import load_network

MODEL = Path(__file__).resolve().parent.parent / "models" / "localization_model.onnx"


def main() -> None:
    """Run the comparison for every sample type and print one line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-missing", type=int, default=2)
    a = p.parse_args()
    net = load_network()
    model = OnnxLocalizer(MODEL, net.ids)
    geod = Geod(ellps="WGS84")
    print(f"{'type':8} {'n':>4} {'median m':>9} {'P95 m':>8} {'max m':>8} {'max dP dB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for dt in SAMPLE_TYPES:
            sim = write_simulated_sets(Path(tmp) / dt, a.n, a.seed, network=net, datatype=dt,
                                       max_missing=a.max_missing, start_s=1.8e9)
            assert sim.iq is not None
            dist, dp = [], []
            for i, path in enumerate(sim.paths):
                ids = [net.ids[j] for j in np.flatnonzero(sim.present[i])]
                x, px = localize(read_recording_set(path, net).to_request(), net, model)
                y, py = localize(encode_capture(sim.iq[i][sim.present[i]], ids), net, model)
                dp.append(float(np.abs(px - py).max()))
                assert (x is None) == (y is None), f"{path}: localized by one path only"
                if x is not None and y is not None:
                    a_, b_ = x["position"], y["position"]
                    dist.append(geod.inv(a_["longitude"], a_["latitude"], b_["longitude"],
                                         b_["latitude"])[2])
            d = np.array(dist)
            print(f"{dt:8} {len(d):>4} {np.median(d):>9.3g} {np.percentile(d, 95):>8.3g} "
                  f"{d.max():>8.3g} {max(dp):>10.2g}")


if __name__ == "__main__":
    main()
