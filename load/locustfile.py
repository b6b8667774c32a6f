"""Locust load test of the three DESIGN.md workloads (see load/README.md for the command).

User classes (pick one or more on the command line):
  SingleB64User    POST /predict, one standard capture, `iq_b64` (complex64)
  SinglePairsUser  POST /predict, one standard capture, `iq` [[I, Q], ...] pairs (seed JSON)
  Batch32User      POST /predict/batch, 32 standard captures (`iq_b64`) per request

Payloads come from the project's simulator (serve_app.samples.make_samples) and are
JSON-encoded once per process. Environment knobs:
  RFLOC_LOAD_PAYLOADS   distinct captures per workload (default 64)
  RFLOC_LOAD_CACHE_HIT  fraction in [0, 1] of requests that repeat one of a few hot captures
                        with "cache": true (default 0: every request has "cache": false, so
                        each one runs the whole chain)
  RFLOC_LOAD_SEED       simulator seed (default 7)
"""

from __future__ import annotations

import functools
import os
import random

import orjson
from locust import FastHttpUser, constant, task

BATCH_CAPTURES = 32
HOT_CAPTURES = 4  # the repeated captures of the cache-hit mix


def _env_float(name: str, default: float, lo: float, hi: float) -> float:
    value = float(os.environ.get(name, default))
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@functools.cache
def payloads(form: str) -> tuple[list[bytes], list[bytes]]:
    """(cold bodies with cache off, hot bodies with cache on) for /predict, encoded once."""
    from serve_app.samples import make_samples

    n = int(os.environ.get("RFLOC_LOAD_PAYLOADS", "64"))
    seed = int(os.environ.get("RFLOC_LOAD_SEED", "7"))
    reqs = make_samples(n, seed, form=form).requests  # type: ignore[arg-type]
    cold = [orjson.dumps({**r, "cache": False}) for r in reqs]
    hot = [orjson.dumps({**r, "cache": True}) for r in reqs[:HOT_CAPTURES]]
    return cold, hot


@functools.cache
def batch_payloads() -> tuple[list[bytes], list[bytes]]:
    """/predict/batch bodies of BATCH_CAPTURES captures (cold, and hot = all cache on)."""
    from serve_app.samples import make_samples

    n = max(int(os.environ.get("RFLOC_LOAD_PAYLOADS", "64")), BATCH_CAPTURES)
    seed = int(os.environ.get("RFLOC_LOAD_SEED", "7"))
    reqs = make_samples(n, seed, form="b64").requests
    cold = []
    for start in range(0, n - BATCH_CAPTURES + 1, BATCH_CAPTURES):
        chunk = reqs[start : start + BATCH_CAPTURES]
        cold.append(orjson.dumps({"captures": [{**r, "cache": False} for r in chunk]}))
    hot = [orjson.dumps({"captures": [{**r, "cache": True} for r in reqs[:BATCH_CAPTURES]]})]
    return cold, hot


class _CaptureUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    path = "/predict"
    name = ""

    def _bodies(self) -> tuple[list[bytes], list[bytes]]:
        raise NotImplementedError

    def on_start(self) -> None:
        self._cold, self._hot = self._bodies()
        self._hit_fraction = _env_float("RFLOC_LOAD_CACHE_HIT", 0.0, 0.0, 1.0)
        self._i = random.randrange(len(self._cold))

    def _next_body(self) -> tuple[bytes, str]:
        if self._hit_fraction and random.random() < self._hit_fraction:
            return random.choice(self._hot), f"{self.name} (hot)"
        self._i = (self._i + 1) % len(self._cold)
        return self._cold[self._i], self.name

    @task
    def post(self) -> None:
        body, name = self._next_body()
        with self.client.post(self.path, data=body, name=name, catch_response=True,
                              headers={"content-type": "application/json"}) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")


class SingleB64User(_CaptureUser):
    """One capture per request, `iq_b64`."""

    name = "/predict iq_b64"

    def _bodies(self) -> tuple[list[bytes], list[bytes]]:
        return payloads("b64")


class SinglePairsUser(_CaptureUser):
    """One capture per request, `iq` pairs (the seed's JSON form, ~1.4 MB per request)."""

    name = "/predict iq pairs"

    def _bodies(self) -> tuple[list[bytes], list[bytes]]:
        return payloads("pairs")


class Batch32User(_CaptureUser):
    """32 captures per /predict/batch request."""

    path = "/predict/batch"
    name = "/predict/batch x32"

    def _bodies(self) -> tuple[list[bytes], list[bytes]]:
        return batch_payloads()
