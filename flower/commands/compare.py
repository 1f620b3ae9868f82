"""`flower compare`: run directories side by side (see training/fit/compare.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import training.fit.compare
from core.errors import DataError
from core.files import pattern_matches
from flower.commands import command
from training.fit.compare import by_f1, format_table, run_row


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower compare`."""
    parser = argparse.ArgumentParser(prog=prog, description=training.fit.compare.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories or glob patterns")
    parser.add_argument("--sort", choices=["f1", "name"], default="f1",
                        help="order rows by F1 (best first; runs without one last) or name (default f1)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    return parser


@command
def main(argv: list[str] | None = None, prog: str = "flower compare") -> int:
    """Run `flower compare`; returns the exit status."""
    args = parser(prog).parse_args(argv)
    paths = [Path(p) for pattern in args.runs for p in (pattern_matches(pattern) or [pattern])]
    rows = [run_row(p) for p in paths if p.is_dir() or not p.exists()]
    if not rows:
        raise DataError("no run directories given")
    key = by_f1 if args.sort == "f1" else (lambda r: r["run"])
    print(format_table(sorted(rows, key=key), args.markdown))
    return 0
