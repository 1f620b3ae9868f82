"""Write docs/COMMANDS.md, every `flower` command's usage, description and options, from the commands' own parsers.

    python scripts/command_reference.py           # (re)write docs/COMMANDS.md
    python scripts/command_reference.py --check   # exit 1 when docs/COMMANDS.md differs from the parsers

The page is generated, never edited: an option's help text and default live in its command's `parser(prog)`
(`flower/commands/<name>.py`), and `tests/test_docs.py` fails when the page and the parsers disagree. Importing
the command modules loads no TensorFlow (`tests/test_architecture.py`), so this runs in a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/command_reference.py` from a checkout
    sys.path.insert(0, str(REPO))

from flower.cli import COMMANDS  # noqa: E402

PAGE = REPO / "docs" / "COMMANDS.md"
WIDTH = 100  # fixed, so the usage lines do not depend on the terminal the script runs in
HEADER = """# Command reference

Every option of every `flower` command, its default and its meaning. This page is generated from the commands'
own parsers by `python scripts/command_reference.py`; do not edit it by hand (`tests/test_docs.py` fails when it
differs from the parsers). `flower <command> --help` prints the same on a terminal. How the commands fit
together: [the README](../README.md).

Where the `flower` script is not on the PATH (a notebook, a Kaggle kernel), `python -m flower <command>` is the
same command; the older per-module forms (`python -m training.train`, `python -m ensemble`, `python -m service`,
...) are gone. In Python, `flower.commands.<module>.main(argv)` runs one command and returns its exit status.
The exit statuses every command shares (2 with one line `error: ...` for a bad option, config value or input
file, 130 and one line `interrupted` for Ctrl-C, 1 with a traceback for a bug) are in
[ARCHITECTURE.md](ARCHITECTURE.md#the-house-who-may-import-what); a command that also uses 1 for a documented
outcome (`flower overlap`, `flower predict`, `flower serve`) says so below.
"""


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser `flower <name>` parses with, from its module's `parser(prog)`."""
    module = importlib.import_module(COMMANDS[name].module)
    parser = module.parser(f"flower {name}")
    formatter = parser.formatter_class
    parser.formatter_class = lambda prog: formatter(prog, width=WIDTH)
    return parser


def _cell(text: str) -> str:
    """Text fit for one cell of a markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _help(action: argparse.Action, prog: str) -> str:
    """An option's help with argparse's `%(default)s` and the like filled in, and its choices."""
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    if action.choices and not any(str(choice) in text for choice in action.choices):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return text


def _default(action: argparse.Action) -> str:
    """An option's default as a cell: empty where there is none (a flag off, nothing given)."""
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS, [], False) or action.nargs == 0:
        return ""
    return f"`{action.default!r}`"


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
            names = ", ".join(f"`{flag}{metavar}`" for flag in action.option_strings)
        else:
            names = f"`{action.metavar or action.dest}`"
        rows.append(f"| {names} | {_default(action)} | {_cell(_help(action, parser.prog))} |")
    return rows


def command_section(name: str) -> str:
    """One command's part of the page: summary, usage, description (and epilog) as the terminal shows them, options."""
    parser = command_parser(name)
    usage = parser.format_usage().strip()
    text = "\n\n".join(part.strip("\n") for part in (parser.description or "", parser.epilog or "") if part.strip())
    lines = [f"## flower {name}", "", COMMANDS[name].summary[:1].upper() + COMMANDS[name].summary[1:] + ".", "",
             "```text", usage, "", text.rstrip(), "```", "", *_option_rows(parser), ""]
    return "\n".join(lines)


def render() -> str:
    """The whole page."""
    contents = ["| command | what it does |", "|---|---|"]
    contents += [f"| [`flower {name}`](#flower-{name}) | {_cell(command.summary)} |"
                 for name, command in COMMANDS.items()]
    sections = [command_section(name) for name in COMMANDS]
    return "\n".join([HEADER, *contents, "", *sections]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--check", action="store_true", help="only compare: exit 1 when docs/COMMANDS.md is stale")
    check = args.parse_args(argv).check
    page = render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if current == page:
        print(f"{PAGE.relative_to(REPO)} is up to date")
        return 0
    if check:
        print(f"{PAGE.relative_to(REPO)} is stale: run python scripts/command_reference.py", file=sys.stderr)
        return 1
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
