"""Prediction cache against a real Redis: keys, TTL, JSON-only values, breaker, outages."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from load.harness import RedisServer, free_port
from serve_app.cache import (
    KEY_PREFIX,
    CircuitBreaker,
    LocalLRUCache,
    RedisCache,
    cache_key,
    make_cache,
)
from tests.conftest import SHARED_REDIS_URL

TIMEOUT_MS = 50.0
# Scheduling slack on a small, busy CI machine; a stalled call would take seconds.
SLACK_S = 0.25



def prediction_entry(version: str = "3", sha256: str | None = "ab" * 32,
                     latitude: float = 45.1) -> dict:
    """A cache entry as the Ingress stores it: a result and the model that made it."""
    return {
        "result": {
            "position": {"latitude": latitude, "longitude": 8.2},
            "uncertainty": {"sigma_x": 12000.0, "sigma_y": 9000.0, "rho": 0.2, "theta": 31.0,
                            "semi_major_m": 30000.0, "semi_minor_m": 21000.0,
                            "orientation_deg": 59.0, "confidence_level": 0.95,
                            "area_m2": 1.9e9},
            "geojson": {"type": "FeatureCollection", "features": [
                {"type": "Feature", "geometry": {"type": "Point",
                                                 "coordinates": [8.2, latitude]},
                 "properties": {}}]},
            "receivers_used": ["torino", "milano", "genova"],
        },
        "model": {"name": "localization_model", "version": version, "alias": "production",
                  "sha256": sha256},
    }


VALUE = prediction_entry()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def test_prefix(shared_redis: tuple[redis.Redis, list[str]]) -> str:
    """A key prefix unique to this test (only these keys are touched)."""
    return f"rfloc-test:{uuid.uuid4().hex}:"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server, always killed (only this process) at teardown."""
    server = RedisServer(free_port(), tmp_path)
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.resume()
        server.kill()


# ---------------------------------------------------------------- cache_key


def test_cache_key_is_deterministic_and_prefixed() -> None:
    key = cache_key("3", b"\x01\x02", 0.95)
    assert key == cache_key("3", b"\x01\x02", 0.95)
    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 64


def test_cache_key_separates_fields() -> None:
    base = cache_key("3", b"abc", 0.95, "x")
    assert cache_key("4", b"abc", 0.95, "x") != base
    assert cache_key("3", b"abd", 0.95, "x") != base
    assert cache_key("3", b"abc", 0.9, "x") != base
    assert cache_key("3", b"abc", 0.95, "y") != base
    # Moving bytes between adjacent fields must not collide.
    assert cache_key("ab", b"c", 0.5) != cache_key("a", b"bc", 0.5)
    assert cache_key("3", b"ab", 0.5, "c") != cache_key("3", b"a", 0.5, "bc")
    assert cache_key("3", b"", 0.5, "x") != cache_key("3x", b"", 0.5, "")


def test_cache_key_normalizes_confidence() -> None:
    assert cache_key("3", b"a", 0.95) == cache_key("3", b"a", 0.95 + 1e-9)
    assert cache_key("3", b"a", 0.95) == cache_key("3", b"a", np.float64(0.95))
    assert cache_key("3", b"a", 0.95) == cache_key("3", b"a", np.float32(0.95))
    assert cache_key("3", b"a", 0.95) != cache_key("3", b"a", 0.950001)


def test_cache_key_accepts_buffers() -> None:
    iq = np.arange(8, dtype=np.complex64)
    assert cache_key("3", iq.tobytes(), 0.95) == cache_key("3", memoryview(iq), 0.95)


# ---------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=60)
    assert breaker.state == "closed"
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_breaker_half_open_probe_success_closes() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.05)
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.08)
    assert breaker.allow()  # the single probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # others are still skipped while the probe is out
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow()


def test_breaker_half_open_probe_failure_reopens() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.05)
    breaker.record_failure()
    breaker.record_failure()
    time.sleep(0.08)
    assert breaker.allow() and breaker.state == "half_open"
    breaker.record_failure()  # one failed probe is enough to reopen
    assert breaker.state == "open"
    assert not breaker.allow()  # the reset timeout starts again
    time.sleep(0.08)
    assert breaker.allow() and breaker.state == "half_open"


