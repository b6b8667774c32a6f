"""Deployment logic in Serve's local testing mode: no cluster, real core, real registry."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest
from ray import serve

from serve_app.lifecycle import bootstrap
from serve_app.pipeline import infer, postprocess, preprocess, stack_captures
from serve_app.samples import make_samples
from serve_app.settings import AppArgs, EnvSettings


@pytest.fixture(scope="module")
def captures(network):
    s = make_samples(6, seed=21)
    slots = np.arange(len(network))
    return [stack_captures([(s.iq[i], slots)], len(network), [0.95]) for i in range(6)]


@pytest.fixture
def app_args(tmp_path, monkeypatch) -> AppArgs:
    monkeypatch.setenv("RFLOC_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = AppArgs()
    bootstrap(args, EnvSettings())
    return args


@pytest.fixture(autouse=True)
def replica_context():
    """Ray 2.60's local testing mode sets no replica context, yet @serve.batch reads
    `max_ongoing_requests` from it when its queue starts; give it one (test-only shim)."""
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig

    context._set_internal_replica_context(
        replica_id=ReplicaID("local", DeploymentID("local", "local")), servable_object=None,
        rank=None, world_size=1, _deployment_config=DeploymentConfig(max_ongoing_requests=128))
    yield
    context._INTERNAL_REPLICA_CONTEXT = None


BROKEN_INFO: list[str] = []  # FakeModel.info raises with this text while it is set


def _run(app):
    return serve.run(app, name="local", route_prefix=None, _local_testing_mode=True)


def test_preprocessor_batches_groups_like_the_core(network, captures):
    from deployments.preprocessor import Preprocessor

    handle = _run(Preprocessor.options(user_config={"max_batch_size": 64,
                                                    "batch_wait_timeout_s": 0.05}).bind())

    async def many():
        return await asyncio.gather(*[handle.remote(g) for g in captures])

    got = asyncio.run(many())
    want = preprocess(captures, network)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.features, w.features)
        assert g.errors == w.errors


def test_model_and_postprocessor_chain(network, captures, app_args):
    from deployments.model import LocalizationModel
    from deployments.postprocessor import Postprocessor

    model = _run(LocalizationModel.options(user_config={"max_batch_size": 64,
                                                        "batch_wait_timeout_s": 0.05})
                 .bind(app_args.model_args()))
    post = _run(Postprocessor.bind())
    groups = preprocess(captures, network)

    async def chain():
        outs = await asyncio.gather(*[model.remote(g, "production", "1") for g in groups])
        return await asyncio.gather(*[post.remote(o) for o in outs]), await model.info.remote()

    results, info = asyncio.run(chain())
    assert info["model"]["version"] == "1" and info["reloads"]["success"] == 1
    assert max(int(k) for k in info["batch_sizes"]) > 1, info["batch_sizes"]
    for g in results:
        assert g.model.version == "1" and g.model.alias == "production"
        [res] = g.results
        direct = postprocess(g, network).results[0]
        assert res["position"] == direct["position"]
        assert res["geojson"]["features"][1]["geometry"]["type"] == "Polygon"


def test_ingress_over_a_fake_chain(network, captures, app_args):
    """The Ingress adapter with stand-in deployments: gRPC infer, readiness, errors."""
    import tritonclient.grpc as grpcclient

    from deployments.ingress import Ingress
    from serve_app.model import OnnxLocalizer
    from serve_app.protocols.oip_grpc import service_pb2 as pb
    from serve_app.schemas import ModelRef
    from serve_app.settings import DEFAULT_MODEL_DIR

    ref = ModelRef(name="localization_model", version="1", alias="production")

    @serve.deployment
    class FakePre:
        def __call__(self, group):
            return preprocess([group], network)[0]

    @serve.deployment
    class FakeModel:
        def __init__(self) -> None:
            self.model = OnnxLocalizer(DEFAULT_MODEL_DIR / "localization_model.onnx",
                                       network.ids)
            self.calls: list[tuple[int, str, str | None]] = []

        def __call__(self, group, alias, version):
            self.calls.append((len(group), alias, version))
            return infer([group], self.model, ref)[0]

        def info(self):
            if BROKEN_INFO:
                raise RuntimeError(BROKEN_INFO[0])
            return {"model": ref.model_dump(), "registry_ok": True, "calls": self.calls}

    @serve.deployment
    class FakePost:
        def __call__(self, group):
            return postprocess(group, network)

    handle = _run(Ingress.bind(FakePre.bind(), FakeModel.bind(), FakePost.bind(), app_args))
    assert asyncio.run(_call(handle.ServerReady, pb.ServerReadyRequest())).ready
    deadline = time.monotonic() + 60  # the Ingress resolves the alias in its poll thread
    while asyncio.run(_call(handle.info))["alias_version"] != "1":
        assert time.monotonic() < deadline, "the Ingress never resolved the alias"
        time.sleep(0.05)

    iq = captures[0].iq[0].view(np.float32).reshape(len(network), -1, 2)
    inputs = [grpcclient.InferInput("IQ", list(iq.shape), "FP32"),
              grpcclient.InferInput("RECEIVER_IDS", [len(network)], "BYTES")]
    inputs[0].set_data_from_numpy(np.ascontiguousarray(iq))
    inputs[1].set_data_from_numpy(np.array(network.ids, dtype=object))
    request = pb.ModelInferRequest(model_name="localization_model",
                                   inputs=[i._get_tensor() for i in inputs],
                                   raw_input_contents=[i._get_content() for i in inputs])
    response = asyncio.run(_call(handle.ModelInfer, request))
    assert response.model_version == "1"
    got = np.frombuffer(response.raw_output_contents[0], "<f8")
    model = OnnxLocalizer(DEFAULT_MODEL_DIR / "localization_model.onnx", network.ids)
    [group] = infer(preprocess([captures[0]], network), model, ref)
    want = postprocess(group, network).results[0]["position"]
    assert got.tolist() == [want["latitude"], want["longitude"]]
    info = asyncio.run(_call(handle.info))
    # The model replicas heard the alias's version from the Ingress's watcher.
    assert info["alias_version"] == "1" and info["calls"] == [(1, "production", "1")]

    # /health while the model replica's call raises: 503 "model not ready" with
    # Retry-After, and nothing of the exception (its text, type or a traceback) in the body.
    assert asyncio.run(_call(handle.health)).status_code == 200
    secret = "/srv/secret-model-dir/token=s3cr3t-7f2a at 10.9.8.7:52341"
    BROKEN_INFO.append(secret)
    try:
        response = asyncio.run(_call(handle.health))
    finally:
        BROKEN_INFO.clear()
    body = response.body.decode()
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert orjson.loads(body)["error"]["message"] == "model not ready"
    for part in ("secret", "s3cr3t", "10.9.8.7", "RuntimeError", "Traceback"):
        assert part not in body, body


async def _call(method, *args):
    return await method.remote(*args)

