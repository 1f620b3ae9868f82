#!/usr/bin/env python3
"""Quality figures of trained members and a served ensemble on a data folder with test answers.

    python scripts/quality.py members runs/a runs/b --data data/flowers5 [--tta 4]
    python scripts/quality.py service demo/ensemble --data data/flowers5 [--size 128] [--tolerance 0.01]
    python scripts/quality.py errors runs/a --data data/flowers5 --out errors.png [--count 40]
    python scripts/quality.py probe ../shared/data/flowers5-128px [--backbone efficientnet-lite0] [--size 128]

`members`: each run's validation and test macro F1 from its best weights, with one pass and with
`--tta` passes (the same passes the run's predictions use), and its seconds per epoch; a Markdown
table. Test scores need `test_answers.csv` in the data folder (the import tool writes it).

`service`: starts the service on a loopback port with the ensemble directory, POSTs every test image
of the data folder (the JPEG bytes stored in its records at `--size`) as a file, scores the answers
against `test_answers.csv`, and compares with the ensemble's `submission.csv` on the same ids. Exits 1
when the two macro F1 differ by more than `--tolerance`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import numpy as np  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402


def read_answers(data: Path) -> dict[str, int]:
    """id -> label of the test split, from test_answers.csv."""
    path = data / "test_answers.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: test scores need the import tool's test answers")
    with path.open() as f:
        return {row["id"]: int(row["label"]) for row in csv.DictReader(f)}


def run_model(run: Path, classes: int):
    """A run's config and its model with the best weights (the ones it exported)."""
    from training.config import config_from_dict
    from training.fit.checkpoints import load_best_weights
    from training.models.model import build_classifier

    config = config_from_dict(json.loads((run / "config.json").read_text()))
    model = build_classifier(config.model.backbone, config.data.image_size, classes, weights=None,
                             dropout=config.model.dropout)
    load_best_weights(model, run / "checkpoints")
    return config, model


def member_scores(run: Path, data: Path, passes: int) -> dict[str, float | str]:
    """Validation/test macro F1 of a run's best weights with 1 and `passes` TTA passes."""
    import keras

    from training.data.dataset import split_info
    from training.fit.export import predict_split

    answers = read_answers(data)
    classes = len(json.loads((data / "classes.json").read_text()))
    config, model = run_model(run, classes)
    size = config.data.image_size

    row: dict[str, float | str] = {"run": run.name, "backbone": config.model.backbone, "size": size}
    for split in ("val", "test"):
        info = split_info(str(data), split, size, config.data.file_size or None)
        for tta in (1, passes):
            ids, labels, probs = predict_split(model, info, size, 64, tta, config.predict.tta_seed, classes)
            truth = labels if split == "val" else np.array([answers[str(i)] for i in ids])
            row[f"{split}_f1_tta{tta}"] = float(f1_score(truth, probs.argmax(1), average="macro"))
    history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    seconds = [float(r[history[0].index("seconds")]) for r in history[1:]]
    row["s_per_epoch"] = float(np.mean(seconds))
    keras.backend.clear_session()
    return row


def members(args: argparse.Namespace) -> int:
    """Print the members table."""
    rows = [member_scores(Path(r), Path(args.data), args.tta) for r in args.runs]
    print(f"| run | backbone | size | val F1 (1 pass) | val F1 ({args.tta} TTA) | test F1 (1 pass) | "
          f"test F1 ({args.tta} TTA) | s/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        scores = [r[f"{split}_f1_tta{t}"] for split in ("val", "test") for t in (1, args.tta)]
        print(f"| {r['run']} | {r['backbone']} | {r['size']} | " + " | ".join(f"{v:.4f}" for v in scores)
              + f" | {r['s_per_epoch']:.1f} |")
    return 0


def split_images(data: Path, size: int, split: str = "test") -> list[tuple[str, bytes]]:
    """(id, JPEG bytes) of every record of a split at one size."""
    import tensorflow as tf

    from training.data.layout import split_files

    spec = {"id": tf.io.FixedLenFeature([], tf.string), "image": tf.io.FixedLenFeature([], tf.string)}
    out = []
    for path in split_files(str(data), size, split):
        for raw in tf.data.TFRecordDataset(path):
            parsed = tf.io.parse_single_example(raw, spec)
            out.append((parsed["id"].numpy().decode(), parsed["image"].numpy()))
    return out


def served_labels(ensemble: Path, images: list[tuple[str, bytes]], batch: int = 16) -> dict[str, int]:
    """POST the images to a freshly started service; id -> top class index."""
    import httpx

    from testkit.artifacts import free_port, start_server

    port = free_port()
    server = start_server(["--ensemble", str(ensemble)], port, timeout=600)
    labels = {}
    try:
        with httpx.Client(timeout=120) as client:
            for start in range(0, len(images), batch):
                chunk = images[start: start + batch]
                files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in chunk]
                answer = client.post(f"http://127.0.0.1:{port}/v1/predict", files=files).raise_for_status().json()
                for (image_id, _), result in zip(chunk, answer["results"], strict=True):
                    if not result["ok"]:
                        raise SystemExit(f"the service refused {image_id}: {result['error']}")
                    labels[image_id] = int(result["top"][0]["index"])
    finally:
        server.terminate()
        server.wait(30)
    return labels


