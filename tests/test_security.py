"""Security properties without a cluster: admin token handling, nothing unpickled or evaluated.

The model artifact's sha256 check is tested in tests/test_registry.py (tampered store or tag),
the non-root image in tests/test_packaging.py, the admin endpoint over HTTP in
tests/test_app_ray.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import pickle
import sys
from collections import OrderedDict

import orjson
import pytest
from starlette.requests import Request

from deployments.ingress import Ingress
from serve_app.cache import LocalLRUCache, _loads, cache_key
from serve_app.cli import main as rfloc_main
from serve_app.decode import decode_capture, decode_raw_batch, decode_raw_body
from serve_app.errors import InvalidInput
from serve_app.settings import MIN_ADMIN_TOKEN_CHARS, EnvSettings
from tests.test_cache import prediction_entry

TOKEN = "s3cret-admin-token-0123456789abcdef"

# The Ingress instances built here skip the replica's constructor; its async __del__ is moot.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine .*__del__' was never awaited:RuntimeWarning")


def _request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "POST", "path": "/model/reload",
                    "headers": headers, "query_string": b""})


def _ingress(monkeypatch, token: str | None):
    """The Ingress class's own admin check, with settings read from this environment."""
    if token is None:
        monkeypatch.delenv("RFLOC_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("RFLOC_ADMIN_TOKEN", token)
    ingress = object.__new__(Ingress.func_or_class)  # no replica: only the check is exercised
    ingress._env = EnvSettings()
    return ingress


def _verdict(ingress, authorization: str | None) -> tuple[int, dict] | None:
    denied = ingress._check_admin(_request(authorization))
    return None if denied is None else (denied.status_code, orjson.loads(denied.body)["error"])


def test_admin_endpoints_are_disabled_without_a_token(monkeypatch):
    ingress = _ingress(monkeypatch, None)
    for auth in (None, "Bearer anything", f"Bearer {TOKEN}", "Bearer "):
        status, err = _verdict(ingress, auth)
        assert status == 403 and "disabled" in err["message"], auth


def test_admin_token_401_403_and_accept(monkeypatch):
    ingress = _ingress(monkeypatch, TOKEN)
    assert _verdict(ingress, None)[0] == 401
    assert _verdict(ingress, "Basic abc")[0] == 401
    assert _verdict(ingress, "Bearer ")[0] == 401
    assert _verdict(ingress, "Bearer wrong")[0] == 403
    assert _verdict(ingress, f"Bearer {TOKEN}x")[0] == 403
    assert _verdict(ingress, f"Bearer {TOKEN[:-1]}")[0] == 403
    assert _verdict(ingress, f"Bearer {TOKEN}") is None
    assert _verdict(ingress, f"bearer {TOKEN}") is None  # the scheme is case-insensitive


def test_admin_token_is_compared_in_constant_time(monkeypatch):
    """The comparison goes through hmac.compare_digest (observed, not grepped)."""
    ingress = _ingress(monkeypatch, TOKEN)
    calls = []

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile signature
        if event == "c_call" and arg is hmac.compare_digest:
            calls.append(arg)

    sys.setprofile(profile)
    try:
        for auth in ("Bearer wrong", f"Bearer {TOKEN}"):
            _verdict(ingress, auth)
    finally:
        sys.setprofile(None)
    assert len(calls) == 2


def test_admin_token_read_with_a_trailing_newline_matches(monkeypatch):
    ingress = _ingress(monkeypatch, f"  {TOKEN}\n")  # as `$(cat token_file)` or a Secret
    assert _verdict(ingress, f"Bearer {TOKEN}") is None
    assert _verdict(ingress, f"Bearer {TOKEN}\n")[0] == 403


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_an_empty_admin_token_leaves_the_admin_endpoints_disabled(monkeypatch, empty):
    status, err = _verdict(_ingress(monkeypatch, empty), "Bearer ")
    assert status == 403 and "disabled" in err["message"]


def test_a_short_admin_token_is_refused_at_startup(monkeypatch, tmp_path, capsys):
    short = "x" * (MIN_ADMIN_TOKEN_CHARS - 1)
    monkeypatch.setenv("RFLOC_ADMIN_TOKEN", f"{short}\n")
    monkeypatch.setenv("RFLOC_STATE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="RFLOC_ADMIN_TOKEN") as info:
        EnvSettings()
    assert short not in str(info.value)  # a refused secret is not echoed into logs
    assert rfloc_main(["serve"]) == 2  # before any registry or Ray is touched
    err = capsys.readouterr().err
    assert "cannot start" in err and f"at least {MIN_ADMIN_TOKEN_CHARS}" in err
    assert short not in err and not any(tmp_path.iterdir())
    monkeypatch.setenv("RFLOC_ADMIN_TOKEN", "x" * MIN_ADMIN_TOKEN_CHARS)
    assert EnvSettings().admin_token.get_secret_value() == "x" * MIN_ADMIN_TOKEN_CHARS


class _Audit:
    """Records code execution and unpickling audit events while armed (the hook stays)."""

    EVENTS = {"pickle.find_class", "exec", "compile", "marshal.loads", "os.system",
              "subprocess.Popen"}

    def __init__(self) -> None:
        self.armed = False
        self.seen: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.armed and event in self.EVENTS:
            self.seen.append(event)


@pytest.fixture(scope="module")
def audit() -> _Audit:
    return _Audit()


def _hostile_path(network, good: dict) -> None:
    """Everything a request and a cache entry go through at the ingress, with hostile data."""
    planted = pickle.dumps(OrderedDict(a=1))  # unpickling it would look up a class
    bodies = [orjson.dumps(good),
              orjson.dumps({**good, "session_id": planted.hex()}),
              planted, b"cos\nsystem\n(S'echo hi'\ntR.", b'{"receivers": "__import__(\'os\')"}',
              orjson.dumps({**good, "receivers": [{**good["receivers"][0], "iq_b64": "gASVAA=="}]
                            + good["receivers"][1:]})]
    for body in bodies:
        with contextlib.suppress(InvalidInput):
            decode_capture(decode_raw_body(body), network)
        with contextlib.suppress(InvalidInput):
            decode_raw_batch(b'{"captures": [' + body + b"]}")
    for raw in (planted, b"cos\nsystem\n(S'echo hi'\ntR."):
        with pytest.raises(ValueError):
            _loads(raw)
    cache = LocalLRUCache(4)
    key = cache_key("1", b"capture", 0.95)
    entry = prediction_entry(version="1")
    asyncio.run(cache.set(key, entry))
    assert asyncio.run(cache.get(key, ("1", entry["model"]["sha256"]))) == entry
    asyncio.run(cache.set(key, {"result": {"x": 1}, "model": {"version": "1"}}))
    assert asyncio.run(cache.get(key)) is None  # not a prediction: a miss, never evaluated


def test_nothing_a_client_or_the_cache_supplies_is_unpickled_or_evaluated(
        audit, network, sample_requests):
    good = sample_requests["b64"][0]
    audit.armed = True  # the hook has teeth: unpickling a class and eval are both seen
    pickle.loads(pickle.dumps(OrderedDict()))
    eval("1 + 1")
    audit.armed = False
    assert {"pickle.find_class", "compile"} <= set(audit.seen)
    audit.seen.clear()
    _hostile_path(network, good)  # warm up: imports compile and exec their modules
    audit.armed = True
    try:
        _hostile_path(network, good)
    finally:
        audit.armed = False
    assert audit.seen == [], f"code execution or unpickling on the request path: {audit.seen}"


def test_errors_raised_in_a_replica_answer_with_their_own_text_not_a_traceback():
    from ray.exceptions import RayTaskError

    from serve_app.errors import ModelError, RegistryUnavailable, http_error

    for exc, status in ((RegistryUnavailable("model registry unreachable"), 503),
                        (ModelError("model 'm' has no version 9"), 404)):
        try:
            raise exc
        except Exception as e:  # how a replica's error reaches the Ingress
            wrapped = RayTaskError("get_pinned", 'Traceback\n  File "/srv/x.py"\n', e,
                                   pid=4242, ip="10.0.0.7").as_instanceof_cause()
        assert isinstance(wrapped, type(exc))
        got, body, _ = http_error(wrapped)
        assert (got, body["error"]["message"]) == (status, str(exc))


def test_open_model_info_has_no_pid_and_no_local_paths():
    from serve_app.lifecycle import public_info

    info = {"pid": 4242, "model": {"version": "3"}, "last_refusal": {
        "version": "4", "at": 1.0,
        "reason": "/home/svc/.rfloc/model-cache/m/4/model.onnx: not a loadable ONNX model: "
                  "file:///srv/artifacts/x (source /srv/y)"}}
    out = public_info(info)
    assert "pid" not in out and out["model"] == {"version": "3"}
    assert "/" not in out["last_refusal"]["reason"].replace("<path>", "")
    assert out["last_refusal"]["reason"].startswith("<path>: not a loadable ONNX model")
    assert info["pid"] == 4242  # the admin view keeps it


def test_docs_page_is_off_by_default_and_under_a_csp_when_on(monkeypatch):
    from serve_app.settings import AppArgs

    ingress = _ingress(monkeypatch, TOKEN)
    for on in (False, True):
        ingress._args = AppArgs(docs_ui=on)
        page = asyncio.run(ingress.docs())
        if not on:
            assert page.status_code == 404
            assert "/openapi.json" in orjson.loads(page.body)["error"]["message"]
            continue
        assert page.status_code == 200 and b"swagger-ui" in page.body
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_is_admin_accepts_only_the_bearer_token(monkeypatch):
    ingress = _ingress(monkeypatch, TOKEN)
    assert ingress._is_admin(f"Bearer {TOKEN}") and ingress._is_admin(f"bearer {TOKEN}")
    for auth in (None, "", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN):
        assert not ingress._is_admin(auth), auth
    assert not _ingress(monkeypatch, None)._is_admin(f"Bearer {TOKEN}")
