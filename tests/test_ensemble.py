"""The ensemble: loading and alignment with every error, blending methods, honest CV, outputs, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ensemble.blend import METHODS, Blender, apply_blend
from ensemble.build import build_ensemble
from ensemble.members import MemberError, load_member_predictions, load_members
from ensemble.scores import macro_f1
from ensemble.validation import cross_validate, member_scores
from flower.commands.blend import main
from testkit.synthetic import synthetic_runs, write_run_dir
from tests.support import peak_memory

QUIET = dict(progress=lambda _: None)


@pytest.fixture
def runs(tmp_path):
    """Three members on 10 classes; member1 is clearly the best."""
    return synthetic_runs(tmp_path / "runs", skills=[1.5, 4.0, 2.0], classes=10, val_rows=400, test_rows=300)


def _rewrite(run, split: str, **changes) -> None:
    """Replace arrays in one of a run's prediction files."""
    path = run / "predictions" / f"{split}.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


def test_members_are_aligned_by_id_whatever_their_row_order(runs):
    aligned = load_members(runs)
    assert aligned.names == ["member0", "member1", "member2"]
    assert list(aligned.val_ids) == sorted(aligned.val_ids) and aligned.val_probs.shape == (3, 400, 10)
    for m, run in enumerate(runs):
        with np.load(run / "predictions" / "val.npz") as raw:
            row = {i: k for k, i in enumerate(raw["ids"])}
            picked = [row[i] for i in aligned.val_ids[:25]]
            np.testing.assert_array_equal(aligned.val_probs[m, :25], raw["probs"][picked])
            np.testing.assert_array_equal(aligned.val_labels[:25], raw["labels"][picked])


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda r: _rewrite(r, "val", probs=np.full((400, 10), np.nan, np.float32)), "NaN/inf"),
        (lambda r: _rewrite(r, "val", probs=np.full((400, 10), 0.2, np.float32)), "distributions.*off by 1"),
        (lambda r: _rewrite(r, "val", probs=np.full((400, 10), 0.1, np.float64)), "dtype float64, expected float32"),
        (lambda r: _rewrite(r, "val", probs=np.full((400, 9), 1 / 9, np.float32)), "expected \\(400, 10\\)"),
        (lambda r: _rewrite(r, "test", ids=np.array([f"t{i % 5}" for i in range(300)])), "duplicate ids"),
        (lambda r: _rewrite(r, "val", labels=None), "lacks \\['labels'\\]"),
        (lambda r: _rewrite(r, "val", ids=np.array(["x"] * 399 + [""])), "empty ids|duplicate ids"),
        (lambda r: _rewrite(r, "test", ids=np.array([f"t{i}" for i in range(299)] + ["t\r299"])),
         "1 id\\(s\\) with a line break, e.g. 't\\\\r299'"),  # a traceback from the csv module before
        (lambda r: _rewrite(r, "test", ids=np.array([object()] * 300, dtype=object)), "need pickle"),
        (lambda r: _rewrite(r, "val", labels=np.full(400, 12)), "labels out of range"),
        (lambda r: (r / "predictions" / "test.npz").write_bytes(b"garbage"), "not an .npz \\(corrupt or truncated\\)"),
        (lambda r: (r / "predictions" / "test.npz").unlink(), "test.npz not found"),
    ],
)
def test_a_broken_member_file_is_named_with_its_problem(runs, break_it, message):
    break_it(runs[1])
    with pytest.raises(MemberError, match=f"member 'member1'.*({message})"):
        load_members(runs)


def test_a_deflated_prediction_file_is_refused_before_it_is_inflated(runs):
    path = runs[1] / "predictions" / "test.npz"
    with np.load(path) as data:
        ids = data["ids"]
    np.savez_compressed(path, ids=ids, probs=np.zeros((1 << 22, 4), np.float32))  # 64 MiB of zeros in 64 KiB
    with peak_memory() as peak, pytest.raises(MemberError) as refused:
        load_members(runs)
    assert peak.bytes < 16 * 2**20, f"{peak.bytes / 2**20:.0f} MiB"  # numpy inflated all 64 MiB before any check
    assert "member 'member1': test.npz holds no predictions: it would inflate to 67" in str(refused.value)


def test_members_that_disagree_are_named(runs, tmp_path):
    classes = json.loads((runs[2] / "classes.json").read_text())
    (runs[2] / "classes.json").write_text(json.dumps(classes[:-1] + ["other"]))
    with pytest.raises(MemberError, match="member 'member2': class 9 is 'other', member 'member0' has 'class 9'"):
        load_members(runs)
    (runs[2] / "classes.json").write_text(json.dumps(classes))

    with np.load(runs[2] / "predictions" / "val.npz") as data:
        labels = data["labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    _rewrite(runs[2], "val", labels=labels)
    with pytest.raises(MemberError, match="member 'member2': val labels disagree with member 'member0' on 1 rows"):
        load_members(runs)


def test_ids_missing_from_one_member_are_reported(runs):
    with np.load(runs[1] / "predictions" / "test.npz") as data:
        ids, probs = data["ids"][:-1], data["probs"][:-1]
    _rewrite(runs[1], "test", ids=ids, probs=probs)
    with pytest.raises(MemberError, match="member 'member1': test ids differ from member 'member0' \\(299 vs 300"):
        load_members(runs)


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(1)
    for _ in range(5):
        labels, predicted = rng.integers(0, 12, 300), rng.integers(0, 14, 300)
        expected = f1_score(labels, predicted, average="macro")
        assert macro_f1(labels, predicted, 14) == pytest.approx(expected, abs=1e-12)


def test_mean_is_the_plain_average(runs):
    aligned = load_members(runs)
    blend = Blender("mean").fit(aligned.val_probs, aligned.val_labels).predict_proba(aligned.test_probs)
    by_hand = (aligned.test_probs[0].astype(float) + aligned.test_probs[1] + aligned.test_probs[2]) / 3
    np.testing.assert_allclose(blend, by_hand, rtol=1e-6)


def test_weighted_favours_the_best_member_and_beats_it_in_cv(runs):
    aligned = load_members(runs)
    blender = Blender("weighted").fit(aligned.val_probs, aligned.val_labels)
    weights = blender.weights_
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1.0)
    assert weights.argmax() == 1
    members = member_scores(aligned.val_probs, aligned.val_labels, aligned.names, 5, 0)
    blend = cross_validate(aligned.val_probs, aligned.val_labels, "weighted", folds=5, seed=0)["scores"]
    assert blend["macro_f1"] >= max(s["macro_f1"] for s in members.values())


@pytest.mark.parametrize("method,options", [("weighted", {"power": True}), ("hill-climb", {}), ("stack", {})])
def test_every_method_gives_valid_probabilities_and_favours_the_best_member(runs, method, options):
    aligned = load_members(runs)
    blender = Blender(method, **options).fit(aligned.val_probs, aligned.val_labels)
    blend = blender.predict_proba(aligned.test_probs)
    assert blend.shape == (300, 10) and (blend >= 0).all()
    np.testing.assert_allclose(blend.sum(1), 1.0, atol=1e-6)
    assert np.argmax(blender.importance_) == 1
    if method != "stack":
        assert (blender.weights_ >= 0).all() and blender.weights_.sum() == pytest.approx(1.0)


