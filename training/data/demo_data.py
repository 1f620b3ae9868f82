"""A small synthetic but learnable data set in the exact competition layout (`flower demo-data`).

    flower demo-data demo/data --sizes 64,96     # about 15 s on 2 CPU cores

Each class is a procedurally drawn "flower" whose petal count, colour and petal shape are set by the
class; position, size, rotation, hue, background and clutter vary per image. It trains in minutes on
two CPU cores and needs no download.

The data set in the folder (its tfrecords-jpeg-SxS folders, classes.json, test_answers.csv and an import's
import_report.json) is replaced as a whole, as `flower import --overwrite` replaces it: written into a
staging folder inside it and swapped in when complete; other files in the folder are kept. An interrupted
run leaves the earlier data set as it was (the next run or import into the folder cleans up).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.contract import CLASSES_FILE, TEST_ANSWERS_FILE
from core.errors import ConfigError

RENDER_SIZE = 192


@dataclass(frozen=True)
class FlowerKind:
    """What makes one demo class: petals, their colour (RGB) and shape (length, width as radius fractions)."""

    name: str
    petals: int
    colour: tuple[int, int, int]
    centre: tuple[int, int, int]
    length: float
    width: float
    pointed: bool


KINDS: tuple[FlowerKind, ...] = (
    FlowerKind("red five-petal", 5, (205, 40, 45), (250, 210, 60), 0.95, 0.45, False),
    FlowerKind("yellow ray flower", 13, (240, 200, 30), (90, 50, 20), 1.0, 0.14, False),
    FlowerKind("purple four-star", 4, (130, 60, 170), (245, 240, 220), 1.0, 0.30, True),
    FlowerKind("white eight-petal", 8, (245, 245, 240), (240, 190, 40), 0.9, 0.22, False),
    FlowerKind("pink six-bell", 6, (240, 130, 180), (150, 40, 80), 0.8, 0.42, False),
    FlowerKind("blue three-petal", 3, (60, 90, 210), (250, 250, 250), 0.95, 0.55, True),
)


def _jitter(colour: Sequence[int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    """Shift a colour randomly by up to `amount` per channel."""
    values = np.asarray(colour, float) + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(values, 0, 255))


def _petal(cx: float, cy: float, angle: float, length: float, width: float, pointed: bool) -> list[tuple]:
    """Polygon of one petal that starts at the centre and points at `angle`."""
    t = np.linspace(0, math.pi, 16)
    along = length * (1 - np.cos(t)) / 2
    across = width / 2 * np.sin(t) ** (2 if pointed else 1)
    outline = np.concatenate([np.stack([along, across], 1), np.stack([along, -across], 1)[::-1]])
    cos, sin = math.cos(angle), math.sin(angle)
    xs = cx + outline[:, 0] * cos - outline[:, 1] * sin
    ys = cy + outline[:, 0] * sin + outline[:, 1] * cos
    return list(zip(xs.tolist(), ys.tolist(), strict=False))


def draw_flower(kind: FlowerKind, rng: np.random.Generator, size: int = RENDER_SIZE) -> Image.Image:
    """Draw one random image of a flower kind at `size` pixels."""
    base = np.array([rng.uniform(40, 110), rng.uniform(90, 160), rng.uniform(30, 90)])
    gradient = np.linspace(0, 1, size)[:, None, None] * rng.normal(0, 40, 3)
    noise = rng.normal(0, 25, (size // 8, size // 8, 3))
    noise = np.kron(noise, np.ones((8, 8, 1)))
    background = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background).filter(ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(image)

    for _ in range(rng.integers(2, 6)):  # leaves and stems as clutter
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.15) * size
        draw.ellipse([x - r, y - r / 3, x + r, y + r / 3], fill=_jitter((50, 120, 40), rng, 20))

    radius = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
    start = rng.uniform(0, 2 * math.pi)
    petal_colour = _jitter(kind.colour, rng, 18)
    for i in range(kind.petals):
        angle = start + 2 * math.pi * i / kind.petals + rng.normal(0, 0.05)
        length = radius * kind.length * rng.uniform(0.9, 1.1)
        width = radius * kind.width * rng.uniform(0.85, 1.15)
        draw.polygon(_petal(cx, cy, angle, length, width, kind.pointed), fill=_jitter(petal_colour, rng, 10))
    centre = radius * rng.uniform(0.18, 0.28)
    draw.ellipse([cx - centre, cy - centre, cx + centre, cy + centre], fill=_jitter(kind.centre, rng, 15))
    return image


def jpeg_bytes(image: Image.Image, size: int, quality: int = 90) -> bytes:
    """Resize an RGB image to size x size and encode it as JPEG."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _unique_ids(rng: np.random.Generator, count: int) -> list[str]:
    """Random 9-hex-digit ids like the competition's, all distinct."""
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(f"{int(rng.integers(0, 16**9)):09x}")
    return sorted(sorted(ids), key=lambda _: rng.random())  # a set's order varies per process; the seed's must not


