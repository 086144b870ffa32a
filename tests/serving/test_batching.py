"""Dynamic batching: requests in flight share one forward pass; each gets its own rows; a lone request
is not held back; errors reach every waiting request."""

from __future__ import annotations

import asyncio
import time

import torch

from veil.serving.batching import DynamicBatcher


def _run(forward, requests, *, busy, max_records=256, max_delay_s=0.5):
    async def main():
        async def run(batch):
            return forward(batch)

        batcher = DynamicBatcher(run, max_records=max_records, max_delay_s=max_delay_s, busy=busy)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(m) for m in requests), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def _row_sums(passes):
    def forward(batch):
        passes.append(len(batch))
        return batch.flatten(1).sum(1)

    return forward


def test_requests_in_flight_share_one_pass_and_get_their_own_rows():
    passes: list[int] = []
    requests = [torch.randn(i + 1, 1, 2, 2) for i in range(10)]
    out = _run(_row_sums(passes), requests, busy=lambda: 10)
    assert passes == [55]
    for m, got in zip(requests, out):
        assert torch.allclose(got, m.flatten(1).sum(1))  # the oracle: each request's own rows


def test_a_pass_holds_at_most_max_records():
    passes: list[int] = []
    out = _run(_row_sums(passes), [torch.ones(1, 1, 2, 2)] * 10, busy=lambda: 10, max_records=4)
    assert passes == [4, 4, 2] and all(float(o) == 4 for o in out)


def test_a_lone_request_is_not_held_back():
    passes: list[int] = []
    t0 = time.monotonic()
    _run(_row_sums(passes), [torch.ones(1, 1, 2, 2)], busy=lambda: 1, max_delay_s=5.0)
    assert passes == [1] and time.monotonic() - t0 < 2.0


def test_an_error_reaches_every_waiting_request():
    def broken(batch):
        raise RuntimeError("forward failed")

    out = _run(broken, [torch.ones(1, 1, 2, 2)] * 3, busy=lambda: 3)
    assert len(out) == 3 and all(isinstance(o, RuntimeError) for o in out)


def test_waits_for_requests_still_on_their_way():
    """busy() says two requests are in flight but only one has reached the queue: the pass waits for
    the second (up to the delay) instead of running twice."""
    passes: list[int] = []

    async def main():
        sums = _row_sums(passes)

        async def forward(batch):
            return sums(batch)

        batcher = DynamicBatcher(forward, max_records=256, max_delay_s=1.0, busy=lambda: 2)
        batcher.start()

        async def late():
            await asyncio.sleep(0.05)
            return await batcher.submit(torch.ones(1, 1, 2, 2))

        out = await asyncio.gather(batcher.submit(torch.ones(1, 1, 2, 2)), late())
        await batcher.stop()
        return out

    out = asyncio.run(main())
    assert passes == [2] and len(out) == 2


def test_a_failing_request_does_not_fail_its_batch_mates():
    """The shared pass raises because of one request's rows: that request alone gets the error; the
    others are rerun alone and get their own rows."""
    passes: list[int] = []

    def forward(batch):
        passes.append(len(batch))
        if (batch < 0).any():
            raise ValueError("a negative message")
        return batch.flatten(1).sum(1)

    requests = [torch.ones(2, 1, 2, 2), -torch.ones(1, 1, 2, 2), 2 * torch.ones(3, 1, 2, 2)]
    out = _run(forward, requests, busy=lambda: 3)
    assert passes[0] == 6  # they did share a pass first
    assert isinstance(out[1], ValueError)
    assert torch.equal(out[0], torch.full((2,), 4.0)) and torch.equal(out[2], torch.full((3,), 8.0))


def test_joining_requests_never_overfill_a_pass():
    """Three-record requests under a four-record cap: each waits for the next pass instead of making a
    pass of six; all get their own rows."""
    passes: list[int] = []
    requests = [torch.full((3, 1, 2, 2), float(i)) for i in range(3)]
    out = _run(_row_sums(passes), requests, busy=lambda: 3, max_records=4)
    assert passes == [3, 3, 3]
    for i, got in enumerate(out):
        assert torch.equal(got, torch.full((3,), 4.0 * i))


def test_passes_with_others_in_flight_are_offloaded_a_lone_one_is_not():
    """``offload`` (the worker thread in the service) runs a pass while other requests are held; a lone
    request runs ``forward`` on the loop. The answers are the same either way."""
    where: list[str] = []
    sums = _row_sums([])

    def make(name):
        async def run(batch):
            where.append(name)
            return sums(batch)

        return run

    async def main(held):
        batcher = DynamicBatcher(make("loop"), max_records=256, max_delay_s=0.0, busy=lambda: held, offload=make("thread"))
        batcher.start()
        try:
            return await batcher.submit(torch.ones(2, 1, 2, 2))
        finally:
            await batcher.stop()

    assert torch.equal(asyncio.run(main(1)), torch.full((2,), 4.0)) and where == ["loop"]
    where.clear()
    assert torch.equal(asyncio.run(main(5)), torch.full((2,), 4.0)) and where == ["thread"]
