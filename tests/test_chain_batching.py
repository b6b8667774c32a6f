"""The Ingress batches requests across the chain: stack, run once, split — same answers."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.decode import decode_capture
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import (
    infer,
    postprocess,
    preprocess,
    split_group,
    stack_captures,
)
from serve_app.samples import make_samples
from serve_app.settings import DEFAULT_MODEL_DIR

REF = {"name": "localization_model", "version": "1", "alias": "production"}


def _chain(group, network, model):
    [g] = infer(preprocess([group], network), model, REF)
    return postprocess(g, network)


@pytest.fixture(scope="module")
def model(network):
    return OnnxLocalizer(DEFAULT_MODEL_DIR / "localization_model.onnx", network.ids)


def test_concat_then_split_equals_one_chain_per_request(network, model):
    reqs = make_samples(7, seed=3, max_missing=4).requests
    decoded = [decode_capture(r, network) for r in reqs]
    # Three requests of 1, 4 and 2 captures, with different confidence levels.
    sizes = [1, 4, 2]
    levels = [0.5 + 0.2 * k for k, n in enumerate(sizes) for _ in range(n)]
    groups, start = [], 0
    for n in sizes:
        part = decoded[start : start + n]
        groups.append(stack_captures([(d.iq, d.slots) for d in part], len(network),
                                     levels[start : start + n]))
        start += n

    # What the Ingress sends down the chain: every request's captures stacked once.
    merged = stack_captures([(d.iq, d.slots) for d in decoded], len(network), levels)
    assert len(merged) == sum(sizes)
    split = split_group(_chain(merged, network, model), sizes)
    alone = [_chain(g, network, model) for g in groups]

    assert [len(g) for g in split] == sizes
    for a, b in zip(split, alone, strict=True):
        assert a.errors == b.errors
        assert a.model == b.model
        np.testing.assert_allclose(a.mean_enu_m, b.mean_enu_m, rtol=1e-6, atol=1e-3)
        np.testing.assert_array_equal(a.detected, b.detected)
        for ra, rb in zip(a.results, b.results, strict=True):
            assert (ra is None) == (rb is None)
            if ra is not None:
                assert ra["uncertainty"] == pytest.approx(rb["uncertainty"], rel=1e-6)
                assert ra["position"] == pytest.approx(rb["position"], abs=1e-6)  # float32 ONNX
                assert ra["receivers_used"] == rb["receivers_used"]

