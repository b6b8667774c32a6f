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
    "another model",  # well-formed, under the right key, but claiming another model version
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
        if poison == "another model":
            honest = orjson.loads(store.get(key))
            poison = orjson.dumps({**honest, "model": {**honest["model"], "version": "999"}})
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


def _pinned_versions(c: httpx.Client) -> list[str]:
    return c.get("/model/info").json()["pinned_versions"]


def test_pinning_abuse_is_refused_before_any_model_work(app_url, sample_requests,
                                                        admin_headers):
    body = {**sample_requests["b64"][2], "cache": False}
    with httpx.Client(base_url=app_url, timeout=120) as c:
        alias_version = c.get("/model/info").json()["model"]["version"]
        pinned_before = _pinned_versions(c)
        # 64 spellings of versions the alias never named: one 403, no look-up, no download.
        spellings = [f"{i:0{2 + i % 5}d}" for i in range(100, 164)]
        r = c.post("/predict/batch", json={"captures": [
            {**body, "model_version": v} for v in spellings]})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["field"] == "captures[0].model_version"
        # 64 spellings of the serving version are one multiplexed id: all answered by it.
        same = [("0" * (i % 4)) + alias_version for i in range(64)]
        r = c.post("/predict/batch", json={"captures": [
            {**body, "model_version": v} for v in same]})
        assert r.status_code == 200, r.text
        assert {x["result"]["model"]["version"] for x in r.json()["results"]} == {alias_version}
        # Two pinned versions in one batch: refused, naming the second.
        r = c.post("/predict/batch", json={"captures": [
            {**body, "model_version": alias_version}, {**body, "model_version": "999"}]},
            headers=admin_headers)
        assert r.status_code == 422 and \
            r.json()["error"]["field"] == "captures[1].model_version", r.text
        # An alias nobody opened, and a malformed header, name the header.
        for value, status in (("staging", 403), ("1 OR 1=1", 422), ("0", 422)):
            r = c.post("/predict", json=body, headers={"serve_multiplexed_model_id": value})
            assert r.status_code == status, (value, r.text)
            assert r.json()["error"]["field"] == "serve_multiplexed_model_id"
        r = c.post("/predict", json={**body, "model_version": "0" + alias_version})
        assert r.status_code == 200 and r.json()["model"]["version"] == alias_version
        assert _pinned_versions(c) == pinned_before  # no model loaded for any of these
