"""Faults under steady load on the session's cluster (the scenarios of load/harness/faults.py).

Replica kills, Redis lost and back, a reload, the registry gone: no request may fail.
Overload: 503 with Retry-After, bounded memory, and service again as soon as load drops.
"""

from __future__ import annotations

import pytest

from load.harness import deployment_ready, faults
from serve_app.registry import ModelRegistry, embedded_uris
from tests.conftest import ADMIN_TOKEN, shipped_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    return faults.request_bodies(8)


@pytest.fixture
def base_cfg(app_url) -> dict:
    return shipped_config(int(app_url.rsplit(":", 1)[1]))


def _show(row: faults.Row) -> None:
    print(f"\n{row.fault}: {row.load}; sent {row.sent}, failed {row.failed} {row.codes}, "
          f"recovery {row.recovery_s} s, p50 / p99 / max {row.p50_ms:.0f} / {row.p99_ms:.0f} / "
          f"{row.max_ms:.0f} ms; {row.notes}")


@pytest.mark.parametrize("deployment", ["LocalizationModel", "Preprocessor", "Postprocessor"])
def test_replica_killed_under_load(app_url, bodies, deployment):
    row = faults.kill_replica(app_url, deployment, bodies)
    _show(row)
    assert row.sent > 100
    assert row.failed == 0, row.codes
    assert row.recovery_s is not None, "Serve did not replace the replica"
    assert deployment_ready("rfloc", deployment)


def test_hung_replica_holds_no_request_past_the_chain_deadline(app_url, base_cfg):
    row = faults.freeze_replica(base_cfg, "Preprocessor", freeze_s=15.0)
    _show(row)
    assert row.sent > 100
    assert row.failed == 0, row.codes
    # Calls sent to the frozen replica are cancelled after chain_timeout_s (5 s) and retried
    # on the other one (allowing for one retry routed to the frozen replica again); without
    # that deadline they, and every request coalesced behind them, wait out the freeze.
    timeout = base_cfg["applications"][0]["args"]["chain_timeout_s"]
    assert row.extra["slowest_s"] < 2 * timeout + 2.0 < row.extra["freeze_s"]


def test_redis_killed_and_restarted_under_load(app_url, base_cfg):
    row = faults.redis_restart(base_cfg)
    _show(row)
    assert row.failed == 0, row.codes
    assert row.recovery_s is not None and row.recovery_s < 60, "cache hits did not resume"


def test_model_reload_under_load(app_url, ray_cluster, bodies):
    state = ray_cluster["state_dir"]
    registry = ModelRegistry(embedded_uris(state)[0], cache_dir=state / "faults-cache")
    row = faults.model_reload(app_url, registry, ADMIN_TOKEN, bodies)
    _show(row)
    assert row.failed == 0, row.codes
    assert row.extra["reload_codes"] == [200, 200]
    assert len(row.extra["versions"]) == 2, "answers should come from both versions"
    assert row.recovery_s is not None and row.recovery_s < 15


def test_registry_unreachable_during_reload_under_load(app_url, base_cfg):
    row = faults.registry_unreachable(base_cfg, ADMIN_TOKEN)
    _show(row)
    assert row.failed == 0, row.codes
    assert row.extra["reload_status"] == 503
    assert row.extra["health_down"] == "degraded"
    assert row.recovery_s is not None, "health did not return to ok with the registry"


def test_full_downstream_queue_is_503_with_retry_after(app_url, base_cfg):
    row = faults.downstream_backpressure(base_cfg)
    _show(row)
    assert row.failed == 0, row.codes  # only 200 and 503
    assert row.extra["shed"] > 0, "the downstream queue never filled"
    assert row.extra["shed_with_retry_after"] == row.extra["shed"]
    assert row.extra["after"] == [200] * 5


def test_overload_sheds_load_with_bounded_memory_and_recovers(app_url, bodies):
    row = faults.overload(app_url, bodies, clients=600, round_s=12.0, rounds=2)
    _show(row)
    assert set(row.codes) <= {503}, f"only 503 may answer beyond capacity: {row.codes}"
    assert row.extra["shed"] > 0, "600 clients did not exceed capacity"
    assert row.extra["shed_with_retry_after"] == row.extra["shed"]
    assert row.extra["ok_answers"] > 0
    assert row.max_ms < 25_000, "a request waited almost the proxy's 30 s timeout"
    before, peaks = row.extra["rss_before_mb"], row.extra["rss_peaks_mb"]
    for proc in ("ingress", "proxy0"):
        assert peaks[0][proc] - before[proc] < 1024, (proc, before, peaks)
        # A second round of the same overload does not grow it further: bounded, not leaking.
        assert peaks[1][proc] <= peaks[0][proc] * 1.15 + 64, (proc, peaks)
    assert set(row.extra["light_after"]) == {200}
    assert row.recovery_s is not None and row.recovery_s < 10
