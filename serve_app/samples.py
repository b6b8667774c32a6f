"""Sample requests from the simulator, shared by the CLI, the tests and the load tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from serve_app.decode import encode_capture
from serve_app.receivers import ReceiverNetwork, load_network
from serve_app.simulate import Scenes, sample_scenes, synthesize_iq

Form = Literal["b64", "pairs", "complex64", "int16", "cf32_le", "ci16_le", "ci8", "cu8"]


@dataclass
class Samples:
    """Simulated captures with their truth and request bodies."""

    scenes: Scenes
    iq: np.ndarray  # [n, R, S] complex64
    requests: list[dict]
    truth_latlon: np.ndarray  # [n, 2] latitude, longitude


def make_samples(
    n: int,
    seed: int = 1,
    *,
    form: Form = "b64",
    network: ReceiverNetwork | None = None,
    max_missing: int = 0,
    confidence_level: float = 0.95,
) -> Samples:
    """`n` simulated capture requests (absent receivers left out of each request)."""
    net = network or load_network()
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(net, n, rng, max_missing=max_missing)
    iq = synthesize_iq(net, scenes, rng)
    requests = []
    for i in range(n):
        slots = np.flatnonzero(scenes.present[i])
        requests.append(encode_capture(iq[i, slots], [net.ids[j] for j in slots], form=form,
                                       confidence_level=confidence_level))
    lat, lon = net.to_geodetic(scenes.tx_enu_m[:, 0], scenes.tx_enu_m[:, 1])
    return Samples(scenes, iq, requests, np.stack([lat, lon], axis=-1))
