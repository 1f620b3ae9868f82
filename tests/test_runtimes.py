"""A runtime per member: `flower export` converts a run's pixel model (LiteRT, ONNX Runtime), and `flower serve` /
`flower predict --runtime` run it only when it answers as the SavedModel does; what is refused says why."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.errors import ConfigError
from core.files import sha256_file
from core.runtimes import RuntimeUnusable, parse_export_runtimes, saved_model_digest
from flower.commands.export import main as export_main
from flower.commands.predict import main as predict_main
from service.app import create_app
from service.predictor import load_ensemble, load_run
from service.runtimes import TOLERANCE
from service.settings import Settings
from testkit.artifacts import image_bytes, make_ensemble, make_run
from testkit.artifacts import photo as make_photo


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The two-member test ensemble (32 and 48 px), exported for LiteRT by `flower export ENSEMBLE` and its 32 px
    member for ONNX Runtime by `flower export RUN`; returns the ensemble directory, the statuses and what was
    printed."""
    root = tmp_path_factory.mktemp("runtimes")
    ens = make_ensemble(root)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        statuses = [export_main([str(ens), "--runtime", "litert"]),
                    export_main([str(root / "runs" / "m32"), "--runtime", "onnx"])]
    return ens, statuses, printed.getvalue().splitlines()


def _photos(count: int = 4) -> list[np.ndarray]:
    return [np.asarray(make_photo(50 + 7 * i, 40 + 5 * i, seed=i)) for i in range(count)]


def test_flower_export_converts_runs_and_records_the_saved_model_each_file_was_made_from(converted, tmp_path):
    ens, statuses, lines = converted
    assert statuses == [0, 0]
    for member, runtime, file in (("m32", "litert", "model.tflite"), ("m48", "litert", "model.tflite"),
                                  ("m32", "onnx", "model.onnx")):
        run = ens.parent / "runs" / member
        record = json.loads((run / "runtimes" / f"{runtime}.json").read_text())
        assert record["made_from"]["sha256"] == saved_model_digest(run / "saved_model")
        assert record["sha256"] == sha256_file(run / "runtimes" / file) and record["file"] == file
        assert any(line.startswith(f"wrote {run / 'runtimes' / file} (") for line in lines), lines
    assert not (ens.parent / "runs" / "m48" / "runtimes" / "model.onnx").exists()
    assert export_main([str(tmp_path), "--runtime", "litert"]) == 2  # neither a run nor an ensemble: one error line


def test_each_runtime_answers_as_tensorflow_with_tta_and_the_metadata_says_which_runs(converted):
    ens, _, _ = converted
    images = _photos()
    tensorflow = load_ensemble(ens)
    blended, members = tensorflow.predict(images)
    m32 = ens.parent / "runs" / "m32"
    onnx, with_tta = load_run(m32, tta=2, runtime="onnx"), load_run(m32, tta=2)
    assert onnx.members[0].runtime_choice.name == "onnx" and onnx.members[0].runtime_choice.difference <= TOLERANCE
    assert np.abs(onnx.predict(images)[0] - with_tta.predict(images)[0]).max() <= TOLERANCE
    assert np.abs(onnx.predict(images)[0] - members[0]).max() > 1e-3  # the TTA pass's pixels reach the runtime too
    files = [("files", (f"{i}.jpg", image_bytes(size=(60, 45), seed=i), "image/jpeg")) for i in range(3)]
    options = {"include_probabilities": "true"}
    with TestClient(create_app(Settings(ensemble=str(ens), runtime="auto"))) as client:  # loaded as `flower serve`
        info = client.get("/v1/models/flowers/metadata").json()["flower"]["members"]
        assert [m["runtime"]["name"] for m in info] == ["litert", "litert"]
        assert info[0]["runtime"]["requested"] == "auto" and info[0]["runtime"]["refused"] == {}
        assert 0 <= info[0]["runtime"]["max_difference"] <= TOLERANCE
        served = client.post("/v1/predict", files=files, data=options).json()["results"]
        auto = client.app.state.service.repository.latest("flowers").predictor
        assert all(member.runtime is not None for member in auto.members)
        got_blended, got_members = auto.predict(images)
        assert np.abs(got_blended - blended).max() <= TOLERANCE and np.abs(got_members - members).max() <= TOLERANCE
        squares = np.random.default_rng(5).uniform(0, 255, (11, 32, 32, 3)).astype(np.float32)  # chunks of 8 and 3
        for batch in (squares, squares[:8], squares[:1]):  # the interpreter resized from batch to batch
            assert np.abs(auto.members[0].pixels(batch) - tensorflow.members[0].pixels(batch)).max() <= TOLERANCE
    with TestClient(create_app(Settings(ensemble=str(ens)), tensorflow)) as client:
        expected = client.post("/v1/predict", files=files, data=options).json()["results"]
    for got, want in zip(served, expected, strict=True):
        assert np.abs(np.subtract(got["probabilities"], want["probabilities"])).max() <= TOLERANCE


