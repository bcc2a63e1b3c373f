"""Reading the README's code blocks, for the tests that run or parse what it tells a user to type."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(section: str, page: Path = README) -> dict[str, str]:
    """The first code block of each language (yaml, bash, python; "" for a block that names none, such as printed
    output) in a section of the README (or of another page written the same way)."""
    text = page.read_text()
    heading = re.search(rf"^#+ {re.escape(section)}\n", text, flags=re.M)
    assert heading, f"{page.name} has no section {section!r}"
    start = heading.end()
    end = text.find("\n## ", start)
    body = text[start:end if end != -1 else len(text)]
    blocks: dict[str, str] = {}
    for lang, code in re.findall(r"```(\w*)\n(.*?)```", body, flags=re.S):
        blocks.setdefault(lang, code)
    return blocks


def readme_commands() -> list[list[str]]:
    """The words of each `entropy-search` line of the README's "Command line" block, [optional] words left out."""
    lines = [line.split("#", 1)[0].split() for line in readme_blocks("Command line")["bash"].splitlines()
             if line.startswith("entropy-search ")]
    return [[w for w in words if not (w.startswith("[") or w.endswith("]"))] for words in lines]
