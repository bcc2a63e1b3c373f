"""The documentation a user reads: the README stays short (at most about 200 lines) and opens with its two set-up
commands, every relative link of the README and docs/ resolves, and no page narrates the project's development
history (what changed goes to CHANGELOG.md); the commands it shows are the ones the tests run, and its headline
table is what the committed rows and the quality benchmark's own command give. Under a second each, but for that
command (about 10 s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench
from readme import readme_blocks, readme_commands

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

    commands = readme_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for words in commands:
        argv = words[1:]
        parser.parse_args(argv)
        for word in argv:
            if word.startswith(("examples/", "tune_configs/")):
                assert (REPO / word).is_file(), word


def test_how_it_works_shows_the_readmes_command_line():
    """docs/how-it-works.md repeats the README's "Command line" block, which tests/test_readme_commands.py runs; the
    two stay the same block. Instant."""
    guide = readme_blocks("Command line", page=REPO / "docs" / "how-it-works.md")["bash"]
    assert guide == readme_blocks("Command line")["bash"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make, as the README's first line does")
def test_make_quickstart_runs_the_readmes_first_command_and_its_timing_script_runs_it_too():
    """`make quickstart`'s recipe is the first line of the README's "Command line" block, which
    tests/test_readme_commands.py runs through `bench/bench_quickstart.py` (the README's timing command)."""
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry_run = subprocess.run(["make", "-n", "--no-print-directory", "VENV=.venv", "-o", ".venv/bin/.installed",
                              "quickstart"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert dry_run[0] == ".venv/bin/entropy-search", dry_run
    assert dry_run[1:] == readme_commands()[0][1:] == list(load_bench("bench_quickstart").COMMAND), dry_run
    assert "`python bench/bench_quickstart.py`" in " ".join((REPO / "README.md").read_text().split())


#: The headline table's rows (README.md and docs/results.md) by the start of their first cell, and the budget of
#: bench/quality/fashion30/rows.jsonl each one reports; its columns after the seeds, and the method of each.
HEADLINE_BUDGETS = {"10x fewer MACs": "macs:0.1", "latency of uniform pruning at 10x": "latency:0.4",
                    "5x fewer MACs": "macs:0.2", "latency 0.5 of": "latency:0.5", "latency 0.33 of": "latency:0.33"}
HEADLINE_METHODS = ("delivered", "uniform", "tp_taylor", "fastnas", "agent")


def _mean_and_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * spread:.2f}%"


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_the_headline_table_is_the_committed_rows(page):
    """Every figure of the headline table (mean ± std of the test accuracy after the fine-tune, and the seeds) is
    what the committed rows of the quality benchmark give, so the table cannot drift from its data. Instant."""
    rows = [json.loads(line) for line in (REPO / "bench/quality/fashion30/rows.jsonl").read_text().splitlines()]
    text = (REPO / page).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    checked = 0
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        budget = next((b for start, b in HEADLINE_BUDGETS.items() if cells[0].startswith(start)), None)
        if budget is None or len(cells) != 2 + len(HEADLINE_METHODS):
            continue
        at = [r for r in rows if r["budget"] == budget]
        delivered = [r for r in at if r["method"] == "delivered"]
        assert cells[1] == str(len(delivered)), f"{page}, {cells[0]}: seeds {cells[1]}, rows {len(delivered)}"
        for method, cell in zip(HEADLINE_METHODS, cells[2:]):
            values = [r["test_after"] for r in at if r["method"] == method and r.get("test_after") is not None]
            if not values:
                assert "not" in cell or "cannot" in cell, f"{page}, {cells[0]}, {method}: {cell} without rows"
                continue
            expected = _mean_and_spread(values)
            assert cell.strip("*").startswith(expected) or cell.startswith(f"**{expected}**"), \
                f"{page}, {cells[0]}, {method}: {cell}, the rows give {expected}"
        checked += 1
    assert checked >= 4, f"{page}: {checked} headline rows found"


def test_the_quality_benchmarks_command_reproduces_the_headline_table():
    """`python bench/bench_quality.py --preset fashion30`, the README's command for its headline table, run as
    written: it continues from the committed rows, finds every row done, computes nothing and prints each budget's
    table, in which the delivered network's mean ± std is the README's. About 10 s (it imports torch)."""
    assert "`python bench/bench_quality.py --preset fashion30`" in " ".join((REPO / "README.md").read_text().split())
    quality = load_bench("bench_quality")
    rows = [json.loads(line) for line in (REPO / "bench/quality/fashion30/rows.jsonl").read_text().splitlines()]
    missing = [(budget, seed, method) for budget in quality.PRESETS["fashion30"]["budgets"] for seed in (0, 1, 2)
               for method in ("delivered", quality.UNIFORM_CLI, quality.FASTNAS)
               if not any(r["budget"] == budget and r["seed"] == seed and r["method"] == method for r in rows)]
    assert not missing, f"rows not committed, the command would compute them (hours): {missing}"
    printed = subprocess.run([sys.executable, "bench/bench_quality.py", "--preset", "fashion30"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, check=True).stdout
    for budget in HEADLINE_BUDGETS.values():
        delivered = [r["test_after"] for r in rows if r["budget"] == budget and r["method"] == "delivered"]
        assert _mean_and_spread(delivered).rstrip("%") in printed, (budget, printed[-2000:])


def test_every_cited_section_of_the_results_is_a_heading():
    """Code and docs cite measurements as `bench/RESULTS.md, "HEADING"`; each cited heading exists (a renamed
    section would leave the citation pointing at nothing). Instant."""
    results = (REPO / "bench" / "RESULTS.md").read_text()
    headings = [line.lstrip("#").strip() for line in results.splitlines() if line.startswith("#")]
    sources = [*PAGES, *(REPO / "entropy_search").rglob("*.py"), *(REPO / "bench").glob("*.py")]
    cited = 0
    for path in sources:
        text = " ".join(path.read_text().replace("#", " ").split())  # citations in comments span lines
        for match in re.finditer(r'RESULTS\.md, "([^"]+)"((?: and "[^"]+")*)', text):
            for title in [match.group(1), *re.findall(r'"([^"]+)"', match.group(2))]:
                assert any(title in heading for heading in headings), f"{path.name} cites {title!r}"
                cited += 1
    assert cited >= 20, cited


def test_the_python_api_pages_example_runs():
    """docs/python-api.md's example runs as written, and ResNet-56 has the 30 channel groups its comment says. About
    5 s (ResNet-56's dependency graph, two forwards)."""
    namespace: dict = {}
    exec(readme_blocks("Python API", page=REPO / "docs" / "python-api.md")["python"], namespace)
    assert len(namespace["space"].groups) == 30
    assert namespace["y"].shape == (8, 10)
