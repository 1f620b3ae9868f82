"""The ensemble: loading and alignment with every error, blending methods, honest CV, outputs, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ensemble.blend import METHODS, Blender, apply_blend
from ensemble.build import build_ensemble
from ensemble.cli import main
from ensemble.members import MemberError, load_member_predictions, load_members
from ensemble.scores import macro_f1
from ensemble.synthetic import synthetic_runs, write_run_dir
from ensemble.validation import cross_validate, member_scores

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
        (lambda r: _rewrite(r, "test", ids=np.array([object()] * 300, dtype=object)), "need pickle"),
        (lambda r: _rewrite(r, "val", labels=np.full(400, 12)), "labels out of range"),
        (lambda r: (r / "predictions" / "test.npz").write_bytes(b"garbage"), "not a readable .npz"),
        (lambda r: (r / "predictions" / "test.npz").unlink(), "test.npz not found"),
    ],
)
def test_a_broken_member_file_is_named_with_its_problem(runs, break_it, message):
    break_it(runs[1])
    with pytest.raises(MemberError, match=f"member 'member1'.*({message})"):
        load_members(runs)


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
    from ensemble.synthetic import synthetic_probs

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


def test_the_ensemble_imports_and_runs_without_tensorflow(runs, tmp_path):
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"  # any import of tensorflow now fails
        "from ensemble.cli import main\n"
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
    for (train, held), fitted, predicted in zip(splits, fitted_rows, predicted_rows, strict=True):
        assert sorted(fitted) == sorted(train.tolist()) and not set(fitted) & set(held.tolist())
        assert sorted(predicted) == sorted(held.tolist())
    # The out-of-fold rows are each fold's blend, fitted without them.
    for train, held in splits:
        alone = Blender("weighted").fit(probs[:, train], labels[train]).predict_proba(probs[:, held])
        np.testing.assert_allclose(result["out_of_fold"][held], alone, rtol=1e-10)
    # Folds are stratified: every class appears in every held-out fold in about the same share.
    for _, held in splits:
        counts = np.bincount(labels[held], minlength=10)
        assert counts.min() >= 14 and counts.max() <= 16


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
    legacy = {**stack.spec_.to_dict(), "weights": list(stack.importance_)}  # what older files held
    np.testing.assert_allclose(apply_blend(legacy, aligned.test_probs), stack.predict_proba(aligned.test_probs))
    for bad, message in [
        ({"method": "median", "weights": [1.0]}, "blend.method must be one of"),
        ({"method": "weighted", "weights": [0.7, 0.7]}, "sum to 1"),
        ({"method": "weighted", "weights": [0.5, "x"]}, "blend.weights must hold finite numbers"),
        ({"method": "weighted", "weights": [0.5, 0.5], "powers": [1.0]}, "blend.powers has 1 entries"),
        ({"method": "mean"}, "needs 'weights'"),
        ({"method": "stack", "coef": [[1.0, 2.0]], "intercept": [0.0], "features": "log"}, "each have 1 entries"),
        ({"method": "stack", "coef": [[1.0]], "intercept": [0.0], "features": "raw"}, "blend.features"),
        ({"method": "mean", "weights": [1.0], "colour": "red"}, "unknown field"),
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