def test_breaker_lost_probe_does_not_wedge_half_open() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.05)
    breaker.record_failure()
    time.sleep(0.08)
    assert breaker.allow()  # probe claimed, never reported (caller cancelled)
    assert not breaker.allow()
    time.sleep(0.08)
    assert breaker.allow()


def test_breaker_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


# ---------------------------------------------------------------- RedisCache, shared Redis


def test_redis_hit_after_miss_and_key_variants(shared_redis, test_prefix) -> None:
    _, keys = shared_redis
    version = f"test-{uuid.uuid4().hex}"  # keeps these keys apart from real entries
    capture = np.random.default_rng(0).standard_normal(64).astype(np.float32).tobytes()
    key = cache_key(version, capture, 0.95)
    other_level = cache_key(version, capture, 0.68)
    other_version = cache_key(version + "b", capture, 0.95)
    keys += [key, other_level, other_version]
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> None:
        try:
            assert await cache.get(key) is None
            await cache.set(key, VALUE)
            assert await cache.get(key) == VALUE
            assert await cache.get(other_level) is None
            assert await cache.get(other_version) is None
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert cache.stats == {"hits": 1, "misses": 3, "errors": 0, "skipped": 0, "invalid": 0}
    assert cache.health()["breaker"] == "closed"


def test_redis_ttl_expiry(shared_redis, test_prefix) -> None:
    _, keys = shared_redis
    key = test_prefix + "ttl"
    keys.append(key)
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=0.3, timeout_ms=500)

    async def scenario() -> None:
        try:
            await cache.set(key, VALUE)
            assert await cache.get(key) == VALUE
            await asyncio.sleep(0.6)
            assert await cache.get(key) is None
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_redis_values_are_json_not_pickle(shared_redis, test_prefix) -> None:
    client, keys = shared_redis
    key = test_prefix + "json"
    keys.append(key)
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)
    value = {**VALUE, "timing_ms": {"total": 4.1}, "cov": np.eye(2)}

    async def scenario() -> None:
        try:
            await cache.set(key, value)
        finally:
            await cache.close()

    asyncio.run(scenario())
    raw = client.get(key)
    assert raw is not None and not raw.startswith(b"\x80")
    assert raw.startswith(b"{")
    assert json.loads(raw)["cov"] == [[1.0, 0.0], [0.0, 1.0]]
    assert 0 < client.pttl(key) <= 30_000


class _Boom:
    """Unpickling this would run code; the cache must never do so."""

    triggered = False

    def __reduce__(self):
        return (_Boom._trigger, ())

    @staticmethod
    def _trigger() -> dict:
        _Boom.triggered = True
        return {"pwned": True}


def test_redis_planted_pickle_is_not_unpickled(shared_redis, test_prefix) -> None:
    client, keys = shared_redis
    pickle_key, junk_key, list_key = (test_prefix + s for s in ("pickle", "junk", "list"))
    keys += [pickle_key, junk_key, list_key]
    client.set(pickle_key, pickle.dumps(_Boom()))
    client.set(junk_key, b"\xff\x00not json")
    client.set(list_key, b"[1, 2, 3]")  # valid JSON, but not an object
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> list:
        try:
            return [await cache.get(k) for k in (pickle_key, junk_key, list_key)]
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == [None, None, None]
    assert not _Boom.triggered
    assert cache.stats["invalid"] == 3 and cache.stats["hits"] == cache.stats["errors"] == 0
    assert cache.breaker.state == "closed"  # bad entries are not a Redis outage
    assert client.exists(pickle_key, junk_key, list_key) == 0  # deleted best-effort


# A poisoned entry under a real key: what an attacker with write access to Redis, a foreign
# application sharing the keyspace, or a corrupt write would leave.
POISONED = {
    "empty object": {},
    "position is text": {**VALUE, "result": {**VALUE["result"], "position": "here"}},
    "latitude out of range": prediction_entry(latitude=123.0),
    "extra field": {**VALUE, "result": {**VALUE["result"], "note": "x"}},
    "no model": {"result": VALUE["result"]},
    "not a FeatureCollection": {**VALUE, "result": {**VALUE["result"], "geojson": {
        "type": "Point", "coordinates": [0, 0]}}},
}


