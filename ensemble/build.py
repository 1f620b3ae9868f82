"""Build an ensemble directory from run directories: load, cross-validate, fit, write (no TensorFlow)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigError
from ensemble.blend import Blender
from ensemble.members import Aligned, load_members
from ensemble.output import (
    check_out_dir,
    plot_scores,
    plot_weights,
    publish_directory,
    write_ensemble_json,
    write_report,
    write_submission,
)
from ensemble.spec import METHODS
from ensemble.validation import choose_method, cross_validate, member_scores

Progress = Callable[[str], None]


def score_methods(aligned: Aligned, method: str, folds: int, seed: int, options: dict[str, dict[str, Any]],
                  progress: Progress) -> tuple[str, dict[str, Any], dict[str, dict[str, float]] | None]:
    """Cross-validate the chosen method (or, for 'auto', every method and pick the best)."""
    labels, probs = aligned.val_labels, aligned.val_probs
    if method != "auto":
        return method, cross_validate(probs, labels, method, options.get(method), folds, seed, progress), None
    method, results = choose_method(probs, labels, options, folds, seed, progress)
    progress(f"auto chose {method!r}")
    return method, results[method], {m: r["scores"] for m, r in results.items()}


def build_ensemble(
    runs: list[Path], out_dir: Path, method: str = "auto", folds: int = 5, seed: int = 0,
    options: dict[str, dict[str, Any]] | None = None, progress: Progress = print,
    expected_test_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Load, cross-validate, fit and write the ensemble directory; return the ensemble.json content.

    `options` maps a method to its Blender keywords, e.g. {"weighted": {"power": True}}.
    `expected_test_ids` (e.g. the ids of the competition's sample submission) are the ids the
    submission must hold; by default the test ids the members agree on. The directory is replaced
    as one unit (see ensemble.output.publish_directory): on any error it is left as it was.
    """
    if method not in (*METHODS, "auto"):
        raise ConfigError(f"unknown method {method!r}; expected one of {(*METHODS, 'auto')}")
    out_dir = check_out_dir(out_dir)
    options = options or {}
    start = time.perf_counter()
    aligned = load_members(runs)
    progress(f"loaded {len(aligned.members)} members: {len(aligned.val_ids)} validation rows, "
             f"{len(aligned.test_ids)} test rows, {len(aligned.classes)} classes")
    members_cv = member_scores(aligned.val_probs, aligned.val_labels, aligned.names, folds, seed)
    method, chosen, methods_cv = score_methods(aligned, method, folds, seed, options, progress)
    blender = Blender(method, **options.get(method, {})).fit(aligned.val_probs, aligned.val_labels)
    test_blend = blender.predict_proba(aligned.test_probs)

    cv = {"folds": chosen["folds"], "seed": seed, "blend": chosen["scores"], "members": members_cv}
    if methods_cv:
        cv["methods"] = methods_cv
    expected = aligned.test_ids if expected_test_ids is None else expected_test_ids

    def write(stage: Path) -> dict[str, Any]:
        write_submission(stage / "submission.csv", aligned.test_ids, test_blend, expected_ids=expected)
        path = write_ensemble_json(stage, aligned, blender.spec_, cv, {"seconds": time.perf_counter() - start},
                                   final_dir=out_dir)
        plot_weights(stage / "weights.png", aligned.names, blender.spec_)
        plot_scores(stage / "scores.png", members_cv, chosen["scores"])
        write_report(stage, aligned, method, chosen["scores"], members_cv, chosen["out_of_fold"], methods_cv)
        return json.loads(path.read_text())

    document = publish_directory(out_dir, write)
    best = max(members_cv.values(), key=lambda s: s["macro_f1"])["macro_f1"]
    progress(f"blend ({method}) CV macro F1 {chosen['scores']['macro_f1']:.4f} (best member {best:.4f}); "
             f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return document
