"""The documentation a user reads: the README stays short (at most about 200 lines) and opens with its two set-up
commands, every relative link of the README and docs/ resolves, and no page narrates the project's development
history (what changed goes to CHANGELOG.md). Under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details to docs/"
    assert lines[3].startswith("make quickstart") and lines[4].startswith("make test"), lines[:6]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not re.match(r"[a-z]+:", target):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_no_page_narrates_the_development_history():
    sources = [*PAGES, REPO / "bench" / "RESULTS.md", *(REPO / "entropy_search").rglob("*.py"),
               *(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]
    pattern = re.compile(r"\bsessions? [0-9]+", re.IGNORECASE)
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in sources
             for match in pattern.finditer(path.read_text())]
    assert not found, found[:10]


def test_every_command_of_the_readme_parses_and_names_files_that_exist():
    """Each `entropy-search` line of the README's "Command line" block is accepted by the CLI's own parser (so no
    option it shows has been renamed or removed) and every shipped file it names exists, in under a second; the
    block is run top to bottom by tests/test_readme_commands.py (slow)."""
    from entropy_search.cli import build_parser

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Command line\n"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [line.split("#", 1)[0].split() for line in block.splitlines() if line.startswith("entropy-search ")]
    assert len(commands) >= 8
    parser = build_parser()
    for words in commands:
        argv = [w for w in words[1:] if not (w.startswith("[") or w.endswith("]"))]  # optional flags shown in []
        parser.parse_args(argv)
        for word in argv:
            if word.startswith(("examples/", "tune_configs/")):
                assert (REPO / word).is_file(), word
