"""Front doors of the service: each turns its wire format into `service.Capture`s and back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# A body up to this size parses in well under a millisecond on the event loop (a standard
# iq_b64 capture is 359 kB), cheaper than the hand-off to a worker thread; larger ones (the
# iq pairs form, batches) parse in a thread so the loop keeps serving other requests.
INLINE_PARSE_BYTES = 512 * 1024


async def off_loop_if_large(parse: Callable[..., T], body: bytes, *args: Any) -> T:
    """`parse(body, *args)`, in a worker thread when the body is large."""
    if len(body) <= INLINE_PARSE_BYTES:
        return parse(body, *args)
    return await asyncio.to_thread(parse, body, *args)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of a front door, independent of the web framework."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"
