"""Checkpoint files on their own (no training): where each file goes, what a rerun or a leftover does, the refusals.

The resume-equals-uninterrupted and kill tests in tests/test_resume.py train; these pin the file-level rules that a
resume relies on, each found missing by mutation testing (docs/TESTING.md, `training/fit/checkpoints.py`).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from training.config import load_config
from training.fit.checkpoints import (
    RESUMABLE_CHANGES,
    EpochState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights_atomic,
)
from training.models.model import build_classifier


def _compiled(classes: int = 3, seed: int = 0) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """A tiny compiled classifier with a built optimizer."""
    keras.utils.set_random_seed(seed)
    model = build_classifier("small-cnn", 16, classes, dropout=0.0)
    optimizer = keras.optimizers.AdamW(1e-3)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _row(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "learning_rate": 1e-3, "loss": 1.5, "val_loss": 1.25, "val_accuracy": 0.5,
            "val_macro_f1": epoch / 10, "seconds": 2.5}


def _state(epoch: int) -> EpochState:
    return EpochState(epoch=epoch, best_f1=epoch / 10, history=[_row(e) for e in range(1, epoch + 1)],
                      precision="float32", replicas=1)


def _bias(model: keras.Model) -> np.ndarray:
    return model.get_layer("probabilities").bias.numpy()


def test_the_first_checkpoint_creates_its_folders_and_a_rerun_of_an_epoch_replaces_it(tmp_path):
    model, optimizer = _compiled()
    folder = tmp_path / "run" / "checkpoints"  # neither exists yet: the first epoch of a fresh run
    save_checkpoint(folder, model, optimizer, _state(2), {"a": 1})
    model.get_layer("probabilities").bias.assign([1.0, 2.0, 3.0])
    optimizer.iterations.assign(11)
    save_checkpoint(folder, model, optimizer, _state(2), {"a": 1})  # the same epoch again (a rerun after a kill)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002"]
    fresh, fresh_optimizer = _compiled(seed=1)
    assert load_checkpoint(folder, fresh, fresh_optimizer, log=lambda _: None) == _state(2)
    np.testing.assert_array_equal(_bias(fresh), [1.0, 2.0, 3.0])
    assert int(fresh_optimizer.iterations.numpy()) == 11


def test_a_checkpoint_remembers_its_config_and_refuses_another_naming_every_change(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    model, optimizer = _compiled()
    saved = load_config(None, {}).to_dict()
    save_checkpoint(folder, model, optimizer, _state(1), saved)
    assert json.loads((folder / "epoch-0001" / "config.json").read_text()) == json.loads(json.dumps(saved))
    assert json.loads((folder / "epoch-0001" / "state.json").read_text()) == {
        "epoch": 1, "best_f1": 0.1, "history": [_row(1)], "precision": "float32", "replicas": 1}  # ARCHITECTURE.md
    safe = {"name": "renamed", "output": str(tmp_path / "elsewhere"), "train.epochs": 99, "train.eval_batch_size": 7,
            "train.steps_per_execution": 4, "train.time_budget_minutes": 30.0, "train.cluster_timeout_seconds": 9.0,
            "data.shard": "file", "data.fit": "pad", "predict.tta": 3, "predict.tta_seed": 5,
            "export.runtimes": "litert,onnx"}
    assert sorted(safe) == sorted(RESUMABLE_CHANGES)
    check_resumable(folder, load_config(None, safe).to_dict())  # every change a resume may make, all at once
    other = load_config(None, {"data.image_size": 96, "model.dropout": 0.5}).to_dict()
    with pytest.raises(ValueError) as refused:
        check_resumable(folder, other)
    assert str(refused.value) == (
        f"{tmp_path / 'run'} holds a run made with another config (data.image_size: 64 -> 96; model.dropout: "
        f"0.2 -> 0.5); resume with the same config (only {', '.join(RESUMABLE_CHANGES)} may change), or write to "
        f"another output folder, or remove {folder} to start over")
    assert "only name, output, train.epochs, " in str(refused.value)


def test_leftovers_of_killed_writes_and_older_epochs_go_but_a_stubborn_one_does_not_fail_the_save(tmp_path):
    folder = tmp_path / "checkpoints"
    model, optimizer = _compiled()
    save_checkpoint(folder, model, optimizer, _state(1), {})
    (folder / ".epoch-0005.tmp").mkdir()  # a kill while another epoch was being written
    (folder / ".epoch-0005.tmp" / "weights.weights.h5").write_bytes(b"partial")
    (folder / "notes").mkdir()  # not ours: kept
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "epoch-0000").symlink_to(elsewhere)  # rmtree refuses a link: it stays, and the save goes on
    save_checkpoint(folder, model, optimizer, _state(2), {})
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0000", "epoch-0002", "notes"]
    assert elsewhere.is_dir()


def test_an_unreadable_or_misfitting_checkpoint_is_refused_with_the_folder_to_remove(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    model, optimizer = _compiled()
    save_checkpoint(folder, model, optimizer, _state(1), {})
    state_file = folder / "epoch-0001" / "state.json"
    state_file.write_text("{half")
    with pytest.raises(ValueError) as broken:
        load_checkpoint(folder, model, optimizer, log=lambda _: None)
    assert str(broken.value).startswith(f"{state_file} is not valid JSON (")
    assert str(broken.value).endswith(f"); remove {folder} to start over")
    state_file.write_text(_state(1).to_json())

    weights = folder / "epoch-0001" / "weights.weights.h5"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 3])  # cut short (a copy that stopped half-way)
    with pytest.raises(RuntimeError, match=f"does not fit this model .*remove {re.escape(str(folder))} to start over"):
        load_checkpoint(folder, model, optimizer, log=lambda _: None)
    weights.write_bytes(intact)

    def misfit(self, path):
        raise ValueError("Layer 'probabilities' expected 2 variables " + "x" * 300 + "\nsecond line of detail")

    monkeypatch.setattr(keras.Model, "load_weights", misfit)
    with pytest.raises(RuntimeError) as refused:
        load_checkpoint(folder, model, optimizer, log=lambda _: None)
    found = re.fullmatch(r"the checkpoint in (.+) does not fit this model \((.*)\); it belongs to another config: "
                         r"remove (.+) to start over", str(refused.value))
    assert found, str(refused.value)
    assert found[1] == str(folder / "epoch-0001") and found[3] == str(folder)
    assert found[2] == ("Layer 'probabilities' expected 2 variables " + "x" * 300)[:200]


def test_weights_saved_atomically_create_deep_folders_and_replace_an_older_file(tmp_path):
    model, _ = _compiled()
    path = tmp_path / "a" / "b" / "best.weights.h5"
    save_weights_atomic(model, path)
    model.get_layer("probabilities").bias.assign([4.0, 5.0, 6.0])
    save_weights_atomic(model, path)  # the next best epoch overwrites it
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.weights.h5"]
    loaded, _ = _compiled(seed=3)
    loaded.load_weights(path)
    np.testing.assert_array_equal(_bias(loaded), [4.0, 5.0, 6.0])
    assert latest_checkpoint(tmp_path / "a") is None  # weights alone are not a checkpoint


def test_the_saved_epoch_is_read_from_the_newest_checkpoint_and_a_damaged_state_is_named(tmp_path):
    from training.fit.checkpoints import saved_epoch

    folder = tmp_path / "checkpoints"
    assert saved_epoch(folder) == 0  # a fresh run
    model, optimizer = _compiled()
    save_checkpoint(folder, model, optimizer, _state(3), {})
    assert saved_epoch(folder) == 3
    state_file = folder / "epoch-0003" / "state.json"
    for text in ("{half", '{"best_f1": 0.3}', '{"epoch": "three"}', '{"epoch": null}', "[3]"):
        state_file.write_text(text)
        with pytest.raises(ValueError) as damaged:
            saved_epoch(folder)
        assert str(damaged.value).startswith(f"{state_file} is not ")
        assert str(damaged.value).endswith(f"); remove {folder} to start over")


def test_the_best_weights_load_into_a_model_of_another_phase_without_an_optimizer_warning(tmp_path):
    from training.fit.checkpoints import load_best_weights

    trained, optimizer = _compiled(seed=4)
    optimizer.iterations.assign(9)  # the file holds optimizer variables too
    save_weights_atomic(trained, tmp_path / "best.weights.h5")
    keras.utils.set_random_seed(5)
    later = build_classifier("small-cnn", 16, 3, dropout=0.0)  # compiled afresh (after an unfreeze): Keras would
    later.compile(optimizer=keras.optimizers.SGD(1e-3), loss="categorical_crossentropy")  # warn it skips them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_best_weights(later, tmp_path)
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
    for a, b in zip(trained.weights, later.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    with pytest.raises(FileNotFoundError):
        load_best_weights(later, tmp_path / "nowhere")


def test_room_for_the_weights_and_the_optimizer_is_checked_before_writing(tmp_path, monkeypatch):
    import errno
    import shutil

    from training.fit.checkpoints import ensure_room_for_weights

    model, optimizer = _compiled()
    sizes = [int(np.prod(v.shape)) * np.dtype(str(v.dtype)).itemsize for v in [*model.weights, *optimizer.variables]]
    needed = sum(sizes) * 11 // 10 + (1 << 20)
    free = {"bytes": needed}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    ensure_room_for_weights(model, tmp_path)  # exactly enough: the optimizer's moments counted with the weights
    free["bytes"] = needed - 1
    with pytest.raises(OSError) as full:
        ensure_room_for_weights(model, tmp_path)
    assert full.value.errno == errno.ENOSPC and f"needs about {needed:,} bytes, {needed - 1:,} free" in str(full.value)
    assert full.value.filename == str(tmp_path)  # the folder that has no room
    with pytest.raises(OSError):  # refused before any file is made
        save_checkpoint(tmp_path / "checkpoints", model, optimizer, _state(1), {})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_failed_weights_write_raises_its_own_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    model, optimizer = _compiled()

    def disk_full(self, path, *args, **kwargs):  # fails before it creates the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", disk_full)
    for attempt in (lambda: save_weights_atomic(model, tmp_path / "best.weights.h5"),
                    lambda: save_checkpoint(tmp_path / "checkpoints", model, optimizer, _state(1), {})):
        with pytest.raises(OSError) as failed:
            attempt()
        assert failed.value.errno == errno.ENOSPC  # not a FileNotFoundError from the clean-up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .epoch-0001.tmp left


def test_a_float16_model_whose_optimizer_keras_wrapped_for_loss_scaling_checkpoints_and_resumes(tmp_path):
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model, optimizer = _compiled()
        assert model.optimizer is not optimizer  # Keras wrapped it: a LossScaleOptimizer around ours
        optimizer.iterations.assign(3)
        save_checkpoint(tmp_path, model, optimizer, _state(1), {})
        fresh, fresh_optimizer = _compiled(seed=1)
        assert load_checkpoint(tmp_path, fresh, fresh_optimizer, log=lambda _: None) == _state(1)
        assert int(fresh_optimizer.iterations.numpy()) == 3
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match="^save_checkpoint needs the model compiled with this optimizer$"):
        save_checkpoint(tmp_path, model, keras.optimizers.AdamW(), _state(2), {})
    with pytest.raises(ValueError, match="^load_checkpoint needs the model compiled with this optimizer$"):
        load_checkpoint(tmp_path, model, keras.optimizers.AdamW(), log=lambda _: None)
    plain, _ = _compiled()
    with pytest.raises(ValueError, match="^save_checkpoint needs the model compiled with this optimizer$"):
        save_checkpoint(tmp_path / "refused", plain, None, _state(2), {})  # no optimizer is not the model's optimizer
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_an_option_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    folder = tmp_path / "checkpoints"
    model, optimizer = _compiled()
    older = load_config(None, {}).to_dict()
    del older["augment"]["erase_area"], older["model"]["dropout"]  # options added after this checkpoint was made
    save_checkpoint(folder, model, optimizer, _state(1), older)
    check_resumable(folder, load_config(None, {}).to_dict())  # today's defaults: nothing changed
    with pytest.raises(ValueError, match=r"another config \(model.dropout: 0.2 -> 0.5\)"):
        check_resumable(folder, load_config(None, {"model.dropout": 0.5}).to_dict())


def test_the_epoch_state_reads_and_writes_the_documented_json():
    state = _state(2)
    text = state.to_json()
    assert list(json.loads(text)) == ["epoch", "best_f1", "history", "precision", "replicas"]
    assert text == json.dumps({"epoch": 2, "best_f1": 0.2, "history": [_row(1), _row(2)], "precision": "float32",
                               "replicas": 1}, indent=1)  # the dict earlier versions wrote, byte for byte
    assert EpochState.from_json(text, Path("state.json")) == state
    assert EpochState.fresh("mixed_bfloat16", 8) == EpochState(epoch=0, best_f1=-1.0, history=[],
                                                              precision="mixed_bfloat16", replicas=8)


@pytest.mark.parametrize(("change", "problem"), [
    ({"epoch": None}, "epoch is None, expected a whole number >= 0"),
    ({"epoch": True}, "epoch is True, expected a whole number >= 0"),
    ({"epoch": -1}, "epoch is -1, expected a whole number >= 0"),
    ({"best_f1": "0.5"}, "best_f1 is '0.5', expected a number"),
    ({"history": {}}, "history is {}, expected a list"),
    ({"history": [{"epoch": 1}]}, "history row 0 is {'epoch': 1}, expected numbers for epoch, learning_rate, "),
    ({"precision": None}, "precision is None, expected a string"),
    ({"replicas": 0}, "replicas is 0, expected a whole number >= 1"),
    ({"replicas": 1.5}, "replicas is 1.5, expected a whole number >= 1"),
])
def test_a_malformed_epoch_state_is_refused_naming_the_file_and_the_field(tmp_path, change, problem):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({**json.loads(_state(1).to_json()), **change}))
    with pytest.raises(ValueError) as refused:
        EpochState.read(path)
    assert str(refused.value).startswith(f"{path} is not an epoch state ({problem}")


def test_an_epoch_state_without_a_field_names_every_missing_one(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"epoch": 1, "best_f1": 0.5, "history": []}')  # without precision and replicas
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not an epoch state \\(missing precision, "
                                         "replicas\\)$"):
        EpochState.read(path)
    path.write_text("[1]")
    with pytest.raises(ValueError, match="is not an epoch state \\(expected a JSON object, got list\\)$"):
        EpochState.read(path)


def test_a_folder_in_the_single_folder_layout_of_earlier_versions_is_refused_not_overwritten(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "state.json").write_text(_state(1).to_json())  # what earlier versions wrote, beside last.weights.h5
    (folder / "last.weights.h5").write_bytes(b"weights")
    model, optimizer = _compiled()
    for attempt in (lambda: latest_checkpoint(folder), lambda: check_resumable(folder, {}),
                    lambda: load_checkpoint(folder, model, optimizer, log=lambda _: None)):
        with pytest.raises(ValueError, match=f"^{re.escape(str(folder))} holds a checkpoint in the single-folder "
                                             f"layout of earlier versions.*remove {re.escape(str(folder))} to start"):
            attempt()
    assert sorted(p.name for p in folder.iterdir()) == ["last.weights.h5", "state.json"]  # nothing touched
