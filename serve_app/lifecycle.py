"""Model lifecycle inside a replica: resolve the alias, validate, swap, pin versions (no Ray)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve_app.errors import ModelError, RegistryUnavailable
from serve_app.evaluate import GOLDEN_FILENAME
from serve_app.model import OnnxLocalizer
from serve_app.registry import ModelRegistry, embedded_uris, ensure_bootstrapped
from serve_app.schemas import ModelRef
from serve_app.settings import AppArgs, EnvSettings

logger = logging.getLogger(__name__)



def make_registry(env: EnvSettings, model_name: str,
                  max_cached_versions: int | None = None) -> ModelRegistry:
    """The MLflow server of MLFLOW_TRACKING_URI, or the embedded SQLite registry."""
    cache_dir = env.state_dir / "model-cache"
    if env.mlflow_tracking_uri:
        return ModelRegistry(env.mlflow_tracking_uri, model_name=model_name, cache_dir=cache_dir,
                             max_cached_versions=max_cached_versions)
    env.state_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri, _ = embedded_uris(env.state_dir)
    return ModelRegistry(tracking_uri, model_name=model_name, cache_dir=cache_dir,
                         max_cached_versions=max_cached_versions)


def bootstrap(args: AppArgs, env: EnvSettings) -> str:
    """Register the shipped model under the alias if the registry has none; fail fast."""
    registry = make_registry(env, args.model_name)
    card_path = args.default_model_dir / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    return ensure_bootstrapped(
        registry, args.default_model_dir / "localization_model.onnx", card, args.model_alias
    )


def load_golden(model_dir: Path) -> np.ndarray:
    """Golden feature inputs shipped with the repo (plain .npy, never pickled)."""
    return np.load(model_dir / GOLDEN_FILENAME, allow_pickle=False)


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and where it came from."""

    localizer: OnnxLocalizer
    ref: ModelRef


class ModelManager:
    """Holds the alias's model and a bounded set of pinned versions; swaps only validated ones."""

    def __init__(
        self,
        registry: ModelRegistry,
        alias: str,
        receiver_ids: list[str],
        golden: np.ndarray,
        max_pinned: int = 3,
    ) -> None:
        self._registry = registry
        self.alias = alias
        self._receiver_ids = receiver_ids
        self._golden = golden
        self._max_pinned = max_pinned
        self._lock = threading.Lock()
        self._pinned: OrderedDict[str, LoadedModel] = OrderedDict()
        self.current: LoadedModel | None = None
        self.last_refusal: dict | None = None
        self.registry_ok = True
        self.last_check_s: float | None = None
        self.reloads = {"success": 0, "refused": 0, "registry_error": 0}

    def _load(self, alias_or_version: str, alias: str | None) -> LoadedModel:
        resolved = self._registry.resolve(alias_or_version)
        localizer = OnnxLocalizer(resolved.onnx_path, self._receiver_ids, resolved.sha256)
        localizer.validate(self._golden)
        return LoadedModel(localizer, ModelRef(name=resolved.name, version=resolved.version,
                                               alias=alias, sha256=resolved.sha256))

    def configure(self, max_pinned: int) -> None:
        """Apply the replica's user_config: how many pinned versions stay loaded."""
        with self._lock:
            self._max_pinned = max_pinned
            while len(self._pinned) > self._max_pinned:
                self._pinned.popitem(last=False)

    def wants(self, alias: str, version: str | None) -> bool:
        """Whether the ingress's view (`alias` names `version`) asks for a refresh.

        Cheap, for the event loop: no when this replica serves that version for that
        alias already, or refused exactly that version last time.
        """
        cur = self.current
        if version is None or (cur and cur.ref.version == version and cur.ref.alias == alias):
            return False
        refused = self.last_refusal
        return not (refused and refused["version"] == version and alias == self.alias)

    def follow(self, alias: str, version: str | None) -> str:
        """Refresh if `wants(alias, version)` (call serialized): `refresh`'s outcome."""
        if not self.wants(alias, version):
            return "unchanged"
        return self.refresh(alias)

    def refresh(self, alias: str | None = None) -> str:
        """Load the alias's version if it changed: 'unchanged', 'swapped', 'refused' or 'degraded'.

        Raises at cold start (no model yet) so a replica without a model never becomes ready.
        """
        if alias is not None:
            self.alias = alias
        try:
            version = self._registry.get_alias(self.alias)
            self.registry_ok = True
        except RegistryUnavailable as exc:
            self.registry_ok = False
            self.reloads["registry_error"] += 1
            if self.current is None:
                raise
            logger.warning("registry unreachable, keeping version %s: %s",
                           self.current.ref.version, exc)
            return "degraded"
        finally:
            self.last_check_s = time.time()
        if version is None:
            msg = f"alias {self.alias!r} is not set in the registry"
            if self.current is None:
                raise ModelError(msg)
            self._refuse(None, msg)
            return "refused"
        if self.current is not None and self.current.ref.version == version \
                and self.current.ref.alias == self.alias:
            return "unchanged"
        try:
            candidate = self._load(version, self.alias)
        except (ModelError, RegistryUnavailable) as exc:
            if self.current is None:
                raise
            self._refuse(version, str(exc))
            return "refused"
        with self._lock:
            self.current = candidate
        self.reloads["success"] += 1
        logger.info("serving %s version %s (alias %s)", candidate.ref.name, version, self.alias)
        return "swapped"

    def _refuse(self, version: str | None, reason: str) -> None:
        self.reloads["refused"] += 1
        self.last_refusal = {"version": version, "reason": reason, "at": time.time()}
        logger.error("refused model version %s: %s", version, reason)

    def pinned(self, version: str) -> LoadedModel:
        """A specific version, loaded on demand and kept in a bounded LRU."""
        if self.current is not None and self.current.ref.version == version:
            return self.current
        with self._lock:
            hit = self._pinned.get(version)
            if hit is not None:
                self._pinned.move_to_end(version)
                return hit
        loaded = self._load(version, None)
        with self._lock:
            self._pinned[version] = loaded
            while len(self._pinned) > self._max_pinned:
                self._pinned.popitem(last=False)
        return loaded

    def info(self) -> dict:
        """What the replica serves, for /model/info and /health."""
        cur = self.current
        return {
            "model": cur.ref.model_dump() if cur else None,
            "sha256": cur.localizer.sha256 if cur else None,
            "metadata": cur.localizer.metadata if cur else None,
            "alias": self.alias,
            "registry_ok": self.registry_ok,
            "last_check": self.last_check_s,
            "last_refusal": self.last_refusal,
            "reloads": dict(self.reloads),
            "pinned_versions": list(self._pinned),
        }


