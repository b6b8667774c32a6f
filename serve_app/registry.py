"""MLflow model registry client: register ONNX models, move aliases, resolve verified files.

A registered version's artifact is a plain directory (no MLflow flavor): ``model.onnx`` and
``model_card.json``, logged under ``model/`` of a run in the ``rfloc-models`` experiment.
Every version carries an ``onnx_sha256`` tag; ``resolve`` refuses a file that does not match.

Network behaviour: MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` from the environment at request time (defaults 120 s and
7 retries with exponential backoff, i.e. minutes against a dead server). ``ModelRegistry``
sets them to ``timeout_s`` and 1 when they are not already set, so an unreachable registry
fails fast; operators can still override both through the environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from serve_app.errors import ModelError, RegistryUnavailable, RflocError
from serve_app.model import sha256_file

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "rfloc-models"
ARTIFACT_DIR = "model"
ONNX_FILENAME = "model.onnx"
CARD_FILENAME = "model_card.json"
SHA_TAG = "onnx_sha256"
FEATURE_SPEC_TAG = "feature_spec_version"
RECEIVERS_TAG = "receivers"
HISTORY_MAX = 20
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
MAX_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
DEFAULT_MAX_RETRIES = 1
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "rfloc-model-cache"

_NOT_FOUND = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
_CLIENT_ERRORS = {_NOT_FOUND, ErrorCode.Name(INVALID_PARAMETER_VALUE)}
_ALREADY_EXISTS = ErrorCode.Name(RESOURCE_ALREADY_EXISTS)


@dataclass(frozen=True)
class ResolvedModel:
    """A model version downloaded to the local cache and checked against its sha256 tag."""

    name: str
    version: str
    alias: str | None
    onnx_path: Path
    card: dict
    sha256: str


def embedded_uris(state_dir: Path) -> tuple[str, str]:
    """(tracking/registry URI, artifact location) of the embedded SQLite registry in state_dir."""
    state_dir = Path(state_dir).resolve()
    return f"sqlite:///{state_dir}/mlflow.db", f"{state_dir.as_uri()}/mlartifacts"


def _sqlite_artifact_location(tracking_uri: str) -> str | None:
    """The embedded artifact location beside a SQLite database, None for other backends."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    return embedded_uris(db_path.parent)[1]


def _receivers_tag(receivers: Any) -> str:
    if isinstance(receivers, str):
        return receivers
    return ",".join(str(r.get("id", r)) if isinstance(r, dict) else str(r) for r in receivers)


