#!/usr/bin/env python3
"""The demo job on the bundled demo data: make the data, train two members, blend them, serve them.

    python scripts/demo.py [--out demo] [--port 8000] [--no-serve]     # about 2 min on 2 CPU cores

1. writes <out>/data: the synthetic flower data set in the competition layout (64 and 96 px records)
   and <out>/augment.png (what training sees);
2. trains two small CNN members, at 64 and 96 px, into <out>/runs/ (run directories, each SavedModel also
   converted for LiteRT);
3. blends them into <out>/ensemble/ (ensemble.json, submission.csv, report.md, plots) and scores the
   submission against the test answers;
4. serves the blended ensemble over HTTP at http://127.0.0.1:<port>/ (a page to drop a photo on, and
   the API; each member on LiteRT once its answers match TensorFlow's) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

CONFIGS = ("training/configs/demo_cnn_64.toml", "training/configs/demo_cnn_96.toml")
REPO = Path(__file__).resolve().parents[1]


def score_submission(submission: Path, answers: Path) -> float:
    """Macro F1 of a submission against an answer CSV (id,label)."""
    from sklearn.metrics import f1_score

    truth = {row["id"]: int(row["label"]) for row in csv.DictReader(open(answers))}
    predicted = {row["id"]: int(row["label"]) for row in csv.DictReader(open(submission))}
    ids = sorted(truth)
    return float(f1_score([truth[i] for i in ids], [predicted[i] for i in ids], average="macro"))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for the demo data, runs and ensemble")
    parser.add_argument("--port", type=int, default=8000, help="port of the demo server")
    parser.add_argument("--no-serve", action="store_true", help="stop after blending instead of serving")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()

    from core.contract import SPLITS
    from flower.commands.augment_grid import main as show_augment
    from training.data.demo_data import make_demo_data
    from training.data.layout import available_sizes, count_records, load_classes, split_files

    print(f"[1/4] making the demo data set in {out / 'data'}", flush=True)
    make_demo_data(out / "data", sizes=(64, 96))
    data = str(out / "data")
    print(f"      classes: {', '.join(load_classes(data))}")
    for size in available_sizes(data):
        counts = {s: count_records(split_files(data, size, s)) for s in SPLITS}
        print(f"      {size}x{size}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    show_augment(["--data", data, "--size", "96", "--out", str(out / "augment.png"), "--set", "cutmix_prob=0.3"])

    from flower.commands.train import main as train

    runs = []
    for i, config in enumerate(CONFIGS, 1):
        name = Path(config).stem.replace("_", "-")
        run = out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)  # the demo always trains afresh
        print(f"[2/4] training member {i}/{len(CONFIGS)}: {config} -> {run}", flush=True)
        code = train(["--config", str(REPO / config), "--set", f"data.dir={data}", "--set", f"output={run}"])
        if code:
            return code
        runs.append(run)

    from flower.commands.blend import main as blend

    print(f"[3/4] blending {len(runs)} members into {out / 'ensemble'}", flush=True)
    code = blend([str(r) for r in runs] + ["--out", str(out / "ensemble"), "--method", "auto", "--folds", "5"])
    if code:
        return code
    f1 = score_submission(out / "ensemble" / "submission.csv", out / "data" / "test_answers.csv")
    print(f"submission {out / 'ensemble' / 'submission.csv'}: test macro F1 {f1:.4f} against "
          f"{out / 'data' / 'test_answers.csv'}")
    print(f"done in {time.time() - start:.0f} s. Look at {out / 'augment.png'}, {out / 'runs'}/*/curves.png, "
          f"{out / 'ensemble' / 'report.md'}")
    if args.no_serve:
        return 0
    from flower.commands.serve import main as serve

    print(f"[4/4] serving the ensemble: open http://127.0.0.1:{args.port}/ (stop with Ctrl-C)\n"
          f"      curl -F files=@some_photo.jpg http://127.0.0.1:{args.port}/v1/predict", flush=True)
    return serve(["--ensemble", str(out / "ensemble"), "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