def test_the_spec_is_json_and_applies_the_same_blend(runs):
    aligned = load_members(runs)
    for method in METHODS:
        blender = Blender(method).fit(aligned.val_probs, aligned.val_labels)
        spec = json.loads(json.dumps(blender.spec_.to_dict()))
        np.testing.assert_allclose(apply_blend(spec, aligned.test_probs), blender.predict_proba(aligned.test_probs))


def test_hill_climb_counts_selections():
    rng = np.random.default_rng(0)
    from testkit.synthetic import synthetic_probs

    labels = np.arange(300) % 6
    probs = synthetic_probs(labels, [1.0, 3.0, 3.0], 6, rng)
    spec = Blender("hill-climb").fit(probs, labels).spec_.to_dict()
    assert sum(spec["selections"]) >= 1
    np.testing.assert_allclose(spec["weights"], np.array(spec["selections"]) / sum(spec["selections"]))


def test_identical_seeds_give_identical_results(runs, tmp_path):
    first = build_ensemble(runs, tmp_path / "a", "auto", folds=4, seed=7, **QUIET)
    second = build_ensemble(runs, tmp_path / "b", "auto", folds=4, seed=7, **QUIET)
    for key in ("blend", "cv", "method"):
        assert first[key] == second[key]
    assert (tmp_path / "a" / "submission.csv").read_text() == (tmp_path / "b" / "submission.csv").read_text()


def test_the_ensemble_directory_has_everything_and_the_submission_matches_kaggle(runs, tmp_path):
    out = tmp_path / "ens"
    document = build_ensemble(runs, out, "weighted", folds=5, **QUIET)
    assert document["method"] == "weighted" and document["classes"] == [f"class {i}" for i in range(10)]
    assert [m["path"] for m in document["members"]] == [f"../runs/member{i}" for i in range(3)]
    assert set(document["cv"]["members"]) == {"member0", "member1", "member2"}
    assert {"macro_f1", "accuracy", "log_loss", "macro_f1_std"} <= set(document["cv"]["blend"])
    rows = list(csv.reader(open(out / "submission.csv")))
    assert rows[0] == ["id", "label"]
    test_ids = sorted(np.load(runs[0] / "predictions" / "test.npz")["ids"].tolist())
    assert [r[0] for r in rows[1:]] == test_ids
    assert all(0 <= int(r[1]) < 10 for r in rows[1:])
    report = (out / "report.md").read_text()
    assert "blend (weighted)" in report and "worst classes" in report
    for png in ("weights.png", "scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_bar_in_a_class_or_member_name_stays_inside_its_cell_of_report_md(tmp_path):
    from types import SimpleNamespace

    from ensemble.output import write_report

    labels = np.array([0, 1, 1, 0])
    aligned = SimpleNamespace(members=[None], classes=["rose|red", "tulip"], val_ids=np.arange(4),
                              test_ids=np.arange(2), val_labels=labels)
    scores = {"macro_f1": 0.5, "macro_f1_std": 0.1, "accuracy": 0.5, "log_loss": 0.7}
    write_report(tmp_path, aligned, "mean", scores, {"m|1": scores}, np.eye(2)[[0, 0, 1, 1]], None)
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    member = next(r for r in rows if r.startswith("| m"))
    rose = next(r for r in rows if r.startswith("| 0: rose"))
    assert member.startswith("| m\\|1 | 0.5000 |") and rose.startswith("| 0: rose\\|red | ")
    assert member.replace("\\|", "").count("|") == 6 and rose.replace("\\|", "").count("|") == 4  # 5 and 3 cells


def test_a_member_name_that_looks_like_tex_is_drawn_as_typed(tmp_path):
    from ensemble.output import plot_weights
    from ensemble.spec import BlendSpec

    path = plot_weights(tmp_path / "weights.png", ["$\\bad{$", "m2"], BlendSpec("mean", weights=(0.5, 0.5)))
    assert path.read_bytes()[:4] == b"\x89PNG"  # matplotlib's math parser refused it, after the blend's whole CV
    from training.data.augment_grid import write_grid_png  # the grid's titles are class names

    pixels = np.zeros((1, 1, 8, 8, 3), np.uint8)
    grid = write_grid_png(tmp_path / "grid.png", pixels[0], pixels, ["$\\bad{$"], pixels[0], np.array([[1.0, 0.0]]),
                          ["$\\bad{$", "b"])
    assert grid.read_bytes()[:4] == b"\x89PNG"


def test_auto_reports_every_method_and_picks_the_best(runs, tmp_path):
    document = build_ensemble(runs, tmp_path / "ens", "auto", folds=3, **QUIET)
    methods = document["cv"]["methods"]
    assert set(methods) == set(METHODS)
    assert document["method"] == max(methods, key=lambda m: methods[m]["macro_f1"])


def test_the_command_line_reports_errors_without_a_traceback(runs, tmp_path, capsys):
    out = str(tmp_path / "ens")
    assert main([str(tmp_path / "runs" / "member*"), "--out", out, "--method", "mean", "--quiet"]) == 0
    assert (tmp_path / "ens" / "submission.csv").exists()
    assert main([str(tmp_path / "nothing*"), "--out", str(tmp_path / "x")]) == 2
    assert "no run directory matches" in capsys.readouterr().err
    odd = tmp_path / "runs" / "r[1]"  # an existing path is a path, whatever characters it holds
    (tmp_path / "runs" / "member0").rename(odd)
    assert main([str(odd), str(tmp_path / "runs" / "member1"), str(tmp_path / "runs" / "member2"), "--out",
                 str(tmp_path / "odd"), "--method", "mean", "--quiet"]) == 0


def test_the_ensemble_imports_and_runs_without_tensorflow(runs, tmp_path):
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"  # any import of tensorflow now fails
        "from flower.commands.blend import main\n"
        f"sys.exit(main([{str(runs[0])!r}, {str(runs[1])!r}, '--out', {str(tmp_path / 'e')!r}, '--quiet']))\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_single_member_loads_with_its_name(tmp_path):
    ids = np.array(["b", "a"])
    run = write_run_dir(tmp_path / "r", "solo", ["x", "y"], ids, np.array([1, 0]),
                        np.array([[0.2, 0.8], [0.9, 0.1]], np.float32), ids, np.array([[0.5, 0.5], [1, 0]], np.float32))
    member = load_member_predictions(run)
    assert member.name == "solo" and member.val_ids.tolist() == ["a", "b"] and member.val_labels.tolist() == [0, 1]


# --- the blend earns its keep, and its CV is honest ------------------------------------------------

@pytest.fixture
def complementary(tmp_path):
    """Three members of similar skill whose errors are independent: averaging them pays off clearly."""
    return synthetic_runs(tmp_path / "comp", skills=[1.9, 2.1, 2.0], classes=10, val_rows=600, test_rows=100,
                          shared=0.0, seed=4)


@pytest.mark.parametrize("method,options", [("mean", {}), ("weighted", {}), ("weighted", {"power": True}),
                                            ("hill-climb", {}), ("stack", {})])
def test_blending_complementary_members_beats_the_best_one_by_a_clear_margin(complementary, method, options):
    aligned = load_members(complementary)
    members = member_scores(aligned.val_probs, aligned.val_labels, aligned.names, 5, 0)
    best = max(s["macro_f1"] for s in members.values())
    blend = cross_validate(aligned.val_probs, aligned.val_labels, method, options, folds=5, seed=0)["scores"]
    assert blend["macro_f1"] > best + 0.08, (method, blend["macro_f1"], best)
    weights = Blender(method, **options).fit(aligned.val_probs, aligned.val_labels).importance_
    weights = weights / weights.sum()  # the stacker's are coefficients: compare their shares
    # No member is dropped or dominates: each carries between a sixth and a half of the blend.
    assert weights.min() > 1 / 6 and weights.max() < 1 / 2, weights


def test_weighted_spreads_weight_by_skill(tmp_path):
    runs = synthetic_runs(tmp_path / "r", skills=[1.0, 2.5, 2.5], classes=8, val_rows=800, test_rows=10, shared=0.0)
    aligned = load_members(runs)
    weights = Blender("weighted").fit(aligned.val_probs, aligned.val_labels).weights_
    assert weights[0] < 0.2 and abs(weights[1] - weights[2]) < 0.2 and weights[1] > 0.3 and weights[2] > 0.3


def test_each_cv_fold_is_fitted_on_its_training_rows_only(complementary, monkeypatch):
    import ensemble.validation as validation

    aligned = load_members(complementary)
    probs, labels = aligned.val_probs, aligned.val_labels
    row_of = {probs[0, i].tobytes(): i for i in range(probs.shape[1])}
    assert len(row_of) == probs.shape[1]  # every row has its own fingerprint
    fitted_rows, predicted_rows = [], []

    class Spy(Blender):
        def fit(self, p, y):
            fitted_rows.append([row_of[r.tobytes()] for r in p[0]])
            np.testing.assert_array_equal(y, labels[fitted_rows[-1]])
            return super().fit(p, y)

        def predict_proba(self, p):
            predicted_rows.append([row_of[r.tobytes()] for r in p[0]])
            return super().predict_proba(p)

    monkeypatch.setattr(validation, "Blender", Spy)
    result = validation.cross_validate(probs, labels, "weighted", folds=4, seed=3)
    splits = validation._folds(labels, 4, 3)
    assert result["folds"] == len(splits) == len(fitted_rows) == 4
    # the folds run on several threads: one fit on each fold's training rows and one blend of its held-out rows
    assert sorted(sorted(fitted) for fitted in fitted_rows) == sorted(sorted(train.tolist()) for train, _ in splits)
    assert sorted(sorted(rows) for rows in predicted_rows) == sorted(sorted(held.tolist()) for _, held in splits)
    # The out-of-fold rows are each fold's blend, fitted without them.
    for train, held in splits:
        alone = Blender("weighted").fit(probs[:, train], labels[train]).predict_proba(probs[:, held])
        np.testing.assert_allclose(result["out_of_fold"][held], alone, rtol=1e-10)
    # Folds are stratified: every class appears in every held-out fold in about the same share.
    for _, held in splits:
        counts = np.bincount(labels[held], minlength=10)
        assert counts.min() >= 14 and counts.max() <= 16


def test_the_folds_are_fitted_at_once_on_one_thread_per_core_and_reported_in_fold_order(complementary, monkeypatch):
    import threading
    import time

    import ensemble.validation as validation

    aligned = load_members(complementary)
    probs, labels = aligned.val_probs, aligned.val_labels
    meet, lock, threads, inside, most = threading.Barrier(2, timeout=30), threading.Lock(), [], [0], [0]

    class Spy(Blender):
        def fit(self, p, y):
            with lock:
                threads.append(threading.current_thread().name)
                first_two, inside[0] = len(threads) <= 2, inside[0] + 1
                most[0] = max(most[0], inside[0])
            if first_two:
                meet.wait()  # the first two folds are fitted at the same time, or this times out
            time.sleep(0.1)  # time for a third thread, were there one, to take the next fold meanwhile
            with lock:
                inside[0] -= 1
            return super().fit(p, y)

    monkeypatch.setattr(validation, "Blender", Spy)
    monkeypatch.setattr(validation.os, "cpu_count", lambda: 2)
    lines = []
    result = validation.cross_validate(probs, labels, "mean", folds=4, seed=3, progress=lines.append)
    assert len(threads) == 4 and most == [2] and threading.current_thread().name not in threads
    assert [line.split(" macro")[0] for line in lines] == [f"  mean: fold {k}/4" for k in range(1, 5)]
    for _, held in validation._folds(labels, 4, 3):
        np.testing.assert_allclose(result["out_of_fold"][held], probs[:, held].astype(float).mean(0))


def test_the_folds_are_fitted_one_at_a_time_where_the_core_count_is_unknown(complementary, monkeypatch):
    import threading
    import time

    import ensemble.validation as validation

    aligned = load_members(complementary)
    lock, inside, most = threading.Lock(), [0], [0]

    class Spy(Blender):
        def fit(self, p, y):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)  # time for a second thread, were there one, to take the next fold meanwhile
            with lock:
                inside[0] -= 1
            return super().fit(p, y)

    monkeypatch.setattr(validation, "Blender", Spy)
    monkeypatch.setattr(validation.os, "cpu_count", lambda: None)  # os.cpu_count() may not know
    validation.cross_validate(aligned.val_probs, aligned.val_labels, "mean", folds=3, seed=3)
    assert most == [1]