@pytest.mark.parametrize("what", sorted(POISONED))
def test_redis_poisoned_entry_is_a_miss_deleted_and_counted(shared_redis, test_prefix,
                                                            what) -> None:
    client, keys = shared_redis
    key = test_prefix + "poisoned"
    keys.append(key)
    client.set(key, json.dumps(POISONED[what]))
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> tuple[dict | None, dict | None]:
        try:
            first = await cache.get(key)
            await cache.set(key, VALUE)  # what the Ingress does after recomputing
            return first, await cache.get(key)
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == (None, VALUE)
    assert cache.stats["invalid"] == 1 and cache.stats["hits"] == 1
    assert cache.stats["errors"] == 0 and cache.breaker.state == "closed"


def test_redis_invalid_entry_is_deleted(shared_redis, test_prefix) -> None:
    client, keys = shared_redis
    key = test_prefix + "deleted"
    keys.append(key)
    client.set(key, b"{}")
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> dict | None:
        try:
            return await cache.get(key)
        finally:
            await cache.close()

    assert asyncio.run(scenario()) is None
    assert client.exists(key) == 0
    assert cache.health()["stats"]["invalid"] == 1


def test_redis_entry_of_another_model_is_invalid(shared_redis, test_prefix) -> None:
    client, keys = shared_redis
    key = test_prefix + "identity"
    keys.append(key)
    serving = ("3", "ab" * 32)
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)
    others = [prediction_entry(version="2"), prediction_entry(sha256="cd" * 32),
              prediction_entry(sha256=None)]

    async def scenario() -> list:
        try:
            got = []
            for entry in others:
                await cache.set(key, entry)
                got.append(await cache.get(key, serving))
                got.append(client.exists(key))
            await cache.set(key, VALUE)
            got.append(await cache.get(key, serving))
            return got
        finally:
            await cache.close()

    assert asyncio.run(scenario()) == [None, 0, None, 0, None, 0, VALUE]
    assert cache.stats["invalid"] == 3 and cache.stats["hits"] == 1


def test_local_lru_validates_entries_too() -> None:
    cache = LocalLRUCache(max_items=4, ttl_s=60)

    async def scenario() -> list:
        await cache.set("a", {})
        await cache.set("b", VALUE)
        return [await cache.get("a"), len(cache), await cache.get("b", ("2", "ab" * 32)),
                len(cache)]

    assert asyncio.run(scenario()) == [None, 1, None, 0]
    assert cache.stats["invalid"] == 2


@pytest.fixture
def acl_user(shared_redis) -> Iterator[tuple[str, str]]:
    """A Redis ACL user allowed only what the cache does, on its keys; deleted afterwards."""
    client, _ = shared_redis
    user, password = f"rfloc-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{KEY_PREFIX}*",
        "~rfloc-test:*", "+get", "+set", "+del", "+ping", "+select")
    try:
        yield user, password
    finally:
        client.execute_command("ACL", "DELUSER", user)


def test_redis_url_with_acl_user_and_password(shared_redis, acl_user, test_prefix,
                                              caplog) -> None:
    client, keys = shared_redis
    user, password = acl_user
    key = test_prefix + "acl"
    keys.append(key)
    db = 5
    good = RedisCache(f"redis://{user}:{password}@127.0.0.1:6379/{db}", ttl_s=30,
                      timeout_ms=500)
    wrong = RedisCache(f"redis://{user}:not-{password}@127.0.0.1:6379/{db}", ttl_s=30,
                       timeout_ms=500)

    async def scenario() -> list:
        try:
            await good.set(key, VALUE)
            return [await good.get(key), await good.ping(), await wrong.get(key),
                    await wrong.ping()]
        finally:
            await good.close()
            await wrong.close()

    with caplog.at_level(logging.WARNING, logger="serve_app.cache"):
        assert asyncio.run(scenario()) == [VALUE, True, None, False]
    as_db = redis.Redis.from_url(f"redis://127.0.0.1:6379/{db}", socket_timeout=2)
    try:
        assert as_db.exists(key) == 1  # written to the database the URL names
        as_db.delete(key)
    finally:
        as_db.close()
    assert good.stats["hits"] == 1 and good.stats["errors"] == 0
    assert wrong.stats["errors"] == 1 and wrong.stats["hits"] == 0
    assert "invalid username-password" in caplog.text.lower()
    assert password not in caplog.text  # URLs are logged without their credentials


