"""Settings of the peers side by side: captures/s and CPU ms per capture, N for reference.

    python load/peers/sweep.py                        # the variants below, b64 and batch
    python load/peers/sweep.py --variants "mlserver:parallel_workers=1;bentoml:workers=2"

Each variant is `NAME[:KEY=VALUE,...]` (load/peers/run.py --set); N (load/naive_app.py)
runs first and last, so a change of load during the sweep shows. Saturation as in
load/bench.py (closed loop, best of 3 phases, CPU of every process of the server).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402 - load/bench.py

VARIANTS = ("mlserver:parallel_workers=0;mlserver:parallel_workers=1;"
            "mlserver:parallel_workers=2;mlserver:parallel_workers=0,max_batch_time=0.002;"
            "bentoml:workers=1;bentoml:workers=2;bentoml:workers=1,async=1;"
            "bentoml:workers=1,threads=2")


def main() -> int:
    """Run the sweep and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=VARIANTS, help="';'-separated NAME[:K=V,...]")
    p.add_argument("--workloads", default="b64,batch", help="of b64, pairs, batch")
    p.add_argument("--duration", type=float, default=9.0)
    p.add_argument("--warmup", type=float, default=3.0)
    a = p.parse_args()
    keys = {"b64": 0, "pairs": 1, "batch": 2}
    all_w = bench.build_workloads(64, 16, 4, seed=21)
    workloads = [all_w[keys[k]] for k in a.workloads.split(",")]
    rows: list[tuple[str, str, dict]] = []

    def measure(label: str, srv: bench.Server) -> None:
        assert srv.proc is not None
        for w in workloads:
            r = bench.saturate(w, srv.port, a.warmup, a.duration, srv.proc.pid)
            rows.append((label, w.name, r))
            print(f"{label} | {w.name}: {r['captures_s']:.0f} captures/s, "
                  f"{r['cpu_ms_per_capture']:.2f} CPU ms/cap, non-200 {r['non_200']}, "
                  f"load {r['load']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="rfloc-sweep-") as tmp_s:
        tmp = Path(tmp_s)
        for round_ in ("first", "last"):
            naive = bench.start_naive(tmp)
            try:
                measure(f"N ({round_})", naive)
            finally:
                naive.stop()
            if round_ == "last":
                break
            for v in a.variants.split(";"):
                name, _, sets = v.partition(":")
                srv, shown = bench.start_peer(tmp, name, [s for s in sets.split(",") if s])
                try:
                    measure(f"{bench.PEERS[name]} {shown}", srv)
                finally:
                    srv.stop()
    print("\n| server, settings | workload | captures/s | CPU ms/cap | non-200 | load 1/5/15 |")
    print("|---|---|--:|--:|---|---|")
    for label, wname, r in rows:
        print(f"| {label} | {wname} | {r['captures_s']:.0f} | {r['cpu_ms_per_capture']:.2f} | "
              f"{r['non_200'] or '—'} | {r['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
