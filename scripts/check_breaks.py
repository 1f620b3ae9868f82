"""Re-apply known breaks to a copy of the project and check that the test suite notices each one.

    .venv/bin/python scripts/check_breaks.py            # every break
    .venv/bin/python scripts/check_breaks.py rotation   # the breaks whose name contains 'rotation'

Each break is a text substitution in one source file of a throw-away copy (the tracked files of the
repository); the named tests are run there and must FAIL. A break whose text is no longer found is
itself reported as a failure, so the list is kept in step with the code. Exit status 0 only when
every break was caught.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    """One deliberate bug: where, what to replace with what, and the tests that must catch it."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKS = [
    Break("checkpoint restores neither weights nor optimizer state", "training/fit/checkpoints.py",
          'model.load_weights(checkpoint / "weights.weights.h5")', "pass", ("tests/test_resume.py", "-k",
                                                                   "restores_weights or killed")),
    Break("checkpoint restores neither weights nor optimizer state (optimizer part)", "training/fit/checkpoints.py",
          "    optimizer.build(model.trainable_variables)  # built,", "    pass  # built,",
          ("tests/test_resume.py", "-k", "restores_weights")),
    Break("each CV fold's blender fitted on all rows", "ensemble/validation.py",
          ".fit(probs[:, train], labels[train])", ".fit(probs, labels)",
          ("tests/test_ensemble.py", "-k", "training_rows_only or memorises")),
    Break("fit_weighted puts all weight on one member", "ensemble/blend.py",
          'return BlendSpec("weighted", weights=tuple(softmax(result.x).tolist()))',
          'return BlendSpec("weighted", weights=tuple(np.eye(m)[int(np.argmax(softmax(result.x)))].tolist()))',
          ("tests/test_ensemble.py", "-k", "complementary or spreads")),
    Break("rotation forced to 0", "imaging/augment.py", "config.rotation * deg * n[0]", "0.0 * n[0]",
          ("tests/test_augment.py", "-k", "rotation")),
    Break("the service decodes JPEG with TensorFlow's default (fast) IDCT", "service/images.py",
          "tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT)", "tf.io.decode_jpeg(data, channels=3)",
          ("tests/test_service.py", "-k", "exact_pixels or equal_the_saved")),
    Break("every image gets the first image's member votes", "service/inference.py",
          "members[:, i]) for i in range(len(images))", "members[:, 0]) for i in range(len(images))",
          ("tests/test_service.py", "-k", "member_votes")),
    Break("the SavedModel decodes JPEG with another DCT method", "training/fit/export.py",
          "tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT)",
          'tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_FAST")',
          ("tests/test_service.py", "-k", "equal_the_saved")),
    Break("the submission's ids are checked against themselves", "ensemble/output.py",
          "check_submission(written_ids, written_labels, num_classes, np.asarray(expected_ids, dtype=str))",
          "check_submission(written_ids, written_labels, num_classes, written_ids)",
          ("tests/test_ensemble.py", "-k", "refused_and_not_written")),
    Break("class weights count the train files only", "training/fit/loop.py",
          "weights = inverse_frequency_weights(class_counts(train_splits, len(classes)))",
          'weights = inverse_frequency_weights(class_counts([infos["train"]], len(classes)))',
          ("tests/test_run.py", "-k", "class_weights_count")),
    Break("the loss returns its own mean (N times too large gradients on N replicas)", "training/fit/loop.py",
          "return lambda y_true, y_pred: base(y_true, y_pred)\n",
          "return lambda y_true, y_pred: tf.reduce_mean(base(y_true, y_pred))\n",
          ("tests/test_distributed.py", "-k", "replicas_equals_one_replica")),
    Break("a resume does not compare configs", "training/fit/checkpoints.py",
          "    changes = config_changes(saved, config, RunConfig().to_dict())\n", "    changes = []\n",
          ("tests/test_resume.py", "-k", "another_config")),
    Break("the API key check uses 'or'", "service/deps.py", 'scheme.lower() == "bearer" and hmac',
          'scheme.lower() == "bearer" or hmac', ("tests/test_service.py", "-k", "api_key")),
]


def copy_project(target: Path) -> None:
    """Copy the tracked (and untracked, not ignored) files of the repository into target."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def check(item: Break, python: str) -> tuple[bool, str]:
    """Apply one break in a fresh copy and run its tests; True when the tests fail as they should."""
    with tempfile.TemporaryDirectory(prefix="break-") as tmp:
        root = Path(tmp)
        copy_project(root)
        path = root / item.file
        text = path.read_text()
        if text.count(item.old) != 1:
            return False, f"the text to break occurs {text.count(item.old)} times in {item.file} (expected once)"
        path.write_text(text.replace(item.old, item.new))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1"}
        result = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *item.tests],
                                cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        if result.returncode == 5:
            return False, "no test selected"
        return result.returncode == 1, summary


def main(argv: list[str]) -> int:
    """Check every break (or those whose name contains an argument); print one line each."""
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    chosen = [b for b in BREAKS if not argv or any(a in b.name for a in argv)]
    missed = 0
    for item in chosen:
        start = time.perf_counter()
        caught, summary = check(item, python)
        missed += not caught
        print(f"{'caught' if caught else 'MISSED'}  {item.name}  [{summary}] ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print(f"{len(chosen) - missed}/{len(chosen)} breaks caught")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
