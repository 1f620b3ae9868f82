"""The dynamic batcher on its own (no model, no HTTP): which images reach the model, Retry-After, and what a
request with batching off records and answers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import generate_latest

from service import batching
from service.batching import DynamicBatcher
from service.errors import ClientError
from service.telemetry import Metrics
from tests.metrics_text import metric_samples, metric_value


class Clock:
    """A stand-in for time.perf_counter that only moves when a batch says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample's value from the metrics' Prometheus text (it must be there)."""
    return metric_value(metric_samples(generate_latest(metrics.registry).decode()), name, required=True, **labels)


def test_retry_after_is_the_queued_batches_times_the_moving_average_of_a_batch(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(batching.time, "perf_counter", clock)
    gate, durations, calls = threading.Event(), [1.5, 2.5], []

    def run(values):
        calls.append(list(values))
        if len(calls) == 3:
            assert gate.wait(10)
        clock.now += durations[len(calls) - 1] if len(calls) <= len(durations) else 0.0
        return values

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=4, max_queue=12)
        await batcher.start()
        assert await batcher.submit_many(["a"]) == ["a"]  # a batch of 1.5 s
        assert batcher.retry_after() == 1  # nothing queued: at least 1 s, never 0
        assert await batcher.submit_many(["b"]) == ["b"]  # 2.5 s: the average is 0.8 * 1.5 + 0.2 * 2.5 = 1.7 s
        held = asyncio.ensure_future(batcher.submit_many(["c"]))  # the model holds this one
        while len(calls) < 3:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit_many(list("defghijklm")))  # 10 images wait: 3 batches of 4
        await asyncio.sleep(0.01)
        assert batcher.depth == 10 and batcher.retry_after() == 6  # ceil(3 batches * 1.7 s) = ceil(5.1)
        with pytest.raises(ClientError) as refused:
            await batcher.submit_many(["n", "o", "p"])  # 10 + 3 > 12
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "6"}
        assert refused.value.message == ("the server is overloaded: 10 images are waiting for the model, and this "
                                         "request's 3 would pass --max-queue 12; retry after 6 s")
        gate.set()
        assert await held == ["c"] and await queued == list("defghijklm")
        await batcher.stop()

    asyncio.run(main())


def test_a_failed_batch_drops_the_rest_of_its_request_and_the_model_never_sees_them():
    calls: list[list] = []

    def run(values):
        calls.append(list(values))
        if values == ["a1"]:
            raise RuntimeError("the model failed")
        return [v.upper() for v in values]

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=1)
        await batcher.start()
        with pytest.raises(RuntimeError, match="the model failed"):
            await batcher.submit_many(["a1", "a2", "a3"])  # a1 fails; a2 and a3 still wait in the queue
        assert batcher.depth == 0  # they left the queue with their request
        assert await batcher.submit_many(["b"]) == ["B"]  # queued after a2 and a3: they would have run by now
        await batcher.stop()

    asyncio.run(main())
    assert calls == [["a1"], ["b"]]


def test_with_batching_off_each_image_records_its_wait_and_a_late_request_gets_504_naming_its_images():
    gate = threading.Event()
    metrics = Metrics()

    def run(values):
        if values == ["slow", "slow"]:
            gate.wait(10)
        return values

    async def main():
        batcher = DynamicBatcher(run, enabled=False, timeout_ms=1000, metrics=metrics, max_queue=2)
        await batcher.start()
        assert await batcher.submit_many(["x", "y", "z"]) == ["x", "y", "z"]  # more than max_queue: nothing else runs
        assert _sample(metrics, "flower_queue_wait_seconds_count") == 3  # one wait per image
        assert 0 <= _sample(metrics, "flower_queue_wait_seconds_sum") < 1.0
        assert _sample(metrics, "flower_batch_size_images_sum") == 3
        slow = asyncio.ensure_future(batcher.submit_many(["slow", "slow"]))
        await asyncio.sleep(0.05)
        with pytest.raises(ClientError) as refused:
            await batcher.submit_many(["z"])
        assert refused.value.message.startswith("the server is overloaded: 2 images are being served by the model, "
                                                "and this request's 1 would pass --max-queue 2")
        with pytest.raises(ClientError) as late:
            await slow
        gate.set()
        assert late.value.status == 504 and late.value.kind == "timeout"
        assert "this request's 2 image(s) within --request-timeout-ms 1000 ms" in late.value.message
        assert batcher.depth == 0
        await batcher.stop()

    asyncio.run(main())
    assert _sample(metrics, "flower_rejected_requests_total", reason="timeout") == 1


def test_batches_take_at_most_max_batch_size_images_in_order_and_each_image_waits_from_its_submission(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(batching.time, "perf_counter", clock)
    gate, calls, metrics = threading.Event(), [], Metrics()

    def run(values):
        calls.append(list(values))
        if len(calls) == 1:
            assert gate.wait(10)
            clock.now += 2.0  # the queued images waited 2 s for this batch to end
        return values

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=2, metrics=metrics)
        await batcher.start()
        held = asyncio.ensure_future(batcher.submit_many(["a"]))
        while not calls:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit_many(list("bcdef")))
        await asyncio.sleep(0.01)
        gate.set()
        assert await held == ["a"] and await queued == list("bcdef")
        assert _sample(metrics, "flower_queue_depth_images") == 0
        await batcher.stop()
        assert _sample(metrics, "flower_queue_depth_images") == 0

    asyncio.run(main())
    assert calls == [["a"], ["b", "c"], ["d", "e"], ["f"]]
    assert _sample(metrics, "flower_queue_wait_seconds_count") == 6
    assert _sample(metrics, "flower_queue_wait_seconds_sum") == 5 * 2.0  # "a" waited 0 s, the five others 2 s


def test_a_late_request_gets_504_naming_its_images_and_a_wrong_batch_function_is_named():
    gate, sizes = threading.Event(), []

    def run(values):
        if values[0] == "held":
            assert gate.wait(10)
        return values if values[0] != "short" else values[:1]

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=4, timeout_ms=300, on_batch=lambda n, s: sizes.append((n, s)))
        await batcher.start()
        held = asyncio.ensure_future(batcher.submit_many(["held"]))
        await asyncio.sleep(0.05)
        with pytest.raises(ClientError) as late:
            await batcher.submit_many(["a", "b"])  # waits behind the held batch past its deadline
        assert late.value.status == 504
        assert "this request's 2 image(s) within --request-timeout-ms 300 ms" in late.value.message
        gate.set()
        with pytest.raises(ClientError):
            await held  # its own deadline passed too
        with pytest.raises(RuntimeError, match="^batch function returned 1 results for 2 inputs$"):
            await batcher.submit_many(["short", "x"])
        await batcher.stop()

    asyncio.run(main())
    assert [n for n, _ in sizes] == [1] and sizes[0][1] > 0.2  # on_batch: each answered batch's size and seconds


def test_the_batchers_bounds_are_checked_and_a_one_millisecond_deadline_holds():
    with pytest.raises(ValueError, match="^max_batch_size must be >= 1, got 0$"):
        DynamicBatcher(lambda values: values, max_batch_size=0)
    with pytest.raises(ValueError, match="^max_queue must be >= 1, got 0$"):
        DynamicBatcher(lambda values: values, max_queue=0)
    gate = threading.Event()

    async def main():
        batcher = DynamicBatcher(lambda values: gate.wait(10) and values, max_queue=1, timeout_ms=1)
        await batcher.start()
        with pytest.raises(ClientError) as late:
            await batcher.submit_many(["a"])
        gate.set()
        await batcher.stop()
        return late.value.status

    assert asyncio.run(main()) == 504


def test_max_wait_gathers_what_arrives_in_its_window_and_greedy_batching_never_waits():
    calls: list[list] = []

    def run(values):
        calls.append(list(values))
        return values

    async def requests(batcher, *timed):
        """Submit each (delay in s, values) after its delay from the start; return every answer."""
        async def one(delay, values):
            await asyncio.sleep(delay)
            return await batcher.submit_many(values)
        await batcher.start()
        answers = await asyncio.gather(*(one(d, v) for d, v in timed))
        await batcher.stop()
        return answers

    # A 400 ms window: "b" and "cd" arrive in it and join "a"; "e" at 1.5 s starts a batch of its own; a full
    # batch (size 4) goes at once, and what is left waits for the next.
    windowed = DynamicBatcher(run, max_batch_size=4, max_wait_ms=400)
    answers = asyncio.run(requests(windowed, (0, ["a"]), (0.05, ["b"]), (0.1, ["c", "d"]), (1.5, ["e"])))
    assert answers == [["a"], ["b"], ["c", "d"], ["e"]]
    assert calls == [["a", "b", "c", "d"], ["e"]]
    calls.clear()
    asyncio.run(requests(windowed, (0, ["a"]), (0.05, list("bcdef"))))
    assert calls == [["a", "b", "c", "d"], ["e", "f"]]
    # The window counts from the batch's first image and does not slide: "c" at 0.6 s is past a's 400 ms.
    calls.clear()
    asyncio.run(requests(windowed, (0, ["a"]), (0.3, ["b"]), (0.6, ["c"])))
    assert calls == [["a", "b"], ["c"]]
    # A full batch goes at once, without waiting out its window.
    started = []
    full = DynamicBatcher(lambda values: started.append(time.perf_counter()) or values, max_batch_size=2,
                          max_wait_ms=3000)
    begin = time.perf_counter()
    asyncio.run(requests(full, (0, ["a", "b"])))
    assert started and started[0] - begin < 1.0
    # Greedy (the default): a lone request goes at once, one 200 ms later is a batch of its own.
    calls.clear()
    asyncio.run(requests(DynamicBatcher(run, max_batch_size=4), (0, ["a"]), (0.2, ["b"])))
    assert calls == [["a"], ["b"]]


def test_images_of_a_request_that_gave_up_are_skipped_and_leave_the_queue_depth():
    gate, calls = threading.Event(), []

    def run(values):
        calls.append(list(values))
        if values == ["held"]:
            assert gate.wait(10)
        return values

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=2)
        await batcher.start()
        held = asyncio.ensure_future(batcher.submit_many(["held"]))
        while not calls:
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(batcher.submit_many(["x1", "x2"]))
        kept = asyncio.ensure_future(batcher.submit_many(["k1", "k2"]))
        await asyncio.sleep(0.02)
        assert batcher.depth == 4
        gone.cancel()  # the client went away while its images waited
        await asyncio.sleep(0.02)
        assert batcher.depth == 2
        gate.set()
        assert await held == ["held"] and await kept == ["k1", "k2"]
        assert batcher.depth == 0
        await batcher.stop()

    asyncio.run(main())
    assert calls == [["held"], ["k1", "k2"]]  # the gone images take no place in a batch


def test_with_batching_off_retry_after_reckons_one_model_call_per_image_being_served(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(batching.time, "perf_counter", clock)
    gate, calls = threading.Event(), []

    def run(values):
        calls.append(list(values))
        if len(calls) == 1:
            clock.now += 1.5  # the first request takes 1.5 s
        else:
            assert gate.wait(10)
        return values

    async def main():
        batcher = DynamicBatcher(run, max_batch_size=8, enabled=False, max_queue=2)
        await batcher.start()
        assert await batcher.submit_many(["a"]) == ["a"]
        held = asyncio.ensure_future(batcher.submit_many(["b", "c"]))
        deadline = time.monotonic() + 5
        while len(calls) < 2:
            assert not held.done() and time.monotonic() < deadline, "the held request never reached the model"
            await asyncio.sleep(0.005)
        assert batcher.depth == 2 and batcher.retry_after() == 3  # 2 images, a call of 1.5 s each (a cautious bound)
        with pytest.raises(ClientError) as refused:
            await batcher.submit_many(["d"])
        assert refused.value.headers == {"Retry-After": "3"}
        gate.set()
        assert await held == ["b", "c"]
        await batcher.stop()

    asyncio.run(main())


def test_the_queue_depth_gauge_is_the_sum_over_every_batcher_sharing_the_metrics():
    gate, metrics = threading.Event(), Metrics()

    def run(values):
        assert gate.wait(10)
        return values

    async def main():
        first = DynamicBatcher(run, max_batch_size=1, metrics=metrics)  # e.g. two versions of a model
        second = DynamicBatcher(run, max_batch_size=1, metrics=metrics)
        await first.start()
        await second.start()
        requests = [asyncio.ensure_future(first.submit_many(["a1", "a2", "a3"])),
                    asyncio.ensure_future(second.submit_many(["b1", "b2"]))]
        deadline = time.monotonic() + 5
        while (first.depth, second.depth) != (2, 1):  # each runs its first image; the others wait
            assert time.monotonic() < deadline, (first.depth, second.depth)
            await asyncio.sleep(0.005)
        assert _sample(metrics, "flower_queue_depth_images") == 3
        gate.set()
        assert await asyncio.gather(*requests) == [["a1", "a2", "a3"], ["b1", "b2"]]
        assert _sample(metrics, "flower_queue_depth_images") == 0
        await first.stop()
        await second.stop()

    asyncio.run(main())
