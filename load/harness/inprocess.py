"""The service's core on one request, in this process: no Serve, no HTTP."""

from __future__ import annotations

from typing import Any

import numpy as np

from serve_app.decode import decode_capture
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import infer, postprocess, preprocess, stack_captures
from serve_app.receivers import ReceiverNetwork


def localize(request: dict[str, Any], network: ReceiverNetwork, model: OnnxLocalizer
             ) -> tuple[dict | None, np.ndarray]:
    """(result or None if refused, per-receiver power dB) of one request."""
    d = decode_capture(request, network)
    group = preprocess([stack_captures([(d.iq, d.slots)], len(network), [0.95])], network)[0]
    infer([group], model, {"name": "m", "version": "1"})
    postprocess(group, network)
    assert group.results is not None
    power = 10 * np.log10(np.mean(np.abs(d.iq.astype(np.complex128)) ** 2, axis=1))
    return group.results[0], power
