"""Distillation (`flower distil`): the teacher file, its join to the records by id, the loss, and a student trained on
the tiny demo data. The student must follow its teacher, not the labels; it never trains on a validation row."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from core.teacher import read_teacher, write_teacher
from tests.support import _one_line_error

CLASSES = 6  # the demo data's


def _records(data: Path, split: str) -> dict[str, int | None]:
    from imaging.records import record_labels
    from training.data.dataset import split_info

    return record_labels(list(split_info(str(data), split, 32).files))


def _teacher(data: Path, path: Path, unlabeled: str | None = None, drop: int = 0) -> dict[str, np.ndarray]:
    """A teacher that answers each training record's label + 1 (mod 6) with probability 0.9: it disagrees with every
    label. Unlabeled records (DATA:SPLIT) get 0.95 or 0.5 on a class in turn; `drop` leaves out that many training
    rows."""
    train = _records(data, "train")
    ids, labels = list(train)[drop:], np.array(list(train.values()))[drop:]
    sources = ["train"] * len(ids)
    if unlabeled:
        more = list(_records(Path(unlabeled.rpartition(":")[0]), unlabeled.rpartition(":")[2]))
        ids, sources = ids + more, sources + ["unlabeled"] * len(more)
        labels = np.concatenate([labels, np.arange(len(more)) % CLASSES])
    top = np.full(len(ids), 0.9)
    top[len(train) - drop:] = np.where(np.arange(len(ids) - len(train) + drop) % 2, 0.95, 0.5)  # unlabeled: half sure
    probs = np.repeat(((1 - top) / (CLASSES - 1))[:, None], CLASSES, axis=1).astype(np.float32)
    probs[np.arange(len(ids)), (labels + 1) % CLASSES] = top
    facts = {"path": str(path.parent), "kind": "ensemble", "name": "permuted", "fingerprint": "0" * 64,
             "classes": json.loads((data / "classes.json").read_text()), "train": f"{data}:train",
             "unlabeled": unlabeled, "unlabeled_from": unlabeled, "tta": 1}
    write_teacher(path, np.array(ids), probs, np.array(sources), facts)
    return {"ids": np.array(ids), "probs": probs, "labels": labels}


def _student(tiny_data: Path, out: Path, teacher: Path, **settings):
    from training.config import load_config

    return load_config(None, {"data.dir": str(tiny_data), "output": str(out), "data.image_size": 32,
                              "data.batch_size": 16, "predict.tta": 1, "augment.enabled": False,  # traced in 10 s
                              "distil.teacher": str(teacher), **settings})


def test_a_student_follows_its_teachers_answers_not_the_labels(tiny_data, tmp_path):
    from training.data.dataset import eval_dataset
    from training.fit.loop import prepare_run

    _teacher(tiny_data, tmp_path / "teacher.npz")
    config = _student(tiny_data, tmp_path / "student", tmp_path / "teacher.npz", **{
        "model.dropout": 0.0, "train.label_smoothing": 0.0, "distil.temperature": 1.0, "distil.hard_weight": 0.0})
    run = prepare_run(config, lambda line: None)
    run.optimizer.learning_rate.assign(3e-3)
    run.model.fit(run.epoch_data(0), steps_per_epoch=10, epochs=1, verbose=0)
    for split in ("train", "val"):
        images, labels, _ = next(iter(eval_dataset(run.infos[split], 32, 100, num_classes=CLASSES)))
        # Batch statistics: ten steps leave batch norm's moving averages far from them.
        answers = run.model(images, training=True).numpy().argmax(axis=1)
        follows, labelled = np.mean(answers == (labels.numpy() + 1) % CLASSES), np.mean(answers == labels.numpy())
        assert follows >= 0.6 and labelled <= 0.2, (split, follows, labelled)


def test_the_loss_is_t_squared_kl_to_the_tempered_teacher_plus_the_weighted_hard_part():
    import tensorflow as tf

    from training.data.soft_targets import tempered
    from training.fit.distillation import distillation_loss

    teacher = np.array([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
    student = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    hard = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = 3.0
    soft, student_t = tempered(teacher, t), tempered(student, t)
    y_true = tf.constant(np.concatenate([soft, hard], axis=1), tf.float32)
    loss = distillation_loss(t)(y_true, tf.constant(student, tf.float32)).numpy()
    expected = t * t * (soft * np.log(soft / student_t)).sum(axis=1) - (hard * np.log(student)).sum(axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    at_teacher = distillation_loss(t)(y_true[1:], tf.constant(teacher[1:], tf.float32)).numpy()
    assert abs(at_teacher[0]) < 1e-5  # no hard part: nothing to learn where the student answers as the teacher


def test_targets_join_the_teacher_by_id_with_temperature_hard_weight_and_pseudo_labels(tiny_data, tmp_path):
    from training.config import load_config
    from training.data.dataset import split_info
    from training.data.soft_targets import one_hot, soft_targets, tempered

    teacher = _teacher(tiny_data, tmp_path / "teacher.npz", unlabeled=f"{tiny_data}:test")
    infos = {s: split_info(str(tiny_data), s, 32) for s in ("train", "val")}
    classes = json.loads((tiny_data / "classes.json").read_text())
    distil = load_config(None, {"distil.teacher": "t", "distil.temperature": 2.0, "distil.hard_weight": 0.5,
                                "distil.pseudo_threshold": 0.9}).distil
    targets = soft_targets(str(tmp_path / "teacher.npz"), infos, classes, distil, 0.1, 32)
    train = _records(tiny_data, "train")
    at = {i: n for n, i in enumerate(teacher["ids"])}
    first = list(train)[0]
    row = targets.rows[list(targets.ids).index(first)]
    np.testing.assert_allclose(row[:CLASSES], tempered(teacher["probs"][[at[first]]], 2.0)[0], rtol=1e-5)
    np.testing.assert_allclose(row[CLASSES:], 0.5 * one_hot(np.array([train[first]]), CLASSES, 0.1)[0], rtol=1e-5)
    unlabeled = teacher["ids"][len(train):]
    confident = teacher["probs"][len(train):].max(axis=1) >= 0.9
    assert 0 < confident.sum() < len(unlabeled)
    assert set(targets.ids) == set(train) | set(unlabeled[confident])  # pseudo-labels above the threshold only
    assert set(targets.dropped) == set(unlabeled[~confident])
    pseudo = targets.rows[list(targets.ids).index(unlabeled[confident][0])]
    top = teacher["probs"][len(train):][confident][0].argmax()
    assert pseudo[:CLASSES].sum() == 0 and pseudo[CLASSES:].argmax() == top
    assert targets.facts["unlabeled"] == {"data": f"{tiny_data}:test", "records": f"{tiny_data}:test",
                                          "rows": len(unlabeled), "trained": int(confident.sum()),
                                          "pseudo_threshold": 0.9}


def test_a_students_epochs_read_its_unlabeled_records_with_their_pseudo_labels(tiny_data, tmp_path):
    from training.fit.loop import prepare_run

    _teacher(tiny_data, tmp_path / "teacher.npz", unlabeled=f"{tiny_data}:test")
    config = _student(tiny_data, tmp_path / "student", tmp_path / "teacher.npz", **{"distil.pseudo_threshold": 0.9})
    run = prepare_run(config, lambda line: None)
    pseudo = int((run.targets.rows[:, :CLASSES].sum(axis=1) == 0).sum())  # a pseudo-label has no soft part
    assert pseudo > 0 and len(run.fit_splits) == 2
    seen = np.concatenate([targets.numpy() for _, targets in run.epoch_data(0).take(run.steps * 3)])
    assert (seen[:, :CLASSES].sum(axis=1) == 0).sum() > 0  # the unlabeled split is read, not only counted
    assert (seen[:, :CLASSES].sum(axis=1) > 0).sum() > 0


def test_a_record_without_a_teacher_row_and_a_validation_id_are_refused_by_name(tiny_data, tmp_path):
    from training.data.dataset import split_info
    from training.data.soft_targets import soft_targets

    infos = {s: split_info(str(tiny_data), s, 32) for s in ("train", "val")}
    classes = json.loads((tiny_data / "classes.json").read_text())
    distil = _student(tiny_data, tmp_path, tmp_path / "t.npz").distil
    _teacher(tiny_data, tmp_path / "short.npz", drop=1)
    with pytest.raises(DataError, match=rf"1 of the 60 training records have no 'train' row in teacher file .*"
                                        rf"{list(_records(tiny_data, 'train'))[0]}"):
        soft_targets(str(tmp_path / "short.npz"), infos, classes, distil, 0.0, 32)
    _teacher(tiny_data, tmp_path / "val.npz", unlabeled=f"{tiny_data}:val")
    with pytest.raises(DataError, match="24 of the records the student would train on are validation ids"):
        soft_targets(str(tmp_path / "val.npz"), infos, classes, distil, 0.0, 32)


def test_a_teacher_file_that_breaks_the_contract_is_refused_naming_it(tiny_data, tmp_path):
    path = tmp_path / "teacher.npz"
    _teacher(tiny_data, path)
    good = read_teacher(path)
    with np.load(path) as data:
        arrays = dict(data)
    for change, message in ((lambda a: a.update(probs=a["probs"] * 2), "rows of 'probs' are not probability"),
                            (lambda a: a.update(ids=np.concatenate([a["ids"][:1], a["ids"][:-1]])), "'ids' repeat"),
                            (lambda a: a.update(source=np.full(len(a["ids"]), "val")), "'source' must give"),
                            (lambda a: a.pop("teacher"), "lacks \\['teacher'\\]")):
        broken = dict(arrays)
        change(broken)
        np.savez(tmp_path / "broken.npz", **broken)
        with pytest.raises(DataError, match=f"teacher file {tmp_path / 'broken.npz'}.*{message}"):
            read_teacher(tmp_path / "broken.npz")
    with pytest.raises(DataError, match="not found"):
        read_teacher(tmp_path / "absent.npz")
    assert good.facts["name"] == "permuted" and good.rows("train") == {i: n for n, i in enumerate(good.ids)}


def test_distillation_refuses_what_would_train_on_validation_rows_or_read_labels_only(tiny_data, tmp_path, capsys):
    from flower.cli import main as flower
    from flower.commands.distil import unlabeled_input

    for option, value in (("data.train_on_val", True), ("train.loss", "focal"), ("train.class_weights", True)):
        with pytest.raises(ConfigError, match=f"distillation .*: {option}={value!r} does not apply"):
            _student(tiny_data, tmp_path, tmp_path / "t.npz", **{option: value})
    with pytest.raises(ConfigError, match="student's own val split: validation rows are never trained on"):
        unlabeled_input(f"{tiny_data}:val", str(tiny_data))
    assert unlabeled_input(f"{tiny_data}:test", str(tiny_data)) == (f"{tiny_data}:test", False)
    assert flower(["distil", str(tmp_path), "--set", "distil.teacher=x.npz"]) == 2
    assert "flower distil writes the teacher file itself" in _one_line_error(capsys)


def test_flower_distil_on_demo_data_writes_an_ordinary_run_that_names_its_teacher(tiny_data, tmp_path, capsys):
    from PIL import Image

    from core.members import write_ensemble
    from ensemble.members import load_member_predictions
    from flower.cli import main as flower
    from flower.commands.distil import ensure_teacher, student_config
    from flower.commands.distil import parser as distil_parser
    from testkit.artifacts import make_run

    classes = json.loads((tiny_data / "classes.json").read_text())
    members = [make_run(tmp_path / "runs", f"m{size}", size, seed=size, classes=classes) for size in (32, 48)]
    ens = tmp_path / "ens"
    ens.mkdir()
    write_ensemble(ens, {"version": 1, "method": "weighted", "classes": classes,
                         "blend": {"method": "weighted", "weights": [0.4, 0.6]},
                         "members": [{"name": m.name, "path": os.path.relpath(m, ens), "weight": w}
                                     for m, w in zip(members, (0.4, 0.6), strict=True)]})
    photos = tmp_path / "photos" / "garden"
    photos.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (40, 56, 3), np.uint8)).save(photos / f"{k}.png")
    student = tmp_path / "student"
    argv = ["distil", str(ens), "--unlabeled", str(photos.parent), "--set", f"data.dir={tiny_data}", "--set",
            f"output={student}", "--set", "data.image_size=32", "--set", "train.epochs=1", "--set",
            "train.steps_per_epoch=2", "--set", "predict.tta=1", "--set", "augment.enabled=false"]
    assert flower(argv) == 0, capsys.readouterr().err[-2000:]
    teacher = read_teacher(student / "teacher.npz")
    train = list(_records(tiny_data, "train"))
    assert teacher.ids.tolist() == train + ["garden/0.png", "garden/1.png", "garden/2.png"]
    assert (student / "unlabeled" / "tfrecords-jpeg-32x32" / "test").is_dir()
    member = json.loads((student / "member.json").read_text())
    named = member["teacher"]
    assert (student / named["path"]).resolve() == ens.resolve() and named["file"] == "teacher.npz"
    assert named["fingerprint"] == hashlib.sha256((ens / "ensemble.json").read_bytes()).hexdigest()
    assert named["unlabeled"]["data"] == str(photos.parent.resolve()) and named["unlabeled"]["trained"] == 3
    assert member["config"]["distil"]["teacher"] == str(student / "teacher.npz")
    assert len(load_member_predictions(student).val_ids) == 24  # blendable as any run; scored on validation
    capsys.readouterr()
    before = (student / "teacher.npz").stat().st_mtime_ns
    config = student_config(distil_parser("flower distil").parse_args(argv[1:]))
    ensure_teacher(str(ens), config, str(photos.parent.resolve()), True)  # what a rerun does first
    assert "teacher: keeping" in capsys.readouterr().out and (student / "teacher.npz").stat().st_mtime_ns == before
