"""The documentation cannot drift: the command reference is the parsers', the README stays short, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from scripts import check_breaks, command_reference
from tests.conftest import REPO

README_MAX_LINES = 150
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_the_command_reference_is_what_the_commands_parsers_say():
    page = (REPO / "docs" / "COMMANDS.md").read_text(encoding="utf-8")
    assert page == command_reference.render(), (
        "docs/COMMANDS.md differs from the commands' parsers: run python scripts/command_reference.py and commit it")


def test_the_command_reference_holds_every_option_of_every_command():
    page = (REPO / "docs" / "COMMANDS.md").read_text(encoding="utf-8")
    for name in command_reference.COMMANDS:
        parser = command_reference.command_parser(name)
        assert f"\n## flower {name}\n" in page
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag == "-h" or flag == "--help" or f"`{flag}" in page, (name, flag)


def test_the_readme_is_a_short_introduction():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move reference text into docs/"
    text = "\n".join(lines)
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text  # the two first commands
    assert "docs/COMMANDS.md" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    broken = [link for page in PAGES for link in _broken_links(page)]
    assert not broken, broken


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "B.md").write_text("# A heading: with `code`\n")
    page = tmp_path / "A.md"
    page.write_text("[ok](B.md#a-heading-with-code) [gone](C.md) [bad](B.md#nothing) [web](https://x.org/y)\n"
                    "```\n[in code](D.md)\n```\n")
    assert _broken_links(page) == ["A.md: C.md (no such file)", "A.md: B.md#nothing (no such heading)"]


def test_every_deliberate_break_still_finds_its_text_once():
    """scripts/check_breaks.py's breaks name code by its text: a refactor that moves the text makes the break miss
    silently until someone runs the script (as one did), so each text is looked up here, at no cost."""
    assert len(check_breaks.BREAKS) >= 13
    counts = {b.name: (REPO / b.file).read_text().count(b.old) for b in check_breaks.BREAKS}
    assert {name: n for name, n in counts.items() if n != 1} == {}
