"""Prediction cache: Redis with bounded timeouts and a circuit breaker, or an in-process LRU.

The cache is an optimisation, never a dependency: every call returns within its timeout
budget and never raises to the caller. Values are JSON (never pickle), so a poisoned or
foreign entry in a shared Redis cannot execute code in a replica; and every value read is
checked against the schema of a cached prediction (and, when the caller says which, the
model that must have made it) before it is used: anything else is a miss, deleted from
Redis and counted as "invalid".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from cachetools import TTLCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.schemas import ModelRef, Uncertainty
from serve_app.settings import redact_url

logger = logging.getLogger(__name__)

KEY_PREFIX = "rfloc:pred:"
# Bumped if the key derivation changes, so old entries are simply never read again.
_KEY_SCHEME = b"rfloc-cache-key/v1"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
WARN_INTERVAL_S = 10.0


def cache_key(
    model_version: str, capture_bytes: bytes, confidence_level: float, extra: str = ""
) -> str:
    """Cache key for one prediction: prefix + sha256 over length-prefixed fields."""
    # float() first: repr() of a numpy scalar is "np.float64(0.95)", not "0.95".
    level = repr(round(float(confidence_level), 6)).encode()
    capture = memoryview(capture_bytes)
    digest = hashlib.sha256()
    digest.update(_KEY_SCHEME)
    # Each field is preceded by its byte length, so no two splits of the same
    # concatenated bytes can produce the same digest input.
    for field in (model_version.encode(), capture, level, extra.encode()):
        nbytes = field.nbytes if isinstance(field, memoryview) else len(field)
        digest.update(struct.pack(">Q", nbytes))
        digest.update(field)
    return KEY_PREFIX + digest.hexdigest()


def _dumps(value: dict) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def _loads(raw: bytes) -> dict:
    value = orjson.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"cached value is a JSON {type(value).__name__}, not an object")
    return value


class _CachedPosition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latitude: float = Field(ge=-90.0, le=90.0)
    longitude: float = Field(ge=-180.0, le=180.0)


class _CachedGeoJson(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern="^FeatureCollection$")
    features: list[dict[str, Any]] = Field(min_length=1)


class CachedResult(BaseModel):
    """The model-dependent part of a `PredictResponse`: what a cache entry keeps."""

    model_config = ConfigDict(extra="forbid")

    position: _CachedPosition
    uncertainty: Uncertainty
    geojson: _CachedGeoJson
    receivers_used: list[str]


class CachedPrediction(BaseModel):
    """A prediction cache entry: the result and the registered model that computed it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    result: CachedResult
    model: ModelRef


# (version, sha256) of the model whose answers a read may return; None = any model.
Identity = tuple[str | None, str | None]
# Checks a decoded value; raises ValueError (pydantic's ValidationError is one) if unusable.
Validator = Callable[[dict, "Identity | None"], None]


def validate_prediction(value: dict, identity: Identity | None = None) -> None:
    """Raise ValueError unless `value` is a cached prediction (of model `identity` if given)."""
    entry = CachedPrediction.model_validate(value)
    if identity is not None:
        version, sha = identity
        if entry.model.version != version or entry.model.sha256 != sha:
            raise ValueError(
                f"entry of model version {entry.model.version!r} "
                f"(sha256 {(entry.model.sha256 or '')[:12]!r}) read for version {version!r} "
                f"(sha256 {(sha or '')[:12]!r})"
            )


_safe_url = redact_url


