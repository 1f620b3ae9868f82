"""Dynamic batching: concurrent requests' images are gathered into one batch per model call.

The contract is Ray Serve's `@serve.batch`: a function from a list of inputs to a list of outputs of
the same length, in the same order. Each caller awaits its own future, so answers never mix.
Inference runs in a worker thread, off the event loop.

Overload: at most `max_queue` images wait for the model; a request that would pass it is refused at once
with 503 `overloaded` and a Retry-After (nothing of it is queued). A request not answered within
`timeout_ms` gets 504 `timeout`, and its images still waiting are dropped: the model never runs them and
they no longer count against `max_queue`. Images already in a running model batch cannot be interrupted:
that batch finishes, and the late answers are discarded. When a model batch fails, each of its callers gets
the error, and the rest of their requests' images leave the queue unrun.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import ClientError
from service.telemetry import Metrics


@dataclass(eq=False)
class _Item:
    value: Any
    future: asyncio.Future
    submitted: float  # time.perf_counter() when it was queued
    waiting: bool = True  # counted in the queue depth until its batch starts or it is abandoned
    request: list[_Item] | None = None  # every item of the request it came with


class DynamicBatcher:
    """Gathers items submitted concurrently into batches of at most `max_batch_size`.

    With `max_wait_ms=0` (the default) batching is greedy: a batch takes whatever is queued when the
    model becomes free, so a lone request never waits and, under load, requests that arrived while
    the previous batch ran go together. With `max_wait_ms>0` a batch also waits up to that long after
    its first item for more. With `enabled=False` every submit call is its own batch (for comparison),
    and `max_queue` bounds the images being served instead of those waiting.

    `max_queue` images may wait for the model (a request larger than that is admitted only when nothing
    waits); `timeout_ms` (0: none) is each request's deadline from its submission until its answers. An
    image already running in a model batch cannot be interrupted: its request still gets 504 at the
    deadline, and the batch's late result for it is dropped. `metrics` records batches, queue waits, the
    queue depth and refusals.
    """

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0, enabled: bool = True, on_batch: Callable[[int, float], None] | None = None,
                 max_queue: int = 256, timeout_ms: float = 0.0, metrics: Metrics | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.timeout = timeout_ms / 1000.0 if timeout_ms > 0 else None
        self.metrics = metrics
        self.depth = 0  # images waiting for the model (batching off: images being served)
        self._batch_seconds = 0.0  # moving average of a batch's duration, for Retry-After
        self._queue: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the background batching task on the running loop."""
        self._arrived = asyncio.Event()
        self._set_depth(0)
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the batching task (its queue depth leaves the gauge)."""
        self._set_depth(0)
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit_many(self, values: list[Any]) -> list[Any]:
        """Submit several items (one request's images) and await their results, in order.

        Raises ClientError 503 `overloaded` (with Retry-After) at once when the queue has no room for them,
        and 504 `timeout` when they are not answered within the deadline.
        """
        if not values:
            return []
        self._admit(len(values))
        if not self.enabled:
            return await self._direct(values)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(v, loop.create_future(), now) for v in values]
        for item in items:
            item.request = items
        self._queue.extend(items)
        self._set_depth(self.depth + len(items))
        self._arrived.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), self.timeout))
        except asyncio.TimeoutError:
            raise self._timed_out(len(values)) from None
        finally:
            self._abandon(items)

    def retry_after(self) -> int:
        """Whole seconds (at least 1) the queued images need to clear, by the recent batch duration."""
        batches = math.ceil(self.depth / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_seconds))

    def _admit(self, count: int) -> None:
        """Refuse, with 503 and Retry-After, a request whose images the queue has no room for."""
        if self.depth == 0 or self.depth + count <= self.max_queue:
            return
        if self.metrics:
            self.metrics.rejected("overloaded")
        retry = self.retry_after()
        waiting = "waiting for" if self.enabled else "being served by"
        raise ClientError(503, "overloaded", f"the server is overloaded: {self.depth} images are {waiting} the "
                                             f"model, and this request's {count} would pass --max-queue "
                                             f"{self.max_queue}; retry after {retry} s",
                          headers={"Retry-After": str(retry)})

    def _timed_out(self, count: int) -> ClientError:
        """The 504 for a request whose images were not answered in time (counted)."""
        if self.metrics:
            self.metrics.rejected("timeout")
        return ClientError(504, "timeout", f"the model did not answer this request's {count} image(s) within "
                                           f"--request-timeout-ms {self.timeout * 1000:g} ms; the server is busy, "
                                           f"retry later")

    def _abandon(self, items: list[_Item]) -> None:
        """A request is done (answered, failed or timed out): its images still waiting leave the queue."""
        released = 0
        for item in items:
            if not item.future.done():
                item.future.cancel()  # the batch loop skips it, and a running batch drops its result
            if item.waiting:
                item.waiting = False
                item.value = None
                released += 1
        if released:
            self._set_depth(self.depth - released)

    def _set_depth(self, depth: int) -> None:
        """Note the queue depth."""
        self.depth = depth
        if self.metrics:
            self.metrics.queue_depth(depth, self)

    async def _direct(self, values: list[Any]) -> list[Any]:
        """Batching off: the request is its own batch, run in a thread; counted in the depth until answered.

        At the deadline a run still waiting for a thread is cancelled; one already running finishes unheard.
        """
        loop = asyncio.get_running_loop()
        self._set_depth(self.depth + len(values))
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, self._timed, values, time.perf_counter()),
                                          self.timeout)
        except asyncio.TimeoutError:
            raise self._timed_out(len(values)) from None
        finally:
            self._set_depth(self.depth - len(values))

    def _timed(self, values: list[Any], submitted: float | None = None) -> list[Any]:
        """Run one batch and report its size and duration (and, given `submitted`, how long it waited)."""
        start = time.perf_counter()
        if submitted is not None and self.metrics:
            for _ in values:
                self.metrics.queue_wait(start - submitted)
        results = self.run_batch(values)
        if len(results) != len(values):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(values)} inputs")
        seconds = time.perf_counter() - start
        self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
        if self.metrics:
            self.metrics.batch(len(values), seconds)
        if self.on_batch:
            self.on_batch(len(values), seconds)
        return results

    async def _loop(self) -> None:
        """Collect a batch, run it in a thread, hand each caller its own result."""
        while True:
            batch = await self._collect()
            await self._run(batch)
            del batch  # the decoded images are not kept alive while the loop waits for the next batch

    async def _collect(self) -> list[_Item]:
        """Wait for a live item; take what is queued (with `max_wait`, also what arrives in time), up to the size."""
        loop = asyncio.get_running_loop()
        batch: list[_Item] = []
        while not batch:
            await self._wait_for_items(None)
            batch = self._pop(self.max_batch_size)
        deadline = loop.time() + self.max_wait
        while self.max_wait > 0 and len(batch) < self.max_batch_size:
            timeout = deadline - loop.time()
            if timeout <= 0 or not await self._wait_for_items(timeout):
                break
            batch += self._pop(self.max_batch_size - len(batch))
        return batch

    async def _wait_for_items(self, timeout: float | None) -> bool:
        """Wait until something is queued, at most `timeout` seconds (None: no limit); whether it is."""
        if self._queue:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _pop(self, count: int) -> list[_Item]:
        """Up to `count` queued items, skipping those whose request is gone."""
        out: list[_Item] = []
        while self._queue and len(out) < count:
            item = self._queue.popleft()
            if not item.future.done():
                out.append(item)
        return out

    async def _run(self, batch: list[_Item]) -> None:
        """Run one batch in a thread and hand each caller its own result (or the batch's failure)."""
        batch = [i for i in batch if not i.future.done()]  # a request may have timed out while the batch gathered
        if not batch:
            return
        start = time.perf_counter()
        values = []
        for item in batch:
            item.waiting = False
            values.append(item.value)
            item.value = None
            if self.metrics:
                self.metrics.queue_wait(start - item.submitted)
        self._set_depth(self.depth - len(batch))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(None, self._timed, values)
        except Exception as err:  # every caller of the batch learns of the failure ...
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            for request in {id(item.request): item.request for item in batch}.values():
                self._abandon(request)  # ... and its other images leave the queue before the next batch is taken
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
