"""The pipeline's output: every scored row as one line of a CSV shard (its key and damage columns first), counted in
Beam's metrics; and the merge of the shards into `flower predict`'s CSV, in input order.

The merge holds one shard in memory at a time: each is sorted by key into a run file on local disk, and the runs
are merged (heapq, at most MAX_OPEN files at once), so a run of millions of rows needs neither their memory nor
sorted shards.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from service.beam.inputs import RAW, Key, matched
from service.scoring import PROGRESS_SECONDS, DamagedFile, Summary, write_rows

NAMESPACE = "flower"  # Beam metrics of this project: images_scored, images_failed, failed_<kind>
SCORED, FAILED, FAILED_KIND = "images_scored", "images_failed", "failed_"
MAX_OPEN = 64  # run files merged at once


def shard_line(key: Key, row: list[str], damage: dict | None) -> str:
    """One row of a shard: index, record, the damaged file's facts (JSON, or empty), then the CSV row."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([*key, json.dumps(damage) if damage else "", *row])
    return buffer.getvalue()


class ShardRows(beam.DoFn):
    """Scored rows -> shard lines; each row counted in Beam's metrics, the worker's progress on its stderr."""

    def __init__(self, quiet: bool) -> None:
        """Without `quiet`, a worker reports on stderr every PROGRESS_SECONDS."""
        self.quiet = quiet

    def setup(self) -> None:
        """The counters; this worker's clock starts at its first row (after its model is loaded)."""
        self.scored, self.failed = Metrics.counter(NAMESPACE, SCORED), Metrics.counter(NAMESPACE, FAILED)
        self.done = self.failures = 0
        self.start = self.last = None

    def process(self, element: tuple[Key, tuple[list[str], dict | None]]) -> Iterator[str]:
        """Count the row and yield its shard line."""
        key, (row, damage) = element
        if row[1] == "false":
            self.failed.inc()
            Metrics.counter(NAMESPACE, FAILED_KIND + row[2].partition(":")[0]).inc()
            self.failures += 1
        else:
            self.scored.inc()
        self.done += 1
        now = time.perf_counter()
        if self.start is None:
            self.start = self.last = now
        elif not self.quiet and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(f"  worker {os.getpid()}: {self.done} images, {self.failures} failed, "
                  f"{(self.done - 1) / (now - self.start):.1f} images/s", file=sys.stderr, flush=True)
        yield shard_line(key, row, damage)


def _key(line: list[str]) -> tuple[int, int]:
    return int(line[0]), int(line[1])


def _read_shard(url: str) -> list[list[str]]:
    """A shard's lines (local or remote)."""
    with FileSystems.open(url, compression_type=RAW) as raw:
        return list(csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))


def _write_run(lines: Iterator[list[str]] | list[list[str]], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    return path


def _merged(runs: list[Path], stack: contextlib.ExitStack) -> Iterator[list[str]]:
    """The lines of sorted run files, merged in key order."""
    readers = [csv.reader(stack.enter_context(open(run, newline="", encoding="utf-8"))) for run in runs]
    return heapq.merge(*readers, key=_key)


def _sorted_runs(shards: list[str], folder: Path) -> list[Path]:
    """Each shard sorted into a run file, then runs merged in groups until at most MAX_OPEN remain."""
    runs = [_write_run(sorted(_read_shard(url), key=_key), folder / f"run-{i}.csv") for i, url in enumerate(shards)]
    level = 0
    while len(runs) > MAX_OPEN:
        merged = []
        for start in range(0, len(runs), MAX_OPEN):
            with contextlib.ExitStack() as stack:
                lines = _merged(runs[start:start + MAX_OPEN], stack)
                merged.append(_write_run(lines, folder / f"merge-{level}-{start}.csv"))
        runs, level = merged, level + 1
    return runs


def merge_shards(pattern: str, out: Path, columns: list[str], overwrite: bool, summary: Summary) -> int:
    """Write the shards matching `pattern` as one CSV `out` (its header `columns`, rows in key order, atomically),
    counting the rows and damaged files into `summary`; returns how many shards there were."""
    shards = matched(pattern)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as folder, \
            contextlib.ExitStack() as stack:
        lines = _merged(_sorted_runs(shards, Path(folder)), stack)
        write_rows(out, columns, _rows(lines, summary), overwrite)
    return len(shards)


def _rows(lines: Iterator[list[str]], summary: Summary) -> Iterator[list[str]]:
    """The CSV rows of merged shard lines, counted; a key seen twice is a bug of the pipeline, never written."""
    previous = None
    for line in lines:
        key, row = _key(line), line[3:]
        if key == previous:
            raise RuntimeError(f"the shards hold row {key} twice ({row[0]!r}): the pipeline wrote a row twice")
        previous = key
        summary.count(row)
        if line[2]:
            facts = json.loads(line[2])
            kind, _, message = row[2].partition(": ")
            summary.damaged.append(DamagedFile(kind, message, facts["file"], facts["index"], facts["lost"],
                                               facts["reason"]))
        yield row