class CircuitBreaker:
    """Consecutive-failure circuit breaker: closed -> open -> half_open (one probe) -> closed.

    Ours rather than a library's: the callers await Redis on the replica's event loop and
    ask `allow()` first, so that an open breaker costs no call and counts as "skipped".
    pybreaker wraps only synchronous calls (its async path is Tornado's) and holds its lock
    across the wrapped call; purgatory is asyncio-native but lets every caller through
    while half-open and, unless told otherwise, counts a cancelled caller as a failure.
    Neither has the single probe that is re-issued when its caller was cancelled.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __init__(self, failure_threshold: int = 3, reset_timeout_s: float = 5.0) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s < 0:
            raise ValueError("reset_timeout_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at = 0.0

    @property
    def state(self) -> str:
        """Current state: "closed", "open" or "half_open"."""
        with self._lock:
            return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        with self._lock:
            return self._failures

    def allow(self) -> bool:
        """Whether a call may go to the backend now (claims the probe when half-opening)."""
        with self._lock:
            if self._state == self.CLOSED:
                return True
            now = time.monotonic()
            if self._state == self.OPEN:
                if now - self._opened_at < self.reset_timeout_s:
                    return False
                self._state = self.HALF_OPEN
                self._probe_started_at = now
                return True
            # Half-open with a probe in flight. If the probe never reported (its caller
            # was cancelled), let another one through rather than stay stuck.
            if now - self._probe_started_at >= self.reset_timeout_s:
                self._probe_started_at = now
                return True
            return False

    def record_success(self) -> None:
        """A backend call succeeded: close the breaker."""
        with self._lock:
            self._state = self.CLOSED
            self._failures = 0

    def record_failure(self) -> None:
        """A backend call failed: open after `failure_threshold` in a row, or a failed probe."""
        with self._lock:
            self._failures += 1
            if self._state == self.HALF_OPEN or (
                self._state == self.CLOSED and self._failures >= self.failure_threshold
            ):
                self._state = self.OPEN
                self._opened_at = time.monotonic()


class PredictionCache:
    """Interface of a prediction cache; get/set never raise."""

    backend = "none"

    def __init__(self, validator: Validator | None = validate_prediction) -> None:
        self._stats_lock = threading.Lock()
        self._validator = validator
        self.stats: dict[str, int] = {
            "hits": 0, "misses": 0, "errors": 0, "skipped": 0, "invalid": 0}

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    def _check(self, raw: bytes, identity: Identity | None) -> dict:
        """The decoded value if it passes the validator; ValueError otherwise."""
        value = _loads(raw)
        if self._validator is not None:
            try:
                self._validator(value, identity)
            except ValidationError as exc:  # keep the message short: no input echoed
                first = exc.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "value"
                raise ValueError(f"not a cached prediction: {where}: {first['msg']}") from None
        return value

    async def get(self, key: str, identity: Identity | None = None) -> dict | None:
        """The cached value for `key`, or None on a miss, an invalid entry or any failure.

        `identity` (version, sha256) names the model whose answers the caller may use; an
        entry made by another model is treated like any other invalid entry.
        """
        raise NotImplementedError

    async def set(self, key: str, value: dict) -> None:
        """Store `value` under `key`; failures are logged and swallowed."""
        raise NotImplementedError

    async def ping(self) -> bool:
        """Whether the backend answers."""
        return True

    def health(self) -> dict:
        """Backend name and counters, for /health and metrics."""
        with self._stats_lock:
            stats = dict(self.stats)
        return {"backend": self.backend, "stats": stats}

    async def close(self) -> None:
        """Release connections."""


class RedisCache(PredictionCache):
    """Redis-backed cache: bounded per-call latency, no retries, circuit breaker, JSON values."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600,
        timeout_ms: float = 50,
        failure_threshold: int = 3,
        reset_timeout_s: float = 5.0,
        validator: Validator | None = validate_prediction,
    ) -> None:
        super().__init__(validator)
        if urlsplit(url).scheme not in _REDIS_SCHEMES:
            raise ValueError(f"cache url must use one of {_REDIS_SCHEMES}: {_safe_url(url)!r}")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        self.url = url
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.timeout_s = timeout_ms / 1000.0
        self.breaker = CircuitBreaker(failure_threshold, reset_timeout_s)
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._client_lock = threading.Lock()
        self._warn_lock = threading.Lock()
        self._last_warn_at = -float("inf")
        self._suppressed_warnings = 0

    def _get_client(self) -> Any:
        """The client bound to the running loop, created on first use in that loop."""
        loop = asyncio.get_running_loop()
        with self._client_lock:
            if self._client is None or self._client_loop is not loop:
                self._close_foreign(self._client, self._client_loop)
                # Imported here so the module stays importable without redis installed.
                import redis.asyncio as redis_asyncio
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff

                # retry_on_timeout already defaults to False (and is deprecated in redis 6+);
                # Retry(..., 0) disables the connection-error retries that redis 6+ enables.
                self._client = redis_asyncio.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=self.timeout_s,
                    retry=Retry(NoBackoff(), 0),
                    decode_responses=False,
                )
                self._client_loop = loop
            return self._client

    @staticmethod
    def _close_foreign(client: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        """Close a client owned by another loop on that loop, if it still can run."""
        # A client and its pool belong to the loop that created them. If that loop is
        # closed, the sockets are released when the client is garbage-collected.
        if client is None or loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)

    def _warn(self, action: str, exc: BaseException) -> None:
        """Log a Redis failure at most once per WARN_INTERVAL_S."""
        now = time.monotonic()
        with self._warn_lock:
            if now - self._last_warn_at < WARN_INTERVAL_S:
                self._suppressed_warnings += 1
                return
            suppressed, self._suppressed_warnings = self._suppressed_warnings, 0
            self._last_warn_at = now
        logger.warning(
            "redis cache %s failed at %s: %s: %s (breaker %s; %d similar warnings suppressed)",
            action,
            _safe_url(self.url),
            type(exc).__name__,
            exc,
            self.breaker.state,
            suppressed,
        )

    def _failed(self, action: str, exc: BaseException) -> None:
        self._count("errors")
        self.breaker.record_failure()
        self._warn(action, exc)

    async def get(self, key: str, identity: Identity | None = None) -> dict | None:
        """The cached value for `key`, or None on a miss, an open breaker, an invalid entry
        (deleted) or any failure."""
        if not self.breaker.allow():
            self._count("skipped")
            return None
        try:
            client = self._get_client()
            raw = await asyncio.wait_for(client.get(key), self.timeout_s)
        except Exception as exc:
            self._failed("get", exc)
            return None
        self.breaker.record_success()
        if raw is None:
            self._count("misses")
            return None
        try:
            value = self._check(raw, identity)
        except Exception as exc:
            # Redis is healthy, the entry is not (forged, foreign, corrupt, or of another
            # model): a miss, never a failure of the request, and not a breaker failure.
            self._count("invalid")
            self._warn("read of an invalid entry", exc)
            await self._delete_quietly(key)
            return None
        self._count("hits")
        return value

    async def _delete_quietly(self, key: str) -> None:
        try:
            await asyncio.wait_for(self._get_client().delete(key), self.timeout_s)
        except Exception as exc:
            logger.debug("could not delete an invalid cache entry: %r", exc)

    async def set(self, key: str, value: dict) -> None:
        """Store `value` as JSON with a TTL; failures are counted and swallowed."""
        try:
            payload = _dumps(value)
        except Exception as exc:
            # A value that cannot be JSON-encoded is a caller bug, not a Redis failure.
            self._count("errors")
            self._warn("encode", exc)
            return
        if not self.breaker.allow():
            self._count("skipped")
            return
        try:
            client = self._get_client()
            await asyncio.wait_for(client.set(key, payload, px=self.ttl_ms), self.timeout_s)
        except Exception as exc:
            self._failed("set", exc)
            return
        self.breaker.record_success()

    async def ping(self) -> bool:
        """Whether Redis answers PING within the timeout (does not touch the breaker)."""
        try:
            return bool(await asyncio.wait_for(self._get_client().ping(), self.timeout_s))
        except Exception:
            return False

    def health(self) -> dict:
        """Breaker state, consecutive failures and counters."""
        report = super().health()
        report["breaker"] = self.breaker.state
        report["consecutive_failures"] = self.breaker.consecutive_failures
        return report

    async def close(self) -> None:
        """Close the client if it belongs to the running loop; otherwise just drop it."""
        with self._client_lock:
            client, loop = self._client, self._client_loop
            self._client, self._client_loop = None, None
        if client is None or loop is not asyncio.get_running_loop():
            return
        try:
            await asyncio.wait_for(client.aclose(), max(self.timeout_s, 1.0))
        except Exception as exc:
            logger.debug("closing redis client: %r", exc)


