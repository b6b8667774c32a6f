"""The peers of the benchmark (load/peers/): the same answers as N for the same bodies.

The core they share (load/peers/peer_core.py) is checked here against N's own front door
(load/naive_app.py) without any peer package. The servers themselves run from their own
virtualenvs, which take minutes to create: their tests run only where
`python load/peers/run.py NAME --prepare` made one already (or with RFLOC_PEERS_TEST_INSTALL=1,
which makes it first), and are skipped otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "load"))
sys.path.insert(0, str(REPO / "load" / "peers"))

import naive_app  # noqa: E402 - load/naive_app.py, N
import run as peers_run  # noqa: E402 - load/peers/run.py
from peer_core import PeerCore  # noqa: E402

from serve_app.protocols import rest  # noqa: E402
from serve_app.samples import make_samples  # noqa: E402

VOLATILE = ("timing_ms", "request_id", "timestamp")


@pytest.fixture(scope="module")
def core() -> PeerCore:
    return PeerCore()


@pytest.fixture(scope="module")
def captures() -> list[dict]:
    return [{**r, "cache": False} for r in make_samples(6, 11, form="b64").requests]


def silent(capture: dict) -> dict:
    """The capture with every receiver's samples zero: no receiver detects a signal."""
    zeros = base64.b64encode(np.zeros(4800, np.complex64).tobytes()).decode()
    return {**capture, "receivers": [{**r, "iq_b64": zeros} for r in capture["receivers"]]}


def n_answer(body: bytes, batch: bool) -> tuple[int, dict]:
    """N's status and JSON answer for a body (its front door, no HTTP)."""
    fn = rest.predict_batch if batch else rest.predict
    ans = asyncio.run(fn(naive_app._service, naive_app._network, body))
    return ans.status, orjson.loads(ans.body)


def stable(answer: dict) -> dict:
    """An answer without what differs between two runs of the same body."""
    if "results" in answer:
        return {"results": [{**r, "result": stable(r["result"])} if r.get("ok") else r
                            for r in answer["results"]]}
    return {k: v for k, v in answer.items() if k not in VOLATILE}


def bodies(captures: list[dict]) -> list[tuple[bytes, bool]]:
    """Single and batch bodies, good and bad, each refused or answered its own way."""
    bad_field = {**captures[1], "confidence_level": 2.0}
    return [
        (orjson.dumps(captures[0]), False),
        (orjson.dumps({"captures": captures[:4]}), True),
        (b"{not json", False),
        (orjson.dumps(bad_field), False),
        (orjson.dumps(silent(captures[2])), False),  # the chain's 422: no receiver detects
        (orjson.dumps({"captures": [captures[3], bad_field, silent(captures[4])]}), True),
        (orjson.dumps({"captures": []}), True),
        (b'{"receivers": []}', False),
    ]


def test_peer_core_answers_like_n_one_body_at_a_time(core, captures):
    for body, batch in bodies(captures):
        [(status, answer)] = core.answer([body], [batch])
        n_status, n_body = n_answer(body, batch)
        assert status == n_status, body[:80]
        assert stable(orjson.loads(answer)) == stable(n_body), body[:80]


def test_peer_core_answers_a_mixed_batch_of_bodies_in_one_pass(core, captures):
    """What a peer's adaptive batching hands it: every body still gets its own answer."""
    cases = bodies(captures)
    out = core.answer([b for b, _ in cases], [k for _, k in cases])
    assert len(out) == len(cases)
    statuses = [s for s, _ in out]
    assert statuses == [200, 200, 400, 422, 422, 200, 422, 422]
    for (body, batch), (status, answer) in zip(cases, out, strict=True):
        assert (status, stable(orjson.loads(answer))) == (
            n_answer(body, batch)[0], stable(n_answer(body, batch)[1]))
    mixed = orjson.loads(out[5][1])["results"]
    assert [r["ok"] for r in mixed] == [True, False, False]
    assert mixed[1]["error"]["field"] == "captures[1].confidence_level"
    assert mixed[2]["error"]["field"] == "captures[2].receivers"


def test_run_settings_are_the_peers_own():
    assert set(peers_run.PEERS) == {"mlserver", "bentoml"}
    for peer in peers_run.PEERS.values():
        assert peer.requirements.is_file()
        assert set(peer.doc) == set(peer.settings)
    reqs = peers_run.PEERS["mlserver"].requirements.read_text()
    assert "mlserver==1.7.1" in reqs and "uvloop==0.21." in reqs


# -- the servers ------------------------------------------------------------------------------

def _venv_ready(name: str) -> bool:
    if os.environ.get("RFLOC_PEERS_TEST_INSTALL") == "1":
        peers_run.prepare(peers_run.PEERS[name], quiet=True)
    stamp = peers_run.venv_dir(name) / ".rfloc-stamp"
    return stamp.exists() and stamp.read_text() == peers_run._stamp(peers_run.PEERS[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("name,sets", [("mlserver", []), ("bentoml", []),
                                       ("mlserver", ["batch_bodies=batched"]),
                                       ("bentoml", ["batch_bodies=batched"])])
def test_peer_server_answers_like_n(name, sets, captures):
    """run.py starts the peer; its HTTP answers are N's; SIGTERM leaves no process behind."""
    if not _venv_ready(name):
        pytest.skip(f"no {name} virtualenv: python load/peers/run.py {name} --prepare")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "load" / "peers" / "run.py"), name,
                             "--port", str(port), *[a for kv in sets for a in ("--set", kv)]],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + peers_run.PEERS[name].health, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.5)
        for body, batch in bodies(captures):
            r = httpx.post(url + ("/predict/batch" if batch else "/predict"), content=body,
                           headers={"content-type": "application/json"}, timeout=60)
            n_status, n_body = n_answer(body, batch)
            assert r.status_code == n_status, (body[:80], r.text[:300])
            assert stable(r.json()) == stable(n_body)
        below = peers_run.descendants(proc.pid)
        assert below, "the server runs below run.py"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    left = [p for p in below if Path(f"/proc/{p}").exists()]
    assert not left, f"processes left after SIGTERM: {left}"


def test_bench_table_has_peer_columns_and_replaces_its_old_section():
    """load/bench.py: a column per peer measured, S/P and P/N, the section renamed in place."""
    import bench  # load/bench.py

    w = bench.Workload("single iq_b64", "/predict", [], 1, 16)
    w.results = {t: {"captures_s": c, "cpu_ms_per_capture": 2.0, "p50_ms": 5.0, "p99_ms": 9.0}
                 for t, c in [("N", 400.0), ("S", 600.0), ("mlserver", 300.0)]}
    head, rule, row = bench.table([w]).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert len(rule.split("|")) == len(head.split("|"))
    assert cells["MLServer cap/s"] == "300" and "BentoML cap/s" not in cells
    assert cells["**S/P** MLServer"] == "2.00" and cells["P/N MLServer"] == "0.75"
    assert cells["**S/N**"] == "1.50" and cells["MLServer p50 / p99 ms"] == "5.0 / 9.0"

    doc = "# Performance\n\n## Cache\n\nc\n\n## L / N / S\n\nold\n\n## Offline batch\n\nb\n"
    out = bench.replace_sections(doc, {"L / N / S / P": "## L / N / S / P\n\nnew"})
    assert "old" not in out and "## L / N / S\n" not in out
    assert out.index("## Cache") < out.index("new") < out.index("## Offline batch")
    assert out.endswith("b\n")
