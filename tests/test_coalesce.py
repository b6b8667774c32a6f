"""The Ingress's adaptive batcher: batches leave when a slot is free, never on a timer."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.coalesce import Coalescer


class Chain:
    """A batch function whose calls finish only when the test releases them."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release: list[asyncio.Event] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        done = asyncio.Event()
        self.release.append(done)
        await done.wait()
        if -1 in items:
            raise ValueError("bad batch")
        return [10 * x for x in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _submitted(c: Coalescer, x: int) -> asyncio.Task:
    """`x` submitted in its own task, after the batcher has reacted to it."""
    task = asyncio.create_task(c.submit(x))
    await _settle()
    return task


def test_idle_call_starts_at_once_and_waiters_leave_together():
    async def main():
        chain = Chain()
        c = Coalescer(chain, max_size=64, max_in_flight=1)
        first = await _submitted(c, 1)
        assert chain.calls == [[1]], "an idle batcher must not wait for company"
        rest = [asyncio.create_task(c.submit(x)) for x in (2, 3, 4)]
        await _settle()
        assert chain.calls == [[1]], "at most one call in flight"
        chain.release[0].set()
        assert await first == 10
        await _settle()
        assert chain.calls == [[1], [2, 3, 4]]
        chain.release[1].set()
        assert await asyncio.gather(*rest) == [20, 30, 40]
        assert c.sizes == {1: 1, 3: 1}

    asyncio.run(main())


def test_max_size_counts_item_sizes_and_a_large_item_runs_alone():
    async def main():
        chain = Chain()
        c = Coalescer(chain, max_size=10, max_in_flight=1, size=lambda x: x)
        tasks = [asyncio.create_task(c.submit(x)) for x in (1, 6, 5, 12, 2)]
        for k in range(5):
            await _settle()
            chain.release[k].set()
        assert await asyncio.gather(*tasks) == [10, 60, 50, 120, 20]
        # 1 starts alone (idle); 6 + 5 and 5 + 12 would exceed 10; 12 alone is over the limit.
        assert chain.calls == [[1], [6], [5], [12], [2]]

    asyncio.run(main())


def _two_in_flight(chain: Chain) -> Coalescer:
    """The shipped Ingress's batcher: 64 captures a call, 2 calls, overlap capped at 16."""
    return Coalescer(chain, max_size=64, max_in_flight=2, min_overlap=16, size=lambda x: x)


def test_a_second_call_overlaps_once_an_even_share_is_waiting():
    async def main():
        chain = Chain()
        c = _two_in_flight(chain)
        a = await _submitted(c, 30)
        small = await _submitted(c, 4)
        assert c.overlap_threshold == 16, "34 in the system, half of it capped at min_overlap"
        assert chain.calls == [[30]], "4 waiting captures are not worth a second call"
        more = await _submitted(c, 12)
        assert chain.calls == [[30], [4, 12]], "16 waiting captures start a second call"
        third = await _submitted(c, 40)
        assert len(chain.calls) == 2, "never more than max_in_flight calls"
        for ev in chain.release[:2]:
            ev.set()
        await _settle()
        assert chain.calls[2] == [40]
        chain.release[2].set()
        assert await asyncio.gather(a, small, more, third) == [300, 40, 120, 400]

    asyncio.run(main())


def test_under_light_load_a_second_call_needs_only_half_of_what_is_in_flight():
    async def main():
        chain = Chain()
        c = _two_in_flight(chain)
        a = await _submitted(c, 2)
        b = await _submitted(c, 2)
        assert c.overlap_threshold == 2, "4 in the system: an even share of 2 calls is 2"
        assert chain.calls == [[2], [2]], "the second request must not wait for the first"
        for ev in chain.release:
            ev.set()
        assert await asyncio.gather(a, b) == [20, 20]

    asyncio.run(main())


def test_an_error_fails_its_batch_only_and_the_batcher_goes_on():
    async def main():
        chain = Chain()
        c = Coalescer(chain, max_size=64, max_in_flight=1)
        first = await _submitted(c, 1)
        bad = [asyncio.create_task(c.submit(x)) for x in (-1, 2)]
        await _settle()
        chain.release[0].set()
        await _settle()
        chain.release[1].set()
        for t in bad:
            with pytest.raises(ValueError, match="bad batch"):
                await t
        assert await first == 10
        later = await _submitted(c, 5)
        chain.release[2].set()
        assert await later == 50

    asyncio.run(main())


def test_a_cancelled_waiter_is_dropped_before_its_batch_runs():
    async def main():
        chain = Chain()
        c = Coalescer(chain, max_size=64, max_in_flight=1)
        first = await _submitted(c, 1)
        gone, kept = asyncio.create_task(c.submit(2)), asyncio.create_task(c.submit(3))
        await _settle()
        gone.cancel()
        await _settle()
        chain.release[0].set()
        await _settle()
        assert chain.calls == [[1], [3]]
        chain.release[1].set()
        assert (await first, await kept) == (10, 30)

    asyncio.run(main())


def test_wrong_result_count_is_an_error_for_the_batch():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def main():
        c = Coalescer(short, max_size=64, max_in_flight=1)
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await c.submit(1)

    asyncio.run(main())


@pytest.mark.parametrize("bad", [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_limits_must_be_positive(bad):
    with pytest.raises(ValueError):
        Coalescer(lambda items: items, max_size=bad[0], max_in_flight=bad[1],
                  min_overlap=bad[2])