class LocalLRUCache(PredictionCache):
    """Bounded in-process LRU with a TTL, for deployments without Redis."""

    backend = "local"

    def __init__(self, max_items: int, ttl_s: float = 3600,
                 validator: Validator | None = validate_prediction) -> None:
        super().__init__(validator)
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.max_items = max_items
        self.ttl_s = ttl_s
        # key -> JSON bytes (so callers never share objects), least recently used evicted
        # first, each gone ttl_s after it was stored. TTLCache is not thread-safe: the lock.
        self._lock = threading.Lock()
        self._items: TTLCache[str, bytes] = TTLCache(maxsize=max_items, ttl=ttl_s,
                                                     timer=time.monotonic)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    async def get(self, key: str, identity: Identity | None = None) -> dict | None:
        """A fresh copy of the cached value, or None if absent, expired or invalid."""
        with self._lock:
            raw = self._items.get(key)  # an expired entry is absent; a read makes it recent
        if raw is None:
            self._count("misses")
            return None
        try:
            value = self._check(raw, identity)
        except Exception as exc:
            self._count("invalid")
            logger.warning("invalid local cache entry dropped: %s", exc)
            with self._lock:
                self._items.pop(key, None)
            return None
        self._count("hits")
        return value

    async def set(self, key: str, value: dict) -> None:
        """Store a JSON copy of `value`, evicting the least recently used beyond max_items."""
        try:
            payload = _dumps(value)
        except Exception as exc:
            self._count("errors")
            logger.warning("local cache value failed to encode: %r", exc)
            return
        with self._lock:
            self._items[key] = payload

    def health(self) -> dict:
        """Counters and current size."""
        report = super().health()
        report["items"] = len(self)
        report["max_items"] = self.max_items
        return report


def make_cache(
    url: str | None, ttl_s: float, timeout_ms: float, local_max_items: int = 0
) -> PredictionCache | None:
    """RedisCache for a URL; else a LocalLRUCache if local_max_items > 0; else None."""
    if url:
        return RedisCache(url, ttl_s=ttl_s, timeout_ms=timeout_ms)
    if local_max_items > 0:
        return LocalLRUCache(local_max_items, ttl_s=ttl_s)
    return None
