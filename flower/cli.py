"""`flower <command> [options]`: dispatch to the command's own module in `flower.commands`, importing nothing else.

Each command's module is imported only when that command runs, so `flower train --help` and
config errors never load TensorFlow, and `flower blend` never needs it. The exit status rules are
`flower.commands.command`'s.
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
from dataclasses import dataclass

from flower import version
from flower.commands import interrupted, interrupted_import


@dataclass(frozen=True)
class Command:
    """One subcommand: the `flower.commands` module whose `main(argv, prog)` runs it, and a line for the overview."""

    module: str
    summary: str


COMMANDS = {
    "import": Command("flower.commands.import_photos", "import folders of photos (one per class) into the competition "
                                                       "layout"),
    "overlap": Command("flower.commands.overlap", "list photos of one set (folder or data split) found again in "
                                                   "another: a leak check"),
    "demo-data": Command("flower.commands.demo_data", "write the synthetic demo flower data set"),
    "train": Command("flower.commands.train", "train one ensemble member from a TOML config (resumes when rerun)"),
    "compare": Command("flower.commands.compare", "compare run directories side by side"),
    "augment-grid": Command("flower.commands.augment_grid", "write a PNG grid of augmented training samples"),
    "export": Command("flower.commands.export", "convert runs' SavedModels for a faster runtime (LiteRT, ONNX "
                                                "Runtime)"),
    "blend": Command("flower.commands.blend", "blend run directories, cross-validate, write the Kaggle submission"),
    "distil": Command("flower.commands.distil", "train one student member on an ensemble's answers (soft targets, "
                                                 "unlabeled images too)"),
    "serve": Command("flower.commands.serve", "serve an ensemble, one run or a model repository over HTTP"),
    "predict": Command("flower.commands.predict", "score image files, folders or a data split with an ensemble (or one "
                                          "run) into a CSV"),
}


def overview() -> str:
    """The text of `flower --help`."""
    width = max(map(len, COMMANDS))
    lines = ["usage: flower <command> [options]     (flower <command> --help: its options, defaults, meaning)",
             "", "Train image-classifier ensemble members, blend them, serve them.", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     this overview (flower help <command>: that command's help)",
              "  -V, --version  the installed version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `flower <command> ...` (argv None: the process's own arguments); returns the exit status."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["help"] and len(argv) > 1:  # `flower help train` is `flower train --help`
        if len(argv) > 2:
            print(f"error: flower help takes one command, got {argv[1:]}", file=sys.stderr)
            return 2
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"flower {version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    status = run_command(name, argv[1:])
    if program:  # done and written: a Ctrl-C while the process exits (TensorFlow's shutdown takes a second, with
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Python's handler gone) would end it by SIGINT, unannounced
    return status


def run_command(name: str, argv: list[str]) -> int:
    """Import the command's module and run its main; Ctrl-C while the module's libraries load is one line, 130."""
    try:
        module = importlib.import_module(COMMANDS[name].module)
    except KeyboardInterrupt:  # Ctrl-C while its libraries (TensorFlow, SciPy) load: before its main's own rules
        return interrupted()
    except ImportError as err:
        if interrupted_import(err):
            return interrupted()
        raise
    return int(module.main(argv, prog=f"flower {name}") or 0)
