"""Shared fixtures: a tiny demo data set and a whole tiny training run, each made once per test session, and the
shared real photos. Plain helpers shared by test files live in tests/support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("FLOWER_PRELOAD_TENSORFLOW") == "1":
    # Mutation runs (scripts/mutation.sh) fork every mutant's test process from one that has collected the tests;
    # importing TensorFlow there (no op run yet, so no thread pools or traced graphs to inherit) saves each
    # mutant the import (3 of its 16 s for a surviving service mutant here).
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
REAL_PHOTOS = REPO.parent / "shared" / "data" / "flowers5-128px"
TINY_COUNTS = {"train": 60, "val": 24, "test": 18}


@pytest.fixture(autouse=True)
def _run_tf_functions_eagerly_while_mutmut_maps_tests():
    """While mutmut maps tests to the functions they reach (MUTANT_UNDER_TEST=stats), run every tf.function eagerly.

    A tf.function runs its Python only when it traces; a test that reuses another test's trace (the augmentation's
    compiled pixel pass, MixUp/CutMix) would not be seen reaching the functions inside it, and would never be run
    against their mutants. Mutants themselves run compiled, as in training.
    """
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        yield
        return
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Demo data at 32 and 48 px: 60 train / 24 val / 18 test images in files of 20 records."""
    from training.data.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("tiny_data")
    make_demo_data(out, sizes=(32, 48), counts=dict(TINY_COUNTS), seed=3, records_per_file=20, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A whole two-epoch run of the small CNN at 32 px on the tiny demo data, its SavedModel converted for LiteRT at
    export (runtimes/model.tflite).

    Made once per session (it was once per module while every test of it lived in one file): tests read it or copy
    it before training on; the SavedModel parity test adds its parity.npz beside the run's files."""
    from tests.support import _train

    out = tmp_path_factory.mktemp("run") / "tiny"
    result = _train(tiny_data, out, "--set", "export.runtimes=litert")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def data_with_a_cut_record(tiny_data, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny data whose second training file lost the tail of its last record (record 19): the
    copy's folder and that file."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train_file = sorted((data / "tfrecords-jpeg-32x32" / "train").glob("*.tfrec"))[1]
    raw = train_file.read_bytes()
    train_file.write_bytes(raw[: len(raw) - 40])
    return data, train_file


@pytest.fixture
def real_photos() -> Path:
    """The shared real flower photos; the test is skipped where that folder is absent."""
    if not (REAL_PHOTOS / "manifest.csv").exists():
        pytest.skip(f"real photos not found at {REAL_PHOTOS} (they live in ../shared beside the repository)")
    return REAL_PHOTOS
