"""An ensemble's members run at once (a thread each) or one after another: the same answers, timings and errors."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from ensemble.spec import BlendSpec
from service.predictor import EnsemblePredictor, load_ensemble
from testkit.artifacts import image_bytes, make_ensemble


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> EnsemblePredictor:
    """The two-member test ensemble (32 and 48 px small CNNs, weights 0.3 / 0.7), loaded and warmed up."""
    return load_ensemble(make_ensemble(tmp_path_factory.mktemp("members")))


def _images(count: int) -> list[np.ndarray]:
    """Decoded RGB images of other sizes than the members' inputs, so each member makes its own square input."""
    return [np.asarray(Image.open(io.BytesIO(image_bytes(size=(60 + 7 * i, 41 + 3 * i), seed=i))).convert("RGB"))
            for i in range(count)]


def _predict(predictor: EnsemblePredictor, images: list[np.ndarray], concurrent: bool) -> tuple:
    """predict with members concurrent or not, the setting restored afterwards."""
    before = predictor.concurrent_members
    predictor.concurrent_members = concurrent
    try:
        return predictor.predict(images)
    finally:
        predictor.concurrent_members = before


def test_concurrent_members_answer_exactly_what_sequential_members_answer(predictor):
    images = _images(5)
    for count in (1, 5):
        blended_seq, members_seq = _predict(predictor, images[:count], False)
        blended_conc, members_conc = _predict(predictor, images[:count], True)
        assert members_seq.shape == (2, count, 4)
        np.testing.assert_array_equal(members_conc, members_seq)
        np.testing.assert_array_equal(blended_conc, blended_seq)
        np.testing.assert_allclose(blended_seq, 0.3 * members_seq[0] + 0.7 * members_seq[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("concurrent", [False, True])
def test_on_member_is_called_once_per_member_per_batch(predictor, concurrent):
    calls, lock = [], threading.Lock()

    def record(name: str, seconds: float) -> None:
        with lock:
            calls.append((name, seconds, threading.current_thread().name))

    predictor.on_member = record
    try:
        _predict(predictor, _images(3), concurrent)
        _predict(predictor, _images(1), concurrent)
    finally:
        predictor.on_member = None
    assert sorted(name for name, _, _ in calls) == ["m32", "m32", "m48", "m48"]
    assert all(seconds > 0 for _, seconds, _ in calls)
    threads = {thread for _, _, thread in calls}
    assert all(t.startswith("member") for t in threads) if concurrent else threads == {threading.main_thread().name}


def test_members_really_run_at_once_on_the_predictors_own_threads(predictor, monkeypatch):
    barrier = threading.Barrier(len(predictor.members), timeout=10)  # breaks unless every member is in at once
    real = EnsemblePredictor._member_predict

    def meeting(self, member, images):
        barrier.wait()
        return real(self, member, images)

    monkeypatch.setattr(EnsemblePredictor, "_member_predict", meeting)
    _predict(predictor, _images(2), True)
    pool = predictor._pool
    _predict(predictor, _images(2), True)
    assert predictor._pool is pool  # made once, kept
    assert len([t for t in threading.enumerate() if t.name.startswith("member")]) >= len(predictor.members)


@pytest.mark.parametrize("concurrent", [False, True])
def test_an_exception_in_one_member_propagates_and_the_others_finish(predictor, monkeypatch, concurrent):
    finished, real = [], EnsemblePredictor._member_predict

    def failing(self, member, images):
        if member.name == "m32":
            raise RuntimeError("m32 broke")
        result = real(self, member, images)
        finished.append(member.name)
        return result

    monkeypatch.setattr(EnsemblePredictor, "_member_predict", failing)
    with pytest.raises(RuntimeError, match="m32 broke"):
        _predict(predictor, _images(2), concurrent)
    # sequential stops at the failing first member; concurrent lets the others finish before it raises
    assert finished == ([] if not concurrent else ["m48"])


def test_the_first_failing_member_in_order_is_the_error_raised(predictor, monkeypatch):
    def failing(self, member, images):
        raise ValueError(f"{member.name} broke")

    monkeypatch.setattr(EnsemblePredictor, "_member_predict", failing)
    with pytest.raises(ValueError, match="m32 broke"):
        _predict(predictor, _images(1), True)


def test_a_single_member_runs_on_the_calling_thread(predictor):
    single = EnsemblePredictor(predictor.classes, predictor.members[:1], BlendSpec("mean", weights=(1.0,)))
    threads = []
    single.on_member = lambda name, seconds: threads.append(threading.current_thread())
    blended, members = single.predict(_images(2))
    assert members.shape == (1, 2, 4) and threads == [threading.current_thread()] and single._pool is None


def test_the_member_threads_end_when_the_predictor_is_collected(predictor):
    import gc
    import time

    fresh = EnsemblePredictor(predictor.classes, predictor.members, predictor.blend)
    fresh.predict(_images(1))
    threads = list(fresh._pool._threads)
    assert threads and all(t.is_alive() for t in threads)
    del fresh
    gc.collect()
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in threads)