def test_a_fold_that_fails_stops_the_cv_and_the_folds_not_yet_started_are_never_fitted(complementary, monkeypatch):
    import time

    import ensemble.validation as validation

    aligned = load_members(complementary)
    probs, labels = aligned.val_probs, aligned.val_labels
    first_train = validation._folds(labels, 4, 3)[0][0]
    fitted = []

    class Spy(Blender):
        def fit(self, p, y):
            if len(y) == len(first_train) and np.array_equal(y, labels[first_train]):
                raise ValueError("fold 1 is broken")
            fitted.append(len(y))
            time.sleep(1.0)  # a good fold takes a while: fold 4 is still queued when fold 1 has failed
            return super().fit(p, y)

    monkeypatch.setattr(validation, "Blender", Spy)
    monkeypatch.setattr(validation.os, "cpu_count", lambda: 2)
    with pytest.raises(ValueError, match="fold 1 is broken"):
        validation.cross_validate(probs, labels, "mean", folds=4, seed=3)
    assert len(fitted) in (1, 2)  # fold 2, perhaps fold 3 (taken as fold 1 failed); never fold 4


def test_a_blend_that_memorises_its_rows_is_caught_by_cv(complementary, monkeypatch):
    """A stacker with a huge C overfits the rows it saw: its CV score must be below its in-sample score."""
    aligned = load_members(complementary)
    probs, labels = aligned.val_probs[:, :120], aligned.val_labels[:120]
    in_sample = Blender("stack", cs=(1e6,)).fit(probs, labels)
    in_sample_f1 = macro_f1(labels, in_sample.predict(probs), 10)
    cv = cross_validate(probs, labels, "stack", {"cs": (1e6,)}, folds=4, seed=0)["scores"]["macro_f1"]
    assert cv < in_sample_f1 - 0.05


