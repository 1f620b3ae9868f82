"""`flower predict`: score image files, folders or a data split with an ensemble (or one run) into a CSV (see
service/scoring.py), on this machine or on Apache Beam (`--runner beam`, service/beam/). Exit status 0: every image
scored; 1: some rows failed, the submission was refused, or the models cannot be loaded; 2: nothing written (bad
options or inputs)."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np

import service.scoring as scoring
from core.errors import ConfigError, FlowerError
from core.files import check_output_file
from core.names import shown
from core.runtimes import AUTO, CHOICES
from flower.commands import command, error, stop_on_sigterm
from service.runtimes import RuntimeChoice
from service.scoring import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, FileInput, InputError, Inputs, SplitInput, Summary

SOME_FAILED = 1  # documented: the CSV is written, some rows failed; or the models cannot be loaded
BEAM_MISSING = ("--runner beam needs Apache Beam, which is not installed here: pip install 'flower-ensemble[beam]' "
                "(or: bash scripts/setup_env.sh cpu,beam)")


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower predict`."""
    parser = argparse.ArgumentParser(prog=prog, description=scoring.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="ENSEMBLE_OR_RUN",
                        help="ensemble directory, its ensemble.json, or a run directory")
    parser.add_argument("images", metavar="IMAGES", nargs="*",
                        help="image files, folders (walked recursively), glob patterns and DATA:SPLIT (e.g. "
                             "data/mine:test); with --runner beam also gs:// paths")
    parser.add_argument("--out", required=True, help="the CSV file to write (its folder must exist)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"top classes per row, capped at the number of classes (default {DEFAULT_TOP_K})")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write one column per class (its name) with the blended probability")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images decoded and predicted together (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--runtime", choices=CHOICES, default=AUTO,
                        help="what runs each member's pixel model (as `flower serve --runtime`): auto, the fastest "
                             "converted runtime whose answers match TensorFlow's within 1e-4 at load, else TensorFlow "
                             "(default auto; --runner beam runs TensorFlow); a runtime named that cannot be used is an "
                             "error")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out (and --submission) when it exists (else refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines and no summary on stderr")
    parser.add_argument("--submission", metavar="CSV",
                        help="also write the Kaggle submission `id,label` of a scored DATA:SPLIT (the only input), "
                             "checked as `flower blend` checks its own; refused when a row failed")
    parser.add_argument("--expect-ids", metavar="CSV",
                        help="with --submission: the ids it must hold exactly (e.g. the competition's "
                             "sample_submission.csv); default: the split's ids")
    beam = parser.add_argument_group("Apache Beam (the `beam` extra)")
    beam.add_argument("--runner", choices=("local", "beam"), default="local",
                      help="local: this process (default); beam: an Apache Beam pipeline, by default the "
                           "DirectRunner with one worker process per core; inputs may then be gs:// paths")
    beam.add_argument("--beam-option", metavar="KEY=VALUE", action="append", default=[],
                      help="a Beam pipeline option, repeatable (runner=DataflowRunner, project=..., region=..., "
                           "temp_location=gs://..., direct_num_workers=N, ...; a bare KEY for a flag)")
    beam.add_argument("--min-batch-size", type=int,
                      help="the smallest batch RunInference forms (default: --batch-size, the largest)")
    return parser


def checked_inputs(args: argparse.Namespace, beam: ModuleType | None = None) -> Inputs:
    """The images to score, once the options, the model path and --out are checked; nothing is written yet. With the
    Beam runner's modules, remote paths are listed through Beam's file systems."""
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    scoring.check_out(Path(args.out), args.overwrite)
    scoring.model_kind(args.model)
    inputs = scoring.collect_inputs(args.images, beam.inputs.remote_inputs if beam else None)
    check_out_is_no_input(Path(args.out), inputs)
    if args.submission:
        check_submission_options(args, inputs)
    elif args.expect_ids:
        raise ConfigError("--expect-ids checks a --submission; give one")
    return inputs


def check_submission_options(args: argparse.Namespace, inputs: Inputs) -> None:
    """--submission scores one DATA:SPLIT alone, into a file that is not --out."""
    if len(inputs.sources) != 1 or not isinstance(inputs.sources[0], SplitInput):
        raise ConfigError("--submission is the submission of one DATA:SPLIT (e.g. data/mine:test): score that split "
                          "alone")
    path = check_output_file(args.submission, "--submission", args.overwrite)
    if path.resolve() == Path(args.out).resolve():
        raise ConfigError(f"--submission and --out are one file, {shown(args.submission)}; name two")


def beam_modules(args: argparse.Namespace) -> ModuleType | None:
    """The Beam runner's package (service.beam, its modules loaded) for --runner beam, a ConfigError naming the extra
    when Beam is not installed; None for the local runner, which refuses the Beam options."""
    if args.runner == "local":
        if args.beam_option or args.min_batch_size is not None:
            raise ConfigError("--beam-option and --min-batch-size are options of --runner beam")
        return None
    if args.min_batch_size is None:
        args.min_batch_size = args.batch_size
    if not 1 <= args.min_batch_size <= args.batch_size:
        raise ConfigError(f"--min-batch-size must be 1 to --batch-size ({args.batch_size}), got {args.min_batch_size}")
    try:
        import service.beam.inputs
        import service.beam.run
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != "apache_beam":
            raise
        raise ConfigError(BEAM_MISSING) from None
    return service.beam


@command
def main(argv: list[str] | None = None, prog: str = "flower predict") -> int:
    """Run `flower predict`; returns the exit status (see the module's docstring)."""
    from service.predictor import ArtifactError

    args = parser(prog).parse_args(argv)
    beam = beam_modules(args)
    pipeline_options = beam.run.pipeline_options(args.beam_option) if beam else None
    inputs = checked_inputs(args, beam)
    expected = _expected_ids(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stop_on_sigterm()  # a terminated run removes its partial CSV, as Ctrl-C does
    options = scoring.Options(top_k=args.top_k, probabilities=args.probabilities, batch_size=args.batch_size)
    try:
        if beam:
            summary, classes = score_on_beam(args, inputs, options, beam, pipeline_options)
        else:
            summary, classes = score_locally(args, inputs, options)
    except ArtifactError as err:
        error(str(err))
        return SOME_FAILED
    status = report(summary, inputs, args)
    if args.submission:
        status = max(status, write_split_submission(args, inputs.sources[0].spec, classes, expected))
    return status


def _expected_ids(args: argparse.Namespace) -> np.ndarray | None:
    """The ids --expect-ids names (read before any scoring), None without it."""
    if not args.expect_ids:
        return None
    from ensemble.inputs import read_ids

    return read_ids(Path(args.expect_ids))


def score_locally(args: argparse.Namespace, inputs: Inputs, options: scoring.Options) -> tuple[Summary, list[str]]:
    """Score in this process (service.scoring.score); the summary and the model's classes."""
    predictor = scoring.load_predictor(args.model, args.runtime)
    if not args.quiet:
        for member in predictor.members:
            print(runtime_line(member.name, member.runtime_choice), file=sys.stderr)
    say_splits(inputs, max(m.image_size for m in predictor.members), args.quiet)
    return scoring.score(predictor, inputs, args.out, options, args.overwrite, args.quiet), predictor.classes


def score_on_beam(args: argparse.Namespace, inputs: Inputs, options: scoring.Options, beam: ModuleType,
                  pipeline_options: object) -> tuple[Summary, list[str]]:
    """Score on Apache Beam (service.beam.run); the summary and the model's classes. Says the pipeline's counts."""
    classes, size = scoring.model_facts(args.model)
    say_splits(inputs, size, args.quiet)
    run = beam.run.score_on_beam(args.model, inputs, Path(args.out), options, args.min_batch_size, pipeline_options,
                                 args.overwrite, args.quiet)
    if not args.quiet:
        counts, kinds = run.counters, beam.run.failed_kinds(run.counters)
        ordered = sorted(kinds.items(), key=lambda item: (-item[1], item[0]))  # the workers' order is no order
        detail = f" ({', '.join(f'{kind} {n}' for kind, n in ordered)})" if kinds else ""
        print(f"beam ({run.runner}): {counts['images_scored']} images scored, {counts['images_failed']} failed"
              f"{detail}, by the pipeline's metrics; {run.shards} shard(s) merged", file=sys.stderr)
    return run.summary, classes


def say_splits(inputs: Inputs, size: int, quiet: bool) -> None:
    """Say which record size each DATA:SPLIT is read at."""
    for split in (s for s in inputs.sources if isinstance(s, SplitInput) and not quiet):
        print(f"reading {shown(split.spec)} at {split.size_for(size)}x{split.size_for(size)} (records of sizes "
              f"{', '.join(map(str, sorted(split.files)))} there; the largest member takes {size})", file=sys.stderr)


def report(summary: Summary, inputs: Inputs, args: argparse.Namespace) -> int:
    """The lines at the end of a run (the summary unless --quiet, what failed); returns the exit status."""
    if not args.quiet:
        print(summary_line(summary, inputs, args.out), file=sys.stderr)
    damage = summary.damage_line()
    if damage:  # counted in records, not rows: a damaged file is one row however many records it lost
        print(f"{damage} of {shown(args.out)}", file=sys.stderr)
    failed = summary.failed - Counter(corrupt_record=len(summary.damaged))
    if failed.total():
        kinds = ", ".join(f"{kind} {n}" for kind, n in failed.most_common())
        print(f"{failed.total()} of {summary.rows - len(summary.damaged)} image(s) failed ({kinds}): see the error "
              f"column of {shown(args.out)}", file=sys.stderr)
    return SOME_FAILED if summary.failures else 0


def write_split_submission(args: argparse.Namespace, spec: str, classes: list[str], expected: np.ndarray | None) -> int:
    """Write --submission from the CSV just written (id: the row's record id, label: its top class's index), checked
    as `flower blend` checks its own (ensemble.output); refused, with status 1, when a row failed."""
    from ensemble.output import write_label_submission

    with open(args.out, newline="", encoding="utf-8") as f:
        rows = [(row["path"], row["ok"], row["error"], row["top1"]) for row in csv.DictReader(f)]
    failed = [row for row in rows if row[1] != "true"]
    refused = f"--submission {shown(args.submission)} not written"
    if failed:
        error(f"{refused}: {len(failed)} of {len(rows)} row(s) failed, the first {failed[0][0]} ({failed[0][2]}); a "
              "submission needs an answer for every id")
        return SOME_FAILED
    ids = np.array([path.removeprefix(f"{spec}#") for path, *_ in rows], dtype=str)
    labels = np.array([classes.index(top1) for *_, top1 in rows], dtype=np.int64)
    try:
        write_label_submission(Path(args.submission), ids, labels, len(classes), ids if expected is None else expected)
    except FlowerError as err:
        error(f"{refused}: {err}")
        return SOME_FAILED
    if not args.quiet:
        print(f"wrote {shown(args.submission)}: {len(ids)} id(s)", file=sys.stderr)
    return 0


def check_out_is_no_input(out: Path, inputs: Inputs) -> None:
    """Refuse an --out that is one of the images to score (--overwrite would replace the photo by the CSV)."""
    if not os.path.lexists(out):
        return
    for source in inputs.sources:
        try:
            same = isinstance(source, FileInput) and os.path.samefile(source.path, out)
        except OSError:  # a broken link or an unreadable file: not the CSV
            same = False
        if same:
            raise InputError(f"--out {shown(str(out))} is one of the images to score; name another file")


def summary_line(summary: Summary, inputs: Inputs, out: str) -> str:
    """What the command says at the end: rows written, what was ignored, time and speed."""
    lines = [f"wrote {shown(out)}: {summary.rows} row(s), {summary.rows - summary.failures} scored, "
             f"{summary.failures} failed, in {summary.seconds:.1f} s "
             f"({summary.rows / max(summary.seconds, 1e-9):.1f} images/s)"]
    if inputs.ignored:
        lines.append(f"ignored {inputs.ignored} file(s) in the folders that are not images by extension or are hidden")
    return "\n".join(lines + [f"note: {note}" for note in inputs.notes])


def runtime_line(member: str, choice: RuntimeChoice) -> str:
    """What `flower predict` says of a member's runtime: the one it runs on, and why the others were refused."""
    said = f"member {member}: {choice.name}"
    if choice.difference is not None:
        said += f" (answers within {choice.difference:.2g} of TensorFlow's)"
    return said + "".join(f"; {runtime} refused: {reason}" for runtime, reason in choice.refused.items())
