"""Model registry client against a real embedded SQLite registry and a real MLflow server."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from load.harness import MlflowServer, free_port
from serve_app.errors import ModelError, RegistryUnavailable
from serve_app.model import sha256_file
from serve_app.registry import (
    CARD_FILENAME,
    MAX_RETRIES_ENV,
    TIMEOUT_ENV,
    ModelRegistry,
    embedded_uris,
    ensure_bootstrapped,
)

SERVER_START_TIMEOUT_S = 60.0
CARD = {
    "feature_spec_version": 1,
    "receivers": ["rx_a", "rx_b", "rx_c"],
    "accuracy": {"median_error_m": 812.5, "p95_error_m": 4100.0, "note": "not a metric"},
}


def _tiny_onnx(path: Path, scale: float = 1.0) -> Path:
    """A valid ONNX model: features [N,7,3] -> position [N,2], cov_params [N,3]."""
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 7, 3])
    position = helper.make_tensor_value_info("position", TensorProto.FLOAT, ["N", 2])
    cov = helper.make_tensor_value_info("cov_params", TensorProto.FLOAT, ["N", 3])
    scale_t = helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])
    nodes = [
        helper.make_node("ReduceMean", ["features"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["pooled", "scale"], ["scaled"]),
        helper.make_node("Slice", ["scaled", "s0", "s2", "ax"], ["position"]),
        helper.make_node("Identity", ["scaled"], ["cov_params"]),
    ]
    consts = [
        helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("s2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [features], [position, cov], initializer=[scale_t, *consts]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(autouse=True)
def _restore_mlflow_env() -> Iterator[None]:
    """ModelRegistry sets MLflow's HTTP env defaults; keep them from leaking between tests."""
    saved = {k: os.environ.get(k) for k in (TIMEOUT_ENV, MAX_RETRIES_ENV)}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded registry per module (schema migration is slow); tests use own model names."""
    return tmp_path_factory.mktemp("registry_state")


@pytest.fixture
def onnx_files(tmp_path: Path) -> tuple[Path, Path]:
    return _tiny_onnx(tmp_path / "a.onnx", 1.0), _tiny_onnx(tmp_path / "b.onnx", 2.0)


@pytest.fixture
def registry(state_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> ModelRegistry:
    tracking_uri, _ = embedded_uris(state_dir)
    return ModelRegistry(
        tracking_uri, model_name=f"m_{request.node.name}", cache_dir=tmp_path / "cache"
    )


def test_first_use_creates_nothing_in_cwd(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_files
) -> None:
    # First test on the module's registry, so the schema and experiment are created here.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    registry = ModelRegistry(
        embedded_uris(state_dir)[0], model_name="m_cwd", cache_dir=tmp_path / "cache"
    )
    assert registry.ping()
    registry.register(onnx_files[0], CARD)
    registry.resolve("1")
    assert list(cwd.iterdir()) == []
    assert (state_dir / "mlflow.db").is_file()
    assert any((state_dir / "mlartifacts").rglob("model.onnx"))


def test_embedded_uris_are_absolute(tmp_path: Path) -> None:
    tracking_uri, artifacts = embedded_uris(tmp_path)
    assert tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifacts == f"file://{tmp_path.resolve()}/mlartifacts"


def test_register_versions_and_aliases(
    registry: ModelRegistry, onnx_files: tuple[Path, Path]
) -> None:
    a, b = onnx_files
    assert registry.get_alias("production") is None  # model absent
    assert registry.versions() == []
    assert registry.register(a, CARD, description="first") == "1"
    assert registry.register(b) == "2"
    assert registry.get_alias("production") is None  # alias unset

    registry.set_alias("production", "1")
    registry.set_alias("staging", "2")
    assert registry.get_alias("production") == "1"
    assert registry.get_alias("staging") == "2"

    rows = registry.versions()
    assert [r["version"] for r in rows] == ["2", "1"]
    assert rows[0]["aliases"] == ["staging"] and rows[1]["aliases"] == ["production"]
    assert rows[1]["sha256"] == sha256_file(a) and rows[0]["sha256"] == sha256_file(b)
    assert rows[1]["accuracy"] == {"median_error_m": 812.5, "p95_error_m": 4100.0}
    assert rows[1]["description"] == "first" and rows[0]["accuracy"] == {}
    assert rows[0]["created"].endswith("+00:00")


def test_resolve_by_alias_and_version(registry: ModelRegistry, onnx_files: tuple[Path, Path]):
    a, b = onnx_files
    registry.register(a, CARD)
    registry.register(b)
    registry.set_alias("production", "2")

    by_alias = registry.resolve("production")
    assert by_alias.version == "2" and by_alias.alias == "production"
    assert by_alias.sha256 == sha256_file(b) == sha256_file(by_alias.onnx_path)
    assert by_alias.onnx_path.parent == registry.cache_dir / registry.model_name / "2"

    by_version = registry.resolve("1")
    assert by_version.version == "1" and by_version.alias is None
    assert sha256_file(by_version.onnx_path) == sha256_file(a)
    assert by_version.card["onnx_sha256"] == sha256_file(a)
    assert by_version.card["receivers"] == CARD["receivers"]
    onnx.checker.check_model(str(by_version.onnx_path))

    # A second resolve reuses the cache (same file, untouched).
    mtime = by_version.onnx_path.stat().st_mtime_ns
    assert registry.resolve("1").onnx_path.stat().st_mtime_ns == mtime

    with pytest.raises(ModelError, match="no version 7"):
        registry.resolve("7")
    with pytest.raises(ModelError, match="'canary'"):
        registry.resolve("canary")


def test_tampered_cache_is_refetched(registry: ModelRegistry, onnx_files: tuple[Path, Path]):
    a, _ = onnx_files
    registry.set_alias("production", registry.register(a, CARD))
    resolved = registry.resolve("production")
    resolved.onnx_path.write_bytes(b"not the model")
    again = registry.resolve("production")
    assert sha256_file(again.onnx_path) == sha256_file(a)


def test_tampered_store_artifact_raises(
    registry: ModelRegistry, onnx_files: tuple[Path, Path], state_dir: Path
) -> None:
    a, _ = onnx_files
    version = registry.register(a, CARD)
    run_id = registry.versions()[0]["run_id"]
    stored = state_dir / "mlartifacts" / run_id / "artifacts" / "model" / "model.onnx"
    stored.write_bytes(stored.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="does not match"):
        registry.resolve(version)
    assert not (registry.cache_dir / registry.model_name / version).exists()


def test_sha_tag_mismatch_raises(registry: ModelRegistry, onnx_files: tuple[Path, Path]):
    a, _ = onnx_files
    version = registry.register(a)
    registry._client.set_model_version_tag(registry.model_name, version, "onnx_sha256", "0" * 64)
    with pytest.raises(ModelError, match="does not match"):
        registry.resolve(version)


def test_rollback(registry: ModelRegistry, onnx_files: tuple[Path, Path]) -> None:
    a, b = onnx_files
    v1, v2, v3 = registry.register(a), registry.register(b), registry.register(a)
    with pytest.raises(ModelError, match="not registered|no previous"):
        registry.rollback("production")
    registry.set_alias("production", v1)
    with pytest.raises(ModelError, match="no previous version"):
        registry.rollback("production")
    registry.set_alias("production", v2)
    registry.set_alias("production", v2)  # no-op move does not grow the history
    registry.set_alias("production", v3)
    assert registry.rollback("production") == v2
    assert registry.get_alias("production") == v2
    assert registry.rollback() == v1
    assert registry.resolve("production").version == v1
    with pytest.raises(ModelError, match="no previous version"):
        registry.rollback()


def test_history_is_bounded(registry: ModelRegistry, onnx_files: tuple[Path, Path]) -> None:
    a, b = onnx_files
    v1, v2 = registry.register(a), registry.register(b)
    for _ in range(15):
        registry.set_alias("production", v1)
        registry.set_alias("production", v2)
    history = registry._client.get_registered_model(registry.model_name).tags
    assert len(history["production_history"].split(",")) == 20


def test_ensure_bootstrapped_is_idempotent(
    registry: ModelRegistry, onnx_files: tuple[Path, Path]
) -> None:
    a, _ = onnx_files
    assert ensure_bootstrapped(registry, a, CARD, "production") == "1"
    assert ensure_bootstrapped(registry, a, CARD, "production") == "1"
    assert [r["version"] for r in registry.versions()] == ["1"]
    assert registry.resolve("production").sha256 == sha256_file(a)


def test_missing_file_raises(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        registry.register(tmp_path / "nope.onnx")


def test_unreachable_registry_fails_fast(tmp_path: Path, onnx_files) -> None:
    os.environ.pop(TIMEOUT_ENV, None)
    os.environ.pop(MAX_RETRIES_ENV, None)
    uri = f"http://127.0.0.1:{free_port()}"
    registry = ModelRegistry(uri, cache_dir=tmp_path / "cache", timeout_s=2.0)
    assert os.environ[TIMEOUT_ENV] == "2" and os.environ[MAX_RETRIES_ENV] == "1"
    start = time.monotonic()
    assert registry.ping() is False
    with pytest.raises(RegistryUnavailable, match="127.0.0.1"):
        registry.resolve("production")
    with pytest.raises(RegistryUnavailable, match="127.0.0.1"):
        registry.register(onnx_files[0])
    assert time.monotonic() - start < 15.0


def test_env_overrides_are_respected(tmp_path: Path) -> None:
    os.environ[TIMEOUT_ENV] = "33"
    os.environ.pop(MAX_RETRIES_ENV, None)
    ModelRegistry("http://127.0.0.1:1", cache_dir=tmp_path, timeout_s=2.0)
    assert os.environ[TIMEOUT_ENV] == "33" and os.environ[MAX_RETRIES_ENV] == "1"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` serving artifacts over HTTP, started once per module."""
    server = MlflowServer(free_port(), tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start(timeout_s=SERVER_START_TIMEOUT_S)
        yield server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_mlflow_server_roundtrip(mlflow_server: str, tmp_path: Path, onnx_files) -> None:
    a, b = onnx_files
    registry = ModelRegistry(mlflow_server, cache_dir=tmp_path / "cache")
    assert registry.ping()
    assert ensure_bootstrapped(registry, a, CARD, "production") == "1"
    assert registry.register(b, description="candidate") == "2"
    registry.set_alias("production", "2")

    resolved = registry.resolve("production")
    assert resolved.version == "2" and resolved.sha256 == sha256_file(b)
    assert sha256_file(resolved.onnx_path) == sha256_file(b)
    assert (resolved.onnx_path.parent / CARD_FILENAME).is_file()
    assert registry.versions()[0]["aliases"] == ["production"]
    assert registry.versions()[1]["accuracy"]["median_error_m"] == 812.5

    assert registry.rollback() == "1"
    assert registry.resolve("production").sha256 == sha256_file(a)
    with pytest.raises(ModelError, match="no version 9"):
        registry.resolve("9")


def test_version_sha256(registry: ModelRegistry, onnx_files: tuple[Path, Path]) -> None:
    a, b = onnx_files
    va, vb = registry.register(a), registry.register(b)
    assert registry.version_sha256(va) == sha256_file(a)
    assert registry.version_sha256(vb) == sha256_file(b) != sha256_file(a)
    assert registry.version_sha256("999") is None


def test_alias_watcher_swaps_whole_refs(registry: ModelRegistry, onnx_files) -> None:
    from serve_app.lifecycle import AliasWatcher

    a, b = onnx_files
    watcher = AliasWatcher(registry, "production")
    watcher.check()
    assert watcher.ref is None and watcher.versions == () and watcher.registry_ok
    va, vb = registry.register(a), registry.register(b)
    assert registry.version_numbers() == [vb, va]
    registry.set_alias("production", va)
    watcher.check()
    first = watcher.ref
    assert first is not None and (first.version, first.alias) == (va, "production")
    assert first.sha256 == sha256_file(a) and watcher.versions == (vb, va)
    watcher.check()
    assert watcher.ref is first  # unchanged alias: the same frozen ref, no new lookups
    registry.set_alias("production", vb)
    watcher.check()
    assert watcher.ref is not first and watcher.ref.sha256 == sha256_file(b)
    assert first.version == va  # a reader holding the old ref still sees it whole
    assert watcher.configure("canary") and not watcher.configure("canary")
    watcher.check()
    assert watcher.ref is None  # no such alias


def test_alias_watcher_keeps_its_view_when_the_registry_is_down(tmp_path: Path) -> None:
    from serve_app.lifecycle import AliasWatcher
    from serve_app.schemas import ModelRef

    registry = ModelRegistry(f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path / "c",
                             timeout_s=2.0)
    watcher = AliasWatcher(registry, "production")
    watcher.ref = ref = ModelRef(name="m", version="3", alias="production", sha256="ab")
    watcher.check()
    assert watcher.registry_ok is False and watcher.ref is ref


def test_model_cache_on_disk_keeps_the_most_recently_used_versions(
        state_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    tracking_uri, _ = embedded_uris(state_dir)
    registry = ModelRegistry(tracking_uri, model_name=f"m_{request.node.name}",
                             cache_dir=tmp_path / "cache", max_cached_versions=2)
    versions = [registry.register(_tiny_onnx(tmp_path / f"{i}.onnx", 1.0 + i))
                for i in range(4)]
    on_disk = tmp_path / "cache" / registry.model_name

    def cached() -> set[str]:
        return {d.name for d in on_disk.iterdir() if not d.name.startswith(".")}

    v1, v2, v3, v4 = versions
    registry.resolve(v1)
    registry.resolve(v2)
    assert cached() == {v1, v2}
    os.utime(on_disk / v1, (1, 1))  # v1 was used long ago: it goes first
    os.utime(on_disk / v2, (2, 2))
    registry.resolve(v1)  # a cache hit marks v1 used now
    registry.resolve(v3)
    assert cached() == {v1, v3}
    os.utime(on_disk / v1, (3, 3))
    resolved = registry.resolve(v4)
    assert cached() == {v3, v4} and resolved.onnx_path.is_file()
    again = registry.resolve(v2)  # pruned: downloaded again, still verified
    assert sha256_file(again.onnx_path) == registry.version_sha256(v2)
    assert v2 in cached() and len(cached()) == 2


def test_alias_view_names_every_alias_and_the_history(registry: ModelRegistry,
                                                      onnx_files) -> None:
    assert registry.alias_view("production") == ({}, [])  # model absent
    a, b = onnx_files
    va, vb = registry.register(a), registry.register(b)
    registry.set_alias("production", va)
    registry.set_alias("production", vb)
    registry.set_alias("staging", va)
    aliases, history = registry.alias_view("production")
    assert aliases == {"production": vb, "staging": va} and history == [va, vb]
