"""Adaptive batching of concurrent calls: a batch leaves when a slot is free, not on a timer.

`@serve.batch` forms a batch from what arrives within `batch_wait_timeout_s` of its first
item, whether or not earlier batches are still running: at a few hundred requests/s and a
few ms of wait, most batches hold one or two requests and queue behind each other. The
`Coalescer` instead starts a call at once when none is running; while calls run, items
wait and the next call takes all of them (up to `max_size`). A further call runs beside
the others (up to `max_in_flight`) once the waiting items (by `size`) are an even share of
all items in the system, recent peak included (`peak / max_in_flight`), but never need more
than `min_overlap`: with 16 clients sending back to back and two calls in flight, calls
carry 8 and 8, so the downstream stages work on one while the next forms, instead of 15
and 1 in turn with the stages idle in between. An idle service adds no wait at all, and
under load the batches grow with the load, so the per-call cost of the downstream chain
is spread over more requests exactly when that matters.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PEAK_DECAY_S = 1.0  # time constant of the peak of items in the system


class Coalescer(Generic[T, R]):
    """Run `fn(items) -> results` (same length, same order) over concurrently submitted items.

    `size(item)` is what counts against `max_size` (captures, not requests); an item larger
    than `max_size` runs alone. An exception from `fn` fails every item of that batch. Not
    thread-safe: submit from one event loop.
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 max_size: int, max_in_flight: int, min_overlap: int = 1,
                 size: Callable[[T], int] = lambda _: 1) -> None:
        self._fn, self._size = fn, size
        self.configure(max_size, max_in_flight, min_overlap)
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._queued_size = 0
        self._in_flight = 0
        self._running_size = 0  # items (by size) in running calls
        self._peak, self._t_peak = 0.0, 0.0  # recent peak of items in the system, decaying
        self._tasks: set[asyncio.Task] = set()
        self.sizes: Counter[int] = Counter()  # batches run so far, by their total `size`

    def configure(self, max_size: int, max_in_flight: int, min_overlap: int = 1) -> None:
        """Change the limits; batches already running are unaffected."""
        if min(max_size, max_in_flight, min_overlap) < 1:
            raise ValueError("max_size, max_in_flight and min_overlap must be >= 1")
        self.max_size, self.max_in_flight, self.min_overlap = max_size, max_in_flight, min_overlap

    async def submit(self, item: T) -> R:
        """Queue `item`, wait for its batch, return its result (or raise the batch's error)."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._queued_size += self._size(item)
        self._observe()
        self._start()
        return await fut

    def _observe(self) -> None:
        now = asyncio.get_running_loop().time()
        decayed = self._peak * math.exp(-(now - self._t_peak) / PEAK_DECAY_S)
        self._peak, self._t_peak = max(self._queued_size + self._running_size, decayed), now

    @property
    def overlap_threshold(self) -> int:
        """Waiting items (by size) that start a call beside running ones."""
        return max(1, min(self.min_overlap, math.ceil(self._peak / self.max_in_flight)))

    def _can_start(self) -> bool:
        if not self._queue or self._in_flight >= self.max_in_flight:
            return False
        return self._in_flight == 0 or self._queued_size >= self.overlap_threshold

    def _start(self) -> None:
        while self._can_start():
            batch: list[tuple[T, asyncio.Future[R]]] = []
            total = 0
            while self._queue:
                item, fut = self._queue[0]
                n = self._size(item)
                if fut.cancelled():  # its caller went away while it waited
                    self._queue.popleft()
                    self._queued_size -= n
                    continue
                if batch and total + n > self.max_size:
                    break
                batch.append(self._queue.popleft())
                self._queued_size -= n
                total += n
            if not batch:
                return
            self._in_flight += 1
            self._running_size += total
            self.sizes[total] += 1
            task = asyncio.get_running_loop().create_task(self._run(batch, total))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]], total: int) -> None:
        try:
            results = await self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(batch)} items")
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:  # every waiter must hear of it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._running_size -= total
            self._start()