def test_rediss_url_makes_a_tls_client() -> None:
    from redis.asyncio.connection import SSLConnection

    cache = RedisCache("rediss://user:secret@redis.example:6380/2?ssl_cert_reqs=required",
                       ttl_s=30, timeout_ms=500)

    async def client_kwargs() -> tuple:
        client = cache._get_client()
        pool = client.connection_pool
        return pool.connection_class, pool.connection_kwargs

    cls, kwargs = asyncio.run(client_kwargs())
    assert issubclass(cls, SSLConnection)
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "secret", 2)
    assert "secret" not in repr(cache.health())


# The first loop's client cannot be closed once asyncio.run has closed its loop; its
# sockets are released by garbage collection, which warns.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_redis_client_follows_the_event_loop(shared_redis, test_prefix) -> None:
    _, keys = shared_redis
    key = test_prefix + "loops"
    keys.append(key)
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def write() -> None:
        await cache.set(key, VALUE)  # no close(): the next loop must cope on its own

    async def read() -> dict | None:
        try:
            return await cache.get(key)
        finally:
            await cache.close()

    asyncio.run(write())
    assert asyncio.run(read()) == VALUE
    assert cache.stats["errors"] == 0
    gc.collect()  # release the first loop's connections while the filter applies


def test_redis_client_moves_between_live_loops(shared_redis, test_prefix) -> None:
    _, keys = shared_redis
    key = test_prefix + "threads"
    keys.append(key)
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    thread.start()
    try:
        # First use on a loop running in another thread (as a replica's loop would be).
        asyncio.run_coroutine_threadsafe(cache.set(key, VALUE), other_loop).result(5)

        async def read() -> dict | None:
            try:
                return await cache.get(key)
            finally:
                await cache.close()

        assert asyncio.run(read()) == VALUE
        # The other loop's client was closed on its own loop, not leaked.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), other_loop).result(5)
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        thread.join(5)
        other_loop.close()
    assert cache.stats["errors"] == 0


def test_redis_unencodable_value_is_swallowed(shared_redis, test_prefix) -> None:
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> None:
        try:
            await cache.set(test_prefix + "bad", {"x": object()})
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert cache.stats["errors"] == 1 and cache.breaker.state == "closed"


def test_redis_ping_and_health(shared_redis) -> None:
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=30, timeout_ms=500)

    async def scenario() -> bool:
        try:
            return await cache.ping()
        finally:
            await cache.close()

    assert asyncio.run(scenario()) is True
    health = cache.health()
    assert health["backend"] == "redis" and health["breaker"] == "closed"
    assert set(health["stats"]) == {"hits", "misses", "errors", "skipped", "invalid"}


# ---------------------------------------------------------------- RedisCache, faults


def test_unreachable_redis_never_raises_and_opens_breaker(caplog) -> None:
    cache = RedisCache(
        f"redis://127.0.0.1:{free_port()}/0", timeout_ms=TIMEOUT_MS, failure_threshold=3
    )

    async def scenario() -> None:
        try:
            assert await cache.ping() is False
            for _ in range(10):
                t0 = time.monotonic()
                assert await cache.get("rfloc-test:nowhere") is None
                await cache.set("rfloc-test:nowhere", VALUE)
                assert time.monotonic() - t0 < 2 * (TIMEOUT_MS / 1000 + SLACK_S)
        finally:
            await cache.close()

    with caplog.at_level(logging.WARNING, logger="serve_app.cache"):
        asyncio.run(scenario())
    assert cache.breaker.state == "open"
    assert cache.stats["errors"] == 3 and cache.stats["skipped"] == 17
    warnings = [r for r in caplog.records if r.name == "serve_app.cache"]
    assert len(warnings) == 1  # rate-limited
    assert "127.0.0.1" in warnings[0].getMessage()


