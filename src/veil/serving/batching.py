"""Dynamic batching: requests that arrive within a few milliseconds share one forward pass."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import torch


class DynamicBatcher:
    """Queue requests' messages and run them through ``forward`` together.

    The worker takes the first waiting request, then keeps collecting for at most ``max_delay_s`` while
    other requests are still on their way (``busy() > collected``: the server holds requests that have not
    reached the queue yet), up to ``max_records``; then one forward pass, and each request gets its rows.
    A lone request is not held back: with nothing else in flight it runs at once.

    Args:
        forward: (N, *shape) -> (N,) predictions, awaited; one pass at a time.
        max_records: Most records in one pass (a request larger than the rest is never split).
        max_delay_s: Longest a request waits for company.
        busy: How many predict requests the server holds right now (including this batch's).
    """

    def __init__(self, forward: Callable[[torch.Tensor], Awaitable[torch.Tensor]], *, max_records: int, max_delay_s: float, busy: Callable[[], int]) -> None:
        self.forward = forward
        self.max_records = max_records
        self.max_delay_s = max_delay_s
        self.busy = busy
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.on_batch: Callable[[int, int], None] = lambda records, requests: None
        self._task: asyncio.Task | None = None

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
        """Predictions for ``messages`` (B, *shape), computed in a shared pass."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((messages, future))
        return await future

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        items = [await self.queue.get()]
        records = len(items[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
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
            items.append(item)
            records += len(item[0])
        return items

    async def _run(self) -> None:
        while True:
            items = await self._collect()
            live = [(m, f) for m, f in items if not f.done()]  # a request whose client left is skipped
            if not live:
                continue
            batch = torch.cat([m for m, _ in live])
            try:
                out = await self.forward(batch)
            except Exception as err:  # every waiting request gets the error, none is dropped
                for _, f in live:
                    if not f.done():
                        f.set_exception(err)
                continue
            self.on_batch(len(batch), len(live))
            start = 0
            for m, f in live:
                if not f.done():
                    f.set_result(out[start : start + len(m)])
                start += len(m)
