"""The work a peer server does for a batch of request bodies: the project's core, no Ray.

MLServer's runtime and BentoML's service (load/peers/) both call `PeerCore.answer` on what
their own batching gathered: each body is one HTTP request to `POST /predict` (one capture)
or `POST /predict/batch` (several). The captures of all the bodies run through the core as
one vectorized group — `decode_raw_body` / `decode_raw_batch` → `decode_capture` →
`stack_captures` → `preprocess` → `infer` → `postprocess` — and each body gets the HTTP
status and JSON answer that N (load/naive_app.py) gives it: the same fields, the same
errors naming the same fields, only `timing_ms`, `request_id` and `timestamp` differ.

Imports only the project and its core dependencies, so the peers' virtualenvs need nothing
else of the project, and the project's tests run it without any peer package.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from serve_app.decode import decode_raw_batch, decode_raw_body
from serve_app.errors import DOMAIN_ERRORS, InvalidInput, batch_item_error, error_body, http_error
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import infer, postprocess, preprocess, stack_captures
from serve_app.protocols.rest import PIN_HEADER, to_captures
from serve_app.receivers import load_network
from serve_app.schemas import ModelRef
from serve_app.service import Capture, LocalizationService

REPO = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO / "models" / "localization_model.onnx"
MODEL_REF = ModelRef(name="localization_model", version="local", alias=None)  # as N's

Answer = tuple[int, bytes]  # HTTP status, JSON body
# A capture's (result, error, the error is a decoding one already named for its batch slot).
Outcome = tuple[dict | None, dict | None, bool]


def _error(exc: BaseException) -> Answer:
    status, body, _ = http_error(exc)
    return status, orjson.dumps(body)


class PeerCore:
    """The shipped ONNX model and receiver network, loaded once per server process."""

    def __init__(self, model_path: Path = MODEL_PATH) -> None:
        self.network = load_network()
        self.model = OnnxLocalizer(model_path, self.network.ids)
        # Only for N's checks on pinned versions (no pin rules: any pin passes, as in N).
        self._pins = LocalizationService(self._no_chain, len(self.network), batching=None)

    @staticmethod
    async def _no_chain(*_: object) -> None:  # pragma: no cover - never called
        raise AssertionError("the peers run the chain themselves")

    def _items(self, body: bytes, batch: bool) -> list[Capture | InvalidInput]:
        """A body's captures, decoded; a bad capture of a batch is its `InvalidInput`.

        Raises a domain error when the whole body is refused (N's answer is that error).
        """
        reqs = decode_raw_batch(body) if batch else [decode_raw_body(body)]
        items = to_captures(reqs, self.network, prefix=batch)
        _, items = self._pins.admit_pins(items, None, PIN_HEADER, False, batch)
        return items

    def answer(self, bodies: Sequence[bytes], batch: Sequence[bool]) -> list[Answer]:
        """Status and JSON answer of each body; `batch[i]`: body i is a /predict/batch body."""
        t0 = time.perf_counter()
        answers: list[Answer | None] = [None] * len(bodies)
        per_body: list[list[Capture | InvalidInput]] = []
        for i, (body, is_batch) in enumerate(zip(bodies, batch, strict=True)):
            try:
                per_body.append(self._items(body, is_batch))
            except DOMAIN_ERRORS as exc:
                answers[i] = _error(exc)
                per_body.append([])
        good = [c for items in per_body for c in items if isinstance(c, Capture)]
        outcomes = iter(self._run(good, t0))
        for i, (items, is_batch) in enumerate(zip(per_body, batch, strict=True)):
            if answers[i] is not None:
                continue
            done = [next(outcomes) if isinstance(c, Capture) else (None, error_body(c), True)
                    for c in items]
            answers[i] = _batch_answer(done) if is_batch else _single_answer(done[0])
        return answers  # type: ignore[return-value]

    def _run(self, captures: list[Capture], t0: float) -> list[Outcome]:
        """The outcome of each good capture: one vectorized pass through the chain."""
        if not captures:
            return []
        group = stack_captures([(c.decoded.iq, c.decoded.slots) for c in captures],
                               len(self.network), [c.confidence_level for c in captures])
        [g] = infer(preprocess([group], self.network), self.model, MODEL_REF)
        postprocess(g, self.network)
        assert g.results is not None
        model = MODEL_REF.model_dump()
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        out: list[Outcome] = []
        for result, err in zip(g.results, g.errors, strict=True):
            if err is not None:
                out.append((None, err, False))
                continue
            timing = {**g.timing_ms, "total": (time.perf_counter() - t0) * 1000.0}
            out.append(({**result, "model": model, "cache_hit": False, "timing_ms": timing,
                         "request_id": uuid.uuid4().hex, "timestamp": stamp}, None, False))
        return out


def _single_answer(outcome: Outcome) -> Answer:
    """POST /predict: the result, or the capture's error with its own status."""
    result, err, _ = outcome
    if err is not None:
        return err["status"], orjson.dumps({"error": err})
    return 200, orjson.dumps(result)


def _batch_answer(outcomes: list[Outcome]) -> Answer:
    """POST /predict/batch: one entry per capture; the chain's errors name `captures[i].`."""
    results = []
    for i, (result, err, decoded) in enumerate(outcomes):
        if err is None:
            results.append({"index": i, "ok": True, "result": result})
        else:  # errors of decoding are prefixed already, those of the chain are placed here
            results.append({"index": i, "ok": False,
                            "error": err if decoded else batch_item_error(err, i)})
    return 200, orjson.dumps({"results": results})