def test_hung_redis_is_bounded_by_the_timeout(own_redis: RedisServer) -> None:
    cache = RedisCache(own_redis.url, timeout_ms=TIMEOUT_MS, failure_threshold=2)
    before: dict[str, int] = {}

    async def scenario() -> list[float]:
        elapsed = []
        try:
            await cache.set("k", VALUE)  # connection established while healthy
            before.update(cache.stats)
            own_redis.pause()
            for _ in range(4):
                t0 = time.monotonic()
                assert await cache.get("k") is None
                elapsed.append(time.monotonic() - t0)
            own_redis.resume()
        finally:
            await cache.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert max(elapsed) < TIMEOUT_MS / 1000 + SLACK_S
    errors = cache.stats["errors"] - before["errors"]
    skipped = cache.stats["skipped"] - before["skipped"]
    assert errors >= 1 and errors + skipped == 4  # 2 errors, 2 skipped unless the warm-up failed
    assert cache.breaker.state == "open"


def test_redis_killed_and_restarted_under_load(own_redis: RedisServer) -> None:
    reset_timeout_s = 0.25
    cache = RedisCache(
        own_redis.url,
        ttl_s=60,
        timeout_ms=TIMEOUT_MS,
        failure_threshold=3,
        reset_timeout_s=reset_timeout_s,
        validator=None,  # plain {"batch", "i"} objects: this test is about outages
    )
    n_batches, batch_size = 30, 10  # 300 operations, each a set then a get
    kill_at, restart_at = 10, 20
    durations: list[float] = []
    caller_errors: list[BaseException] = []
    states_while_down: list[str] = []
    results: dict[int, list[dict | None]] = {}

    async def timed(coro) -> object:
        t0 = time.monotonic()
        try:
            return await coro
        except BaseException as exc:  # anything reaching the caller is a failure
            caller_errors.append(exc)
            return None
        finally:
            durations.append(time.monotonic() - t0)

    async def operation(batch: int, i: int) -> dict | None:
        key = f"op:{batch}:{i}"
        value = {"batch": batch, "i": i}
        await timed(cache.set(key, value))
        got = await timed(cache.get(key))
        return got if got == value else None

    async def scenario() -> None:
        try:
            for batch in range(n_batches):
                if batch == kill_at:
                    own_redis.kill()
                elif batch == restart_at:
                    own_redis.start()
                results[batch] = await asyncio.gather(
                    *(operation(batch, i) for i in range(batch_size))
                )
                if kill_at <= batch < restart_at:
                    states_while_down.append(cache.breaker.state)
                await asyncio.sleep(0.04)
            # After recovery a fresh write is readable again. A few attempts, because on
            # a loaded machine a cold 50 ms connect can miss and reopen the breaker.
            deadline = time.monotonic() + 5.0
            while True:
                await asyncio.sleep(reset_timeout_s)
                await timed(cache.set("final", VALUE))
                if await timed(cache.get("final")) == VALUE:
                    break
                assert time.monotonic() < deadline, cache.health()
        finally:
            await cache.close()

    t_start = time.monotonic()
    asyncio.run(scenario())
    total_s = time.monotonic() - t_start

    assert caller_errors == []
    assert len(durations) >= 2 * n_batches * batch_size + 2
    assert max(durations) < TIMEOUT_MS / 1000 + SLACK_S, max(durations)
    hits = [sum(r is not None for r in results[b]) for b in range(n_batches)]
    # Normally every pre-outage operation hits; cold connects under CPU load may time out.
    assert sum(hits[:kill_at]) >= kill_at * batch_size // 2, hits
    assert sum(hits[kill_at:restart_at]) == 0, hits
    assert "open" in states_while_down
    assert cache.stats["skipped"] > 0 and cache.stats["errors"] >= 3
    assert sum(hits[restart_at:]) > 0, hits  # hits resume within the loop
    assert cache.breaker.state == "closed"
    assert total_s < 15


