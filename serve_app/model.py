"""ONNX Runtime wrapper: load a localization model, check its contract, run batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serve_app.errors import ModelError
from serve_app.features import FEATURE_SPEC_VERSION, N_FEATURES

INPUT_NAME = "features"
MEAN_OUTPUT = "mean_enu_m"
COV_OUTPUT = "cov_enu_m2"
MAX_SANE_OFFSET_M = 2_000_000.0


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _json_meta(path: Path, meta: dict[str, str], key: str, default: str, kind: type) -> Any:
    """A JSON metadata entry of the expected kind; a ModelError, not a JSONDecodeError, if not."""
    try:
        value = json.loads(meta.get(key, default))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path.name}: metadata {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, kind):
        raise ModelError(f"{path.name}: metadata {key!r} must be a JSON {kind.__name__}, "
                         f"got {type(value).__name__}")
    return value


class OnnxLocalizer:
    """A loaded, contract-checked localization model."""

    def __init__(
        self,
        path: str | Path,
        receiver_ids: list[str] | None = None,
        expected_sha256: str | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        self.sha256 = sha256_file(self.path)
        if expected_sha256 and expected_sha256 != self.sha256:
            raise ModelError(
                f"{self.path}: sha256 {self.sha256} does not match the registry's "
                f"{expected_sha256}; refusing to load"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelError(f"{self.path}: not a loadable ONNX model: {exc}") from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        self.receiver_ids: list[str] = _json_meta(self.path, meta, "receivers", "[]", list)
        self.enu_origin: dict = _json_meta(self.path, meta, "enu_origin", "{}", dict)
        self._check_signature(receiver_ids)

    def _check_signature(self, receiver_ids: list[str] | None) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        problems = []
        if set(inputs) != {INPUT_NAME}:
            problems.append(f"inputs {sorted(inputs)} != ['{INPUT_NAME}']")
        else:
            inp = inputs[INPUT_NAME]
            shape = inp.shape
            if inp.type != "tensor(float)":
                problems.append(f"input '{INPUT_NAME}' has type {inp.type}, expected tensor(float)")
            if len(shape) != 3 or shape[2] != N_FEATURES:
                problems.append(
                    f"input '{INPUT_NAME}' shape {shape}, expected [N, R, {N_FEATURES}]"
                )
            elif receiver_ids is not None and shape[1] != len(receiver_ids):
                problems.append(
                    f"input '{INPUT_NAME}' has {shape[1]} receiver slots, "
                    f"network has {len(receiver_ids)}"
                )
        for name, rank in ((MEAN_OUTPUT, 2), (COV_OUTPUT, 3)):
            if name not in outputs:
                problems.append(f"missing output '{name}' (has {sorted(outputs)})")
            elif len(outputs[name].shape) != rank:
                problems.append(f"output '{name}' rank {len(outputs[name].shape)}, expected {rank}")
        spec = self.metadata.get("feature_spec_version")
        if spec != FEATURE_SPEC_VERSION:
            problems.append(f"feature_spec_version {spec!r}, expected {FEATURE_SPEC_VERSION!r}")
        if receiver_ids is not None and self.receiver_ids != list(receiver_ids):
            problems.append(
                f"receivers {self.receiver_ids} do not match the network {list(receiver_ids)}"
            )
        if problems:
            raise ModelError(f"{self.path.name}: signature mismatch: " + "; ".join(problems))

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a batch [N, R, 3] → (mean [N, 2], covariance [N, 2, 2]) in ENU metres."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        mean, cov = self._session.run([MEAN_OUTPUT, COV_OUTPUT], {INPUT_NAME: x})
        return mean.astype(np.float64), cov.astype(np.float64)

    def validate(self, golden_features: np.ndarray) -> None:
        """Refuse a model whose outputs on golden inputs are non-finite or not sane."""
        try:
            mean, cov = self.predict(golden_features)
        except Exception as exc:
            raise ModelError(f"{self.path.name}: failed on golden inputs: {exc}") from exc
        n = golden_features.shape[0]
        if mean.shape != (n, 2) or cov.shape != (n, 2, 2):
            raise ModelError(f"{self.path.name}: output shapes {mean.shape}, {cov.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise ModelError(f"{self.path.name}: non-finite outputs on golden inputs")
        if np.abs(mean).max() > MAX_SANE_OFFSET_M:
            raise ModelError(f"{self.path.name}: positions beyond {MAX_SANE_OFFSET_M:.0f} m")
        det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
        symmetric = np.allclose(cov[:, 0, 1], cov[:, 1, 0], rtol=1e-4, atol=1e-6)
        if not (symmetric and (cov[:, 0, 0] > 0).all() and (det > 0).all()):
            raise ModelError(f"{self.path.name}: covariance not symmetric positive definite")
