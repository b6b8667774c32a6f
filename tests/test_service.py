"""The service core with the pipeline inline as its chain: no Ray, a real model and cache."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from serve_app.cache import LocalLRUCache
from serve_app.decode import DecodedCapture, decode_capture
from serve_app.errors import InvalidInput, Unavailable
from serve_app.model import OnnxLocalizer
from serve_app.pipeline import (
    CaptureGroup,
    Group,
    infer,
    postprocess,
    preprocess,
    stack_captures,
)
from serve_app.protocols import rest
from serve_app.samples import make_samples
from serve_app.schemas import ModelRef
from serve_app.service import Batching, Capture, LocalizationService
from serve_app.settings import DEFAULT_MODEL_DIR
from tests.conftest import SHARED_REDIS_URL

ALIAS = ModelRef(name="localization_model", version="3", alias="production", sha256="ab" * 32)


class FakeChain:
    """The pipeline inline; records each call's size and version, answers as `model`."""

    def __init__(self, network, model: OnnxLocalizer) -> None:
        self.network, self.model = network, model
        self.calls: list[tuple[int, str | None]] = []
        self.fail: Exception | None = None
        self.served = ALIAS

    async def __call__(self, group: CaptureGroup, pinned: str | None) -> Group:
        self.calls.append((len(group), pinned))
        await asyncio.sleep(0.01)  # others arrive while this call runs
        if self.fail is not None:
            raise self.fail
        ref = self.served if pinned is None else ModelRef(name="localization_model",
                                                           version=pinned)
        [g] = infer(preprocess([group], self.network), self.model, ref)
        return postprocess(g, self.network)


@pytest.fixture(scope="module")
def model(network):
    return OnnxLocalizer(DEFAULT_MODEL_DIR / "localization_model.onnx", network.ids)


@pytest.fixture(scope="module")
def samples():
    return make_samples(6, seed=5).requests


@pytest.fixture
def chain(network, model):
    return FakeChain(network, model)


def _captures(reqs, network, **kw) -> list[Capture]:
    from serve_app.schemas import CaptureRequest

    out = []
    for r in reqs:
        req = CaptureRequest.model_validate({**r, **kw})
        out.append(Capture(decode_capture(req, network), req.confidence_level, req.cache,
                           req.model_version))
    return out


def test_answers_equal_the_pipeline_and_repeat_from_the_cache(network, model, chain, samples):
    shadowed = []
    service = LocalizationService(chain, len(network), cache=LocalLRUCache(64),
                                  identity=lambda: ALIAS,
                                  shadow=lambda run, results: shadowed.append(results))
    items = _captures(samples[:3], network)
    first = asyncio.run(service.localize(items))
    again = asyncio.run(service.localize(items))
    for a, b, c in zip(first, again, items, strict=True):
        group = stack_captures([(c.decoded.iq, c.decoded.slots)], len(network), [0.95])
        [want] = postprocess(infer(preprocess([group], network), model, ALIAS)[0],
                             network).results
        assert a.ok and a.result["position"] == want["position"]
        assert a.result["model"] == ALIAS.model_dump() and a.result["cache_hit"] is False
        assert b.result["cache_hit"] is True and b.result["position"] == want["position"]
    assert chain.calls == [(3, None)]  # the second request never reached the chain
    assert len(shadowed) == 1 and len(shadowed[0]) == 3


def test_pinned_versions_bypass_the_cache_and_each_gets_its_chain(network, chain, samples):
    cache = LocalLRUCache(64)
    service = LocalizationService(chain, len(network), cache=cache, identity=lambda: ALIAS)
    items = [*_captures(samples[:2], network, model_version="1"),
             *_captures(samples[2:3], network)]
    out = asyncio.run(service.localize(items))
    assert [o.result["model"]["version"] for o in out] == ["1", "1", "3"]
    assert sorted(chain.calls, key=str) == sorted([(2, "1"), (1, None)], key=str)
    assert len(cache) == 1  # only the alias-served answer was stored
    asyncio.run(service.localize(items, pinned="2"))  # a request-wide pin wins
    assert chain.calls[-1] == (3, "2")


def test_answers_of_another_model_are_not_cached(network, chain, samples):
    cache = LocalLRUCache(64)
    service = LocalizationService(chain, len(network), cache=cache, identity=lambda: ALIAS)
    chain.served = ALIAS.model_copy(update={"version": "4"})  # the alias moved mid-request
    [o] = asyncio.run(service.localize(_captures(samples[:1], network)))
    assert o.ok and o.result["model"]["version"] == "4"
    assert len(cache) == 0