def demo_examples(counts: dict[str, int], seed: int) -> Iterator[tuple[str, str, int, Image.Image]]:
    """Yield (split, id, label, image) for every demo image, classes balanced within each split."""
    rng = np.random.default_rng(seed)
    ids = iter(_unique_ids(rng, sum(counts.values())))
    for split, count in counts.items():
        labels = np.arange(count) % len(KINDS)
        rng.shuffle(labels)
        for label in labels:
            yield split, next(ids), int(label), draw_flower(KINDS[label], rng)


def _check_demo_options(sizes: Sequence[int], counts: dict[str, int]) -> None:
    """Refuse image sizes below 8 px and splits without images (ConfigError), before anything is drawn."""
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 8 for s in sizes):
        raise ConfigError(f"sizes must be whole numbers >= 8, got {list(sizes)}")
    for split, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ConfigError(f"counts[{split!r}] must be a whole number >= 1, got {count!r}")


def make_demo_data(
    out_dir: str | Path,
    sizes: Sequence[int] = (64, 96),
    counts: dict[str, int] | None = None,
    seed: int = 0,
    records_per_file: int = 200,
    progress: bool = True,
) -> dict[str, int]:
    """Write the demo data set (all sizes, train/val/test, classes.json, test_answers.csv); return counts.

    The data set in `out_dir` is replaced as one unit, as `flower import --overwrite` replaces one (staged inside
    it, then swapped in: training.data.importer.publish): nothing of an earlier data set there stays beside it."""
    from training.data.importer.publish import publish

    counts = counts or {"train": 720, "val": 240, "test": 240}
    _check_demo_options(sizes, counts)
    per_split: dict[str, list[tuple[str, int, Image.Image]]] = {s: [] for s in counts}
    total = sum(counts.values())
    for done, (split, image_id, label, image) in enumerate(demo_examples(counts, seed), 1):
        per_split[split].append((image_id, label, image))
        if progress and (done % 200 == 0 or done == total):
            print(f"  drawn {done}/{total} images", flush=True)
    publish(Path(out_dir), lambda folder: _write_demo_set(folder, per_split, sizes, records_per_file, progress),
            overwrite=True, classes=[k.name for k in KINDS], sizes=sizes, progress=progress)
    return dict(counts)


def _write_demo_set(out: Path, per_split: dict[str, list[tuple[str, int, Image.Image]]], sizes: Sequence[int],
                    records_per_file: int, progress: bool) -> None:
    """Write every size's records, classes.json and test_answers.csv into `out` (the staging folder)."""
    from core.contract import size_folder_name
    from core.files import write_text_atomic
    from imaging.records import Record, write_split  # TensorFlow only when writing records

    for size in sizes:
        for split, items in per_split.items():
            labelled = split != "test"
            records = (Record(jpeg_bytes(img, size), i, lab if labelled else None) for i, lab, img in items)
            write_split(str(out / size_folder_name(size) / split), size, records, records_per_file)
        if progress:
            print(f"  wrote records at {size}x{size}", flush=True)
    write_text_atomic(out / CLASSES_FILE, json.dumps([k.name for k in KINDS], indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    writer.writerows((i, lab) for i, lab, _ in per_split.get("test", []))
    write_text_atomic(out / TEST_ANSWERS_FILE, buffer.getvalue())
