"""Hostile and malformed input against a running service: size limits, the bad-input
table, schemathesis. Shared by tests/test_app_ray.py, tests/test_limits_ray.py,
tests/test_schemathesis_ray.py and load/reliability.py; no pytest here. Traffic goes to
loopback only.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from serve_app.constants import N_SAMPLES
from serve_app.schemas import MAX_BATCH_CAPTURES, MAX_RECEIVERS

from .net import check_target
from .procs import rss_mb

# -- raw HTTP: bodies the client does not (fully) send -----------------------------------------


def _connect(url: str) -> tuple[socket.socket, str]:
    check_target(url)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    return socket.create_connection((host, port), timeout=60), f"{host}:{port}"


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before a response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body[:n]


def _field(body: bytes) -> str | None:
    try:
        return orjson.loads(body)["error"]["field"]
    except Exception:
        return None


def declared_oversize(url: str, path: str = "/predict", declared: int = 1 << 30) -> dict:
    """Headers announcing a `declared`-byte body, no body sent: refused without reading."""
    sock, host = _connect(url)
    with sock:
        t0 = time.perf_counter()
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {declared}\r\n\r\n").encode())
        status, _, body = _read_response(sock)
        seconds = time.perf_counter() - t0
    return {"case": f"declared Content-Length {declared} bytes, body never sent",
            "status": status, "field": _field(body), "seconds": seconds, "sent_bytes": 0,
            "body_bytes": declared}


def streamed_oversize(url: str, limit: int, path: str = "/predict",
                      chunk: int = 1 << 20) -> dict:
    """A chunked body (no Content-Length) streamed past `limit`: refused once it passes."""
    sock, host = _connect(url)
    answer: list[tuple[int, dict[str, str], bytes]] = []

    def read() -> None:
        with contextlib.suppress(OSError):
            answer.append(_read_response(sock))

    reader = threading.Thread(target=read, daemon=True)
    sent = 0
    with sock:
        t0 = time.perf_counter()
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                      "\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        reader.start()
        piece = f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n"
        try:
            while not answer and sent < limit + 16 * chunk:
                sock.sendall(piece)
                sent += chunk
            if not answer:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending
        reader.join(timeout=60)
        seconds = time.perf_counter() - t0
    status, _, body = answer[0] if answer else (-1, {}, b"")
    return {"case": f"chunked body streamed past the {limit}-byte limit", "status": status,
            "field": _field(body), "seconds": seconds, "sent_bytes": sent,
            "body_bytes": sent}


def held_uploads(url: str, n: int, declared: int, path: str = "/predict/batch") -> list:
    """`n` connections that announce a `declared`-byte body and send 1 KiB of it, kept open.

    The caller closes the sockets. What the service holds for them is what many slow
    uploads (or a slowloris) make it hold.
    """
    socks = []
    for _ in range(n):
        sock, host = _connect(url)
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {declared}\r\n\r\n").encode()
                     + b" " * 1024)
        socks.append(sock)
    return socks


def declared_upload(url: str, declared: int, path: str = "/predict/batch",
                    timeout_s: float = 10.0) -> dict:
    """One more announced upload: its status and Retry-After if answered within `timeout_s`
    before any more of the body is sent (status -1: the service is reading it)."""
    sock, host = _connect(url)
    with sock:
        sock.settimeout(timeout_s)
        t0 = time.perf_counter()
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {declared}\r\n\r\n").encode())
        try:
            status, headers, body = _read_response(sock)
        except (TimeoutError, ConnectionError):
            status, headers, body = -1, {}, b""
        seconds = time.perf_counter() - t0
    return {"status": status, "retry_after": headers.get("retry-after"),
            "message": body.decode(errors="replace")[:200], "seconds": seconds}


# -- JSON bodies -------------------------------------------------------------------------------


def _rx(rid: str, n: int, form: str = "pairs") -> dict:
    if form == "pairs":
        return {"id": rid, "iq": [[0.001, -0.002]] * n}
    return {"id": rid, "iq_b64": base64.b64encode(bytes(8 * n)).decode()}  # complex64 zeros


def oversize_bodies(good: dict) -> list[tuple[str, str, bytes, set[int], str]]:
    """(class, path, body, accepted statuses, field prefix) for every size limit but bytes."""
    ids = ("torino", "milano", "genova")
    rx = good["receivers"]

    def capture(receivers: list[dict]) -> bytes:
        return orjson.dumps({**good, "receivers": receivers})

    return [
        ("receivers per capture: 33 (limit 32)", "/predict",
         capture([rx[0]] * (MAX_RECEIVERS + 1)), {422}, "receivers"),
        ("receivers per capture: 300,000", "/predict",
         capture([{"id": "torino", "iq_b64": "AAAA"}] * 300_000), {413}, "body"),
        ("samples per receiver: 4,801 (limit 4,800)", "/predict",
         capture([_rx(i, N_SAMPLES + 1) for i in ids]), {422}, "receivers[0].iq"),
        ("samples per receiver: 1,000,000 [I, Q] pairs x 3", "/predict",
         capture([_rx(i, 1_000_000) for i in ids]), {413}, "body"),
        ("samples per receiver: 1,000,000 in iq_b64 (11 MB)", "/predict",
         capture([_rx(i, 1_000_000 if i == "torino" else N_SAMPLES, "b64") for i in ids]),
         {422}, "receivers[0].iq_b64"),
        ("samples per receiver: 2,000,000 in iq_b64 (21 MB, over the 16 MiB /predict body "
         "limit)", "/predict",
         capture([_rx(i, 2_000_000 if i == "torino" else N_SAMPLES, "b64") for i in ids]),
         {413}, "body"),
        ("captures per batch: 65 (limit 64)", "/predict/batch",
         orjson.dumps({"captures": [good] * (MAX_BATCH_CAPTURES + 1)}), {413, 422}, "captures"),
        ("captures per batch: 1,000,000 empty", "/predict/batch",
         b'{"captures": [' + b",".join([b"{}"] * 1_000_000) + b"]}", {413}, "body"),
    ]


def bad_inputs(good: dict) -> list[tuple[str, dict | bytes, int, str]]:
    """(name, body, status, field substring) for the bad-input classes of the API."""
    r0 = good["receivers"]

    def with_rx(i: int, **kw) -> dict:
        b = copy.deepcopy(good)
        b["receivers"][i] = {"id": r0[i]["id"], **kw}
        return b

    nan_iq = np.zeros(4800, np.complex64)
    nan_iq[7] = np.nan
    nan_b64 = base64.b64encode(nan_iq.tobytes()).decode()
    return [
        ("unknown receiver", {**good, "receivers": [{**r0[0], "id": "atlantis"}, *r0[1:]]},
         422, "receivers[0].id"),
        ("fewer than 3", {**good, "receivers": r0[:2]}, 422, "receivers"),
        ("duplicate receiver", {**good, "receivers": [r0[0], r0[0], *r0[2:]]},
         422, "receivers[1].id"),
        ("bad base64", with_rx(0, iq_b64="!!not base64!!"), 422, "receivers[0].iq_b64"),
        ("odd byte length", with_rx(1, iq_b64=base64.b64encode(b"\x00" * 12).decode()),
         422, "receivers[1].iq_b64"),
        ("odd IQ pairs", with_rx(2, iq=[[0.1, 0.2, 0.3]] * 4800), 422, "receivers[2].iq"),
        ("NaN", with_rx(0, iq_b64=nan_b64), 422, "receivers[0].iq_b64"),
        ("Inf", with_rx(0, iq=[[1e39, 0.0]] * 4800), 422, "receivers[0].iq"),
        ("empty IQ", with_rx(0, iq=[]), 422, "receivers[0].iq"),
        ("wrong sample count", with_rx(0, iq=[[0.0, 0.0]] * 100), 422, "receivers[0].iq"),
        ("wrong sample rate", {**good, "sample_rate_hz": 96000}, 422, "sample_rate_hz"),
        ("confidence 0", {**good, "confidence_level": 0.0}, 422, "confidence_level"),
        ("confidence 1.5", {**good, "confidence_level": 1.5}, 422, "confidence_level"),
        ("wrong types", {**good, "receivers": "torino"}, 422, "receivers"),
        ("unknown field", {**good, "colour": "blue"}, 422, "colour"),
        ("malformed JSON", b'{"receivers": [', 400, "body"),
    ]


@dataclass
class InputClass:
    """Outcome of one class of input: how many were sent and how they were answered."""

    name: str
    sent: int = 0
    expected: int = 0  # answered with an accepted status naming the expected field
    server_errors: int = 0  # 5xx
    statuses: Counter = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)
    body_bytes: int = 0
    detail: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000.0 if self.seconds else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.name, "sent": self.sent, "as_expected": self.expected,
                "5xx": self.server_errors, "statuses": dict(self.statuses),
                "median_ms": self.median_ms, "body_bytes": self.body_bytes,
                "detail": self.detail}


def post_classes(url: str, cases: Iterable[tuple[str, str, bytes | dict, set[int], str]],
                 repeat: int = 1) -> list[InputClass]:
    """POST every case `repeat` times; each is expected to get one of its statuses."""
    check_target(url)
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, path, body, ok, field_prefix in cases:
            raw = body if isinstance(body, bytes) else orjson.dumps(body)
            res = InputClass(name, body_bytes=len(raw))
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = client.post(path, content=raw, headers={"content-type": "application/json"})
                res.seconds.append(time.perf_counter() - t0)
                res.sent += 1
                res.statuses[r.status_code] += 1
                got = _field(r.content) or ""
                if r.status_code in ok and got.startswith(field_prefix):
                    res.expected += 1
                elif not res.detail:
                    res.detail = f"{r.status_code} {got!r}: {r.text[:200]}"
                if r.status_code >= 500:
                    res.server_errors += 1
            out.append(res)
    return out


def raw_class(result: dict, ok: set[int], field_prefix: str = "body") -> InputClass:
    """An InputClass from a declared_oversize / streamed_oversize result."""
    res = InputClass(result["case"], sent=1, body_bytes=result["body_bytes"],
                     seconds=[result["seconds"]], statuses=Counter([result["status"]]))
    res.expected = int(result["status"] in ok and (result["field"] or "").startswith(field_prefix))
    res.server_errors = int(result["status"] >= 500)
    res.detail = f"{result['sent_bytes']} bytes sent before the answer"
    return res


def large_upload_body(good: dict, iq_b64_chars: int = 45_000_000,
                      total_bytes: int = 60_000_000) -> bytes:
    """A capture whose first receiver's iq_b64 is `iq_b64_chars` long, padded with JSON
    whitespace to `total_bytes`: the upload of the memory finding in docs/reliability.md."""
    rx = [{**good["receivers"][0], "iq_b64": "A" * iq_b64_chars}, *good["receivers"][1:]]
    body = orjson.dumps({**good, "receivers": rx})
    return body[:-1] + b" " * max(0, total_bytes - len(body)) + b"}"


def concurrent_uploads(url: str, body: bytes, clients: int, pid: int,
                       path: str = "/predict", settle_s: float = 5.0) -> dict:
    """`clients` POSTs of `body` at once; statuses and the RSS (MiB) of process `pid`
    before, at its peak (sampled every 20 ms) and `settle_s` after the last answer."""

    check_target(url)
    statuses: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def post() -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            start.wait()
            try:
                status = c.post(path, content=body,
                                headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
        with lock:
            statuses[status] += 1

    before = rss_mb(pid)
    peak = before
    threads = [threading.Thread(target=post, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    time.sleep(settle_s)
    return {"clients": clients, "body_bytes": len(body), "statuses": dict(statuses),
            "seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak,
            "rss_after_mb": rss_mb(pid)}


# -- schemathesis ------------------------------------------------------------------------------


@dataclass
class FuzzSummary:
    """What schemathesis sent and what it found."""

    operations: list[str] = field(default_factory=list)
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)  # operations with nothing to negate
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def run_schemathesis(url: str, *, max_examples: int = 25, seed: int = 7,
                     skip: tuple[str, ...] = ()) -> FuzzSummary:
    """Positive and negative cases for every operation of the app's OpenAPI schema.

    Checks: no 5xx, response bodies conform to the schema, status codes and content types
    are documented. Failures are collected (with the case as a curl command), not raised.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    check_target(url)
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance,
              content_type_conformance]
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    out = FuzzSummary()

    def runner(op: Any, label: str, mode: GenerationMode) -> Any:
        @hseed(seed)
        @settings(max_examples=max_examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(base_url=url, timeout=60)
            out.cases += 1
            out.statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=checks)
            except Exception as exc:  # a check failed: keep it and go on
                if len(out.failures) < 50:
                    out.failures.append(f"{label} [{mode.value}] {type(exc).__name__}: "
                                        f"{str(exc)[:600]}\n  {case.as_curl_command()}")

        return run

    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        if label in skip:
            continue
        out.operations.append(label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(op, label, mode)()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    out.failures.append(f"{label}: no valid request could be generated")
                else:  # nothing to negate: no parameters and no body
                    out.no_negative.append(label)
    out.seconds = time.perf_counter() - t0
    return out
