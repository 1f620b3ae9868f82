"""Dynamic batching: concurrent requests' images are gathered into one batch per model call.

The contract is Ray Serve's `@serve.batch`: a function from a list of inputs to a list of outputs of
the same length, in the same order. Each caller awaits its own future, so answers never mix.
Inference runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Item:
    value: Any
    future: asyncio.Future


class DynamicBatcher:
    """Gathers items submitted concurrently into batches of at most `max_batch_size`.

    With `max_wait_ms=0` (the default) batching is greedy: a batch takes whatever is queued when the
    model becomes free, so a lone request never waits and, under load, requests that arrived while
    the previous batch ran go together. With `max_wait_ms>0` a batch also waits up to that long after
    its first item for more. With `enabled=False` every submit call is its own batch (for comparison).
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0, enabled: bool = True, on_batch: Callable[[int, float], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the background batching task on the running loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the batching task."""
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit_many(self, values: list[Any]) -> list[Any]:
        """Submit several items (one request's images) and await their results, in order."""
        if not values:
            return []
        loop = asyncio.get_running_loop()
        if not self.enabled:
            return await loop.run_in_executor(None, self._timed, values)
        items = [_Item(v, loop.create_future()) for v in values]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(i.future for i in items)))

    def _timed(self, values: list[Any]) -> list[Any]:
        """Run one batch and report its size and duration."""
        start = time.perf_counter()
        results = self.run_batch(values)
        if len(results) != len(values):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(values)} inputs")
        if self.on_batch:
            self.on_batch(len(values), time.perf_counter() - start)
        return results

    async def _loop(self) -> None:
        """Collect a batch, run it in a thread, hand each caller its own result."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            deadline = loop.time() + self.max_wait
            while self.max_wait > 0 and len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            await self._run(batch)
            del batch  # the decoded images are not kept alive while the loop waits for the next batch

    async def _run(self, batch: list[_Item]) -> None:
        """Run one batch in a thread and hand each caller its own result (or the batch's failure)."""
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(None, self._timed, [i.value for i in batch])
        except Exception as err:  # every caller of the batch learns of the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