def test_errors_stay_in_their_slot(network, chain, samples):
    service = LocalizationService(chain, len(network))
    weak = {**samples[0], "receivers": samples[0]["receivers"][:3]}
    d = _captures([weak], network)[0].decoded
    # Three receivers that heard nothing: decoding accepts them, the chain cannot localize.
    silent = Capture(DecodedCapture(np.zeros_like(d.iq), d.receiver_ids, d.slots,
                                    d.sample_rate_hz, d.center_freq_hz), 0.95)
    bad = InvalidInput("captures[1].receivers[0].id", "unknown receiver 'x'")
    out = asyncio.run(service.localize([_captures(samples[:1], network)[0], bad, silent]))
    assert out[0].ok
    assert out[1].error == {"field": "captures[1].receivers[0].id",
                            "message": "unknown receiver 'x'", "status": 422}
    assert out[2].error["field"] == "receivers" and out[2].error["status"] == 422


def test_concurrent_requests_share_chain_calls(network, chain, samples):
    service = LocalizationService(chain, len(network),
                                  batching=Batching(max_size=64, max_in_flight=1))
    items = _captures(samples, network)

    async def many():
        return await asyncio.gather(*[service.localize([c]) for c in items])

    out = asyncio.run(many())
    assert all(o.ok for [o] in out)
    assert len(chain.calls) == 2 and service.batch_sizes == {1: 1, 5: 1}


def test_admit_and_unavailable_chain(network, chain, samples):
    service = LocalizationService(chain, len(network), max_captures=2)
    with pytest.raises(InvalidInput) as exc:
        asyncio.run(service.localize(_captures(samples[:3], network)))
    assert exc.value.field == "captures" and exc.value.status_code == 413
    chain.fail = Unavailable("overloaded")
    with pytest.raises(Unavailable):
        asyncio.run(service.localize(_captures(samples[:1], network)))


def test_rest_front_door_keeps_the_api_answers(network, chain, samples):
    service = LocalizationService(chain, len(network), max_captures=4)
    one = asyncio.run(rest.predict(service, network, orjson.dumps(samples[0])))
    assert one.status == 200 and orjson.loads(one.body)["model"]["version"] == "3"
    bad_rx = {**samples[1], "receivers": [{**samples[1]["receivers"][0], "id": "atlantis"},
                                          *samples[1]["receivers"][1:]]}
    batch = {"captures": [samples[0], bad_rx, {"receivers": "x"}]}
    out = orjson.loads(asyncio.run(rest.predict_batch(service, network,
                                                      orjson.dumps(batch))).body)
    assert [r["ok"] for r in out["results"]] == [True, False, False]
    assert out["results"][1]["error"]["field"] == "captures[1].receivers[0].id"
    assert out["results"][2]["error"]["field"] == "captures[2].receivers"
    too_many = asyncio.run(rest.predict_batch(service, network,
                                              orjson.dumps({"captures": samples[:5]})))
    assert too_many.status == 413 and orjson.loads(too_many.body) == {"error": {
        "field": "captures", "message": "at most 4 captures per request, got 5",
        "status": 413}}
    chain.fail = Unavailable("overloaded: queue full")
    busy = asyncio.run(rest.predict(service, network, orjson.dumps(samples[0])))
    assert busy.status == 503 and busy.headers == {"Retry-After": "1"}


def test_forged_entry_claiming_another_model_is_a_miss_on_real_redis(network, chain, samples,
                                                                     shared_redis):
    from serve_app.cache import RedisCache, cache_key

    client, keys = shared_redis
    cache = RedisCache(SHARED_REDIS_URL, ttl_s=60, timeout_ms=500)
    service = LocalizationService(chain, len(network), cache=cache, identity=lambda: ALIAS,
                                  batching=None)
    [item] = _captures(samples[:1], network)
    key = cache_key(f"{ALIAS.version}:{ALIAS.sha256}", item.decoded.canonical,
                    item.confidence_level)
    keys.append(key)
    [want] = asyncio.run(service.localize([item]))  # the honest answer, now cached
    honest = orjson.loads(client.get(key))
    assert honest["model"]["version"] == "3" and chain.calls == [(1, None)]
    # A well-formed entry under the same key that claims another model, at another place.
    forged = {"result": {**honest["result"], "position": {"latitude": 0.0, "longitude": 0.0}},
              "model": {**honest["model"], "version": "2"}}
    client.set(key, orjson.dumps(forged))

    async def read():
        try:
            return await service.localize([item])
        finally:
            await cache.close()

    [got] = asyncio.run(read())
    assert got.ok and got.result["cache_hit"] is False
    assert got.result["position"] == want.result["position"] != forged["result"]["position"]
    assert chain.calls == [(1, None), (1, None)]  # the forged entry sent it down the chain
    assert cache.stats["invalid"] == 1
    assert orjson.loads(client.get(key))["model"]["version"] == "3"  # replaced by the answer


