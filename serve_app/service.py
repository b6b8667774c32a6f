"""Request orchestration behind every front door: captures in, answers or per-item errors out.

The rfloc JSON API, the Open Inference Protocol (REST and gRPC) and the naive baseline
all decode their own wire format into `Capture`s and call `LocalizationService.localize`,
which does the rest in one place: admission, cache look-up, grouping by model version,
the chain call (coalesced across concurrent requests), response shaping, cache write and
shadow traffic. The chain, the cache and the shadow hook are passed in, so this module
knows nothing of Ray Serve and is tested with a plain function as the chain.

Request policies (limits on captures, pinning rules, bytes in flight) go in `admit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

import numpy as np

from serve_app.cache import PredictionCache, cache_key
from serve_app.coalesce import Coalescer
from serve_app.decode import DecodedCapture
from serve_app.errors import InvalidInput, Unavailable, error_body
from serve_app.pipeline import CaptureGroup, Group, split_group, stack_captures
from serve_app.schemas import ModelRef

# The chain: stacked captures and a pinned version (None: the alias) -> the answered group.
Chain = Callable[[CaptureGroup, str | None], Awaitable[Group]]
# Shadow hook: (run the same captures on a version, the champion's results) -> None.
RunOn = Callable[[str], Awaitable[Group]]
Shadow = Callable[[RunOn, list[dict | None]], None]


@dataclasses.dataclass(frozen=True)
class Capture:
    """One decoded capture and the options that govern its answer."""

    decoded: DecodedCapture
    confidence_level: float
    cache: bool = True
    model_version: str | None = None  # pinned version of this capture (None: the alias)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A capture's answer: `result` (the API's PredictResponse dict) or `error` (ErrorBody)."""

    result: dict | None = None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass
class _Pending:
    """One request's captures of one model version waiting for a chain batch."""

    captures: list[tuple[np.ndarray, np.ndarray]]  # (iq [n_present, S], slots) per capture
    confidence: list[float]

    def __len__(self) -> int:
        return len(self.captures)


MAX_VERSION_DIGITS = 16  # like the JSON API's model_version
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


@dataclasses.dataclass(frozen=True)
class PinRules:
    """What a request may pin: versions and aliases open to any client; aliases resolved.

    Anything else needs the admin token. Every spelling of a version (`1`, `01`) becomes one
    multiplexed id, so a client cannot make the model replicas load a version twice.
    """

    open_versions: frozenset[str] = frozenset()
    open_aliases: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # alias -> version


class BytesInFlight:
    """A bound on the request bytes a replica holds at once; beyond it, 503 at once.

    Bodies are counted while they are read and until their answer is sent, so many large
    uploads cannot together exhaust a replica's memory. One event loop uses it: no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[Held]:
        """A request's share; what it took is given back when the block ends."""
        held = Held(self)
        try:
            yield held
        finally:
            self.held -= held.n_bytes


class Held:
    """The bytes one request holds of a `BytesInFlight`."""

    def __init__(self, owner: BytesInFlight) -> None:
        self._owner, self.n_bytes = owner, 0

    def add(self, n_bytes: int) -> None:
        """Take `n_bytes` more, or raise `Unavailable` (503) if the bound would be passed."""
        owner = self._owner
        if owner.held + n_bytes > owner.limit:
            raise Unavailable(f"request bytes in flight would exceed {owner.limit}; retry later")
        owner.held += n_bytes
        self.n_bytes += n_bytes


@dataclasses.dataclass(frozen=True)
class Batching:
    """Cross-request batching of alias-served captures (see `serve_app.coalesce`)."""

    max_size: int = 64
    max_in_flight: int = 2
    min_overlap: int = 16