class AliasWatcher:
    """The ingress's view of the alias: the `ModelRef` it names now, swapped whole.

    `ref.version` tells the model replicas which version to follow; with `ref.sha256` it
    is the identity the prediction cache keys on. `versions` are the registered version
    numbers (newest first), refreshed with the alias.
    """

    def __init__(self, registry: ModelRegistry, alias: str) -> None:
        self._registry = registry
        self.alias = alias
        self.ref: ModelRef | None = None
        self.versions: tuple[str, ...] = ()
        self.aliases: dict[str, str] = {}  # every alias of the model -> its version
        self.history: tuple[str, ...] = ()  # versions the followed alias has pointed at
        self.registry_ok = True

    def configure(self, alias: str) -> bool:
        """Follow `alias` from now on; whether it changed."""
        changed = alias != self.alias
        self.alias = alias
        return changed

    def check(self) -> None:
        """Resolve the alias now; an unreachable registry keeps the last answer."""
        alias = self.alias
        try:
            aliases, history = self._registry.alias_view(alias)
            version = aliases.get(alias)
            ref = self.ref
            if version is None:
                ref = None
            elif ref is None or (ref.version, ref.alias) != (version, alias) or ref.sha256 is None:
                # A registry recreated from scratch reuses version numbers: the file's hash
                # keeps an old model's cached answers from passing for the new one's.
                ref = ModelRef(name=self._registry.model_name, version=version, alias=alias,
                               sha256=self._registry.version_sha256(version))
            self.versions = tuple(self._registry.version_numbers())
            self.aliases, self.history = aliases, tuple(history)
            self.ref = ref
            if not self.registry_ok:
                logger.info("registry reachable again")
            self.registry_ok = True
        except RegistryUnavailable as exc:
            if self.registry_ok:
                logger.warning("registry unreachable: %s", exc)
            self.registry_ok = False


_LOCAL_PATH = re.compile(r"(?:file://)?/[^\s'\"()\[\],:]+")  # a path or file URI


def public_info(info: dict) -> dict:
    """What /model/info shows without the admin token: no PID, no local paths."""
    out = {k: v for k, v in info.items() if k != "pid"}
    refusal = out.get("last_refusal")
    if isinstance(refusal, dict) and isinstance(refusal.get("reason"), str):
        out["last_refusal"] = {**refusal, "reason": _LOCAL_PATH.sub("<path>", refusal["reason"])}
    return out
