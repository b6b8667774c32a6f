"""Ports and HTTP readiness: free loopback ports, waiting for a URL, the allowed targets."""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urlsplit

import httpx

TEST_HOSTS = ipaddress.ip_network("10.213.0.0/16")  # load/harness/multinode.py's netns hosts


def check_target(url: str) -> None:
    """Refuse any target but loopback and the multi-node test hosts."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"load may only target loopback or the test hosts, not {host!r}") from None
    if not (ip.is_loopback or ip in TEST_HOSTS):
        raise ValueError(f"load may only target loopback or the test hosts, not {host}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 180.0, status: int = 200) -> httpx.Response:
    """Poll `url` until it answers `status`, or raise TimeoutError after `timeout_s`."""
    check_target(url)
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5.0)
            if r.status_code == status:
                return r
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer {status} within {timeout_s} s (last: {last})")