def test_the_member_scores_use_the_same_held_out_folds(complementary):
    aligned = load_members(complementary)
    probs, labels = aligned.val_probs, aligned.val_labels
    scores = member_scores(probs, labels, aligned.names, 4, 2)
    from ensemble.validation import _folds

    for m, name in enumerate(aligned.names):
        per_fold = [macro_f1(labels[h], probs[m, h].argmax(1), 10) for _, h in _folds(labels, 4, 2)]
        assert scores[name]["macro_f1"] == pytest.approx(np.mean(per_fold))
        assert scores[name]["macro_f1_std"] == pytest.approx(np.std(per_fold))


# --- the submission check, the typed spec, the estimator interface ------------------------------------

def test_a_submission_whose_rows_differ_from_the_test_ids_is_refused_and_not_written(tmp_path):
    from ensemble.output import write_submission

    probs = np.eye(3, dtype=np.float32)
    path = tmp_path / "submission.csv"
    for ids, expected, message in [
        (np.array(["a", "b", "c"]), np.array(["a", "b", "d"]), "differ from the test ids"),
        (np.array(["a", "b", "b"]), np.array(["a", "b", "c"]), "not unique"),
        (np.array(["a", "b"]), np.array(["a", "b", "c"]), "expected 3"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_submission(path, ids, probs[: len(ids)], expected_ids=expected)
        assert not path.exists()
    write_submission(path, np.array(["x,1", "y", 'z"']), probs, expected_ids=np.array(['z"', "x,1", "y"]))
    rows = list(csv.reader(open(path)))
    assert rows == [["id", "label"], ["x,1", "0"], ["y", "1"], ['z"', "2"]]  # odd ids survive the CSV round trip


def test_the_blend_spec_has_one_meaning_per_field(runs, tmp_path):
    from ensemble.spec import BlendSpec, SpecError

    aligned = load_members(runs)
    stack = Blender("stack").fit(aligned.val_probs, aligned.val_labels)
    assert stack.spec_.weights is None and stack.weights_ is None
    assert "weights" not in stack.spec_.to_dict() and np.argmax(stack.importance_) == 1
    np.testing.assert_allclose(stack.importance_, np.asarray(stack.spec_.coef).mean(1))
    document = build_ensemble(runs, tmp_path / "stack", "stack", folds=3, **QUIET)
    assert [m["weight"] for m in document["members"]] == [None, None, None]
    assert BlendSpec.from_dict(document["blend"]) == BlendSpec.from_dict(stack.spec_.to_dict())
    weighted = build_ensemble(runs, tmp_path / "weighted", "weighted", folds=3, **QUIET)
    assert [m["weight"] for m in weighted["members"]] == weighted["blend"]["weights"]
    with_weights = {**stack.spec_.to_dict(), "weights": list(stack.importance_)}  # a stacker has no weights
    with pytest.raises(SpecError, match=r"blend.method 'stack' takes no \['weights'\]"):
        BlendSpec.from_dict(with_weights)
    for bad, message in [
        ({"method": "median", "weights": [1.0]}, "blend.method must be one of"),
        ({"method": "weighted", "weights": [0.7, 0.7]}, "sum to 1"),
        ({"method": "weighted", "weights": [0.5, "x"]}, "blend.weights must hold finite numbers"),
        ({"method": "weighted", "weights": [0.5, 0.5], "powers": [1.0]}, "blend.powers has 1 entries"),
        ({"method": "mean"}, "needs 'weights'"),
        ({"method": "stack", "coef": [[1.0, 2.0]], "intercept": [0.0], "features": "log"}, "each have 1 entries"),
        ({"method": "stack", "coef": [[1.0]], "intercept": [0.0], "features": "raw"}, "blend.features"),
        ({"method": "mean", "weights": [1.0], "colour": "red"}, "unknown field"),
        ({"method": "stack", "coef": [[1.0]], "intercept": [0.0], "features": "log", "powers": [0.0]}, "takes no"),
        ({"method": "weighted", "weights": [1.0], "features": "banana", "C": -5}, "takes no \\['features', 'C'\\]"),
        ({"method": "hill-climb", "weights": [1.0], "selections": [1.5]}, "whole numbers"),
        ({"method": "hill-climb", "weights": [0.5, 0.5], "selections": [-1, 2]}, "counts >= 0"),
        ({"method": "stack", "coef": [[1.0]], "intercept": [0.0], "features": "log", "C": -1}, "blend.C must be > 0"),
        ([1, 2], "must be a JSON object"),
    ]:
        with pytest.raises(SpecError, match=message):
            BlendSpec.from_dict(bad)
    with pytest.raises(ValueError, match="expected probabilities of 2 members"):
        apply_blend({"method": "mean", "weights": [0.5, 0.5]}, aligned.test_probs)


def test_the_blender_is_a_scikit_learn_estimator(runs):
    from sklearn.base import clone

    aligned = load_members(runs)
    blender = Blender("hill-climb", patience=3, iterations=7)
    assert blender.get_params()["patience"] == 3 and blender.get_params()["method"] == "hill-climb"
    copy = clone(blender).set_params(iterations=1)
    assert copy.iterations == 1 and blender.iterations == 7 and not hasattr(copy, "spec_")
    one_step = copy.fit(aligned.val_probs, aligned.val_labels).spec_
    assert sum(one_step.selections) == 1  # one iteration picks one member
    assert repr(Blender("stack", cs=(1.0,))) == "Blender(cs=(1.0,), method='stack')"
    with pytest.raises(TypeError):
        Blender("weighted", powr=True)  # a misspelt option is an error, not silently ignored


# --- claims pinned by mutation testing (docs/TESTING.md): each test kills mutants that the tests above let live ---

def _members(seed: int, rows: int = 240, classes: int = 6, skills=(1.0, 2.0, 1.5)) -> tuple[np.ndarray, np.ndarray]:
    """Small synthetic validation probabilities [M, rows, classes] (float64) and their labels."""
    from testkit.synthetic import synthetic_probs

    labels = np.arange(rows) % classes
    return synthetic_probs(labels, list(skills), classes, np.random.default_rng(seed), shared=0.5).astype(float), labels


def _tempered(probs: np.ndarray, power: float) -> np.ndarray:
    """Probabilities raised to a power and renormalised: a power > 1 makes them over-confident, < 1 under-."""
    q = probs**power
    return q / q.sum(-1, keepdims=True)


def _simplex_gradient(weights: np.ndarray, true_class: np.ndarray) -> np.ndarray:
    """d(log loss)/d(weight m) of the blend `weights @ true_class` ([M, N] true-class probabilities).

    At the minimum on the simplex (the loss is convex) every member with weight has a gradient of exactly
    weights @ gradient == -1, and no member has less.
    """
    return -(true_class / (weights @ true_class)).mean(1)


def test_weighted_weights_are_the_log_loss_optimum_on_the_simplex():
    probs, labels = _members(1)
    weights = Blender("weighted").fit(probs, labels).weights_
    gradient = _simplex_gradient(weights, probs[:, np.arange(len(labels)), labels])
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0) and (weights > 0.02).sum() >= 2
    assert (gradient >= -1 - 1e-4).all(), gradient
    np.testing.assert_allclose(gradient[weights > 0.02], -1.0, atol=1e-4)


def test_weighted_with_powers_is_at_the_optimum_of_its_log_loss_and_beats_plain_weights():
    probs, labels = _members(3)
    probs = np.stack([_tempered(probs[0], 3.0), probs[1], _tempered(probs[2], 0.4)])
    rows = np.arange(len(labels))
    spec = Blender("weighted", power=True).fit(probs, labels).spec_
    weights, powers = np.array(spec.weights), np.array(spec.powers)

    def true_class(t):
        return np.stack([_tempered(p, k) for p, k in zip(probs, t, strict=True)])[:, rows, labels]

    def log_loss(w, t):
        return -np.log(w @ true_class(t)).mean()

    plain = Blender("weighted").fit(probs, labels).weights_
    assert log_loss(weights, powers) < log_loss(plain, np.ones(3)) - 0.02
    assert ((powers > 0.1) & (powers < 10)).all() and (weights > 0.02).sum() >= 2
    gradient = _simplex_gradient(weights, true_class(powers))
    assert (gradient >= -1 - 1e-4).all(), gradient
    np.testing.assert_allclose(gradient[weights > 0.02], -1.0, atol=1e-4)
    for m in np.flatnonzero(weights > 0.02):  # and no member's power can move to lower the loss
        step = np.eye(3)[m] * 1e-5
        slope = (log_loss(weights, powers + step) - log_loss(weights, powers - step)) / 2e-5
        assert abs(slope) < 1e-4, (m, slope)


@pytest.mark.parametrize("sharpness,power", [(2.0, 0.5), (0.5, 2.0), (40.0, 0.1), (1 / 40, 10.0)])
def test_a_fitted_power_undoes_over_and_under_confidence_within_0_1_and_10(sharpness, power):
    from scipy.special import softmax

    rng = np.random.default_rng(2)
    truth = softmax(rng.normal(0.0, 1.5, (3000, 5)), axis=1)  # calibrated: the labels are drawn from it
    labels = (truth.cumsum(1) < rng.random((3000, 1))).sum(1)
    member = _tempered(truth, sharpness)[None]
    blender = Blender("weighted", power=True).fit(member, labels)
    if power in (0.1, 10.0):  # the bounds of a fitted power
        assert blender.spec_.powers[0] == pytest.approx(power, rel=1e-6)
    else:
        assert blender.spec_.powers[0] == pytest.approx(power, rel=0.1)
        np.testing.assert_allclose(blender.predict_proba(member), truth, atol=0.03)


def test_a_power_blend_renormalises_each_member_before_weighting_and_zeros_stay_finite():
    p = np.array([[[0.5, 0.3, 0.2], [0.0, 0.2, 0.8]], [[0.1, 0.1, 0.8], [0.6, 0.4, 0.0]]])
    spec = {"method": "weighted", "weights": [0.25, 0.75], "powers": [2.0, 0.5]}
    np.testing.assert_allclose(apply_blend(spec, p), 0.25 * _tempered(p[0], 2.0) + 0.75 * _tempered(p[1], 0.5),
                               atol=1e-5)
    plain = {"method": "weighted", "weights": [0.25, 0.75]}
    np.testing.assert_allclose(apply_blend(plain, p), 0.25 * p[0] + 0.75 * p[1], atol=1e-12)


@pytest.mark.parametrize("features", ["log", "probs"])
def test_a_stacker_is_a_softmax_of_coefficients_times_features_plus_biases(features):
    from scipy.special import softmax

    p = np.array([[[0.5, 0.3, 0.2], [0.0, 0.2, 0.8]], [[0.1, 0.1, 0.8], [0.6, 0.4, 0.0]]])
    coef, bias = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, -1.0]]), np.array([0.1, 0.0, -0.3])
    spec = {"method": "stack", "features": features, "C": 1.0, "coef": coef.tolist(), "intercept": bias.tolist()}
    x = np.log(np.maximum(p, 1e-12)) if features == "log" else p
    np.testing.assert_allclose(apply_blend(spec, p), softmax(x[0] * coef[0] + x[1] * coef[1] + bias, axis=1),
                               rtol=1e-9)


