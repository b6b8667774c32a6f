"""Size limits on the running service: each refused with 413/422 before the heavy work."""

from __future__ import annotations

import time

import httpx
import pytest

from load.harness import hostile
from serve_app.schemas import MAX_CAPTURE_BODY_BYTES
from tests.conftest import shipped_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def body_limit(app_url) -> int:
    args = shipped_config(0)["applications"][0]["args"]
    return int(args.get("max_body_bytes", 64 * 1024 * 1024))


def test_declared_oversize_is_refused_without_reading_the_body(app_url, body_limit):
    declared = hostile.declared_oversize(app_url, declared=1 << 30)
    assert (declared["status"], declared["field"]) == (413, "body"), declared
    assert declared["sent_bytes"] == 0
    # Reading even the allowed maximum through the proxy takes far longer than this refusal.
    # A /predict body is read no further than the largest valid capture needs.
    limit = min(body_limit, MAX_CAPTURE_BODY_BYTES)
    streamed = hostile.streamed_oversize(app_url, limit)
    assert (streamed["status"], streamed["field"]) == (413, "body"), streamed
    assert limit <= streamed["sent_bytes"] <= limit + 16 * (1 << 20)
    print(f"\ndeclared 1 GiB refused in {declared['seconds'] * 1000:.0f} ms; "
          f"{streamed['sent_bytes'] >> 20} MiB streamed refused after "
          f"{streamed['seconds'] * 1000:.0f} ms")
    assert declared["seconds"] < max(streamed["seconds"] / 5, 0.5)


def test_receivers_samples_and_captures_limits(app_url, sample_requests):
    good = sample_requests["b64"][0]
    results = hostile.post_classes(app_url, hostile.oversize_bodies(good))
    for res in results:
        print(f"\n{res.name}: {dict(res.statuses)} in {res.median_ms:.0f} ms "
              f"({res.body_bytes:,} bytes)")
        assert res.expected == res.sent, (res.name, res.detail)
        assert res.server_errors == 0
    # The bodies refused by counting brackets cost the service little, however large.
    by_name = {r.name: r for r in results}
    for name in ("receivers per capture: 300,000", "samples per receiver: 1,000,000 [I, Q] "
                 "pairs x 3", "captures per batch: 1,000,000 empty"):
        assert by_name[name].median_ms < 3000, (name, by_name[name].median_ms)
    r = httpx.post(app_url + "/predict", json={**good, "cache": False}, timeout=60)
    assert r.status_code == 200


def test_request_bytes_in_flight_are_bounded(app_url, sample_requests):
    args = shipped_config(0)["applications"][0]["args"]
    budget = int(args["max_inflight_body_bytes"])
    declared = 60 * (1 << 20)
    n_fit = budget // declared  # uploads the Ingress holds at once
    socks = hostile.held_uploads(app_url, n_fit, declared)
    try:
        deadline = time.monotonic() + 60
        while True:  # the held uploads reach the Ingress in their own time
            extra = hostile.declared_upload(app_url, declared, timeout_s=5)
            if extra["status"] == 503 or time.monotonic() > deadline:
                break
        assert extra["status"] == 503 and extra["retry_after"], extra
        assert "in flight" in extra["message"]
        # Small requests still fit beside the held bytes.
        r = httpx.post(app_url + "/predict", json=sample_requests["b64"][0], timeout=60)
        assert r.status_code == 200, r.text
    finally:
        for sock in socks:
            sock.close()
    print(f"\n{n_fit} held uploads of {declared >> 20} MiB; one more: {extra}")
    deadline = time.monotonic() + 60
    while True:  # the closed uploads give their bytes back
        after = hostile.declared_upload(app_url, declared, timeout_s=5)
        if after["status"] != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert after["status"] != 503, after


def test_concurrent_large_uploads_keep_the_ingress_rss_bounded(app_url, sample_requests):
    """24 uploads of 60 MB at once (one 45 MB `iq_b64` each): refused, the Ingress's RSS
    bounded (before the limits it grew by ~900 MiB and kept most of it)."""
    from load.harness import replica_names, replica_pid

    args = shipped_config(0)["applications"][0]["args"]
    budget_mb = int(args["max_inflight_body_bytes"]) / 2**20
    pid = replica_pid(replica_names("rfloc", "Ingress")[0])
    body = hostile.large_upload_body(sample_requests["b64"][0])
    res = hostile.concurrent_uploads(app_url, body, 24, pid)
    print(f"\n24 x {len(body) / 1e6:.0f} MB to /predict: {res['statuses']} in "
          f"{res['seconds']:.1f} s; Ingress RSS {res['rss_before_mb']:.0f} → peak "
          f"{res['rss_peak_mb']:.0f} → {res['rss_after_mb']:.0f} MiB")
    assert set(res["statuses"]) <= {413, 503}, res["statuses"]
    # A /predict body declared beyond the largest capture is refused before it is read;
    # whatever is read stays within the replica's bytes-in-flight budget.
    assert res["rss_peak_mb"] - res["rss_before_mb"] < budget_mb, res
    r = httpx.post(app_url + "/predict", json={**sample_requests["b64"][0], "cache": False},
                   timeout=60)
    assert r.status_code == 200, r.text
