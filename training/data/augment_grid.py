"""Write a PNG grid of augmented samples from any data set, so a person can look at what training sees.

    flower augment-grid --data demo/data --size 96 --out augment.png [--set rotation=30 ...]

Each row is one image: the evaluation view first, then augmented copies. When CutMix or MixUp is on,
extra rows show mixed training batches with their soft labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imaging.augment_config import AugmentConfig


def augmented_grid(
    data_dir: str, split: str, image_size: int, rows: int, copies: int, config: AugmentConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return originals [rows,S,S,3], augmented copies [rows,copies,S,S,3] (uint8) and the row titles."""
    import tensorflow as tf

    from imaging.augment import augment_image, resize_image
    from training.data.dataset import eval_dataset, split_info
    from training.data.layout import load_classes

    classes = load_classes(data_dir)
    info = split_info(data_dir, split, image_size)
    batch = next(iter(eval_dataset(info, info.file_size, rows)))  # decoded once, at the stored size
    raw = batch[0].numpy()
    originals = resize_image(tf.constant(raw), image_size).numpy()  # what evaluation feeds the model
    titles = [classes[int(c)] for c in batch[1].numpy()] if info.labelled else [""] * rows
    copies_out = np.stack([
        np.stack([
            augment_image(tf.constant(img), tf.constant([seed, r * copies + c], tf.int64), config, image_size).numpy()
            for c in range(copies)
        ])
        for r, img in enumerate(raw)
    ])
    return originals.astype(np.uint8), np.clip(copies_out, 0, 255).astype(np.uint8), titles


def mixed_batches(
    data_dir: str, image_size: int, count: int, config: AugmentConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One training batch with CutMix/MixUp applied: images uint8 and soft labels."""
    from training.data.dataset import train_dataset, training_splits
    from training.data.layout import load_classes

    splits = training_splits(data_dir, image_size)
    ds = train_dataset(splits, image_size, count, num_classes=len(load_classes(data_dir)), augment=config, seed=seed,
                       shuffle_buffer=64)
    images, labels = next(iter(ds))
    return np.clip(images.numpy(), 0, 255).astype(np.uint8), labels.numpy()


def write_grid_png(
    path: str | Path, originals: np.ndarray, copies: np.ndarray, titles: list[str], mixed: np.ndarray | None = None,
    mixed_labels: np.ndarray | None = None, classes: list[str] | None = None,
) -> Path:
    """Draw the grid with matplotlib and write it atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.files import write_atomic

    rows, ncopies = copies.shape[:2]
    mixed_rows = 0 if mixed is None else int(np.ceil(len(mixed) / (ncopies + 1)))
    fig, axes = plt.subplots(rows + mixed_rows, ncopies + 1, figsize=(1.6 * (ncopies + 1), 1.7 * (rows + mixed_rows)))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    for r in range(rows):
        axes[r, 0].imshow(originals[r])
        axes[r, 0].set_title(f"eval: {titles[r]}"[:22], fontsize=7, parse_math=False)  # a class name, as typed
        for c in range(ncopies):
            axes[r, c + 1].imshow(copies[r, c])
            if r == 0:
                axes[r, c + 1].set_title(f"augmented {c + 1}", fontsize=7)
    for i in range(0 if mixed is None else len(mixed)):
        ax = axes[rows + i // (ncopies + 1), i % (ncopies + 1)]
        ax.imshow(mixed[i])
        top = np.argsort(mixed_labels[i])[::-1][:2]
        label = " + ".join(f"{classes[k][:10]} {mixed_labels[i][k]:.2f}" for k in top if mixed_labels[i][k] > 0)
        ax.set_title(label, fontsize=6, parse_math=False)
    fig.tight_layout()
    out = write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return out