def _stack_objective(coef: np.ndarray, bias: np.ndarray, x: np.ndarray, labels: np.ndarray, c: float) -> float:
    """The stacker's documented loss: mean cross-entropy + (|deviations|^2 + |biases|^2) / (2 C N)."""
    from scipy.special import logsumexp

    logits = np.einsum("mnc,mc->nc", x, coef) + bias
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    deviations = coef - coef.mean(1, keepdims=True)  # the unpenalised member weight is each row's mean
    n = len(labels)
    return -log_p[np.arange(n), labels].mean() + ((deviations**2).sum() + (bias**2).sum()) / (2 * c * n)


@pytest.mark.parametrize("features,c", [("log", 0.05), ("probs", 0.05), ("log", 5.0)])
def test_the_stacker_minimises_its_documented_loss(features, c):
    probs, labels = _members(4, rows=180, classes=4)
    spec = Blender("stack", features=features, cs=(c,)).fit(probs, labels).spec_
    assert spec.C == c and spec.features == features
    coef, bias = np.array(spec.coef), np.array(spec.intercept)
    x = np.log(np.maximum(probs, 1e-12)) if features == "log" else probs
    params = np.concatenate([coef.ravel(), bias])

    def objective(v):
        return _stack_objective(v[: coef.size].reshape(coef.shape), v[coef.size:], x, labels, c)

    step = 1e-5
    slopes = [(objective(params + step * e) - objective(params - step * e)) / (2 * step) for e in np.eye(len(params))]
    assert np.abs(slopes).max() < 2e-4, np.abs(slopes).max()


def test_the_stackers_loss_is_the_documented_loss_and_its_gradient_the_loss_slope_at_any_point():
    from scipy.special import log_softmax

    from ensemble.blend import _stack_loss

    probs, labels = _members(2, rows=40, classes=3)
    x = np.log(probs)  # float64 features: the loss is exact
    m, n, c = x.shape
    params = np.random.default_rng(0).normal(0.0, 0.5, m + m * c + c)
    beta, delta, bias = params[:m], params[m:m + m * c].reshape(m, c), params[m + m * c:]
    log_p = log_softmax(np.einsum("mnc,mc->nc", x, beta[:, None] + delta) + bias, axis=1)
    expected = -log_p[np.arange(n), labels].mean() + ((delta**2).sum() + (bias**2).sum()) / (2 * 0.7 * n)
    loss = _stack_loss(x, labels, 0.7)
    value, grad = loss(params)
    assert value == pytest.approx(expected, rel=1e-12)
    step = 1e-6
    slopes = [(loss(params + step * e)[0] - loss(params - step * e)[0]) / (2 * step) for e in np.eye(len(params))]
    np.testing.assert_allclose(grad, slopes, atol=1e-8)


