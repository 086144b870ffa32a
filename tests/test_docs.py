"""The README and docs/ show only commands and options that exist, defenses that are registered, and links
that resolve: every ``veil ...`` line in a shell block is checked against the CLI itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from veil.cli import app
from veil.defenses import list_defenses

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUP = typer.main.get_command(app)


def shell_lines(page: Path) -> list[str]:
    """The ``veil ...`` commands of a page's ```bash blocks (a line may hold several, joined by && or ;)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0]
            for part in re.split(r"&&|;|\|", line):
                words = part.strip().split()
                if words and words[0] == "veil":
                    out.append(part.strip())
    return out


def options_of(name: str) -> set[str]:
    command = GROUP.commands[name]
    return {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {"--help"}


CASES = [(page.name, line) for page in PAGES for line in shell_lines(page)]


def test_the_pages_show_commands():
    assert len(CASES) >= 10  # the README alone shows ten


@pytest.mark.parametrize("page, line", CASES)
def test_every_command_and_option_shown_exists(page, line):
    words = shlex.split(line)
    assert len(words) >= 2 and words[1] in GROUP.commands, f"{page}: 'veil {words[1:2]}' is not a command"
    known = options_of(words[1])
    for w in words[2:]:
        if w.startswith("--"):
            assert w.split("=")[0] in known, f"{page}: 'veil {words[1]}' has no option {w}"
    for flag, value in zip(words, words[1:]):
        if flag in ("-d", "--defense"):
            assert value in list_defenses(), f"{page}: no defense {value!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
