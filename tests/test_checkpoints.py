"""Checkpoint files on their own (no training): where each file goes, what a rerun or a leftover does, the refusals.

The resume-equals-uninterrupted and kill tests in tests/test_training.py train; these pin the file-level rules that
a resume relies on, each found missing by mutation testing (docs/TESTING.md, `training/fit/checkpoints.py`).
"""

from __future__ import annotations

import json
import re
import warnings

import keras
import numpy as np
import pytest

from training.config import load_config
from training.fit.checkpoints import (
    RESUMABLE_CHANGES,
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


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "best_f1": epoch / 10, "history": []}


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
    assert json.loads((folder / "epoch-0001" / "state.json").read_text()) == _state(1)
    safe = {"name": "renamed", "output": str(tmp_path / "elsewhere"), "train.epochs": 99, "train.eval_batch_size": 7,
            "train.steps_per_execution": 4, "train.time_budget_minutes": 30.0, "data.shard": "file", "data.fit": "pad",
            "predict.tta": 3, "predict.tta_seed": 5}
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


def test_the_checkpoints_own_config_outranks_the_runs_config_file(tmp_path):
    # The run's config.json stands in only for a legacy checkpoint that has none of its own.
    folder = tmp_path / "run" / "checkpoints"
    model, optimizer = _compiled()
    saved = load_config(None, {}).to_dict()
    save_checkpoint(folder, model, optimizer, _state(1), saved)
    run_file = tmp_path / "run" / "config.json"
    run_file.write_text(json.dumps(load_config(None, {"data.image_size": 96}).to_dict()))
    check_resumable(folder, saved, run_file)  # the checkpoint says 64, so a 64 px resume goes on
    with pytest.raises(ValueError, match="data.image_size: 64 -> 96"):
        check_resumable(folder, load_config(None, {"data.image_size": 96}).to_dict(), run_file)
    (folder / "epoch-0001" / "config.json").unlink()
    with pytest.raises(ValueError, match="data.image_size: 96 -> 64"):  # now the run's file speaks for it
        check_resumable(folder, saved, run_file)
    check_resumable(folder, saved, None)  # neither says anything: nothing to refuse


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


def test_a_new_layout_checkpoint_ignores_an_optimizer_file_left_from_the_legacy_layout(tmp_path):
    # A kill right after the first new-layout save (before the legacy files are removed) leaves both.
    folder = tmp_path / "checkpoints"
    model, optimizer = _compiled()
    optimizer.iterations.assign(5)
    save_checkpoint(folder, model, optimizer, _state(1), {})
    np.savez(folder / "optimizer.npz", **{f"v{i}": np.zeros(v.shape) + 99 for i, v in enumerate(optimizer.variables)})
    fresh, fresh_optimizer = _compiled(seed=1)
    load_checkpoint(folder, fresh, fresh_optimizer, log=lambda _: None)
    assert int(fresh_optimizer.iterations.numpy()) == 5
    for a, b in zip(optimizer.variables, fresh_optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


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
    state_file.write_text(json.dumps(_state(1)))

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
        assert str(damaged.value).startswith(f"{state_file} is unreadable (")
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


def test_a_legacy_checkpoint_gets_its_optimizer_state_from_its_own_file(tmp_path):
    # Earlier versions kept the optimizer's variables apart, in optimizer.npz beside last.weights.h5 (weights only).
    model, optimizer = _compiled()
    optimizer.iterations.assign(7)
    keras.utils.set_random_seed(0)
    bare = build_classifier("small-cnn", 16, 3, dropout=0.0)
    bare.set_weights(model.get_weights())
    bare.save_weights(tmp_path / "last.weights.h5")  # not compiled: no optimizer variables in the file
    np.savez(tmp_path / "optimizer.npz", **{f"v{i}": v.numpy() for i, v in enumerate(optimizer.variables)})
    (tmp_path / "state.json").write_text(json.dumps(_state(1)))
    fresh, fresh_optimizer = _compiled(seed=1)
    with warnings.catch_warnings(record=True) as caught:  # the file has no optimizer variables, as expected
        warnings.simplefilter("always")
        assert load_checkpoint(tmp_path, fresh, fresh_optimizer, log=lambda _: None) == _state(1)
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
    assert int(fresh_optimizer.iterations.numpy()) == 7
    for a, b in zip(optimizer.variables, fresh_optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    np.savez(tmp_path / "optimizer.npz", v0=np.zeros(3))  # another optimizer's state (or a damaged file)
    with pytest.raises(RuntimeError, match=f"optimizer.npz does not fit this model .*remove {re.escape(str(tmp_path))} "
                                           "to start over"):
        load_checkpoint(tmp_path, *_compiled(seed=2), log=lambda _: None)
