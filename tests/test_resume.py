"""Stopping and resuming training: a killed run resumes exactly, a NaN loss stops at the last good epoch,
truncated or missing data is named, checkpoints restore weights, optimizer state and the epoch (and survive a
kill mid-write), checkpoints of another model, config or precision are refused, the time budget, a refit on
train+val, and steps_per_execution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests.conftest import REPO
from tests.support import TINY_RUN, _train, _weights
from training.config import load_config
from training.models.model import build_classifier


def test_a_killed_run_resumes_exactly_where_it_stopped(tiny_data, tiny_run, tmp_path):
    out = tmp_path / "killed"
    first = _train(tiny_data, out, kill_after=1)
    assert first.returncode == -9  # SIGKILL right after epoch 1's checkpoint
    assert json.loads((out / "checkpoints" / "epoch-0001" / "state.json").read_text())["epoch"] == 1
    assert not (out / "member.json").exists()
    second = _train(tiny_data, out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch 1" in second.stdout
    assert "epoch 1/2:" not in second.stdout and "epoch 2/2:" in second.stdout
    epochs = [line.split(",")[0] for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2"]
    # The resumed run is the uninterrupted one: same weights, optimizer state, history and predictions.
    resumed = _weights(out / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    whole = _weights(tiny_run / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert resumed.keys() == whole.keys() and len(resumed) > 4
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)
    assert any("optimizer" in name for name in whole)  # the weights file holds the optimizer's moments too
    losses = [[row.split(",")[2:6] for row in (run / "history.csv").read_text().splitlines()[1:]]
              for run in (out, tiny_run)]
    assert losses[0] == losses[1]
    for split in ("val", "test"):
        with np.load(out / "predictions" / f"{split}.npz") as a, \
                np.load(tiny_run / "predictions" / f"{split}.npz") as b:
            np.testing.assert_array_equal(a["probs"], b["probs"])


NAN_RUN = textwrap.dedent("""
    # The train command with a loss that turns NaN at epoch 2 (as a too-high learning rate would).
    import sys
    import tensorflow as tf
    import training.fit.loop as fit
    from flower.commands.train import main
    made = fit.make_loss
    def make_loss(config, weights):
        loss = made(config, weights)
        step = tf.Variable(0.0)
        def poisoned(y, p):
            step.assign_add(1.0)
            return loss(y, p) * tf.where(step > 3.0, float("nan"), 1.0)  # 3 steps per epoch
        return poisoned
    fit.make_loss = make_loss
    sys.exit(main(sys.argv[1:]))
