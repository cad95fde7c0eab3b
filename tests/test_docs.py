"""The documentation: every code block of the pages and the README parses, and the site builds.

Each fenced block is parsed by its language: Python with `ast`, JSON, TOML, YAML and INI
(systemd units) with their parsers, shell with `bash -n`; `text` is output, shown as is. A
block opts out only with a marker on the line right above it that says why:
`<!-- untested: <reason> -->`. The blocks are also run: the tutorial's Python and shell
blocks in a new project from the wheel by tests/test_adoption.py; every other page's Python
blocks in the tutorial's project, and its shell blocks (make targets, commands, environment
files), by tests/test_docs_run.py; the requests to a running stack (`curl`) by
tests/test_stack.py.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    + [page for page in DOCS.rglob("*.md") if "_build" not in page.relative_to(DOCS).parts]
)
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
UNTESTED = re.compile(r"^<!--\s*untested:(.*?)-->\s*$")
README_LIMIT = 12 * 1024


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    language: str
    code: str
    untested: str | None  # the marker's reason, "" for a marker without one

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}:{self.language or '(none)'}"


def is_closing(line: str, fence: str) -> bool:
    """A closing fence: the opening's character, at least as many times, and nothing else."""
    stripped = line.strip()
    return stripped.startswith(fence) and stripped == fence[0] * len(stripped)


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        end = index + 1
        while end < len(lines) and not is_closing(lines[end], fence):
            end += 1
        assert end < len(lines), f"{page}:{index + 1}: a code block is never closed"
        marker = UNTESTED.match(lines[index - 1].strip()) if index else None
        found.append(
            Block(
                page=page,
                line=index + 1,
                language=info.split()[0] if info else "",
                code="\n".join(lines[index + 1 : end]) + "\n",
                untested=marker.group(1).strip() if marker else None,
            )
        )
        index = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def parse_python(code: str) -> None:
    ast.parse(code)


def parse_json(code: str) -> None:
    json.loads(code)


def parse_toml(code: str) -> None:
    tomllib.loads(code)


def parse_yaml(code: str) -> None:
    yaml = pytest.importorskip("yaml")
    yaml.safe_load(code)


def parse_ini(code: str) -> None:
    """An INI file, or a systemd unit (whose keys may repeat, `Environment=`); an excerpt that
    starts with keys is read as the body of one section."""
    keys = [line.strip() for line in code.splitlines() if line.strip()[:1] not in ("", "#", ";")]
    if not keys or not keys[0].startswith("["):
        code = "[excerpt]\n" + code
    configparser.RawConfigParser(strict=False, interpolation=None).read_string(code)


def parse_shell(code: str) -> None:
    result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def nothing_to_parse(code: str) -> None:
    """Output shown to the reader (a table, a log, a traceback)."""


PARSERS = {
    "python": parse_python,
    "json": parse_json,
    "toml": parse_toml,
    "yaml": parse_yaml,
    "ini": parse_ini,
    "systemd": parse_ini,
    "sh": parse_shell,
    "bash": parse_shell,
    "text": nothing_to_parse,
}


def is_directive(block: Block) -> bool:
    """A MyST directive (```{include}, ```{toctree}, ```{eval-rst}): the Sphinx build checks it."""
    return block.language.startswith("{")


@pytest.mark.parametrize("block", [b for b in BLOCKS if not is_directive(b)], ids=str)
def test_a_code_block_parses_as_its_language(block: Block) -> None:
    if block.untested is not None:
        assert block.untested, f"{block}: an untested block must say why (<!-- untested: why -->)"
        pytest.skip(f"untested: {block.untested}")
    assert block.language in PARSERS, (
        f"{block}: a code block must name a language this test parses ({', '.join(PARSERS)})"
        " or say why it is untested"
    )
    PARSERS[block.language](block.code)


def test_the_pages_have_code_blocks_of_every_kind_this_test_knows() -> None:
    """A guard against a parser that finds nothing (a fence pattern gone wrong)."""
    languages = {block.language for block in BLOCKS}
    assert {"python", "sh", "ini", "yaml", "toml", "text"} <= languages
    assert len(BLOCKS) > 50


def test_the_readme_is_at_most_12_kb_and_has_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT
    assert "make run" in readme and "make test" in readme


def test_every_page_of_the_site_is_in_a_table_of_contents() -> None:
    """Sphinx warns of a page in no toctree; this says which, before the build."""
    pages = {
        page.relative_to(DOCS).with_suffix("").as_posix()
        for page in DOCS.rglob("*.md")
        if "_build" not in page.relative_to(DOCS).parts
    }
    listed = {"index"}
    for page in DOCS.rglob("*.md"):
        for block in blocks_of(page):
            if block.language == "{toctree}":
                folder = page.parent.relative_to(DOCS).as_posix()
                entries = [
                    line.strip()
                    for line in block.code.splitlines()
                    if line.strip() and not line.startswith(":")
                ]
                listed |= {(entry if folder == "." else f"{folder}/{entry}") for entry in entries}
    assert pages - listed == set()


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    """What `make docs` runs: Sphinx with warnings as errors."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"),
            *("-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        # As `make docs` builds it: the reference project's settings (docs/conf.py), whatever
        # settings this test process runs with.
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "sagaproject.settings"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").exists()


def test_a_block_opts_out_only_with_a_marker_right_above_it(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- untested: needs the reader's gateway -->\n```python\nimport gateway\n```\n\n"
        "<!-- untested: -->\n```python\nx\n```\n\n"
        "<!-- untested: too far above -->\n\n```python\ny\n```\n"
    )
    marked, unexplained, unmarked = blocks_of(page)
    assert marked.untested == "needs the reader's gateway"
    assert unexplained.untested == ""
    assert unmarked.untested is None