def _rules(versions=("3",), aliases=(), named=None):
    from serve_app.service import PinRules

    rules = PinRules(frozenset(versions), frozenset(aliases),
                     named if named is not None else {"production": "3", "staging": "2"})
    return lambda: rules


@pytest.mark.parametrize(("value", "admin", "want"), [
    (None, False, None), ("", False, None),
    ("3", False, "3"), ("03", False, "3"), ("0003", False, "3"),  # one multiplexed id
    ("2", True, "2"), ("0002", True, "2"), ("staging", True, "2"),
])
def test_pin_normalises_open_and_admin_pins(network, chain, value, admin, want):
    service = LocalizationService(chain, len(network), pin_rules=_rules())
    assert service.pin(value, "model_version", admin) == want


@pytest.mark.parametrize(("value", "admin", "status"), [
    ("2", False, 403), ("0002", False, 403), ("staging", False, 403), ("999", False, 403),
    ("0", True, 422), ("1" * 17, True, 422), ("-1", True, 422), ("1.0", True, 422),
    ("٣", True, 422), ("a b", True, 422), ("x" * 65, True, 422), ("canary", True, 422),
])
def test_pin_refusals_name_the_field(network, chain, value, admin, status):
    service = LocalizationService(chain, len(network), pin_rules=_rules())
    with pytest.raises(InvalidInput) as exc:
        service.pin(value, "serve_multiplexed_model_id", admin)
    assert exc.value.field == "serve_multiplexed_model_id"
    assert exc.value.status_code == status


def test_open_alias_resolves_to_its_version(network, chain):
    service = LocalizationService(chain, len(network),
                                  pin_rules=_rules(versions=(), aliases=("staging",)))
    assert service.pin("staging", "model_version") == "2"
    assert service.pin("02", "model_version") == "2"  # what the open alias names now
    with pytest.raises(InvalidInput) as exc:
        service.pin("3", "model_version")  # the serving alias is not open here
    assert exc.value.status_code == 403


def test_one_pinned_version_per_batch_and_normalised_ids_down_the_chain(network, chain,
                                                                       samples):
    service = LocalizationService(chain, len(network), pin_rules=_rules(versions=("3", "2")))
    same = [*_captures(samples[:2], network, model_version="03"),
            *_captures(samples[2:4], network, model_version="3"),
            *_captures(samples[4:5], network)]
    out = asyncio.run(service.localize(same, batch=True))
    assert all(o.ok for o in out)
    assert sorted(chain.calls, key=str) == sorted([(4, "3"), (1, None)], key=str)
    two = [*_captures(samples[:1], network, model_version="3"),
           *_captures(samples[1:2], network, model_version="2")]
    n = len(chain.calls)
    with pytest.raises(InvalidInput) as exc:
        asyncio.run(service.localize(two, batch=True))
    assert exc.value.field == "captures[1].model_version" and exc.value.status_code == 422
    assert len(chain.calls) == n  # refused before any work


def test_rest_pins_refused_before_work(network, chain, samples):
    service = LocalizationService(chain, len(network), pin_rules=_rules())
    body = orjson.dumps({**samples[0], "model_version": "2"})
    a = asyncio.run(rest.predict(service, network, body))
    assert a.status == 403 and orjson.loads(a.body)["error"]["field"] == "model_version"
    a = asyncio.run(rest.predict(service, network, orjson.dumps(samples[0]), "staging"))
    assert a.status == 403
    assert orjson.loads(a.body)["error"]["field"] == "serve_multiplexed_model_id"
    assert chain.calls == []
    a = asyncio.run(rest.predict(service, network, body, admin=True))
    assert a.status == 200 and orjson.loads(a.body)["model"]["version"] == "2"
    batch = orjson.dumps({"captures": [{**s, "model_version": "0003"} for s in samples[:64]]})
    a = asyncio.run(rest.predict_batch(service, network, batch))
    assert a.status == 200 and chain.calls[-1] == (len(samples), "3")


def test_bytes_in_flight_bound_refuses_with_503_and_gives_back():
    from serve_app.service import BytesInFlight

    bound = BytesInFlight(100)
    with bound.hold() as a:
        a.add(60)
        with bound.hold() as b:
            with pytest.raises(Unavailable, match="in flight"):
                b.add(41)
            b.add(40)
            assert bound.held == 100
        assert bound.held == 60
    assert bound.held == 0
    with pytest.raises(Unavailable), bound.hold() as c:
        c.add(101)
    assert bound.held == 0
