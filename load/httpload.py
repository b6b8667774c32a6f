"""A lean HTTP/1.1 load generator on asyncio streams (loopback only), used by load/bench.py;
its connection is the fault scenarios' (load/harness/http1.py).

Request bytes are built once; responses are read by Content-Length (or chunked) and not
parsed, so the client costs little CPU beside the server it measures on a 2-core machine.
Two modes: closed loop with `concurrency` connections (throughput at saturation) and open
loop at a fixed rate (latency measured from each request's scheduled send time, so a slow
server is not hidden by coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
from harness.http1 import Connection  # load/ is on sys.path: a sibling package

LOOPBACK = "127.0.0.1"


@dataclass
class LoadResult:
    """Outcome of one load phase."""

    requests: int = 0
    ok: int = 0
    status: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # connection errors
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # of 200 answers

    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        """A latency percentile of the successful requests, in ms."""
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)


def request_head(port: int, path: str, body_len: int, extra: str = "") -> bytes:
    """The request line and headers of a JSON POST; `extra`: more header lines (CRLF-ended)."""
    return (f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_len}\r\n{extra}"
            "\r\n").encode()


async def _one(conn: Connection, head: bytes, body: bytes, res: LoadResult, t_ref: float,
               timeout_s: float) -> None:
    res.requests += 1
    try:
        status, _, _ = await asyncio.wait_for(conn.request(head, body), timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        res.errors += 1
        conn.close()
        return
    res.status[status] = res.status.get(status, 0) + 1
    if status == 200:
        res.ok += 1
        res.latencies_s.append(time.perf_counter() - t_ref)


async def closed_loop(port: int, path: str, bodies: list[bytes], *, concurrency: int,
                      duration_s: float, max_requests: int, timeout_s: float = 30.0,
                      extra: list[str] | None = None) -> LoadResult:
    """`concurrency` connections each sending back to back until the duration or count ends.

    `extra`: per body, header lines to add (e.g. Inference-Header-Content-Length).
    """
    heads = [request_head(port, path, len(b), x)
             for b, x in zip(bodies, extra or [""] * len(bodies), strict=True)]
    res = LoadResult()
    counter = iter(range(max_requests))
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    async def worker(k: int) -> None:
        conn = Connection(LOOPBACK, port)
        try:
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                j = (i + k) % len(bodies)
                await _one(conn, heads[j], bodies[j], res, time.perf_counter(), timeout_s)
        finally:
            conn.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    res.elapsed_s = time.perf_counter() - t0
    return res


async def open_loop(port: int, path: str, bodies: list[bytes], *, rate_rps: float,
                    duration_s: float, max_connections: int = 64, timeout_s: float = 30.0,
                    extra: list[str] | None = None) -> LoadResult:
    """Requests sent at fixed times (rate_rps) over a pool of keep-alive connections."""
    heads = [request_head(port, path, len(b), x)
             for b, x in zip(bodies, extra or [""] * len(bodies), strict=True)]
    res = LoadResult()
    idle: list[Connection] = []
    sem = asyncio.Semaphore(max_connections)
    n = max(1, int(rate_rps * duration_s))
    t0 = time.perf_counter()

    async def send(i: int, t_sched: float) -> None:
        async with sem:
            conn = idle.pop() if idle else Connection(LOOPBACK, port)
            j = i % len(bodies)
            await _one(conn, heads[j], bodies[j], res, t_sched, timeout_s)
            idle.append(conn)

    tasks = []
    for i in range(n):
        t_sched = t0 + i / rate_rps
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(i, t_sched)))
    await asyncio.gather(*tasks)
    res.elapsed_s = time.perf_counter() - t0
    for conn in idle:
        conn.close()
    return res


def run(coro):  # noqa: ANN001, ANN201 - thin wrapper
    """Run a coroutine on uvloop when available (a cheaper client), else asyncio."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