def test_the_stackers_loss_stays_exact_with_logits_a_thousand_apart():
    from scipy.special import log_softmax

    from ensemble.blend import _stack_loss

    x = np.array([[[1000.0, 0.0, -5.0], [-1000.0, -1001.0, -1003.0]]])  # one member, two rows far apart
    labels = np.array([1, 0])
    value, grad = _stack_loss(x, labels, 1.0)(np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert value == pytest.approx(-log_softmax(x[0], axis=1)[[0, 1], labels].mean(), rel=1e-12)
    assert np.isfinite(grad).all()


def test_a_stacker_fit_stops_after_200_lbfgs_steps(monkeypatch):
    from ensemble import blend
    from testkit.synthetic import synthetic_probs

    labels = np.arange(100) % 10
    probs = synthetic_probs(labels, [1.5, 4.0, 2.0], 10, np.random.default_rng(0))
    steps, real = [], blend.minimize

    def counted(*args, **kwargs):
        result = real(*args, **kwargs)
        steps.append(result.nit)
        return result

    monkeypatch.setattr(blend, "minimize", counted)
    Blender("stack", cs=(1e3,)).fit(probs, labels)
    assert steps == [200]  # ten rows a class, a weak penalty: 318 steps to converge; the cap bounds the time


def _inner_cv_choice(probs, labels, cs, folds, seed):
    """The C of the lowest stratified K-fold log loss, computed with the public API; and the losses."""
    from sklearn.model_selection import StratifiedKFold

    losses = {}
    for c in cs:
        losses[c] = 0.0
        for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels):
            q = Blender("stack", cs=(c,)).fit(probs[:, train], labels[train]).predict_proba(probs[:, held])
            losses[c] -= np.log(q[np.arange(len(held)), labels[held]]).sum()
    return min(cs, key=losses.get), losses


def test_the_stacker_picks_the_c_with_the_lowest_inner_cv_log_loss_of_its_own_folds_and_seed():
    probs, labels = _members(4, rows=60, classes=3)
    cs = (0.01, 0.03, 0.1)
    chosen = set()
    for folds, seed in [(4, 1), (4, 3), (3, 1)]:
        best, _ = _inner_cv_choice(probs, labels, cs, folds, seed)
        assert Blender("stack", cs=cs, folds=folds, seed=seed).fit(probs, labels).spec_.C == best, (folds, seed)
        chosen.add(best)
    assert len(chosen) == 3  # on these rows the choice depends on the inner folds, so another split would show


def test_the_stacker_cross_validates_two_cs_and_ignores_absent_classes():
    probs, labels = _members(4, rows=60, classes=3)
    best, _ = _inner_cv_choice(probs, labels, (0.1, 0.03), 4, 1)
    assert best == 0.1 and Blender("stack", cs=(0.1, 0.03), folds=4, seed=1).fit(probs, labels).spec_.C == 0.1
    no_class_1 = np.where(labels == 1, 2, labels)
    cs = (0.01, 0.03, 0.1, 0.3)
    best, _ = _inner_cv_choice(probs, no_class_1, cs, 4, 1)
    assert best == 0.3 and Blender("stack", cs=cs, folds=4, seed=1).fit(probs, no_class_1).spec_.C == 0.3


def test_the_stacker_cross_validates_c_with_two_rows_in_a_class_and_else_keeps_the_middle_c():
    probs, labels = _members(4, rows=60, classes=3)
    labels = labels.copy()
    rare = np.flatnonzero(labels == 2)
    labels[rare[2:]] = 0  # class 2 keeps two rows: two inner folds
    cs = (0.3, 1e3, 1e-3)
    best, _ = _inner_cv_choice(probs, labels, cs, 2, 0)
    assert best != cs[1] and Blender("stack", cs=cs).fit(probs, labels).spec_.C == best
    labels[rare[1]] = 0  # one row: no inner CV is possible
    assert Blender("stack").fit(probs, labels).spec_.C == 1.0
    assert Blender("stack", cs=(0.1, 10.0, 100.0, 1e3)).fit(probs, labels).spec_.C == 100.0


def test_the_stacker_walks_the_c_path_up_from_the_smallest_c_warm_started_and_stops_where_the_loss_turns_up(
        monkeypatch):
    from ensemble import blend

    probs, labels = _members(0, rows=120, classes=4)
    cs = (10.0, 0.1, 0.01, 1.0)  # in any order
    best, losses = _inner_cv_choice(probs, labels, cs, 3, 0)  # cold fits of every C
    assert best == 0.1 and losses[0.01] > losses[0.1] < losses[1.0]
    fits, real = [], blend._fit_stack_once

    def spy(features, fold_labels, c_reg, start=None):
        params = real(features, fold_labels, c_reg, start)
        fits.append((c_reg, len(fold_labels), None if start is None else start.copy(), params))
        return params

    monkeypatch.setattr(blend, "_fit_stack_once", spy)
    spec = Blender("stack", cs=cs).fit(probs, labels).spec_
    assert spec.C == 0.1
    # three inner folds of 80 rows at 0.01, 0.1 and 1 (higher than 0.1: the path stops), then all 120 rows
    assert [(c, rows) for c, rows, _, _ in fits] == [(0.01, 80)] * 3 + [(0.1, 80)] * 3 + [(1.0, 80)] * 3 + [(0.1, 120)]
    assert all(start is None for _, _, start, _ in fits[:3])
    for k in range(3, 9):  # each fold's fit starts from the same fold's fit at the previous C
        np.testing.assert_array_equal(fits[k][2], fits[k - 3][3])
    np.testing.assert_array_equal(fits[9][2], np.mean([params for *_, params in fits[3:6]], axis=0))
    cold = Blender("stack", cs=(0.1,)).fit(probs, labels).spec_  # no inner CV: a cold start
    np.testing.assert_allclose(np.array(spec.coef), np.array(cold.coef), atol=1e-4)
    np.testing.assert_allclose(spec.intercept, cold.intercept, atol=1e-4)


def test_blends_are_fitted_with_one_blas_thread_and_the_setting_is_restored(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from ensemble import blend

    inside, real = [], blend.fit_stack
    monkeypatch.setattr(blend, "fit_stack", lambda *a, **k: inside.append(threadpool_info()) or real(*a, **k))
    probs, labels = _members(1, rows=60, classes=3)
    with threadpool_limits(2):
        Blender("stack", cs=(1.0,)).fit(probs, labels)
        after = threadpool_info()
    assert {lib["num_threads"] for lib in inside[0]} == {1}
    assert {lib["num_threads"] for lib in after} == {2}


def test_blender_errors_name_the_problem():
    probs, labels = _members(6, rows=24)
    with pytest.raises(ValueError, match=r"unknown blend method 'median'; expected one of \('mean', 'weighted'"):
        Blender("median").fit(probs, labels)
    with pytest.raises(ValueError, match=r"with 23 rows, got \(3, 24, 6\)"):
        Blender("mean").fit(probs, labels[:-1])
    with pytest.raises(ValueError, match=r"expected probabilities \[members, rows, classes\] with 6 rows, "
                                         r"got \(6, 6\)"):
        Blender("mean").fit(probs[0, :6], labels[:6])  # rows of one member, not [members, rows, classes]
    with pytest.raises(ValueError, match="stack features must be 'log' or 'probs', got 'raw'"):
        Blender("stack", features="raw").fit(probs, labels)
    with pytest.raises(ValueError, match=r"expected probabilities of 3 members as \[M, N, C\], got \(24, 6\)"):
        Blender("mean").fit(probs, labels).predict_proba(probs[0])
    stack = Blender("stack", cs=(1.0,)).fit(probs, labels)
    with pytest.raises(ValueError, match="the stacker was fitted on 6 classes, got 5"):
        stack.predict_proba(probs[:, :, :5])


def test_one_blas_thread_lasts_until_the_last_of_several_holders_leaves():
    from threadpoolctl import threadpool_info, threadpool_limits

    from ensemble.blend import one_blas_thread as shared

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info()}

    one_blas_thread = type(shared)()  # a fresh one, as at import
    with threadpool_limits(2):
        one_blas_thread.__enter__()  # the CV's thread
        one_blas_thread.__enter__()  # a fold's fit on another thread
        assert blas_threads() == {1}
        one_blas_thread.__exit__(None, None, None)  # whichever leaves first
        assert blas_threads() == {1}
        one_blas_thread.__exit__(None, None, None)
        assert blas_threads() == {2}