# ---------------------------------------------------------------- LocalLRUCache, make_cache


def test_local_lru_evicts_least_recently_used() -> None:
    cache = LocalLRUCache(max_items=2, ttl_s=60, validator=None)  # any JSON object

    async def scenario() -> None:
        await cache.set("a", {"v": 1})
        await cache.set("b", {"v": 2})
        assert await cache.get("a") == {"v": 1}  # "a" is now the most recent
        await cache.set("c", {"v": 3})  # evicts "b"
        assert await cache.get("b") is None
        assert await cache.get("a") == {"v": 1}
        assert await cache.get("c") == {"v": 3}
        await cache.set("a", {"v": 4})  # overwrite keeps the size
        assert len(cache) == 2 and await cache.get("a") == {"v": 4}

    asyncio.run(scenario())
    assert cache.stats == {"hits": 4, "misses": 1, "errors": 0, "skipped": 0, "invalid": 0}
    assert cache.health()["items"] == 2


def test_local_lru_ttl() -> None:
    cache = LocalLRUCache(max_items=10, ttl_s=0.2)

    async def scenario() -> None:
        await cache.set("a", VALUE)
        assert await cache.get("a") == VALUE
        await asyncio.sleep(0.35)
        assert await cache.get("a") is None
        assert len(cache) == 0

    asyncio.run(scenario())


def test_local_lru_ttl_counts_from_the_write_not_the_reads() -> None:
    cache = LocalLRUCache(max_items=10, ttl_s=1.0)

    async def scenario() -> None:
        await cache.set("a", VALUE)
        for _ in range(3):  # reads keep it recent, not alive
            await asyncio.sleep(0.1)
            assert await cache.get("a") == VALUE
        await asyncio.sleep(0.8)
        assert await cache.get("a") is None
        await cache.set("a", VALUE)  # a new write starts a new TTL
        assert await cache.get("a") == VALUE

    asyncio.run(scenario())


def test_local_lru_expired_entries_go_before_live_ones_are_evicted() -> None:
    cache = LocalLRUCache(max_items=2, ttl_s=1.5, validator=None)

    async def scenario() -> None:
        await cache.set("x", {"v": 1})
        await asyncio.sleep(0.75)
        await cache.set("y", {"v": 2})
        assert await cache.get("x") == {"v": 1}  # "x" the most recent, "y" the least
        await asyncio.sleep(0.9)  # "x" has expired, "y" has not
        await cache.set("z", {"v": 3})  # takes the expired entry's place, not "y"'s
        assert await cache.get("y") == {"v": 2} and await cache.get("z") == {"v": 3}
        assert await cache.get("x") is None and len(cache) == 2

    asyncio.run(scenario())


def test_local_lru_entries_cannot_be_mutated_by_callers() -> None:
    cache = LocalLRUCache(max_items=10, ttl_s=60)
    value = prediction_entry(latitude=45.0)

    async def scenario() -> None:
        await cache.set("a", value)
        value["result"]["position"]["latitude"] = 0.0
        got = await cache.get("a")
        assert got == prediction_entry(latitude=45.0)
        got["result"]["receivers_used"].append("rome")
        assert (await cache.get("a"))["result"]["receivers_used"] == [
            "torino", "milano", "genova"]

    asyncio.run(scenario())


def test_make_cache_selection() -> None:
    assert make_cache(None, ttl_s=60, timeout_ms=50) is None
    assert make_cache("", ttl_s=60, timeout_ms=50, local_max_items=0) is None
    local = make_cache("", ttl_s=60, timeout_ms=50, local_max_items=16)
    assert isinstance(local, LocalLRUCache) and local.max_items == 16
    remote = make_cache(SHARED_REDIS_URL, ttl_s=60, timeout_ms=25, local_max_items=16)
    assert isinstance(remote, RedisCache)
    assert remote.timeout_s == pytest.approx(0.025) and remote.ttl_ms == 60_000
    with pytest.raises(ValueError, match="url"):
        make_cache("http://127.0.0.1:6379", ttl_s=60, timeout_ms=50)