def _accuracy_metrics(card: dict) -> dict[str, float]:
    accuracy = card.get("accuracy")
    if not isinstance(accuracy, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in accuracy.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class ModelRegistry:
    """Client of the MLflow registry holding one registered ONNX model and its aliases."""

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        model_name: str = "localization_model",
        cache_dir: Path | None = None,
        timeout_s: float = 10.0,
        artifact_location: str | None = None,
        max_cached_versions: int | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.timeout_s = timeout_s
        # Versions kept on disk under cache_dir (None: all); the least recently used go first.
        self.max_cached_versions = max_cached_versions
        # Only used when this client creates the experiment; keeps runs out of the CWD.
        self._artifact_location = artifact_location or _sqlite_artifact_location(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # MLflow reads these per request; respect values the operator already set.
        os.environ.setdefault(TIMEOUT_ENV, str(max(1, math.ceil(timeout_s))))
        os.environ.setdefault(MAX_RETRIES_ENV, str(DEFAULT_MAX_RETRIES))
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=self.registry_uri)

    # -- error mapping -------------------------------------------------------------------

    def _where(self) -> str:
        parts = urlsplit(self.tracking_uri)
        if parts.password:  # never echo credentials embedded in the URI
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return parts._replace(netloc=netloc).geturl()
        return self.tracking_uri

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Map MLflow/transport failures: client errors -> ModelError, the rest -> unavailable."""
        try:
            yield
        except RflocError:
            raise
        except MlflowException as exc:
            if exc.error_code in _CLIENT_ERRORS:
                raise ModelError(f"{what}: {exc.message}") from exc
            raise RegistryUnavailable(
                f"model registry at {self._where()} failed while {what}: {exc.message}"
            ) from exc
        except OSError as exc:  # includes requests' ConnectionError / Timeout
            raise RegistryUnavailable(
                f"model registry at {self._where()} unreachable while {what}: {exc}"
            ) from exc

    # -- registration --------------------------------------------------------------------

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(
                EXPERIMENT_NAME, artifact_location=self._artifact_location
            )
        except MlflowException as exc:  # created concurrently by another client
            if exc.error_code != _ALREADY_EXISTS:
                raise
            experiment = self._client.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _ensure_registered_model(self) -> None:
        try:
            self._client.create_registered_model(
                self.model_name, description="Radio transmitter localization (ONNX)"
            )
        except MlflowException as exc:
            if exc.error_code != _ALREADY_EXISTS:
                raise

    def register(self, onnx_path: Path, card: dict | None = None, description: str = "") -> str:
        """Log the ONNX file and its card in a run, create a model version; returns the version."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelError(f"ONNX file not found: {onnx_path}")
        sha = sha256_file(onnx_path)
        card_out = {**(card or {}), SHA_TAG: sha}
        run_tags = {SHA_TAG: sha}
        if FEATURE_SPEC_TAG in card_out:
            run_tags[FEATURE_SPEC_TAG] = str(card_out[FEATURE_SPEC_TAG])
        if card_out.get(RECEIVERS_TAG):
            run_tags[RECEIVERS_TAG] = _receivers_tag(card_out[RECEIVERS_TAG])
        version_tags = {k: v for k, v in run_tags.items() if k != RECEIVERS_TAG}

        with self._guard(f"registering {onnx_path.name} as {self.model_name!r}"):
            run = self._client.create_run(
                self._experiment_id(), run_name=f"{self.model_name}-{sha[:12]}", tags=run_tags
            )
            run_id = run.info.run_id
            try:
                with tempfile.TemporaryDirectory(prefix="rfloc-register-") as tmp:
                    staged = Path(tmp)
                    shutil.copyfile(onnx_path, staged / ONNX_FILENAME)
                    (staged / CARD_FILENAME).write_text(
                        json.dumps(card_out, indent=2, sort_keys=True) + "\n"
                    )
                    self._client.log_artifacts(run_id, str(staged), artifact_path=ARTIFACT_DIR)
                for key, value in _accuracy_metrics(card_out).items():
                    self._client.log_metric(run_id, key, value)
            except BaseException:
                self._client.set_terminated(run_id, status="FAILED")
                raise
            self._client.set_terminated(run_id, status="FINISHED")

            self._ensure_registered_model()
            mv = self._client.create_model_version(
                self.model_name,
                source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}",
                run_id=run_id,
                tags=version_tags,
                description=description or None,
            )
        version = str(mv.version)
        logger.info("registered %s version %s (sha256 %s)", self.model_name, version, sha[:12])
        return version

    # -- aliases -------------------------------------------------------------------------

    def _aliases(self) -> dict[str, str] | None:
        """alias -> version of the registered model, None if the model is absent."""
        try:
            model = self._client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code == _NOT_FOUND:
                return None
            raise
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def _history(self, alias: str) -> list[str]:
        model = self._client.get_registered_model(self.model_name)
        raw = (model.tags or {}).get(f"{alias}_history", "")
        return [v for v in raw.split(",") if v]

    def _write_history(self, alias: str, history: list[str]) -> None:
        self._client.set_registered_model_tag(
            self.model_name, f"{alias}_history", ",".join(history[-HISTORY_MAX:])
        )

    def set_alias(self, alias: str, version: str) -> None:
        """Point alias at version and append it to the alias's history (for rollback)."""
        version = str(version)
        with self._guard(f"setting alias {alias!r} of {self.model_name!r} to {version}"):
            self._client.set_registered_model_alias(self.model_name, alias, version)
            # Read-modify-write of a tag: concurrent alias changes may lose a history entry.
            history = self._history(alias)
            if not history or history[-1] != version:
                history.append(version)
                self._write_history(alias, history)
        logger.info("alias %s@%s -> version %s", self.model_name, alias, version)

    def alias_view(self, alias: str) -> tuple[dict[str, str], list[str]]:
        """Every alias -> version, and the versions `alias` has pointed at (one registry call)."""
        with self._guard(f"reading aliases of {self.model_name!r}"):
            try:
                model = self._client.get_registered_model(self.model_name)
            except MlflowException as exc:
                if exc.error_code == _NOT_FOUND:
                    return {}, []
                raise
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        raw = (model.tags or {}).get(f"{alias}_history", "")
        return aliases, [v for v in raw.split(",") if v]

    def get_alias(self, alias: str) -> str | None:
        """Version the alias points at; None if the alias is unset or the model absent."""
        with self._guard(f"reading alias {alias!r} of {self.model_name!r}"):
            aliases = self._aliases()
        return None if aliases is None else aliases.get(alias)

    def version_sha256(self, version: str) -> str | None:
        """The onnx_sha256 tag of a version (None if the version or tag is absent)."""
        with self._guard(f"reading version {version} of {self.model_name!r}"):
            try:
                mv = self._client.get_model_version(self.model_name, str(version))
            except MlflowException as exc:
                if exc.error_code in _CLIENT_ERRORS:
                    return None
                raise
        return (mv.tags or {}).get(SHA_TAG)

    def rollback(self, alias: str = "production") -> str:
        """Move alias back to the version it pointed to before; returns that version."""
        with self._guard(f"rolling back alias {alias!r} of {self.model_name!r}"):
            aliases = self._aliases()
            if aliases is None:
                raise ModelError(f"model {self.model_name!r} is not registered")
            current = aliases.get(alias)
            history = self._history(alias)
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise ModelError(
                    f"alias {alias!r} of {self.model_name!r} has no previous version to roll "
                    f"back to (currently {current})"
                )
            target = history[-1]
            self._client.set_registered_model_alias(self.model_name, alias, target)
            self._write_history(alias, history)
        logger.info("rolled back %s@%s: %s -> %s", self.model_name, alias, current, target)
        return target

    # -- listing -------------------------------------------------------------------------

    def version_numbers(self) -> list[str]:
        """The registered version numbers, newest first (one registry call)."""
        with self._guard(f"listing versions of {self.model_name!r}"):
            try:
                found = self._client.search_model_versions(f"name='{self.model_name}'")
            except MlflowException as exc:
                if exc.error_code in _CLIENT_ERRORS:
                    return []
                raise
        return [str(v) for v in sorted((int(mv.version) for mv in found), reverse=True)]

    def versions(self) -> list[dict]:
        """All versions, newest first: version, aliases, created, sha256, accuracy, description."""
        with self._guard(f"listing versions of {self.model_name!r}"):
            aliases = self._aliases()
            if aliases is None:
                return []
            by_version: dict[str, list[str]] = {}
            for alias, version in sorted(aliases.items()):
                by_version.setdefault(version, []).append(alias)
            found = self._client.search_model_versions(f"name='{self.model_name}'")
            rows = []
            for mv in sorted(found, key=lambda mv: int(mv.version), reverse=True):
                accuracy: dict[str, float] = {}
                if mv.run_id:
                    try:
                        accuracy = dict(self._client.get_run(mv.run_id).data.metrics)
                    except MlflowException as exc:  # run deleted: keep the version listed
                        if exc.error_code != _NOT_FOUND:
                            raise
                rows.append(
                    {
                        "version": str(mv.version),
                        "aliases": by_version.get(str(mv.version), []),
                        "created": datetime.fromtimestamp(
                            mv.creation_timestamp / 1000, tz=UTC
                        ).isoformat(),
                        "sha256": (mv.tags or {}).get(SHA_TAG),
                        "accuracy": accuracy,
                        "description": mv.description or "",
                        "run_id": mv.run_id,
                    }
                )
        return rows

    # -- resolution ----------------------------------------------------------------------

    def resolve(self, alias_or_version: str) -> ResolvedModel:
        """Download (or reuse from cache) a version by alias or number, verified by sha256."""
        ref = str(alias_or_version).strip()
        alias: str | None = None if ref.isdigit() else ref
        with self._guard(f"resolving {self.model_name!r} {ref!r}"):
            if alias is None:
                version = ref
            else:
                aliases = self._aliases()
                if aliases is None:
                    raise ModelError(f"model {self.model_name!r} is not registered")
                if alias not in aliases:
                    raise ModelError(f"alias {alias!r} is not set on model {self.model_name!r}")
                version = aliases[alias]
            try:
                mv = self._client.get_model_version(self.model_name, version)
            except MlflowException as exc:
                if exc.error_code == _NOT_FOUND:
                    raise ModelError(f"model {self.model_name!r} has no version {version}") from exc
                raise
            expected = (mv.tags or {}).get(SHA_TAG)
            if not expected:
                raise ModelError(
                    f"{self.model_name!r} version {version} has no {SHA_TAG} tag; refusing an "
                    "unverifiable model"
                )
            target = self.cache_dir / self.model_name / version
            if not self._cache_valid(target, expected):
                self._download(mv.run_id, mv.source, target, expected, version)
                self._prune(keep=target)
        card = json.loads((target / CARD_FILENAME).read_text())
        with contextlib.suppress(OSError):  # its mtime orders the versions for pruning
            os.utime(target)
        return ResolvedModel(
            name=self.model_name,
            version=version,
            alias=alias,
            onnx_path=target / ONNX_FILENAME,
            card=card,
            sha256=expected,
        )

    @staticmethod
    def _cache_valid(target: Path, expected: str) -> bool:
        onnx = target / ONNX_FILENAME
        if not (onnx.is_file() and (target / CARD_FILENAME).is_file()):
            return False
        if sha256_file(onnx) != expected:
            logger.warning("cached %s does not match its sha256 tag; downloading again", onnx)
            return False
        return True

    def _download(
        self, run_id: str | None, source: str | None, target: Path, expected: str, version: str
    ) -> None:
        """Download into a scratch dir, verify, then move into place (safe across replicas)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            if run_id:
                local = self._client.download_artifacts(run_id, ARTIFACT_DIR, str(scratch))
            else:
                from mlflow.artifacts import download_artifacts

                local = download_artifacts(
                    artifact_uri=source or "",
                    dst_path=str(scratch),
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.registry_uri,
                )
            downloaded = Path(local)
            onnx = downloaded / ONNX_FILENAME
            if not onnx.is_file() or not (downloaded / CARD_FILENAME).is_file():
                raise ModelError(
                    f"{self.model_name!r} version {version} artifact lacks {ONNX_FILENAME} or "
                    f"{CARD_FILENAME} (source {source})"
                )
            actual = sha256_file(onnx)
            if actual != expected:
                raise ModelError(
                    f"{self.model_name!r} version {version}: {ONNX_FILENAME} sha256 {actual} "
                    f"does not match the registered {SHA_TAG} {expected}"
                )
            shutil.rmtree(target, ignore_errors=True)
            try:
                downloaded.rename(target)
            except OSError:
                # Another replica moved a copy into place first; use it if it is intact.
                if not self._cache_valid(target, expected):
                    raise
            logger.info("downloaded %s version %s to %s", self.model_name, version, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """Delete the least recently used versions beyond `max_cached_versions` (not `keep`)."""
        if self.max_cached_versions is None:
            return
        try:
            found = [d for d in keep.parent.iterdir() if d.is_dir() and d.name.isdigit()]
            found.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        except OSError as exc:
            logger.warning("could not list the model cache %s: %s", keep.parent, exc)
            return
        others = [d for d in found if d != keep]
        # A loaded ONNX session keeps its bytes: deleting the files of a version in use by
        # another replica costs that replica a download if it loads the version again.
        for old in others[max(0, self.max_cached_versions - 1):]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("pruned %s version %s from the model cache", self.model_name, old.name)

    def ping(self) -> bool:
        """True if the registry answers a cheap query."""
        try:
            self._client.search_registered_models(max_results=1)
        except (MlflowException, OSError) as exc:
            logger.warning("model registry at %s not answering: %s", self._where(), exc)
            return False
        return True


def ensure_bootstrapped(
    registry: ModelRegistry, default_onnx: Path, default_card: dict | None, alias: str
) -> str:
    """Register default_onnx and point alias at it unless the alias is set; returns its version."""
    version = registry.get_alias(alias)
    if version is not None:
        return version
    version = registry.register(
        default_onnx, default_card, description=f"bootstrap default from {Path(default_onnx).name}"
    )
    registry.set_alias(alias, version)
    return version
