"""`rfloc batch` at growing input sizes: driver and worker memory, wall time, captures/s.

For each size: `rfloc simulate --parquet` writes standard captures (7 receivers x 4,800
cf32_le samples, 269 kB each), then `rfloc batch` localizes them on its own local Ray
instance while this script samples the peak RSS (VmHWM) of the driver and of every Ray
worker process. Then one run over the largest input with a small object store, to show
that the job streams through it (the figure Ray gives for spilled bytes). L, the
in-process limit of DESIGN.md, is measured in the same run (load/bench.py's L, single
iq_b64), and the batch UDF alone in one process on the same Parquet rows.

Rewrites the section "## Offline batch" of docs/performance.md, keeping every other one.

    python load/batch_bench.py                                  # 4k, 16k, 64k captures
    python load/batch_bench.py --sizes 1024,4096 --doc ''       # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    DOC,
    REPO,
    InProcess,
    build_workloads,
    fmt,
    loadavg,
    machine,
    measure_l,
    replace_sections,
)

CAPTURE_BYTES = 7 * 4800 * 8


def _tree(root: int) -> dict[int, str]:
    """`root` and its descendants: pid -> command line."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    out = {}
    for pid in found:
        with contextlib.suppress(OSError):
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
    return out


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S
    return 0.0


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) of a process in KiB: its peak RSS, and its private memory now."""
    hwm = anon = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return hwm, anon


class PeakSampler(threading.Thread):
    """Samples a process tree until stopped: per process, peak RSS (VmHWM, the last sample
    is the peak) and peak private memory (RssAnon: RSS without the mapped object store)."""

    def __init__(self, root: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s = root, every_s
        self.peaks: dict[int, tuple[int, int, str]] = {}
        self.cpu_s: dict[int, float] = {}  # last sample: a process's CPU time when it ended
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for pid, cmd in _tree(self.root).items():
                hwm, anon = _memory_kib(pid)
                old_hwm, old_anon, _ = self.peaks.get(pid, (0, 0, ""))
                self.peaks[pid] = (max(hwm, old_hwm), max(anon, old_anon), cmd)
                self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), _cpu_s(pid))
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def driver_mib(self) -> float:
        return self.peaks.get(self.root, (0, 0, ""))[0] / 1024

    def worker_cpu_s(self, prefix: str = "ray::") -> float:
        """CPU seconds of the Ray worker processes whose name starts with `prefix`."""
        return sum(self.cpu_s.get(pid, 0.0) for pid, (_, _, cmd) in self.peaks.items()
                   if cmd.startswith(prefix))

    def largest_worker(self) -> tuple[float, float, str]:
        """Peak RSS MiB, peak private MiB and name of the largest Ray worker (`ray::…`)."""
        workers = [(hwm, anon, cmd.split()[0]) for hwm, anon, cmd in self.peaks.values()
                   if cmd.startswith("ray::")]
        if not workers:
            return float("nan"), float("nan"), "—"
        hwm, anon, name = max(workers)
        return hwm / 1024, anon / 1024, name


def rfloc(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], env=env, cwd=REPO,
                          check=True, **kw)


def run_batch(inp: Path, out: Path, log: Path, extra: list[str]) -> dict:
    """One `rfloc batch` with its peaks; the command's JSON summary plus the measurements."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "serve_app.cli", "batch", str(inp), str(out), "--json-summary",
           "--no-progress", *extra]
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    text = log.read_text(errors="replace")
    if rc:
        raise RuntimeError(f"rfloc batch failed ({rc}):\n{text[-3000:]}")
    summary = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    worker_mib, worker_private_mib, worker = sampler.largest_worker()
    n = summary["captures"]
    return {**summary, "wall_s": wall, "driver_peak_mib": sampler.driver_mib(),
            "actor_cpu_ms": 1e3 * sampler.worker_cpu_s("ray::MapWorker") / n,
            "worker_cpu_ms": 1e3 * sampler.worker_cpu_s() / n,
            "worker_peak_mib": worker_mib, "worker_private_mib": worker_private_mib,
            "worker": worker.removeprefix("ray::")}


def udf_alone(inp: Path, seconds: float = 8.0) -> float:
    """Captures/s of the batch UDF (decode + core + GeoParquet rows) in this one process."""
    import pyarrow.parquet as pq

    from serve_app.batch import BatchLocalizer

    table = pq.ParquetFile(sorted(inp.glob("*.parquet"))[0]).read_row_group(0)
    udf = BatchLocalizer()
    udf.localize(table)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += udf.localize(table).num_rows
    return done / (time.perf_counter() - t0)


