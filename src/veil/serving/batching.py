"""Dynamic batching: concurrent requests are queued and run through the model as one forward pass."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import torch


class DynamicBatcher:
    """Queue requests' messages and run them through ``forward`` together.

    The worker takes the first waiting request, lets every request that is ready on the event loop reach
    the queue (one loop turn), takes them all, and then keeps collecting for at most ``max_delay_s`` while
    other requests are still on their way (``busy() > collected``: the server holds requests that have not
    reached the queue yet), up to ``max_records`` (a request that would take the pass past it waits for the
    next one); then one forward pass, and each request gets its rows.
    A lone request is not held back: with nothing else in flight it runs at once.

    With ``offload`` (a forward pass in a worker thread), a pass whose requests are not all the server
    holds runs there, so that the event loop meanwhile reads, checks and queues the requests still on
    their way; the next pass takes every request queued by the time the model is free. A lone request
    runs ``forward`` on the event loop, without a thread hop.

    If a shared pass raises, each of its requests is run again alone, so that only the request that
    fails gets the error and its batch-mates get their answers.

    Args:
        forward: (N, *shape) -> (N, ...) outputs, awaited; one pass at a time.
        max_records: Most records in one pass (a larger request runs alone; a request is never split).
        max_delay_s: Longest a request waits for company.
        busy: How many requests the server holds right now (including this batch's).
        offload: The same pass as ``forward``, awaited while it runs off the event loop; used when other
            requests are in flight (``None``: always ``forward``).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], Awaitable[torch.Tensor]],
        *,
        max_records: int,
        max_delay_s: float,
        busy: Callable[[], int],
        offload: Callable[[torch.Tensor], Awaitable[torch.Tensor]] | None = None,
    ) -> None:
        self.forward = forward
        self.offload = offload
        self.max_records = max_records
        self.max_delay_s = max_delay_s
        self.busy = busy
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.on_batch: Callable[[int, int], None] = lambda records, requests: None
        self._task: asyncio.Task | None = None
        self._held: tuple[torch.Tensor, asyncio.Future] | None = None  # taken, but would have overfilled the last pass

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, messages: torch.Tensor) -> torch.Tensor:
        """The outputs for ``messages`` (B, *shape), computed in a shared pass: (B, ...)."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((messages, future))
        return await future

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        if self._held is not None:
            items, self._held = [self._held], None
        else:
            items = [await self.queue.get()]
        records = len(items[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        if self.queue.empty() and self.busy() > 1:
            await asyncio.sleep(0)  # requests that are ready run up to their submit: no timer needed for them
        while records < self.max_records:
            if not self.queue.empty():
                item = self.queue.get_nowait()
            elif self.busy() > len(items) and (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except (TimeoutError, asyncio.TimeoutError):
                    break
            else:
                break
            if records + len(item[0]) > self.max_records:
                self._held = item  # the first of the next pass: a pass is never overfilled by joining requests
                break
            items.append(item)
            records += len(item[0])
        return items

    async def _pass(self, live: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        batch = live[0][0] if len(live) == 1 else torch.cat([m for m, _ in live])
        run = self.offload if self.offload is not None and self.busy() > len(live) else self.forward
        try:
            out = await run(batch)
        except Exception as err:
            if len(live) == 1:
                if not live[0][1].done():
                    live[0][1].set_exception(err)
                return
            for item in live:  # alone, so that only the failing request gets its error
                await self._pass([item])
            return
        self.on_batch(len(batch), len(live))
        start = 0
        for m, f in live:
            if not f.done():
                f.set_result(out[start : start + len(m)])
            start += len(m)

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            live = [(m, f) for m, f in items if not f.done()]  # a request whose client left is skipped
            if live:
                await self._pass(live)
