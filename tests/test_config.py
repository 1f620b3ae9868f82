"""Training options: learning-rate schedules, the macro F1 metric, config files and overrides, option errors
named before anything runs, the run folder's name, and `flower train --help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tests.conftest import REPO
from training.config import ScheduleConfig, load_config
from training.fit.evaluation import classification_scores
from training.fit.schedules import learning_rate


def test_rampup_sustain_decay_values():
    config = ScheduleConfig(kind="rampup", start=1e-5, max=5e-5, min=1e-5, rampup_epochs=5, sustain_epochs=2,
                            decay=0.8)
    values = [learning_rate(config, e, 12, replicas=8) for e in range(10)]
    assert values[0] == pytest.approx(1e-5)
    assert values[5] == values[6] == pytest.approx(4e-4)  # max scaled by 8 replicas
    assert values[2] == pytest.approx(1e-5 + (4e-4 - 1e-5) * 2 / 5)
    assert values[8] == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.8**1)


def test_cosine_and_constant_values():
    config = ScheduleConfig(kind="cosine", start=0.0, max=1.0, min=0.0, warmup_epochs=2)
    values = [learning_rate(config, e, 10) for e in range(10)]
    assert values[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert values[6] == pytest.approx(0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert learning_rate(ScheduleConfig(kind="constant", max=0.3), 7, 10, 2) == pytest.approx(0.6)


def test_macro_f1_over_the_whole_split_matches_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, 500)
    probs = rng.dirichlet(np.ones(7), 500)
    scores = classification_scores(labels, probs)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert scores["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())


def test_config_overrides_and_errors_name_the_option(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[data]\nimage_size = 48\n[augment]\nrotation = 3\n')
    config = load_config(path, {"train.epochs": 3, "augment.cutmix_prob": 0.5})
    assert (config.data.image_size, config.train.epochs, config.augment.rotation, config.augment.cutmix_prob) == (
        48, 3, 3.0, 0.5)
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['train.epoch'\\]"):
        load_config(path, {"train.epoch": 3})
    with pytest.raises(ValueError, match="train.epochs: expected int, got '3'"):
        load_config(path, {"train.epochs": "3"})
    with pytest.raises(ValueError, match="schedule.kind must be"):
        load_config(None, {"schedule.kind": "linear"})
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_help_explains_every_option():
    result = subprocess.run([sys.executable, "-m", "flower", "train", "--help"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0
    for option in ("image_size", "batch_size", "backbone", "trainable", "rampup_epochs", "label_smoothing",
                   "mixed_precision", "tta", "cutmix_prob", "fill_mode"):
        assert option in result.stdout
    assert "per replica" in result.stdout and "imagenet | noisy-student | none" in result.stdout


def test_an_output_that_is_not_a_local_folder_is_refused():
    with pytest.raises(ValueError, match="output must be a local folder .* got 'gs://bucket/run'"):
        load_config(None, {"output": "gs://bucket/run"})


@pytest.mark.parametrize("overrides,message", [
    ({"train.steps_per_epoch": -1}, "train.steps_per_epoch must be between 0 and"),
    ({"train.eval_batch_size": 0}, "train.eval_batch_size must be between 1 and"),
    ({"data.shuffle_buffer": -3}, "data.shuffle_buffer must be between 1 and"),
    ({"data.image_size": 100000}, "data.image_size must be between 8 and 2048"),
    ({"predict.tta": 1000000}, "predict.tta must be between 1 and 64"),
    ({"schedule.max": -1.0}, "schedule.max must be between 0.0 and"),
    ({"schedule.decay": 0.0}, "schedule.decay must be in \\(0, 1\\]"),
    ({"augment.rotation": float("nan")}, "augment.rotation: expected a finite number, got nan"),
    ({"augment.rotation": float("inf")}, "augment.rotation: expected a finite number, got inf"),
    ({"augment": 3, "augment.rotation": 1}, "'augment' is a single value here"),
    ({"name": 2024}, "quote text that looks like a number"),
    ({"data.dir": " "}, "data.dir must name the data folder"),
    ({"augment.zoom": 1e30}, "augment.zoom must be <= 1, got 1e\\+30"),  # trained a NaN model before
    ({"augment.rotation": 1000.0}, "augment.rotation must be <= 180"),
    ({"augment.mixup_alpha": 1e9}, "augment.mixup_alpha must be <= 100"),
    ({"augment.shift_reference_size": 0}, "augment.shift_reference_size must be between 1 and"),
    ({"augment.erase_area": 5}, "augment.erase_area"),
    ({"train.seed": -1}, "train.seed must be between 0 and"),
    ({"predict.tta_seed": -2}, "predict.tta_seed must be between 0 and"),
])
def test_out_of_range_and_odd_options_are_named_before_anything_runs(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_member_is_named_after_its_run_folder_unless_named():
    assert load_config(None, {"output": "/tmp/runs/effnet-b0-224"}).member_name == "effnet-b0-224"
    assert load_config(None, {"output": "/tmp/runs/x", "name": "given"}).member_name == "given"
    assert load_config(None, {}).run_dir == Path("runs/member")


def test_a_refit_takes_the_best_epoch_with_a_finite_f1_and_names_a_damaged_run(tmp_path):
    from core.errors import ConfigError
    from core.members import write_member
    from training.config import refit_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(load_config(None, {"train.epochs": 4}).to_dict()))
    write_member(run, {"name": "run"})
    (run / "history.csv").write_text("epoch,val_macro_f1\n1,nan\n2,0.5\n3,0.7\n4,0.7\n")
    assert refit_config(run).train.epochs == 3  # the NaN epoch never wins (max() kept a NaN met first)
    (run / "history.csv").write_text("epoch,val_macro_f1\n1,nan\n")
    with pytest.raises(ConfigError, match="history.csv holds no epoch with a validation macro F1"):
        refit_config(run)
    (run / "history.csv").write_bytes(b"\xff\xfeepoch,val_macro_f1\n")  # not UTF-8: was UnicodeDecodeError
    with pytest.raises(ConfigError, match="history.csv is not a history.csv this toolkit wrote"):
        refit_config(run)
    (run / "config.json").write_text(json.dumps({"name": "run"}))
    with pytest.raises(ConfigError, match="config.json is not a run's config"):
        refit_config(run)  # was KeyError: 'data', a traceback
