"""One epoch of the training loop in this process (tests/test_run.py, test_resume.py and test_distributed.py train
in subprocesses, which mutation testing cannot attribute): what an epoch writes, scores and logs, and how a
non-finite loss stops it."""

from __future__ import annotations

import csv
import json
import shutil
import time
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from core.errors import DataError
from tests.conftest import TINY_COUNTS
from training.config import load_config
from training.fit.checkpoints import EpochState, latest_checkpoint
from training.fit.evaluation import classification_scores
from training.fit.export import predict_split
from training.fit.loop import Budget, prepare_run, run_epoch
from training.fit.schedules import learning_rate


def _config(tiny_data, out, **settings):
    """The small CNN at 32 px on the tiny demo data, two epochs."""
    return load_config(None, {"data.dir": str(tiny_data), "output": str(out), "name": "tiny", "data.image_size": 32,
                              "data.batch_size": 16, "train.epochs": 2, "train.eval_batch_size": 32,
                              "predict.tta": 1, "data.deterministic": True, "export.runtimes": "none", **settings})


def test_an_epoch_trains_scores_the_whole_validation_split_checkpoints_and_logs(tiny_data, tmp_path, capsys):
    config = _config(tiny_data, tmp_path / "run", **{"schedule.kind": "cosine", "schedule.warmup_epochs": 1})
    lines: list[str] = []
    run = prepare_run(config, lines.append)
    state = EpochState.fresh(run.policy, run.replicas)
    before = [w.numpy().copy() for w in run.model.trainable_weights]
    capsys.readouterr()
    val_seconds = run_epoch(run, 0, state, lines.append)
    assert capsys.readouterr().out == ""  # the log is the only output: no Keras progress bar beside it
    assert val_seconds > 0
    assert int(run.optimizer.iterations.numpy()) == run.steps  # one epoch of steps, not more
    assert f"  epoch 1/2 step {run.steps}/{run.steps} loss {state.history[0]['loss']:.4f} (" in "\n".join(lines)
    assert any(np.abs(a - b.numpy()).max() > 0 for a, b in zip(before, run.model.trainable_weights, strict=True))
    row = state.history[0]
    lr = learning_rate(config.schedule, 0, 2, run.replicas, config.model.unfreeze_epoch)
    assert row["epoch"] == 1 and row["learning_rate"] == lr and np.isfinite(row["loss"]) and row["seconds"] > 0
    assert float(run.optimizer.learning_rate.numpy()) == pytest.approx(lr)
    _, labels, probs = predict_split(run.model, run.infos["val"], 32, 32, num_classes=len(run.classes))
    assert len(labels) == run.infos["val"].count  # the whole split, not a sample
    scores = classification_scores(labels, probs)
    assert row["val_macro_f1"] == pytest.approx(scores["macro_f1"]) and row["val_loss"] == pytest.approx(scores["loss"])
    assert row["val_accuracy"] == pytest.approx(scores["accuracy"])
    assert state.epoch == 1 and state.best_f1 == row["val_macro_f1"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "epoch-0001"
    assert (checkpoints / "epoch-0001" / "state.json").read_text() == state.to_json()
    assert json.loads((checkpoints / "epoch-0001" / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict()))
    assert (checkpoints / "best.weights.h5").is_file()
    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["val_macro_f1"]) == pytest.approx(row["val_macro_f1"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    epoch_line = next(line for line in lines if line.startswith("epoch 1/2: "))
    assert f"lr {lr:.2e} loss {row['loss']:.4f} " in epoch_line and "(best)" in epoch_line
    assert f"val_macro_f1 {row['val_macro_f1']:.4f}" in epoch_line and epoch_line.endswith(" img/s]")
    # A second epoch that does not beat the best keeps the best weights file as it was.
    best = (checkpoints / "best.weights.h5").read_bytes()
    state.best_f1 = 2.0  # nothing can beat it
    run_epoch(run, 1, state, lines.append)
    assert state.epoch == 2 and len(state.history) == 2 and state.best_f1 == 2.0
    assert int(run.optimizer.iterations.numpy()) == 2 * run.steps  # the second epoch trained once, from where it was
    second = learning_rate(config.schedule, 1, 2, run.replicas, config.model.unfreeze_epoch)
    assert state.history[1]["learning_rate"] == second != lr  # after the warm-up epoch the schedule moves on
    assert (checkpoints / "best.weights.h5").read_bytes() == best
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.weights.h5", "epoch-0002"]
    assert "(best)" not in next(line for line in lines if line.startswith("epoch 2/2: "))


def test_a_non_finite_loss_stops_before_the_epoch_is_saved_and_says_what_to_change(tiny_data, tmp_path):
    run = prepare_run(_config(tiny_data, tmp_path / "run"), lambda _: None)
    run.model.fit = lambda *args, **kwargs: SimpleNamespace(history={"loss": [float("nan")]})
    state = EpochState.fresh(run.policy, run.replicas)
    with pytest.raises(ValueError) as stopped:
        run_epoch(run, 0, state, lambda _: None)
    assert str(stopped.value) == ("epoch 1: the training loss is nan: stopping before this epoch is saved (the "
                                  "checkpoint of epoch 0 stands); lower schedule.max (now 0.001) or make the augment "
                                  "options milder, then rerun")
    assert state == EpochState.fresh(run.policy, run.replicas)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_time_budget_reserves_the_longest_epoch_and_the_final_predictions(monkeypatch):
    import training.fit.loop as fit

    now = {"t": 1000.0}
    monkeypatch.setattr(fit.time, "monotonic", lambda: now["t"])
    infos = {"val": SimpleNamespace(count=20), "test": SimpleNamespace(count=30)}
    run = SimpleNamespace(infos=infos, config=SimpleNamespace(predict=SimpleNamespace(tta=2)))
    budget = Budget(600.0, started=now["t"])
    assert not budget.exhausted()  # nothing measured yet
    budget.record(100.0, 10.0, run)
    budget.record(150.0, 10.0, run)
    assert budget.finish == 10.0 * 2 * (1 + 30 / 20) + 30.0  # val and test, each pass, plus the export
    now["t"] += 600.0 - 150.0 - 80.0 - 0.5  # elapsed + the longest epoch + the finish: just inside 600 s
    assert not budget.exhausted()
    now["t"] += 1.0
    assert budget.exhausted()
    assert not Budget(0.0, epochs=[1e9]).exhausted()  # no budget: never exhausted
    exact = Budget(600.0, started=0.0, epochs=[150.0], finish=80.0)
    now["t"] = 370.0
    assert not exact.exhausted()  # the next epoch and the finish end exactly at the budget: still fits
    one = Budget(600.0)
    one.record(10.0, 4.0, SimpleNamespace(infos={"val": SimpleNamespace(count=1), "test": SimpleNamespace(count=3)},
                                          config=SimpleNamespace(predict=SimpleNamespace(tta=1))))
    assert one.finish == 4.0 * (1 + 3) + 30.0  # a validation split of one image: the test split is 3 of its passes


def _progress_lines(monkeypatch, steps: int, calls: list[int], logs=None) -> list[str]:
    """What StepProgress prints for epoch 3 of 5 (batch 8) when Keras reports after the given 0-based steps,
    each half a second after the last."""
    import training.fit.loop as fit

    now = {"t": 50.0}
    monkeypatch.setattr(fit.time, "perf_counter", lambda: now["t"])
    lines: list[str] = []
    progress = fit.StepProgress(2, 5, steps, 8, lines.append)
    progress.on_epoch_begin(2)
    for i, batch in enumerate(calls):
        now["t"] = 50.0 + 0.5 * (i + 1)
        progress.on_train_batch_end(batch, {"loss": 1.0 / (batch + 1)} if logs is None else logs)
    return lines


def test_progress_is_printed_about_ten_times_an_epoch_with_its_running_loss_and_rate(monkeypatch):
    lines = _progress_lines(monkeypatch, 25, list(range(25)))  # every 2nd step, and the last
    steps = [*range(2, 25, 2), 25]
    assert lines == [f"  epoch 3/5 step {s}/25 loss {1.0 / s:.4f} ({s * 8 / (0.5 * s):.0f} img/s)" for s in steps]
    assert _progress_lines(monkeypatch, 3, [0, 1, 2])[0] == "  epoch 3/5 step 1/3 loss 1.0000 (16 img/s)"
    assert len(_progress_lines(monkeypatch, 3, [0, 1, 2])) == 3  # fewer than ten steps: every step
    # With steps_per_execution 4 Keras reports every 4th step: a line whenever a tenth of the epoch was crossed.
    lines = _progress_lines(monkeypatch, 100, [*range(3, 100, 4)])
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [12, 20, 32, 40, 52, 60, 72, 80, 92, 100]
    assert _progress_lines(monkeypatch, 1, [0], logs={}) == ["  epoch 3/5 step 1/1 loss nan (16 img/s)"]


class FakeClock:
    """training.fit.loop's `time` module with a perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.monotonic = time.monotonic

    def perf_counter(self) -> float:
        return self.now


def _stub_epoch(monkeypatch, run, clock: FakeClock, fit_seconds: float = 12.3456, val_seconds: float = 3.25,
                loss: float = 0.25) -> list[dict]:
    """Replace the model's fit and the validation predictions by stand-ins that take the given (fake) seconds;
    the stand-in predictions are right for every image. Returns the keyword arguments of each fit call."""
    import training.fit.loop as fit

    monkeypatch.setattr(fit, "time", clock)
    calls: list[dict] = []

    def fake_fit(data, **kwargs):
        calls.append(kwargs)
        clock.now += fit_seconds
        return SimpleNamespace(history={"loss": [loss]})

    def fake_predict(model, info, size, batch, num_classes):
        clock.now += val_seconds
        labels = np.arange(info.count) % num_classes
        return np.array([str(i) for i in labels]), labels, np.eye(num_classes, dtype=np.float32)[labels]

    run.model.fit = fake_fit
    monkeypatch.setattr(fit, "predict_split", fake_predict)
    return calls


def test_an_epochs_time_and_its_validation_time_are_measured_apart(tiny_data, tmp_path, monkeypatch):
    lines: list[str] = []
    run = prepare_run(_config(tiny_data, tmp_path / "run"), lines.append)
    calls = _stub_epoch(monkeypatch, run, FakeClock())
    state = EpochState.fresh(run.policy, run.replicas)
    assert run_epoch(run, 0, state, lines.append) == pytest.approx(3.25)  # what the time budget reserves per pass
    assert [(c["initial_epoch"], c["epochs"], c["steps_per_epoch"]) for c in calls] == [(0, 1, run.steps)]
    row = state.history[0]
    assert row["seconds"] == 12.35 and row["loss"] == 0.25 and row["val_macro_f1"] == 1.0
    rate = run.steps * run.global_batch / 12.3456
    assert lines[-1].endswith(f"val_macro_f1 1.0000 (best) [12.3 s, {rate:.0f} img/s]")
    state.best_f1 = 1.0  # equalled, not beaten: the best weights stay those of the earlier epoch
    (tmp_path / "run" / "checkpoints" / "best.weights.h5").unlink()
    run_epoch(run, 1, state, lines.append)
    assert not (tmp_path / "run" / "checkpoints" / "best.weights.h5").exists()
    assert lines[-1].endswith(f"val_macro_f1 1.0000 [12.3 s, {rate:.0f} img/s]")


def test_the_epoch_at_model_unfreeze_epoch_switches_what_trains_with_a_fresh_optimizer(tiny_data, tmp_path,
                                                                                        monkeypatch):
    from training.models.model import _layers_of, features_of, parameter_counts

    config = _config(tiny_data, tmp_path / "run", **{"model.trainable": "head", "model.unfreeze_epoch": 1,
                                                       "train.epochs": 3, "model.batch_norm": "frozen"})
    lines: list[str] = []
    run = prepare_run(config, lines.append)
    _stub_epoch(monkeypatch, run, FakeClock())
    state = EpochState.fresh(run.policy, run.replicas)
    head = parameter_counts(run.model)
    first = run.optimizer
    run_epoch(run, 0, state, lines.append)
    assert run.trainable == "head" and run.optimizer is first and not any("now training" in line for line in lines)
    run_epoch(run, 1, state, lines.append)
    counts = parameter_counts(run.model)
    assert run.trainable == "all" and run.optimizer is not first and counts["trainable"] > head["trainable"]
    assert f"now training all: {counts['trainable']:,} trainable parameters, frozen {counts['frozen']:,}" in lines
    layers = _layers_of(features_of(run.model))
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert norms and convs and all(c.trainable for c in convs) and not any(n.trainable for n in norms)  # batch_norm
    scaled = learning_rate(config.schedule, 1, 3, run.replicas, 1)  # from the unfreeze epoch on: x unfreeze_scale
    assert state.history[1]["learning_rate"] == scaled == pytest.approx(
        learning_rate(config.schedule, 1, 3, run.replicas, 0) * config.schedule.unfreeze_scale)
    assert float(run.optimizer.learning_rate.numpy()) == pytest.approx(scaled)
    # A resumed run is built in its checkpoint's phase: epoch 1's in the first, epoch 2's in the second.
    assert prepare_run(config, lines.append, start_epoch=1).trainable == "head"
    assert prepare_run(config, lines.append, start_epoch=2).trainable == "all"


def test_a_corrupt_training_record_found_inside_fit_is_named_and_nothing_is_saved(data_with_a_cut_record, tmp_path):
    data, train_file = data_with_a_cut_record
    run = prepare_run(_config(data, tmp_path / "run"), lambda _: None)
    state = EpochState.fresh(run.policy, run.replicas)
    with pytest.raises(DataError) as found:
        run_epoch(run, 0, state, lambda _: None)
    assert str(found.value).startswith(f"{train_file}: record 19 is corrupt")
    assert state == EpochState.fresh(run.policy, run.replicas) and not (tmp_path / "run" / "checkpoints").exists()


def test_a_graph_error_that_no_record_explains_is_reported_with_its_reason(tiny_data, tmp_path):
    run = prepare_run(_config(tiny_data, tmp_path / "run"), lambda _: None)

    def failing_fit(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "Graph execution error:\n\nlogits and labels must match")

    run.model.fit = failing_fit
    with pytest.raises(DataError) as failed:
        run_epoch(run, 1, EpochState(epoch=1, best_f1=-1.0, history=[], precision=run.policy, replicas=1),
                  lambda _: None)
    assert str(failed.value) == "epoch 2: training failed: logits and labels must match"


def _state(epoch: int) -> EpochState:
    return EpochState(epoch=epoch, best_f1=0.5, history=[], precision="float32", replicas=2)


def test_each_epochs_batches_come_from_the_runs_data_settings_and_the_epochs_seed(monkeypatch):
    import training.fit.loop as fit
    from imaging.augment_config import AugmentConfig

    seen: list[tuple] = []
    monkeypatch.setattr(fit, "train_dataset", lambda *args, **kwargs: seen.append((args, kwargs)) or "batches")
    monkeypatch.setattr(fit, "worker_index", lambda: 2)
    monkeypatch.setattr(fit, "worker_count", lambda: 3)
    data = SimpleNamespace(image_size=24, shuffle_buffer=17, deterministic=True)
    augment = AugmentConfig()
    config = SimpleNamespace(data=data, augment=augment, train=SimpleNamespace(seed=5))
    run = SimpleNamespace(config=config, fit_splits=["train", "val"], global_batch=12, classes=list("abcd"),
                          shard="file", targets=None)
    assert fit.Run.epoch_data(run, 3) == "batches"
    assert seen == [((["train", "val"], 24, 12), {
        "num_classes": 4, "augment": augment, "seed": fit.epoch_seed(5, 3), "shuffle_buffer": 17,
        "deterministic": True, "shard": "file", "worker": (2, 3), "targets": None})]


def test_a_run_is_prepared_from_its_data_and_settings_and_says_what_it_found(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "import_report.json").write_text(json.dumps({"fit": "pad"}))
    settings = {"train.weight_decay": 0.03, "train.steps_per_execution": 2, "train.mixed_precision": "off"}
    lines: list[str] = []
    run = prepare_run(_config(data, tmp_path / "run", **settings), lines.append)
    assert run.policy == "float32" and any(line.startswith("precision policy: float32 (") for line in lines)
    assert (f"data: {data} records 32px -> model 32px; train 60, val 24, test 18; fitting on train (60 images); "
            f"6 classes; global batch 16, 3 steps/epoch, 2 per execution") in lines
    assert (run.geometry["fit"], run.geometry["from"]) == ("pad", str(data / "import_report.json"))
    assert f"photos become squares by pad (from {data / 'import_report.json'}), as the service will make them" in lines
    assert run.optimizer.weight_decay == pytest.approx(0.03) and run.model.steps_per_execution == 2
    # Defaults: one step per execution off a TPU; data.fit, when set, wins over the report; train+val.
    lines.clear()
    both = prepare_run(_config(data, tmp_path / "run", **{"data.fit": "stretch", "data.train_on_val": True}),
                       lines.append)
    assert (f"data: {data} records 32px -> model 32px; train 60, val 24, test 18; fitting on train+val (84 images); "
            f"6 classes; global batch 16, 5 steps/epoch, 1 per execution") in lines
    assert (both.geometry["fit"], both.geometry["from"]) == ("stretch", "data.fit")
    assert both.model.steps_per_execution == 1
    # The model follows model.*: the record size as its input, the dropout, the batch norm mode, a weights file.
    from training.models.backbones import build_backbone
    from training.models.model import features_of

    saved = next(layer for layer in build_backbone("small-cnn", 32).layers if isinstance(layer, keras.Model))
    for i, weight in enumerate(saved.weights):  # values no initializer draws
        weight.assign(np.full(weight.shape, 0.01 * (i + 1), "float32"))
    saved.save_weights(tmp_path / "backbone.weights.h5")  # the backbone's own weights, as a downloaded file holds
    model = prepare_run(_config(data, tmp_path / "run", **{
        "model.weights": str(tmp_path / "backbone.weights.h5"), "model.dropout": 0.37,
        "model.batch_norm": "frozen"}), lines.append).model
    assert model.input_shape == (None, 32, 32, 3)
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.37]
    core = next(layer for layer in features_of(model).layers if isinstance(layer, keras.Model))
    for got, want in zip(core.weights, saved.weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    norms = [layer for layer in core.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
    # data.file_size picks the records of another size; one worker on one host reads every batch itself.
    lines.clear()
    bigger = prepare_run(_config(data, tmp_path / "run", **{"data.file_size": 48}), lines.append)
    assert any(line.startswith(f"data: {data} records 48px -> model 32px; ") for line in lines)
    assert bigger.shard == "off" and not any("TPU hosts" in line for line in lines)
    # Fewer images than one global batch: still one step an epoch.
    assert prepare_run(_config(data, tmp_path / "run", **{"data.batch_size": 128}), lines.append).steps == 1


def test_last_n_blocks_must_exist_in_the_backbone(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path / "run", **{"model.trainable": "last:4"})
    assert prepare_run(config, lambda _: None).trainable == "last:4"  # small-cnn has 4 blocks: all of them
    with pytest.raises(ValueError) as refused:
        prepare_run(_config(tiny_data, tmp_path / "run", **{"model.trainable": "last:5"}), lambda _: None)
    assert str(refused.value) == "model.trainable='last:5' but the backbone has only 4 blocks"
    unfreeze = {"model.trainable": "head", "model.unfreeze": "last:12", "model.unfreeze_epoch": 1}
    with pytest.raises(ValueError) as refused:
        prepare_run(_config(tiny_data, tmp_path / "run", **unfreeze), lambda _: None)
    assert str(refused.value) == "model.unfreeze='last:12' but small-cnn has only 4 blocks"
    last_4 = {**unfreeze, "model.unfreeze": "last:4"}
    assert prepare_run(_config(tiny_data, tmp_path / "run", **last_4), lambda _: None).trainable == "head"
    assert not (tmp_path / "run").exists()


def test_workers_compare_their_resume_epoch_and_their_config_less_its_paths(monkeypatch):
    import training.fit.loop as fit

    compared: list[int] = []
    differs: set[int] = set()
    strategy = object()  # the run's strategy: the collective runs over its workers

    def same_on_every_worker(over, value):
        assert over is strategy
        compared.append(value)
        return value not in differs

    monkeypatch.setattr(fit, "same_on_every_worker", same_on_every_worker)

    def digest_of(settings: dict) -> int:
        compared.clear()
        config = load_config(None, {"data.dir": "/data", "output": "/out", "name": "a", **settings})
        fit.check_workers_agree(SimpleNamespace(strategy=strategy, policy="float32"), config, _state(3))
        assert compared[0] == 3  # the epoch each worker resumes after
        return compared[1]

    same = digest_of({})
    assert 0 <= same < 2 ** 20  # what same_on_every_worker can compare
    # The name, the output folder, the data folder and how long a worker waits for the others may differ between
    # machines; anything else may not.
    assert digest_of({"name": "b", "output": "/mnt/out", "data.dir": "/mnt/data"}) == same
    assert digest_of({"train.cluster_timeout_seconds": 30}) == same
    assert digest_of({"train.epochs": 7}) != same and digest_of({"data.image_size": 96}) != same
    run = SimpleNamespace(strategy=strategy, policy="float32")
    config = load_config(None, {"data.dir": "/data", "output": "/out", "name": "a"})
    differs.add(same)
    with pytest.raises(ValueError) as refused:
        fit.check_workers_agree(run, config, _state(3))
    assert str(refused.value) == (f"the workers disagree on the config (this one: epoch 3 from {config.run_dir}, "
                                  f"config digest {same:05x}): start every worker with the same command, its output "
                                  "on storage all of them share")
    differs.clear()
    differs.add(3)
    with pytest.raises(ValueError, match=r"^the workers disagree on the epoch they resume after \(this one: epoch 3 "):
        fit.check_workers_agree(run, config, _state(3))
    differs.clear()
    compared.clear()
    fit.check_workers_agree(SimpleNamespace(strategy=strategy, policy="mixed_bfloat16"), config, _state(3))
    assert compared[0] == 3 and compared[1] != same  # another precision policy is another setup


def test_a_refit_whose_validation_source_blend_would_refuse_is_refused_before_the_first_step(tiny_data, tmp_path):
    from core.errors import ConfigError
    from core.members import write_member
    from testkit.synthetic import write_run_dir
    from training.data.demo_data import KINDS
    from training.fit.loop import train_member

    def source(name, classes, rows=TINY_COUNTS["val"]):
        ids, labels = np.array([f"v{i}" for i in range(rows)]), np.arange(rows) % len(classes)
        probs = np.full((rows, len(classes)), 1 / len(classes), np.float32)
        return write_run_dir(tmp_path / name, name, classes, ids, labels, probs, ids[:2], probs[:2])

    kinds = [k.name for k in KINDS]
    refused_on_val = source("on-val", kinds)
    write_member(refused_on_val, {"name": "on-val", "config": {"data": {"train_on_val": True}}})
    unreadable = source("unreadable", kinds)
    (unreadable / "member.json").write_text("{")
    for run, message in ((source("other-classes", ["a", "b"]), "its classes differ from those of .*other-classes "
                                                                r"\(6 vs 2 classes; class 0 is 'red five-petal' here"),
                         (source("other-data", kinds, rows=5), "holds 5 validation rows, the data's validation "
                                                               f"split {TINY_COUNTS['val']}"),
                         (refused_on_val, "on-val was trained on its validation rows too"),
                         (unreadable, r"member\.json is not valid JSON .*unreadable/member\.json"),
                         (tmp_path / "nowhere", "nowhere is not a run directory")):
        out = tmp_path / "refit"
        config = load_config(None, {"data.dir": str(tiny_data), "output": str(out), "data.image_size": 32,
                                    "data.train_on_val": True, "data.validation_from": str(run)})
        with pytest.raises(ConfigError, match=f"data.validation_from='{run}': .*{message}"):
            train_member(config, log=lambda line: None)
        assert not out.exists()