def test_the_default_blender_is_the_mean_and_predict_is_the_rowwise_argmax():
    probs, labels = _members(7, rows=60)
    blender = Blender().fit(probs, labels)
    assert blender.spec_.method == "mean"
    np.testing.assert_array_equal(blender.predict(probs), probs.mean(0).argmax(1))


def test_the_blender_defaults_are_the_ones_the_command_line_relies_on():
    # The CLI sets only power, features and seed; the rest of every blend it makes comes from these defaults.
    assert Blender().get_params() == {"method": "mean", "power": False, "iterations": 100, "patience": 15,
                                      "features": "log", "cs": (0.1, 1.0, 10.0), "folds": 3, "seed": 0}


def _greedy_path(probs: np.ndarray, labels: np.ndarray, steps: int) -> list[tuple[float, tuple[int, ...]]]:
    """Hill-climb's documented step, repeated: add the member whose addition gives the best macro F1 (the
    first on ties), even if that is worse than before. Returns (macro F1, selection counts) after each step."""
    total, counts, path = np.zeros(probs.shape[1:]), np.zeros(len(probs), int), []
    for _ in range(steps):
        candidates = [macro_f1(labels, (total + p).argmax(1), probs.shape[2]) for p in probs]
        j = int(np.argmax(candidates))
        total, counts[j] = total + probs[j], counts[j] + 1
        path.append((candidates[j], tuple(counts.tolist())))
    return path


def test_hill_climb_keeps_the_best_prefix_and_stops_after_patience_steps_without_a_new_best():
    probs, labels = _members(14, rows=90, classes=5, skills=(1.0, 1.2, 0.8, 1.1))
    path = _greedy_path(probs, labels, 40)
    found = set()
    for patience in (1, 2, 3, 4):
        best, selections, since = -1.0, None, 0
        for score, counts in path:
            if score > best:
                best, selections, since = score, counts, 0
            else:
                since += 1
                if since == patience:
                    break
        spec = Blender("hill-climb", patience=patience).fit(probs, labels).spec_
        assert spec.selections == selections, patience
        np.testing.assert_allclose(spec.weights, np.array(selections) / sum(selections))
        found.add(selections)
    three_steps = Blender("hill-climb", iterations=3, patience=40).fit(probs, labels).spec_.selections
    assert three_steps == max(path[:3], key=lambda step: step[0])[1]  # the best of the first three steps
    # Here the path recovers after 1, 1, 2 and then 3 flat steps, so each patience ends somewhere else, and
    # the best prefix picks a member more than once (the selection is with replacement).
    assert len(found) == 4 and max(max(s) for s in found) >= 2
    assert json.dumps(spec.to_dict()["selections"]) == json.dumps(list(selections))  # counts, not floats


def test_hill_climb_stops_at_a_perfect_member_and_adds_nothing_to_it():
    probs, labels = _members(12, rows=60, classes=3)
    probs[1] = np.eye(3)[labels] * 0.9 + 0.1 / 3  # member 1 is always right
    spec = Blender("hill-climb").fit(probs, labels).spec_
    assert spec.selections == (0, 1, 0) and spec.weights == (0.0, 1.0, 0.0)


def test_cv_uses_fewer_folds_when_the_rarest_class_is_small_and_refuses_a_single_row():
    probs, labels = _members(8, rows=60, classes=3)
    labels = labels.copy()
    labels[np.flatnonzero(labels == 1)[3:]] = 0  # class 1 keeps three rows
    assert cross_validate(probs, labels, "mean", folds=5, seed=0)["folds"] == 3
    assert cross_validate(probs, labels, "mean")["folds"] == 3  # the default asks for 5
    assert cross_validate(probs, np.where(labels == 1, 2, labels), "mean", folds=4)["folds"] == 4  # no class 1
    labels[np.flatnonzero(labels == 1)[2:]] = 0
    assert cross_validate(probs, labels, "mean", folds=5, seed=0)["folds"] == 2  # two rows: two folds still work
    labels[np.flatnonzero(labels == 1)[1:]] = 0
    with pytest.raises(ValueError, match=r"cannot cross-validate: a class has only 1 validation row\(s\); "
                                         r"need at least 2"):
        cross_validate(probs, labels, "mean", folds=5, seed=0)


def test_cv_scores_are_the_mean_of_the_folds_scores_and_cover_every_row():
    from ensemble.scores import scores
    from ensemble.validation import _folds

    probs, labels = _members(9, rows=120, classes=4)
    result = cross_validate(probs, labels, "weighted", {"power": True}, folds=4, seed=1)
    splits = _folds(labels, 4, 1)
    np.testing.assert_array_equal(np.sort(np.concatenate([held for _, held in splits])), np.arange(120))
    for train, held in splits:  # each fold's blend is fitted with the method's options
        alone = Blender("weighted", power=True).fit(probs[:, train], labels[train])
        np.testing.assert_allclose(result["out_of_fold"][held], alone.predict_proba(probs[:, held]), rtol=1e-12)
    per_fold = [scores(labels[held], result["out_of_fold"][held]) for _, held in splits]
    for key in ("macro_f1", "accuracy", "log_loss"):
        assert result["scores"][key] == pytest.approx(np.mean([f[key] for f in per_fold]), rel=1e-12)
    assert result["scores"]["macro_f1_std"] == pytest.approx(np.std([f["macro_f1"] for f in per_fold]), rel=1e-12)
    assert len({round(f["macro_f1"], 9) for f in per_fold}) > 1  # so the std above is not trivially 0
    # By default: 5 folds, seed 0 (as the command line); another seed gives other folds.
    default = cross_validate(probs, labels, "mean")
    assert default["folds"] == 5
    assert default["scores"] == cross_validate(probs, labels, "mean", folds=5, seed=0)["scores"]
    assert default["scores"] != cross_validate(probs, labels, "mean", folds=5, seed=1)["scores"]


def test_cv_reports_each_fold_as_it_goes():
    import re

    probs, labels = _members(10, rows=60, classes=3)
    lines = []
    assert cross_validate(probs, labels, "hill-climb", folds=3, seed=0, progress=lines.append)["folds"] == 3
    assert len(lines) == 3
    for k, line in enumerate(lines, 1):
        match = re.fullmatch(rf"  hill-climb: fold {k}/3 macro F1 \d\.\d{{4}} \((\d+\.\d) s\)", line)
        assert match and float(match[1]) < 60, line  # the fold's own fitting time


