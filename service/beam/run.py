"""One Beam run of `flower predict`: the pipeline options, the work folder, the pipeline, its metrics, the merge.

    manifest (one line per file) -> Reshuffle (spread over the workers) -> read (images; a split's records)
      -> RunInference (FlowerModelHandler: batches of --min-batch-size to --batch-size) -> shard lines -> CSV shards

The work folder holds the manifest, the staged model and the shards: `temp_location/flower-predict-<hex>/` when
that option is given (it must be, on a runner other than the local ones: its workers cannot see this machine's
disk), else a hidden folder beside --out. It is removed when the run ends, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from core.contract import join
from core.errors import ConfigError, FlowerError, Kind
from service.beam.inputs import manifest_entries, read_entry, write_manifest
from service.beam.model import FlowerModelHandler, stage_model
from service.beam.shards import FAILED, FAILED_KIND, NAMESPACE, SCORED, ShardRows, merge_shards
from service.scoring import URL, Inputs, Options, Summary, count_records, header, model_facts

LOCAL_RUNNERS = ("directrunner", "direct", "switchingdirectrunner", "bundlebaseddirectrunner", "prismrunner", "prism")
WAIT_SECONDS = 30  # how often a remote runner's progress is shown
MANIFEST, MODEL, SHARDS = "inputs.jsonl", "model", "shards"  # in the work folder


def pipeline_options(pairs: list[str]) -> PipelineOptions:
    """Beam's PipelineOptions from `--beam-option KEY=VALUE` (or a bare KEY for a flag), over the local default: the
    DirectRunner with one worker process per core. An unknown key or a bad value is a ConfigError naming it."""
    flags = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
             f"--direct_num_workers={os.cpu_count() or 1}"]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not key.isidentifier():
            raise ConfigError(f"--beam-option {pair!r}: expected KEY=VALUE, a Beam pipeline option (e.g. "
                              "runner=DataflowRunner, direct_num_workers=4)")
        flags.append(f"--{key}={value}" if sep else f"--{key}")
    options = PipelineOptions(flags)
    known = set(PipelineOptions([]).get_all_options())
    problems = io.StringIO()
    try:
        with contextlib.redirect_stderr(problems):  # argparse prints its usage and exits on a bad value
            unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    except SystemExit:
        raise ConfigError(f"--beam-option: {problems.getvalue().strip().splitlines()[-1]}") from None
    if unknown:
        raise ConfigError(f"--beam-option: {', '.join(unknown)} is no Beam pipeline option (see `python -m "
                          "apache_beam.examples.wordcount --help` for the options of this Beam version)")
    return options


def is_local(options: PipelineOptions) -> bool:
    """Whether the runner runs on this machine (its workers see its disk)."""
    runner = options.view_as(StandardOptions).runner
    return str(runner or "DirectRunner").lower() in LOCAL_RUNNERS


def runner_name(options: PipelineOptions) -> str:
    """The runner in words: its name, and the worker processes of a local DirectRunner."""
    runner = str(options.view_as(StandardOptions).runner or "DirectRunner")
    direct = options.view_as(DirectOptions)
    if runner.lower() == "directrunner" and direct.direct_running_mode == "multi_processing":
        workers = direct.direct_num_workers
        return f"{runner}, {workers} worker process{'' if workers == 1 else 'es'}"
    return runner


def work_folder(out: Path, options: PipelineOptions) -> str:
    """Where this run keeps its manifest, model and shards (see the module's docstring)."""
    name = f"flower-predict-{secrets.token_hex(8)}"
    temp = options.view_as(GoogleCloudOptions).temp_location
    if temp:
        return join(temp, name)
    if not is_local(options):
        raise ConfigError(f"--runner beam on {runner_name(options)} needs --beam-option temp_location=URL: a folder "
                          "both its workers and this machine reach (e.g. gs://BUCKET/tmp), for the model, the list of "
                          "inputs and the CSV shards")
    return str(out.resolve().parent / f".{out.name}.{name}")


@dataclass
class BeamRun:
    """What a Beam run did: the merged CSV's summary, the pipeline's counters, the runner, the shards merged."""

    summary: Summary
    counters: Counter
    runner: str
    shards: int


def score_on_beam(model: str, inputs: Inputs, out: Path, options: Options, min_batch_size: int,
                  beam_options: PipelineOptions, overwrite: bool = False, quiet: bool = True) -> BeamRun:
    """Score every input on Beam into the CSV `out`: rows, order and columns as `service.scoring.score` writes them."""
    with _beam_logs_at(logging.ERROR):  # its workers' warnings (no semi-persistent directory, ...) are noise here
        return _score(model, inputs, out, options, min_batch_size, beam_options, overwrite, quiet)


def _score(model: str, inputs: Inputs, out: Path, options: Options, min_batch_size: int,
           beam_options: PipelineOptions, overwrite: bool, quiet: bool) -> BeamRun:
    """score_on_beam, with Beam's logs as they are set."""
    start = time.perf_counter()
    classes, size = model_facts(model)
    top_k = min(options.top_k, len(classes))
    columns = header(classes, top_k, options.probabilities)  # refused before anything is written
    work = work_folder(out, beam_options)
    try:
        entries = manifest_entries(inputs, size)
        write_manifest(entries, join(work, MANIFEST))
        handler = FlowerModelHandler(stage_model(model, join(work, MODEL)), options, top_k, min_batch_size)
        if not quiet:
            print(f"scoring {len(entries)} file(s) on {runner_name(beam_options)}; work folder {work}",
                  file=sys.stderr, flush=True)
        pipeline = beam.Pipeline(options=beam_options)
        (pipeline
         | "inputs" >> beam.io.ReadFromText(join(work, MANIFEST))
         | "spread" >> beam.Reshuffle()
         | "read" >> beam.FlatMap(read_entry, options.max_image_bytes)
         | "score" >> RunInference(KeyedModelHandler(handler))
         | "rows" >> beam.ParDo(ShardRows(quiet))
         | "shards" >> beam.io.WriteToText(join(work, SHARDS, "rows"), file_name_suffix=".csv"))
        counters = _finish(pipeline.run(), quiet)
        summary = Summary(records=count_records(inputs, size))
        shards = merge_shards(join(work, SHARDS, "rows*.csv"), out, columns, overwrite, summary)
    finally:
        _remove(work)
    summary.seconds = time.perf_counter() - start
    return BeamRun(summary, counters, runner_name(beam_options), shards)


@contextlib.contextmanager
def _beam_logs_at(level: int) -> Iterator[None]:
    """Beam's loggers at `level` for a while (the driver's, and those the local runner relays from its workers)."""
    logger = logging.getLogger("apache_beam")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _finish(result: PipelineResult, quiet: bool) -> Counter:
    """Wait for the pipeline (a remote runner's progress every WAIT_SECONDS); its counters once it is done."""
    while not PipelineState.is_terminal(result.state):
        result.wait_until_finish(duration=WAIT_SECONDS * 1000)
        if not quiet:
            counts = counters(result)
            print(f"  {counts[SCORED] + counts[FAILED]} images, {counts[FAILED]} failed ({result.state})",
                  file=sys.stderr, flush=True)
    if result.state != PipelineState.DONE:
        raise FlowerError(f"the Beam pipeline ended {result.state}; nothing written", Kind.UNAVAILABLE)
    return counters(result)


def counters(result: PipelineResult) -> Counter:
    """This project's counters of a pipeline (committed where the runner has them, else attempted)."""
    counts: Counter = Counter()
    for metric in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        value = metric.committed if metric.committed is not None else metric.attempted
        counts[metric.key.metric.name] += value or 0
    return counts


def failed_kinds(counts: Counter) -> Counter:
    """The failed rows by error kind, from the counters."""
    return Counter({name.removeprefix(FAILED_KIND): n for name, n in counts.items()
                    if name.startswith(FAILED_KIND) and n})


def _remove(work: str) -> None:
    """Remove the work folder (local or remote); a failure to is logged, never raised over the run's outcome."""
    try:
        if URL.match(work):
            files = [m.path for m in FileSystems.match([join(work, "**")])[0].metadata_list]
            if files:
                FileSystems.delete(files)
        elif os.path.isdir(work):
            shutil.rmtree(work)
    except OSError as err:  # BeamIOError too
        logging.getLogger(__name__).warning("could not remove the work folder %s: %s", work, err)