""")


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_epoch(tiny_data, tmp_path):
    out = tmp_path / "nan"
    result = subprocess.run([sys.executable, "-c", NAN_RUN, "--set", f"data.dir={tiny_data}", "--set", f"output={out}",
                             *TINY_RUN], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: epoch 2: the training loss is nan: stopping before this epoch is saved (the checkpoint of " \
           "epoch 1 stands)" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.weights.h5", "epoch-0001"]
    assert not (out / "member.json").exists() and not (out / "saved_model").exists()
    assert not (out / "predictions").exists()


def test_a_truncated_training_file_is_named_not_a_graph_error(data_with_a_cut_record, tmp_path):
    data, train_file = data_with_a_cut_record
    result = _train(data, tmp_path / "out")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {train_file}: record 19 is corrupt" in result.stderr and "Traceback" not in result.stderr


def test_bad_data_fails_with_a_clear_message(tmp_path):
    result = _train(tmp_path / "nothing", tmp_path / "out")
    assert result.returncode == 2
    assert "error: data folder not found" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_restores_weights_optimizer_state_and_the_epoch(tmp_path):
    from training.fit.checkpoints import EpochState
    from training.fit.loop import load_checkpoint, save_checkpoint

    def model_and_optimizer(seed):
        keras.utils.set_random_seed(seed)
        model = build_classifier("small-cnn", 16, 3, dropout=0.0)
        optimizer = keras.optimizers.AdamW(learning_rate=1e-2)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy")
        return model, optimizer

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    trained, optimizer = model_and_optimizer(1)
    trained.fit(x, y, epochs=2, batch_size=4, verbose=0)
    row = {"epoch": 1, "learning_rate": 0.01, "loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5, "val_macro_f1": 0.5,
           "seconds": 1.0}
    saved = EpochState(epoch=2, best_f1=0.5, history=[row], precision="float32", replicas=1)
    save_checkpoint(tmp_path, trained, optimizer, saved, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]
    fresh, fresh_optimizer = model_and_optimizer(2)
    logs = []
    state = load_checkpoint(tmp_path, fresh, fresh_optimizer, logs.append)
    assert state == saved
    assert logs == ["resuming after epoch 2 (best validation macro F1 so far 0.5000)"]
    for a, b in zip(trained.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(fresh_optimizer.iterations.numpy()) == 4
    for a, b in zip(optimizer.variables, fresh_optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # One more step from the restored state equals one more step of the original.
    trained.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    fresh.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(trained.weights, fresh.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
    assert load_checkpoint(tmp_path / "none", fresh, fresh_optimizer, logs.append) is None


def test_every_epoch_sees_its_own_data_and_dropout_seeds():
    from training.fit.loop import epoch_seed, reseed_layers

    seeds = {epoch_seed(0, e) for e in range(50)} | {epoch_seed(1, e) for e in range(50)}
    assert len(seeds) == 100 and epoch_seed(3, 7) == epoch_seed(3, 7)
    model = build_classifier("small-cnn", 16, 3, dropout=0.5)
    x = np.full((1, 16, 16, 3), 100.0, np.float32)

    def masks():
        return [model(x, training=True).numpy() for _ in range(2)]

    reseed_layers(model, 5)
    first = masks()
    reseed_layers(model, 5)
    again = masks()
    reseed_layers(model, 6)
    other = masks()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first, other)


def _epoch_state(epoch: int):
    from training.fit.checkpoints import EpochState

    return EpochState(epoch=epoch, best_f1=epoch / 10, history=[], precision="float32", replicas=1)


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_epoch_whole(tmp_path, monkeypatch):
    import training.fit.checkpoints as checkpoints

    keras.utils.set_random_seed(0)
    model = build_classifier("small-cnn", 16, 3, dropout=0.0)
    optimizer = keras.optimizers.AdamW(1e-3)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(1), {})
    first = _weights(tmp_path / "epoch-0001" / "weights.weights.h5")
    model.get_layer("probabilities").bias.assign([9.0, 9.0, 9.0])

    def killed(path, text):  # the process dies while writing epoch 2's state.json
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoints, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(2), {})
    monkeypatch.undo()
    assert checkpoints.latest_checkpoint(tmp_path).name == "epoch-0001"
    fresh = build_classifier("small-cnn", 16, 3, dropout=0.0)
    fresh_optimizer = keras.optimizers.AdamW(1e-3)
    fresh.compile(optimizer=fresh_optimizer, loss="categorical_crossentropy")
    state = checkpoints.load_checkpoint(tmp_path, fresh, fresh_optimizer, log=lambda _: None)
    assert state.epoch == 1
    restored = {v.path: v.numpy() for v in fresh.weights}
    assert not np.allclose(restored["probabilities/bias"], 9.0)  # epoch 1's weights, not the half-written epoch 2
    for name, value in first.items():
        if name.endswith("bias") and "probabilities" in name:
            np.testing.assert_array_equal(value, restored["probabilities/bias"])
    checkpoints.save_checkpoint(tmp_path, model, optimizer, _epoch_state(2), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]  # the leftover .tmp folder is gone


def test_a_checkpoint_of_another_model_is_refused_with_advice(tiny_data, tiny_run, tmp_path):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(tiny_run / "checkpoints", out / "checkpoints")
    result = _train(tiny_data, out, "--set", "model.backbone=efficientnet-b0")
    assert result.returncode == 2
    assert "model.backbone: 'small-cnn' -> 'efficientnet-b0'" in result.stderr
    (out / "checkpoints" / "epoch-0002" / "config.json").unlink()  # a checkpoint that does not say its config
    result = _train(tiny_data, out, "--set", "model.backbone=efficientnet-b0")
    assert result.returncode == 2
    assert "does not fit this model" in result.stderr and f"remove {out / 'checkpoints'}" in result.stderr


def test_resuming_with_another_config_is_refused_before_anything_is_written(tiny_data, tiny_run, tmp_path):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(tiny_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = _train(tiny_data, out, "--set", "data.image_size=48", "--set", "model.dropout=0.5")
    assert result.returncode == 2
    assert "data.image_size: 32 -> 48" in result.stderr and "model.dropout: 0.2 -> 0.5" in result.stderr
    assert "remove" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    longer = _train(tiny_data, out, "--set", "train.epochs=3", "--set", "predict.tta=1")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resuming after epoch 2" in longer.stdout and "epoch 3/3:" in longer.stdout


def test_config_changes_name_every_option_that_matters_and_ignore_the_safe_ones(tmp_path):
    from training.fit.checkpoints import check_resumable, config_changes, latest_checkpoint

    base = load_config(None, {"output": str(tmp_path / "run")}).to_dict()
    changed = load_config(None, {"output": str(tmp_path / "elsewhere"), "name": "renamed", "train.epochs": 20,
                                 "train.eval_batch_size": 8, "predict.tta": 4, "predict.tta_seed": 3}).to_dict()
    assert config_changes(base, changed) == []  # only options that are safe to change on a resume
    other = load_config(None, {"data.image_size": 96, "augment.erase_area": [0.1, 0.3],
                               "schedule.max": 0.01}).to_dict()
    assert config_changes(base, other) == ["augment.erase_area: (0.02, 0.2) -> (0.1, 0.3)",
                                           "data.image_size: 64 -> 96", "schedule.max: 0.001 -> 0.01"]
    assert config_changes({"a": {"b": [1, 2]}}, {"a": {"b": (1, 2)}}) == []  # JSON lists equal tuples
    assert config_changes({"a": {"b": 1}}, {"a": {"c": 1}}) == ["a.b: 1 -> None", "a.c: None -> 1"]
    folder = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(folder) is None
    check_resumable(folder, other)  # nothing to resume: nothing to refuse
    for epoch in (1, 3, 2):
        (folder / f"epoch-{epoch:04d}").mkdir(parents=True)
        (folder / f"epoch-{epoch:04d}" / "state.json").write_text("{}")
    (folder / "epoch-0009").mkdir()  # no state.json: a half-written folder never counts
    (folder / ".epoch-0010.tmp").mkdir()
    assert latest_checkpoint(folder).name == "epoch-0003"
    (folder / "epoch-0003" / "config.json").write_text(json.dumps(base))
    check_resumable(folder, changed)
    with pytest.raises(ValueError, match="another config \\(data.image_size: 64 -> 96\\).*remove .*checkpoints"):
        check_resumable(folder, load_config(None, {"data.image_size": 96}).to_dict())
    (folder / "epoch-0003" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        check_resumable(folder, base)


def test_a_resume_on_another_precision_is_refused_and_on_another_replica_count_warned():
    from dataclasses import replace
    from types import SimpleNamespace

    from training.fit.checkpoints import EpochState
    from training.fit.loop import check_resumed_setup

    lines = []
    state = EpochState(epoch=2, best_f1=0.5, history=[], precision="mixed_float16", replicas=8)
    with pytest.raises(ValueError, match="trained with precision policy mixed_float16 and this device picks float32.*"
                                         "train.mixed_precision=float16"):
        check_resumed_setup(replace(state), SimpleNamespace(policy="float32", replicas=8), lines.append)
    resumed = replace(state)
    check_resumed_setup(resumed, SimpleNamespace(policy="mixed_float16", replicas=2), lines.append)
    assert lines == ["warning: the checkpoint was trained on 8 replica(s), this run has 2: the global batch, the "
                     "steps per epoch and the learning rate scale change from here on"]
    assert resumed.replicas == 2  # what the next checkpoint records
    same = replace(state)
    check_resumed_setup(same, SimpleNamespace(policy="mixed_float16", replicas=8), lines.append)
    assert len(lines) == 1 and same == state  # the same precision and replica count: nothing to say
    with pytest.raises(ValueError, match="trained with precision policy float32 and this device picks mixed_bfloat16: "
                                         "the optimizer state would not load; resume with --set "
                                         "train.mixed_precision=off$"):
        check_resumed_setup(replace(state, precision="float32", replicas=1),
                            SimpleNamespace(policy="mixed_bfloat16", replicas=1), lines.append)
    fresh = EpochState.fresh("float32", 1)  # a run with no checkpoint: its own setup, nothing to say
    check_resumed_setup(fresh, SimpleNamespace(policy="float32", replicas=1), lines.append)
    assert len(lines) == 1 and fresh == EpochState.fresh("float32", 1)


def test_the_time_budget_stops_after_the_last_epoch_that_fits_and_the_run_goes_on_when_rerun(tiny_data, tmp_path):
    out = tmp_path / "budget"
    # A budget of a fraction of a second: the first epoch (nothing measured yet) runs, the second cannot fit.
    first = _train(tiny_data, out, "--set", "train.time_budget_minutes=0.001", "--set", "train.epochs=3",
                   "--set", "predict.tta=1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopping after epoch 1 of 3" in first.stdout
    member = json.loads((out / "member.json").read_text())
    assert member["epochs_trained"] == 1
    assert member["stopped"] == {"reason": "time_budget", "epochs_trained": 1, "epochs": 3, "budget_minutes": 0.001}
    assert (out / "predictions" / "test.npz").is_file() and (out / "saved_model").is_dir()
    second = _train(tiny_data, out, "--set", "train.epochs=3", "--set", "predict.tta=1")  # no budget this time
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after epoch 1" in second.stdout
    member = json.loads((out / "member.json").read_text())
    assert member["epochs_trained"] == 3 and member["stopped"] is None


def test_a_refit_trains_on_train_and_val_for_the_best_epoch_count_and_blends_on_the_originals_rows(
        tiny_data, tiny_run, tmp_path):
    import shutil

    from ensemble.members import load_member_predictions

    original = tmp_path / "tiny"
    shutil.copytree(tiny_run, original)
    history = [line.split(",") for line in (original / "history.csv").read_text().splitlines()[1:]]
    best = max(history, key=lambda row: float(row[5]))[0]
    result = subprocess.run([sys.executable, "-m", "flower", "train", "--refit-of", str(original), "--set",
                             "predict.tta=1", "--set", "export.runtimes=none"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    refit = tmp_path / "tiny-refit"
    member = json.loads((refit / "member.json").read_text())
    assert member["name"] == "tiny-refit" and member["validation_from"] == "../tiny"
    assert member["config"]["data"]["train_on_val"] is True and member["config"]["train"]["epochs"] == int(best)
    assert "fitting on train+val" in result.stdout and "exporting the last epoch's weights" in result.stdout
    loaded, own = load_member_predictions(refit), load_member_predictions(original)
    np.testing.assert_array_equal(loaded.val_probs, own.val_probs)
    assert not np.array_equal(loaded.test_probs, own.test_probs)
    refused = subprocess.run([sys.executable, "-m", "flower", "train", "--refit-of", str(refit)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "refit a run trained on train only" in refused.stderr


def test_steps_per_execution_trains_exactly_like_single_steps(tiny_data, tmp_path):
    from training.fit.loop import prepare_run

    runs = {}
    for per_execution in (1, 3):
        out = tmp_path / f"spe{per_execution}"
        result = _train(tiny_data, out, "--set", f"train.steps_per_execution={per_execution}",
                        "--set", "predict.tta=1", "--set", "train.epochs=2")
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{per_execution} per execution" in result.stdout
        runs[per_execution] = _weights(out / "checkpoints" / "epoch-0002" / "weights.weights.h5")
    assert runs[1].keys() == runs[3].keys()
    for name in runs[1]:
        np.testing.assert_allclose(runs[3][name], runs[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
    # ... and the model really runs 3 steps per execution (capped at the steps of an epoch).
    settings = {"data.dir": str(tiny_data), "data.image_size": 32, "data.batch_size": 16,
                "train.steps_per_execution": 3, "output": str(tmp_path / "never-written")}
    assert prepare_run(load_config(None, settings), log=lambda _: None).model.steps_per_execution == 3
    settings["train.steps_per_execution"] = 99
    assert prepare_run(load_config(None, settings), log=lambda _: None).model.steps_per_execution == 3