def section(res: dict) -> str:
    """The markdown section "## Offline batch"."""
    m, runs, small = res["machine"], res["runs"], res.get("small_store")
    lines = [
        "## Offline batch", "",
        f"Measured by `{res['command']}` on {res['date']} (whole run "
        f"{res['total_s'] / 60:.1f} min). Machine: {m['nproc']} cores ({m['cpu']}), "
        f"{m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}, Ray {m['ray']}; "
        f"shared with other engineers' tests: load average (1/5/15 min) {res['loads']['start']} "
        f"at the start, {res['loads']['end']} at the end.", "",
        "Each size: `rfloc simulate --parquet IN --n N` (standard captures, cf32_le, "
        "269 kB each), then `rfloc batch IN OUT` on its own local Ray instance (actors of "
        "1 CPU, autoscaling between 1 and 2, batches of 256). Peak RSS is "
        "VmHWM, sampled every 0.2 s, of the driver (the `rfloc batch` process) and of the "
        "largest Ray worker process; a worker's RSS counts the object-store pages it "
        "mapped (shared memory), so its peak private memory (RssAnon) is given beside it. "
        "L (load/bench.py's, single iq_b64 vectorized over 64 captures, one process) is "
        "measured just before and just after each run, the mean beside it; CPU ms per "
        "capture (every Ray worker process of the job: actors, read and write tasks, model "
        "loads; L: its process) is less disturbed by the other work on the machine than "
        "captures/s.", "",
        "| captures | input GB | driver peak RSS MiB | largest worker peak RSS MiB "
        "(private) | wall s | captures/s: command | dataset run | actors busy | L beside "
        "| **busy / L** | CPU ms/capture: Ray workers / L |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['captures']:,} | {r['input_gb']:.1f} | {r['driver_peak_mib']:.0f} | "
            f"{r['worker_peak_mib']:.0f} ({r['worker_private_mib']:.0f}) | "
            f"{r['wall_s']:.0f} | {fmt(r['captures'] / r['wall_s'])} | "
            f"{fmt(r['captures_s'])} | {fmt(r['busy_captures_s'])} | {fmt(r['l_captures_s'])} | "
            f"**{fmt(r['busy_captures_s'] / r['l_captures_s'], 2)}** | "
            f"{r['worker_cpu_ms']:.2f} / {r['l_cpu_ms']:.2f} |")
    first, last = runs[0], runs[-1]
    lines += [
        "",
        f"Driver peak RSS at {last['captures']:,} captures is "
        f"{last['driver_peak_mib'] / first['driver_peak_mib']:.2f}x the one at "
        f"{first['captures']:,} ({last['input_gb'] / first['input_gb']:.0f}x the input). "
        f"The largest worker: {', '.join(sorted({r['worker'] for r in runs}))}. The batch UDF "
        f"alone in one process (Parquet rows in, GeoParquet rows out, batches of 256): "
        f"{fmt(res['udf_captures_s'])} captures/s.",
        "",
        "\"actors busy\": from the first batch's start to the last one's end in the actors "
        "(what the pool sustains once it is up); \"dataset run\": the Ray Data execution, "
        "actor start and model load included; \"command\": the whole `rfloc batch`, Python "
        "and Ray start included.",
    ]
    if small:
        times_store = small["input_gb"] * 1024 / small["object_store_mib"]
        spilled_pct = 100 * (small["spilled_mib"] or 0) / (small["input_gb"] * 1024)
        lines += [
            "",
            f"Small object store: `rfloc batch IN OUT --object-store-mib "
            f"{small['object_store_mib']}` over the {small['captures']:,}-capture input "
            f"({small['input_gb']:.1f} GB, {times_store:.0f}x "
            f"the store) completed in {small['wall_s']:.0f} s: "
            f"{fmt(small['busy_captures_s'])} captures/s while busy, "
            f"driver peak {small['driver_peak_mib']:.0f} MiB, largest worker "
            f"{small['worker_peak_mib']:.0f} MiB ({small['worker_private_mib']:.0f} private); "
            "Ray reported "
            f"{fmt(small['spilled_mib'])} MiB spilled "
            f"({spilled_pct:.1f} % of the input).",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,16384,65536", help="captures per input")
    p.add_argument("--small-store-mib", type=int, default=256,
                   help="object store of the last run over the largest input (0: skip)")
    p.add_argument("--tmp", type=Path, default=Path("/work/tmp-batch"),
                   help="where the inputs and outputs go (deleted at the end)")
    p.add_argument("--l-seconds", type=float, default=6.0,
                   help="L's measuring time, before and after each run")
    p.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    p.add_argument("--doc", default=str(DOC), help="markdown file to update ('' = none)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    a = p.parse_args()
    t_start = time.perf_counter()
    sizes = [int(s) for s in a.sizes.split(",")]
    res: dict = {"machine": machine(), "loads": {"start": loadavg()}, "runs": [],
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": " ".join(["python load/batch_bench.py",
                                      *map(shlex.quote, sys.argv[1:])])}
    print(f"machine: {res['machine']}; load {res['loads']['start']}", flush=True)
    a.tmp.mkdir(parents=True, exist_ok=True)
    try:
        core = InProcess()
        w = build_workloads(64, 1, 1, seed=21)[0]

        def with_l(*args: Any) -> dict:
            """`run_batch(*args)` between two measurements of L; their means beside it."""
            ls = [measure_l(w, core, a.l_seconds, 5)]
            r = run_batch(*args)
            ls.append(measure_l(w, core, a.l_seconds, 5))
            r["l_captures_s"] = sum(x["captures_s"] for x in ls) / 2
            r["l_cpu_ms"] = sum(x["cpu_ms_per_capture"] for x in ls) / 2
            print(f"  L beside: {[round(x['captures_s']) for x in ls]} captures/s", flush=True)
            return r

        for n in sizes:
            inp, out = a.tmp / f"in-{n}", a.tmp / f"out-{n}"
            shutil.rmtree(inp, ignore_errors=True)
            t = time.perf_counter()
            rfloc("simulate", "--parquet", str(inp), "--n", str(n), "--seed", "5",
                  "--workers", "2", stdout=subprocess.DEVNULL)
            size_gb = sum(f.stat().st_size for f in inp.glob("*.parquet")) / 1e9
            print(f"{n} captures: {size_gb:.2f} GB simulated in {time.perf_counter() - t:.0f} s",
                  flush=True)
            if n == sizes[0]:
                res["udf_captures_s"] = udf_alone(inp)
                print(f"batch UDF alone: {res['udf_captures_s']:.0f} captures/s", flush=True)
            r = with_l(inp, out, a.tmp / f"batch-{n}.log", [])
            r["input_gb"] = size_gb
            res["runs"].append(r)
            print(f"  rfloc batch: wall {r['wall_s']:.0f} s, busy {r['busy_captures_s']} cap/s, "
                  f"CPU ms/cap workers {r['worker_cpu_ms']:.2f} L {r['l_cpu_ms']:.2f}, "
                  f"driver {r['driver_peak_mib']:.0f} MiB, worker {r['worker_peak_mib']:.0f} MiB "
                  f"({r['worker_private_mib']:.0f} private) "
                  f"({r['worker']}), spilled {r['spilled_mib']} MiB; load {loadavg()}", flush=True)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
            if n != sizes[-1] and not a.keep:
                shutil.rmtree(inp, ignore_errors=True)
        if a.small_store_mib:
            n = sizes[-1]
            inp = a.tmp / f"in-{n}"
            r = with_l(inp, a.tmp / "out-small-store", a.tmp / "batch-small.log",
                       ["--object-store-mib", str(a.small_store_mib)])
            r.update(input_gb=res["runs"][-1]["input_gb"], object_store_mib=a.small_store_mib)
            res["small_store"] = r
            print(f"small store ({a.small_store_mib} MiB): wall {r['wall_s']:.0f} s, spilled "
                  f"{r['spilled_mib']} MiB, driver {r['driver_peak_mib']:.0f} MiB", flush=True)
    finally:
        if not a.keep:
            for d in a.tmp.glob("*"):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
    res["loads"]["end"] = loadavg()
    res["total_s"] = time.perf_counter() - t_start
    text = section(res)
    print()
    print(text)
    if a.doc:
        doc = Path(a.doc)
        doc.write_text(replace_sections(doc.read_text() if doc.exists() else "",
                                        {"Offline batch": text}))
        print(f"wrote {a.doc}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