class LocalizationService:
    """Orchestrates one request's captures; the chain, cache and shadow hook are injected.

    `identity()` is the model the alias names now (`None` while unknown): results are
    cached only under it, and only answers of that very model are written. `batching`
    None sends each request down the chain on its own.
    """

    def __init__(
        self,
        chain: Chain,
        n_receivers: int,
        *,
        cache: PredictionCache | None = None,
        identity: Callable[[], ModelRef | None] = lambda: None,
        shadow: Shadow | None = None,
        batching: Batching | None = Batching(),
        max_captures: int | None = None,
        after_request: Callable[[], None] | None = None,
        pin_rules: Callable[[], PinRules] | None = None,
    ) -> None:
        self._chain, self._n_receivers = chain, n_receivers
        self._pin_rules = pin_rules  # None: pins pass unchecked (the naive baseline)
        self._cache, self._identity, self._shadow = cache, identity, shadow
        self._after = after_request
        self.max_captures = max_captures
        self._batcher: Coalescer[_Pending, Group] | None = None
        if batching is not None:
            self._batcher = Coalescer(self._chain_batch, max_size=batching.max_size,
                                      max_in_flight=batching.max_in_flight,
                                      min_overlap=batching.min_overlap, size=len)

    def configure(self, batching: Batching) -> None:
        """Change the batching limits; batches already running are unaffected."""
        if self._batcher is not None:
            self._batcher.configure(batching.max_size, batching.max_in_flight,
                                    batching.min_overlap)

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Chain calls so far, by captures carried."""
        return dict(self._batcher.sizes if self._batcher is not None else Counter())

    # -- policies ---------------------------------------------------------------------------

    def admit(self, n_captures: int, field: str = "captures") -> None:
        """Refuse a request before any work: too many captures (413 naming `field`)."""
        if self.max_captures is not None and n_captures > self.max_captures:
            raise InvalidInput(field, f"at most {self.max_captures} captures per request, "
                                      f"got {n_captures}", 413)

    def pin(self, value: str | None, field: str, admin: bool = False) -> str | None:
        """The version a pin names (normalised: the one multiplexed id), or refuse it.

        422 for a malformed value or an unknown alias, 403 for a version or alias that only
        the admin token may pin; `field` names the pin in the error.
        """
        if not value or self._pin_rules is None:
            return value or None
        rules = self._pin_rules()
        if value.isascii() and value.isdigit():
            if len(value) > MAX_VERSION_DIGITS or int(value) == 0:
                raise InvalidInput(field, f"a version number is 1 to {MAX_VERSION_DIGITS} "
                                          "digits and not 0")
            version = str(int(value))
            # What an open alias names now is open by number too (the same model either way).
            via_alias = {rules.aliases.get(a) for a in rules.open_aliases}
            if not admin and version not in rules.open_versions and version not in via_alias:
                raise InvalidInput(field, f"version {version} is not open to pinning; it "
                                          "needs the admin token", 403)
            return version
        if not _ALIAS.fullmatch(value):
            raise InvalidInput(field, "must be a version number or an alias name")
        if not admin and value not in rules.open_aliases:
            raise InvalidInput(field, f"alias {value!r} is not open to pinning; it needs the "
                                      "admin token", 403)
        named = rules.aliases.get(value)
        if named is None:
            raise InvalidInput(field, f"the model has no alias {value!r}")
        return named

    def admit_pins(self, items: Sequence[Capture | InvalidInput], pinned: str | None,
                   pinned_field: str, admin: bool, batch: bool
                   ) -> tuple[str | None, list[Capture | InvalidInput]]:
        """The request-wide pin and the items with their pins checked and normalised.

        A request pins one version at most: a batch whose captures pin two is refused (422).
        """
        if pinned:
            return self.pin(pinned, pinned_field, admin), list(items)
        out: list[Capture | InvalidInput] = []
        first: tuple[str, str] | None = None  # (version, field) of the first pinned capture
        for i, item in enumerate(items):
            if isinstance(item, InvalidInput) or not item.model_version:
                out.append(item)
                continue
            field = f"captures[{i}].model_version" if batch else "model_version"
            version = self.pin(item.model_version, field, admin)
            if first is None:
                first = (version or "", field)
            elif version != first[0]:
                raise InvalidInput(field, f"one pinned version per request: {first[1]} pins "
                                          f"version {first[0]}, this capture {version}")
            out.append(dataclasses.replace(item, model_version=version))
        return None, out

    # -- the request --------------------------------------------------------------------------

    async def localize(self, items: Sequence[Capture | InvalidInput],
                       pinned: str | None = None, *,
                       pinned_field: str = "serve_multiplexed_model_id", admin: bool = False,
                       batch: bool = False) -> list[Outcome]:
        """Outcomes of `items` in order; an `InvalidInput` item keeps its error.

        `pinned` (a request-wide version, named `pinned_field` in errors) overrides each
        capture's `model_version`; pins pass `admit_pins` first (`admin`: the request bears
        the admin token; `batch`: errors name `captures[i].model_version`). Errors of the
        chain come back unprefixed; the front door places them (e.g. `captures[i].`).
        Raises `Unavailable` when the chain cannot answer at all.
        """
        self.admit(len(items))
        pinned, items = self.admit_pins(items, pinned, pinned_field, admin, batch)
        t0 = time.perf_counter()
        identity = self._identity()  # what this request's cache keys are made of
        out: list[Outcome | None] = [None] * len(items)
        todo: dict[str | None, list[tuple[int, Capture, str | None]]] = {}
        try:
            for i, item in enumerate(items):
                if isinstance(item, InvalidInput):
                    out[i] = Outcome(error=error_body(item))
                    continue
                version = pinned or item.model_version
                key = None if version else self._key(item, identity)
                cached = None
                if key is not None and self._cache is not None and identity is not None:
                    # Only answers of the model the key names are usable: an entry that
                    # claims another model (forged, or written by a stale replica) is a miss.
                    cached = await self._cache.get(key, (identity.version, identity.sha256))
                if cached is not None:
                    out[i] = Outcome(result=_respond(cached["result"], cached["model"], {},
                                                     True, t0))
                else:
                    todo.setdefault(version, []).append((i, item, key))
            # One chain per distinct pinned version (usually just one chain).
            for version, group_items in todo.items():
                await self._answer(version, group_items, identity, out, t0)
        finally:
            if self._after is not None:
                self._after()
        return out  # type: ignore[return-value]

    async def _answer(self, version: str | None, items: list[tuple[int, Capture, str | None]],
                      identity: ModelRef | None, out: list[Outcome | None], t0: float) -> None:
        captures = [(c.decoded.iq, c.decoded.slots) for _, c, _ in items]
        confidence = [c.confidence_level for _, c, _ in items]
        group = await self._run(captures, confidence, version)
        assert group.results is not None and group.model is not None
        model = group.model.model_dump()
        for j, (i, _, key) in enumerate(items):
            err = group.errors[j]
            if err is not None:
                out[i] = Outcome(error=err)
                continue
            result = group.results[j]
            assert result is not None  # an item without an error has its result
            out[i] = Outcome(result=_respond(result, model, group.timing_ms, False, t0))
            if key is not None and self._cache is not None and identity is not None \
                    and (group.model.version, group.model.sha256) == (identity.version,
                                                                      identity.sha256):
                await self._cache.set(key, {"result": result, "model": model})
        if version is None and self._shadow is not None:
            self._shadow(lambda v: self._run(captures, confidence, v), list(group.results))

    def _key(self, capture: Capture, identity: ModelRef | None) -> str | None:
        """Cache key of an alias-served capture (None: not cached)."""
        if self._cache is None or not capture.cache or identity is None \
                or identity.sha256 is None:
            return None
        return cache_key(f"{identity.version}:{identity.sha256}", capture.decoded.canonical,
                         capture.confidence_level)

    # -- the chain ----------------------------------------------------------------------------

    async def _run(self, captures: list[tuple[np.ndarray, np.ndarray]],
                   confidence: list[float], version: str | None) -> Group:
        if version is None and self._batcher is not None:
            return await self._batcher.submit(_Pending(captures, confidence))
        return await self._chain(stack_captures(captures, self._n_receivers, confidence),
                                 version)

    # Concurrent requests cross the chain as one group (the Coalescer decides which): the
    # chain's hops are paid per batch, not per request (docs/performance.md). Their
    # captures are stacked once, here, into the array the Preprocessor reads.
    async def _chain_batch(self, items: list[_Pending]) -> list[Group]:
        group = stack_captures([c for p in items for c in p.captures], self._n_receivers,
                               [x for p in items for x in p.confidence])
        out = await self._chain(group, None)
        return split_group(out, [len(p) for p in items])


def _respond(result: dict, model: dict, timing: dict, cache_hit: bool, t0: float) -> dict:
    """The API's answer for one capture: the result plus model, cache and timing."""
    timing = {**timing, "total": (time.perf_counter() - t0) * 1000.0}
    return {**result, "model": model, "cache_hit": cache_hit, "timing_ms": timing,
            "request_id": uuid.uuid4().hex,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
