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

from tests.conftest import free_port, shipped_config, wait_http
from tests.multinode import _children

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_rfloc_serve_simulate_predict_and_ctrl_c(tmp_path):
    port = free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(shipped_config(port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RFLOC_", "REDIS_URL",
                                                                   "MLFLOW_", "RAY_ADDRESS"))}
    env["RFLOC_STATE_DIR"] = str(tmp_path / "state")  # a fresh machine's empty state
    rfloc = shutil.which("rfloc") or "rfloc"
    proc = subprocess.Popen([rfloc, "serve", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout_s=300)
        seen = _children({proc.pid})  # serve run, GCS, raylet, replicas...
        assert len(seen) > 3
        sample, truth = tmp_path / "sample.json", tmp_path / "truth.json"
        subprocess.run([rfloc, "simulate", "--out", str(sample), "--truth", str(truth)],
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
        p = subprocess.run([rfloc, "predict", str(sample), "--url", url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert json.loads(p.stdout)[0]["position"] == out["position"]
        assert json.loads(truth.read_text())[0]["latitude"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for pid in _children({proc.pid}):
                os.kill(pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, proc.stdout.read()[-3000:] if proc.stdout else ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in seen):
        time.sleep(1)
    left = [p for p in seen if os.path.exists(f"/proc/{p}")
            and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert not left, f"Ray processes left after Ctrl-C: {left}"


def test_cli_help_lists_the_commands():
    p = subprocess.run([sys.executable, "-m", "serve_app.cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    for cmd in ("serve", "simulate", "predict", "register", "promote", "rollback", "models",
                "batch"):
        assert cmd in p.stdout
