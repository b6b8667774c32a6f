"""The README's path, as a newcomer runs it: `rfloc serve`, simulate, predict, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from load.harness import descendants
from tests.conftest import free_port, shipped_config, wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RFLOC = shutil.which("rfloc") or "rfloc"
STOP_WITHIN_S = 10.0  # Ctrl-C or SIGTERM to exit, Serve and the local Ray instance included


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`rfloc serve` on a free port and a fresh state directory, once it answers /health."""
    port = free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(shipped_config(port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RFLOC_", "REDIS_URL",
                                                                   "MLFLOW_", "RAY_ADDRESS"))}
    env["RFLOC_STATE_DIR"] = str(tmp_path / "state")  # a fresh machine's empty state
    proc = subprocess.Popen([RFLOC, "serve", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout_s=300)
    except BaseException:
        _stop(proc, signal.SIGINT, descendants({proc.pid}))
        raise
    return proc, url, env


def _stop(proc: subprocess.Popen, signum: int, seen: set[int]) -> tuple[float, str]:
    """Send `signum`; the seconds until `rfloc serve` exited, and what it printed."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=120)
    finally:
        took_s = time.monotonic() - t0
        for pid in descendants({proc.pid}) if proc.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
    out = proc.stdout.read() if proc.stdout else ""
    deadline = time.monotonic() + 2  # the kernel reaps what Ray's shutdown just killed
    left = seen
    while left and time.monotonic() < deadline:
        left = {p for p in seen if os.path.exists(f"/proc/{p}")
                and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()}
        time.sleep(0.1)
    assert not left, f"processes left after signal {signum}: {left}"
    return took_s, out


def test_rfloc_serve_simulate_predict_and_ctrl_c(tmp_path):
    proc, url, env = _start(tmp_path)
    seen = descendants({proc.pid})  # serve run, GCS, raylet, replicas, HAProxy...
    try:
        assert len(seen) > 3
        sample, truth = tmp_path / "sample.json", tmp_path / "truth.json"
        subprocess.run([RFLOC, "simulate", "--out", str(sample), "--truth", str(truth)],
                       env=env, check=True, timeout=120)
        # The README's curl, in Python.
        r = httpx.post(url + "/predict", content=sample.read_bytes(), timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == {**out["model"], "name": "localization_model", "version": "1",
                                "alias": "production"}
        polygon = out["geojson"]["features"][1]["geometry"]
        assert polygon["type"] == "Polygon" and len(polygon["coordinates"][0]) > 10
        p = subprocess.run([RFLOC, "predict", str(sample), "--url", url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert json.loads(p.stdout)[0]["position"] == out["position"]
        assert json.loads(truth.read_text())[0]["latitude"]
    finally:
        took_s, printed = _stop(proc, signal.SIGINT, seen)  # Ctrl-C
    print(f"Ctrl-C: rfloc serve exited {proc.returncode} after {took_s:.1f} s")
    assert proc.returncode in (0, 130), printed[-3000:]
    assert took_s <= STOP_WITHIN_S, printed[-3000:]
    assert "failed to shut down" not in printed, printed[-3000:]


def test_sigterm_stops_rfloc_serve_as_fast_as_ctrl_c(tmp_path):
    proc, _, _ = _start(tmp_path)
    took_s, printed = _stop(proc, signal.SIGTERM, descendants({proc.pid}))
    print(f"SIGTERM: rfloc serve exited {proc.returncode} after {took_s:.1f} s")
    assert proc.returncode in (0, 130), printed[-3000:]
    assert took_s <= STOP_WITHIN_S, printed[-3000:]
    assert "failed to shut down" not in printed, printed[-3000:]


def test_cli_help_lists_the_commands():
    p = subprocess.run([sys.executable, "-m", "serve_app.cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    for cmd in ("serve", "simulate", "predict", "register", "promote", "rollback", "models",
                "batch"):
        assert cmd in p.stdout
