"""`flower predict`: score image files, folders or a data split with an ensemble (or one run) into a CSV (see
service/scoring.py). Exit status 0: every image scored; 1: some rows failed, or the models cannot be loaded; 2:
nothing written (bad options or inputs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import service.scoring as scoring
from core.errors import ConfigError
from core.names import shown
from core.runtimes import AUTO, CHOICES
from flower.commands import command, error, stop_on_sigterm
from service.runtimes import RuntimeChoice
from service.scoring import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, FileInput, InputError, Inputs, SplitInput, Summary

SOME_FAILED = 1  # documented: the CSV is written, some rows failed; or the models cannot be loaded


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower predict`."""
    parser = argparse.ArgumentParser(prog=prog, description=scoring.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="ENSEMBLE_OR_RUN",
                        help="ensemble directory, its ensemble.json, or a run directory")
    parser.add_argument("images", metavar="IMAGES", nargs="*",
                        help="image files, folders (walked recursively) and DATA:SPLIT (e.g. data/mine:test)")
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
                             "(default auto); a runtime named that cannot be used is an error")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists (else refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines and no summary on stderr")
    return parser


def checked_inputs(args: argparse.Namespace) -> Inputs:
    """The images to score, once the options, the model path and --out are checked; nothing is written yet."""
    if args.top_k < 1 or args.batch_size < 1:
        raise ConfigError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    scoring.check_out(Path(args.out), args.overwrite)
    scoring.model_kind(args.model)
    inputs = scoring.collect_inputs(args.images)
    check_out_is_no_input(Path(args.out), inputs)
    return inputs


@command
def main(argv: list[str] | None = None, prog: str = "flower predict") -> int:
    """Run `flower predict`; returns the exit status (see the module's docstring)."""
    from service.predictor import ArtifactError

    args = parser(prog).parse_args(argv)
    inputs = checked_inputs(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stop_on_sigterm()  # a terminated run removes its partial CSV, as Ctrl-C does
    try:
        predictor = scoring.load_predictor(args.model, args.runtime)
    except ArtifactError as err:
        error(str(err))
        return SOME_FAILED
    if not args.quiet:
        for member in predictor.members:
            print(runtime_line(member.name, member.runtime_choice), file=sys.stderr)
    options = scoring.Options(top_k=args.top_k, probabilities=args.probabilities, batch_size=args.batch_size)
    size = max(m.image_size for m in predictor.members)
    for split in (s for s in inputs.sources if isinstance(s, SplitInput) and not args.quiet):
        print(f"reading {shown(split.spec)} at {split.size_for(size)}x{split.size_for(size)} (records of sizes "
              f"{', '.join(map(str, sorted(split.files)))} there; the largest member takes {size})", file=sys.stderr)
    summary = scoring.score(predictor, inputs, args.out, options, args.overwrite, args.quiet)
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