def offline_one_pass(ensemble: Path, data: Path, ids: list[str]) -> dict[str, int]:
    """The ensemble's blend of its members' one-pass (no TTA) test predictions: id -> class."""
    from ensemble.blend import apply_blend
    from training.data.dataset import split_info
    from training.fit.export import predict_split

    document = json.loads((ensemble / "ensemble.json").read_text())
    stacked = []
    for member in document["members"]:
        config, model = run_model((ensemble / member["path"]).resolve(), len(document["classes"]))
        info = split_info(str(data), "test", config.data.image_size, config.data.file_size or None)
        test_ids, _, probs = predict_split(model, info, config.data.image_size, 64, 1, 1, len(document["classes"]))
        order = {str(i): k for k, i in enumerate(test_ids)}
        stacked.append(probs[[order[i] for i in ids]])
    blended = apply_blend(document["blend"], np.stack(stacked))
    return dict(zip(ids, blended.argmax(1).tolist(), strict=True))


def service(args: argparse.Namespace) -> int:
    """Compare the served ensemble's macro F1 on the test images with the offline submission's."""
    ensemble, data = Path(args.ensemble), Path(args.data)
    answers = read_answers(data)
    images = split_images(data, args.size)
    served = served_labels(ensemble, images)
    with (ensemble / "submission.csv").open() as f:
        offline = {row["id"]: int(row["label"]) for row in csv.DictReader(f)}
    ids = [i for i, _ in images]
    truth = [answers[i] for i in ids]
    served_f1 = f1_score(truth, [served[i] for i in ids], average="macro")
    offline_f1 = f1_score(truth, [offline[i] for i in ids], average="macro")
    agree = np.mean([served[i] == offline[i] for i in ids])
    print(f"{len(ids)} test images sent as files at {args.size} px: served macro F1 {served_f1:.4f}, offline "
          f"submission {offline_f1:.4f} (difference {served_f1 - offline_f1:+.4f}); same top class for "
          f"{agree:.1%} of the images")
    one_pass = offline_one_pass(ensemble, data, ids)
    print(f"offline blend without TTA (each member on its own records, one pass): macro F1 "
          f"{f1_score(truth, [one_pass[i] for i in ids], average='macro'):.4f}; same top class as served for "
          f"{np.mean([served[i] == one_pass[i] for i in ids]):.1%}")
    return 0 if abs(served_f1 - offline_f1) <= args.tolerance else 1


def errors(args: argparse.Namespace) -> int:
    """A PNG of a run's most confident validation errors (label vs prediction) and its confusion matrix."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from sklearn.metrics import confusion_matrix

    run, data = Path(args.run), Path(args.data)
    classes = json.loads((data / "classes.json").read_text())
    with np.load(run / "predictions" / "val.npz") as saved:
        ids, probs, labels = saved["ids"], saved["probs"], saved["labels"]
    images = dict(split_images(data, min(int(p.name.split("x")[-1]) for p in data.glob("tfrecords-jpeg-*")), "val"))
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    wrong = wrong[np.argsort(-probs[wrong].max(1))][: args.count]
    cols = 8
    rows = (len(wrong) + cols - 1) // cols + 3
    fig = plt.figure(figsize=(2 * cols, 2 * rows))
    for k, i in enumerate(wrong):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(Image.open(io.BytesIO(images[str(ids[i])])))
        ax.set_title(f"{classes[labels[i]]} -> {classes[probs[i].argmax()]}\n{probs[i].max():.2f} ({ids[i]})",
                     fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(rows // 3 + 1, 2, (rows // 3 + 1) * 2 - 1)
    matrix = confusion_matrix(labels, probs.argmax(1), labels=range(len(classes)))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), n in np.ndenumerate(matrix):
        ax.text(c, r, str(n), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    fig.suptitle(f"{run.name}: the {len(wrong)} most confident of {int((probs.argmax(1) != labels).sum())} "
                 f"validation errors (label -> prediction, probability)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


def probe(args: argparse.Namespace) -> int:
    """Linear probe: 5-fold CV accuracy of a logistic regression on a backbone's frozen, pooled features."""
    import keras
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from training.models.backbones import build_backbone

    features = build_backbone(args.backbone, args.size, "imagenet")
    classes = sorted(p.name for p in Path(args.photos).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((Path(args.photos) / name).glob("*.jpg"))[: args.per_class]:
            image = Image.open(path).convert("RGB").resize((args.size, args.size), Image.BICUBIC)
            images.append(np.asarray(image, np.float32))
            labels.append(label)
    pooled = keras.layers.GlobalAveragePooling2D()(features.predict(np.stack(images), batch_size=50, verbose=0))
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), np.asarray(pooled), labels, cv=5).mean()
    print(f"{args.backbone} ({args.size} px, ImageNet weights frozen): linear probe on {len(labels)} photos of "
          f"{len(classes)} classes, 5-fold CV accuracy {accuracy:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("members", help="validation/test macro F1 of run directories, TTA off and on")
    m.add_argument("runs", nargs="+")
    m.add_argument("--data", required=True)
    m.add_argument("--tta", type=int, default=4)
    s = sub.add_parser("service", help="the served ensemble's macro F1 on the test images vs the submission's")
    s.add_argument("ensemble")
    s.add_argument("--data", required=True)
    s.add_argument("--size", type=int, default=128, help="record size whose JPEG bytes are sent")
    s.add_argument("--tolerance", type=float, default=0.01)
    e = sub.add_parser("errors", help="a PNG of a run's most confident validation errors and its confusion matrix")
    e.add_argument("run")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--count", type=int, default=40)
    p = sub.add_parser("probe", help="linear-probe accuracy of a backbone's frozen ImageNet features on photos")
    p.add_argument("photos", help="a folder with one sub-folder of JPEG photos per class")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--per-class", type=int, default=120, help="the first N photos of each class, by name")
    args = parser.parse_args(argv)
    return {"members": members, "service": service, "errors": errors, "probe": probe}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
