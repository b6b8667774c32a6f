"""Cache trust on the running service: a poisoned Redis entry is a miss, deleted, counted."""

from __future__ import annotations

import random

import httpx
import orjson
import pytest
import redis

from serve_app.cache import cache_key
from serve_app.decode import decode_capture, validate_capture
from tests.conftest import REDIS_TEST_URL

pytestmark = pytest.mark.ray


def _invalid_count(client: httpx.Client) -> int:
    return client.get("/health").json()["cache"]["stats"]["invalid"]


@pytest.mark.parametrize("poison", [
    b"{}",  # was a 500 on every request for the capture
    b'{"result": {"position": "forged"}, "model": {"name": "x", "version": "1"}}',
    b"[1, 2, 3]",
])
def test_poisoned_cache_entry_is_a_miss_deleted_and_counted(app_url, network, sample_requests,
                                                           poison):
    level = round(random.uniform(0.80, 0.99), 6)  # a capture+level no other test caches
    body = {**sample_requests["b64"][2], "confidence_level": level, "cache": True}
    store = redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=2)
    with httpx.Client(base_url=app_url, timeout=60) as c:
        first = c.post("/predict", json=body)
        assert first.status_code == 200 and first.json()["cache_hit"] is False, first.text
        model = first.json()["model"]
        decoded = decode_capture(validate_capture(body), network)
        key = cache_key(f"{model['version']}:{model['sha256']}", decoded.canonical, level)
        assert orjson.loads(store.get(key))["result"]["position"] == first.json()["position"]
        store.set(key, poison, px=60_000)  # what a writer to the shared Redis could leave
        before = _invalid_count(c)
        second = c.post("/predict", json=body)
        assert second.status_code == 200, second.text
        assert second.json()["cache_hit"] is False  # recomputed, not served from the entry
        assert second.json()["position"] == first.json()["position"]
        assert _invalid_count(c) == before + 1
        # The bad entry is gone; the Ingress stored the recomputed answer in its place.
        assert orjson.loads(store.get(key))["result"]["position"] == first.json()["position"]
        third = c.post("/predict", json=body)
        assert third.status_code == 200 and third.json()["cache_hit"] is True
    store.delete(key)
    store.close()