def test_auto_picks_the_best_cv_macro_f1_and_the_simplest_method_on_a_tie(monkeypatch):
    import ensemble.validation as validation

    table, calls = {}, []

    def fake_cross_validate(probs, labels, method, options=None, folds=5, seed=0, progress=None):
        calls.append((method, options, folds, seed, progress))
        return {"scores": {"macro_f1": table[method]}}

    monkeypatch.setattr(validation, "cross_validate", fake_cross_validate)
    options = {"stack": {"cs": (1.0,)}, "weighted": {"power": True}}
    table.update({"mean": 0.8, "weighted": 0.8 + 1e-11, "hill-climb": 0.7, "stack": 0.8})  # under 1e-10: a tie
    best, results = validation.choose_method("probs", "labels", options, folds=4, seed=9, progress=print)
    assert best == "mean" and set(results) == set(METHODS)
    assert results["weighted"]["scores"]["macro_f1"] == table["weighted"]
    assert calls == [(m, options.get(m), 4, 9, print) for m in METHODS]  # each method's own options
    table.update({"weighted": 0.8, "hill-climb": 0.81, "stack": 0.81})
    assert validation.choose_method("probs", "labels", options, folds=4, seed=9)[0] == "hill-climb"
    table.update({"stack": 0.82})
    assert validation.choose_method("probs", "labels", options, folds=4, seed=9)[0] == "stack"


def test_a_member_fitted_on_its_validation_rows_is_refused(runs, tmp_path):
    (runs[2] / "member.json").write_text(json.dumps({"name": "member2", "config": {"data": {"train_on_val": True}}}))
    with pytest.raises(MemberError, match="member 'member2'.*trained on its validation rows"):
        load_members(runs)


def test_the_submission_can_be_checked_against_the_competitions_ids(runs, tmp_path, capsys):
    test_ids = sorted(np.load(runs[0] / "predictions" / "test.npz")["ids"].tolist())
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("id,label\n" + "".join(f"{i},0\n" for i in reversed(test_ids)))
    members = [str(r) for r in runs]
    assert main([*members, "--out", str(tmp_path / "ok"), "--method", "mean", "--expect-ids", str(sample),
                 "--quiet"]) == 0
    sample.write_text("id,label\n" + "".join(f"{i},0\n" for i in test_ids[:-1]))
    assert main([*members, "--out", str(tmp_path / "short"), "--method", "mean", "--expect-ids", str(sample),
                 "--quiet"]) == 2
    assert "submission has 300 ids" in capsys.readouterr().err and not (tmp_path / "short" / "submission.csv").exists()
    (tmp_path / "noid.csv").write_text("name,label\nx,0\n")
    assert main([*members, "--out", str(tmp_path / "x"), "--expect-ids", str(tmp_path / "noid.csv")]) == 2
    assert "has no 'id' column" in capsys.readouterr().err
    assert main([*members, "--out", str(tmp_path / "y"), "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err


def test_members_with_the_same_name_get_advice(runs):
    for run in runs[:2]:
        (run / "member.json").write_text(json.dumps({"name": "member"}))
    with pytest.raises(MemberError, match="--set name="):
        load_members(runs)


def _refit_of(original, tmp_path, **member):
    """A refit member of `original`: in-sample validation predictions, its own test predictions."""
    with np.load(original / "predictions" / "val.npz") as val, np.load(original / "predictions" / "test.npz") as test:
        labels, classes = val["labels"], json.loads((original / "classes.json").read_text())
        perfect = np.eye(len(classes), dtype=np.float32)[labels]
        shifted = np.roll(test["probs"], 1, axis=1)
        refit = write_run_dir(tmp_path / "refit", "refit", classes, val["ids"], labels, perfect, test["ids"], shifted)
    document = {"name": "refit", "config": {"data": {"train_on_val": True}},
                "validation_from": os.path.relpath(original, refit), **member}
    (refit / "member.json").write_text(json.dumps(document))
    return refit


def test_a_refit_member_is_blended_on_its_originals_validation_predictions(runs, tmp_path):
    refit = _refit_of(runs[0], tmp_path)
    loaded, original = load_member_predictions(refit), load_member_predictions(runs[0])
    np.testing.assert_array_equal(loaded.val_probs, original.val_probs)  # not its own in-sample rows
    np.testing.assert_array_equal(loaded.val_ids, original.val_ids)
    with np.load(refit / "predictions" / "test.npz") as test:
        order = np.argsort(test["ids"])
        np.testing.assert_array_equal(loaded.test_probs, test["probs"][order])  # its own test predictions
    assert loaded.name == "refit"
    assert main([str(refit), str(runs[1]), "--out", str(tmp_path / "ens"), "--method", "mean", "--quiet"]) == 0


@pytest.mark.parametrize("member,message", [
    ({"validation_from": ""}, "trained on its validation rows.*--refit-of"),
    ({"validation_from": "../nowhere"}, "nowhere is not a run directory"),
])
def test_a_refit_whose_validation_source_is_missing_is_refused(runs, tmp_path, member, message):
    with pytest.raises(MemberError, match=message):
        load_member_predictions(_refit_of(runs[0], tmp_path, **member))


def test_a_refit_of_a_refit_or_of_other_classes_is_refused(runs, tmp_path):
    (runs[0] / "member.json").write_text(json.dumps({"name": "member0", "config": {"data": {"train_on_val": True}}}))
    with pytest.raises(MemberError, match="member0 was trained on its validation rows too"):
        load_member_predictions(_refit_of(runs[0], tmp_path))
    (runs[0] / "member.json").write_text(json.dumps({"name": "member0"}))
    refit = _refit_of(runs[0], tmp_path)
    classes = json.loads((refit / "classes.json").read_text())
    (refit / "classes.json").write_text(json.dumps(classes[::-1]))
    with pytest.raises(MemberError, match="its classes differ"):
        load_member_predictions(refit)


@pytest.mark.parametrize("damage, says", [
    ("garbled header", r"holds a corrupt array \(a garbled \.npy header"),
    ("stored without .npy", r"holds no predictions: 'probs' is not stored as an \.npy array"),
])
def test_a_prediction_file_with_a_garbled_array_header_or_a_raw_member_is_named_not_a_traceback(runs, damage, says):
    import io
    import zipfile

    path = runs[1] / "predictions" / "test.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            npy = io.BytesIO()
            np.save(npy, value)
            if key != "probs":
                archive.writestr(f"{key}.npy", npy.getvalue())
            elif damage == "garbled header":  # numpy reads the header dict with Python's tokenizer: TokenError
                archive.writestr("probs.npy", npy.getvalue().replace(b"}", b" ", 1))
            else:  # a member without .npy's name and magic: numpy hands back its bytes instead of an array
                archive.writestr("probs", b"0.1,0.9\n")
    with pytest.raises(MemberError, match=rf"^member 'member1': test.npz {says}"):
        load_members(runs)


def test_a_prediction_file_whose_array_header_declares_more_than_it_holds_is_refused_unread(runs):
    import io
    import zipfile

    path = runs[1] / "predictions" / "test.npz"
    with np.load(path) as data:
        ids = data["ids"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 4)})
    ids_npy = io.BytesIO()
    np.save(ids_npy, ids)
    with zipfile.ZipFile(path, "w") as archive:  # 300 bytes that ask numpy for 16 TiB
        archive.writestr("ids.npy", ids_npy.getvalue())
        archive.writestr("probs.npy", header.getvalue() + bytes(16))
    with pytest.raises(MemberError, match=r"^member 'member1': test.npz holds no predictions: probs.npy declares "
                                          r"\(1099511627776, 4\) float32 \(17592186044416 bytes\) in \d+ bytes"):
        load_members(runs)  # (^: said once, not wrapped again as 'holds a corrupt array (...)')