def test_auto_falls_back_to_tensorflow_naming_why_and_a_named_runtime_that_is_missing_is_refused(
        converted, monkeypatch, caplog):
    ens, _, _ = converted
    run = ens.parent / "runs" / "m32"
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # the import fails, as when not installed
    predictor = load_run(run, runtime="auto")
    choice = predictor.members[0].runtime_choice
    assert choice.name == "onnx" and choice.refused == {
        "litert": "ai-edge-litert is not installed (pip install 'flower-ensemble[litert]')"}
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level(logging.WARNING, "service.runtimes"):
        predictor = load_run(run, runtime="auto")
    member = predictor.members[0]
    assert member.runtime is None and member.runtime_choice.name == "tensorflow"
    assert sorted(member.runtime_choice.refused) == ["litert", "onnx"]
    assert "member 'm32' runs on TensorFlow: litert refused: ai-edge-litert is not installed" in caplog.text
    with pytest.raises(RuntimeUnusable) as refused:
        load_run(run, runtime="litert")
    assert str(refused.value) == (f"member 'm32' ({run}): runtime 'litert' cannot be used: ai-edge-litert is not "
                                  "installed (pip install 'flower-ensemble[litert]')")


def test_a_converted_file_that_is_stale_tampered_or_answers_otherwise_is_refused_with_its_reason(converted, tmp_path):
    ens, _, _ = converted
    other = make_run(tmp_path, "other", 32, seed=7)  # the same size and classes as m32, other weights
    assert load_run(other, runtime="auto").members[0].runtime_choice.refused == {
        "litert": "runtimes/model.tflite not found (make it with: flower export RUN --runtime litert)",
        "onnx": "runtimes/model.onnx not found (make it with: flower export RUN --runtime onnx)"}
    shutil.copytree(ens.parent / "runs" / "m32" / "runtimes", other / "runtimes")  # m32's files beside other's model
    refused = load_run(other, runtime="auto").members[0].runtime_choice.refused
    assert refused["litert"] == ("runtimes/model.tflite was made from another SavedModel than the run's saved_model/ "
                                 "(re-exported since: stale; make it with: flower export RUN --runtime litert again)")
    record_file = other / "runtimes" / "litert.json"
    record = json.loads(record_file.read_text())
    record["made_from"]["sha256"] = saved_model_digest(other / "saved_model")  # a record that lies about its source
    record_file.write_text(json.dumps(record))
    with pytest.raises(RuntimeUnusable, match=r"runtime 'litert' cannot be used: its answers differ from "
                                              r"TensorFlow's by up to [0-9.e-]+ on the warm-up batch \(more than "
                                              r"0.0001\)$"):
        load_run(other, runtime="litert")
    with open(other / "runtimes" / "model.tflite", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RuntimeUnusable, match=r"runtimes/model.tflite is not the file its record describes "
                                              r"\(damaged or replaced;"):
        load_run(other, runtime="litert")


