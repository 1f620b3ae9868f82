"""`flower export`: convert runs' SavedModels for a faster runtime (runs exported before, or with export.runtimes =
'none'; see training/fit/runtimes.py).

    flower export runs/lite0-128 --runtime litert
    flower export ens/flowers --runtime litert --runtime onnx     # every member of an ensemble

Each run directory gains runtimes/model.tflite (litert) or runtimes/model.onnx (onnx), converted from its
saved_model/'s serving_pixels signature, and runtimes/<runtime>.json, the record of the SavedModel it was made from
(a re-export makes the file stale: the service then refuses it and says so). `flower serve --runtime auto` and
`flower predict --runtime auto` use it once its answers match TensorFlow's at load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import DataError
from core.members import is_ensemble_directory, is_run_directory, read_ensemble
from core.runtimes import CONVERTED
from flower.commands import command


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower export`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_ENSEMBLE",
                        help="run directories, or ensemble directories (each of their members)")
    parser.add_argument("--runtime", action="append", required=True, choices=sorted(CONVERTED),
                        help="the runtime to convert for (repeat for several)")
    return parser


def run_directories(paths: list[str]) -> list[Path]:
    """The run directories the paths name (an ensemble's members in its order), each once; DataError naming a path
    that is neither a run nor an ensemble directory."""
    runs: list[Path] = []
    for text in paths:
        path = Path(text)
        if is_run_directory(path):
            found = [path]
        elif path.is_file() or is_ensemble_directory(path):
            ensemble = read_ensemble(path)
            found = [entry.run_dir(ensemble.path) for entry in ensemble.members]
        else:
            raise DataError(f"{text} is neither a run directory (member.json) nor an ensemble directory "
                            "(ensemble.json)")
        runs += [run for run in found if run.resolve() not in {r.resolve() for r in runs}]
    return runs


@command
def main(argv: list[str] | None = None, prog: str = "flower export") -> int:
    """Run `flower export`; returns the exit status."""
    args = parser(prog).parse_args(argv)
    runs = run_directories(args.paths)
    runtimes = list(dict.fromkeys(args.runtime))
    from training.fit.runtimes import check_converters, convert_run  # TensorFlow only once the arguments are good

    check_converters(tuple(runtimes))
    for run in runs:
        for runtime in runtimes:
            print(f"converting {run} to {runtime} ...", file=sys.stderr, flush=True)
            convert_run(run, runtime)
    return 0