def test_flower_predict_on_litert_writes_tensorflows_rows_and_a_refused_runtime_is_one_error_line(
        converted, tmp_path, capsys):
    ens, _, _ = converted
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(image_bytes(size=(70 + i, 50), seed=20 + i))
    rows = {}
    for runtime in ("litert", "tensorflow"):
        out = tmp_path / f"{runtime}.csv"
        assert predict_main([str(ens), str(folder), "--out", str(out), "--probabilities", "--runtime", runtime]) == 0
        with open(out, newline="") as f:
            rows[runtime] = [[float(row[name]) for name in json.loads((ens / "ensemble.json").read_text())["classes"]]
                             for row in csv.DictReader(f)]
    assert "member m32: litert (answers within " in capsys.readouterr().err
    assert np.abs(np.subtract(rows["litert"], rows["tensorflow"])).max() <= TOLERANCE
    bare = make_run(tmp_path, "bare", 32, seed=3)
    assert predict_main([str(bare), str(folder), "--out", str(tmp_path / "x.csv"), "--runtime", "onnx"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: member 'bare' ({bare}): runtime 'onnx' cannot be used: runtimes/model.onnx not found "
                   "(make it with: flower export RUN --runtime onnx)\n")
    assert not (tmp_path / "x.csv").exists()


def test_export_runtimes_names_known_runtimes_and_a_missing_converter_is_refused_before_training(monkeypatch):
    assert parse_export_runtimes("litert") == ("litert",)
    assert parse_export_runtimes("onnx, litert") == ("onnx", "litert")
    assert parse_export_runtimes("none") == ()
    for bad in ("tflite", "litert,litert", "", "none,litert"):
        with pytest.raises(ConfigError, match=f"export.runtimes must be 'none' or runtimes from .*, got {bad!r}"):
            parse_export_runtimes(bad)
    import importlib.util

    from training.fit.runtimes import check_converters

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    check_converters(("litert",))  # TensorFlow's own converter
    with pytest.raises(ConfigError, match=r"^converting to onnx needs tf2onnx, which is not installed: pip install "
                                          r"'flower-ensemble\[onnx\]' \(or leave onnx out of export.runtimes\)$"):
        check_converters(("litert", "onnx"))


def test_a_conversion_that_fails_at_the_end_of_training_is_one_warning_and_the_run_stays_complete(tmp_path):
    from training.fit.runtimes import export_runtimes

    lines: list[str] = []
    assert export_runtimes(tmp_path, ("litert",), lines.append) == []  # no SavedModel to convert
    assert lines == [f"warning: the SavedModel was not converted to litert (DataError: {tmp_path} holds no SavedModel "
                     f"(saved_model/saved_model.pb) to convert); it serves on TensorFlow, and `flower export "
                     f"{tmp_path} --runtime litert` tries again"]
    assert not (tmp_path / "runtimes").exists()


def test_a_member_on_a_runtime_sends_the_plain_and_every_tta_pass_to_it_and_never_to_tensorflow():
    from pathlib import Path

    from service.predictor import MemberModel

    seen: list[np.ndarray] = []

    def runtime(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.full((len(batch), 3), 1 / 3, np.float32)

    member = MemberModel("m", Path("."), 12, predict_pixels=None)  # no TensorFlow signature to fall back on
    member.runtime = runtime
    member._augment = lambda batch, seed: batch[:, :, ::-1] + float(seed[0])  # a stand-in pass k: flip, add 1 + k
    images = [np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8) for i in range(2)]
    assert member.probabilities(images, tta=3).shape == (2, 3)
    squares = np.stack(images).astype(np.float32)
    assert [batch.shape for batch in seen] == [(2, 12, 12, 3)] * 3 and seen[0].dtype == np.float32
    np.testing.assert_array_equal(seen[0], squares)  # the plain pass: the squares
    for k in (1, 2):  # each TTA pass: its augmented pixels, made by TensorFlow code, go to the runtime
        np.testing.assert_array_equal(seen[k], squares[:, :, ::-1] + 1 + k)
