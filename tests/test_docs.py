"""The documentation points at real things: every relative link of README.md, docs/*.md and
benchmarks/README.md, and every ``*.md`` file the first two cite, exists, and every shell command in the README parses:
its modules exist, the repository files it names exist, and a ``python -m monai.bundle run`` line
passes the bundle's own option check (an override that is no id of the merged configs fails)."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest
from conftest import REPO

from monai_skipts.bundle.checks import _as_files, check_overrides, command_line_overrides

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
README = (REPO / "README.md").read_text(encoding="utf-8")
#: the repository's top-level folders: a command argument starting with one of them names a file here
REPO_DIRS = ("bundles/", "transforms/", "benchmarks/", "docs/", "tests/", ".ci/", "monai_skipts/")


def _relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in links if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_cited_files_exist(doc):
    text = doc.read_text(encoding="utf-8")
    for link in _relative_links(text):
        assert (doc.parent / link).exists(), f"{doc.name}: link {link} points at nothing"
    if doc.name == "README.md" and doc.parent.name == "benchmarks":
        return  # its backticked *.md names are the benchmarks' output files (quality.md)
    for cited in re.findall(r"`([\w./-]+\.md)`", text):
        found = (doc.parent / cited).exists() or (REPO / cited).exists()
        assert found, f"{doc.name}: cites {cited}, not in the repository"


def test_readme_links_the_docs():
    links = _relative_links(README)
    for doc in ("docs/usage.md", "docs/results.md", "docs/design.md", "docs/operating_in_a_hospital.md"):
        assert doc in links, doc


COMMANDS = shell_commands(README)


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10 and any("monai.bundle run" in c for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_every_readme_command_parses(line):
    """Each ``&&``-separated command shlex-splits; ``python -m X`` names an importable module (this
    package's and MONAI's; other packages' where installed); a path into this repository exists; a
    bundle run's overrides are ids of its configs."""
    for cmd in re.split(r"\s&&\s", line):
        words = shlex.split(re.sub(r"\[--[^\]]*\]", "", cmd))  # optional [--flag value] parts dropped
        while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value command
            words.pop(0)
        if "-m" in words and words[0].startswith(("python", "torchrun")):
            module = words[words.index("-m") + 1]
            if module.startswith(("monai_skipts", "monai.")):
                assert importlib.util.find_spec(module) is not None, f"{module}: no such module ({line})"
        for w in words:
            for part in re.findall(r"[\w./-]+", w):
                if part.startswith(REPO_DIRS) and "<" not in w:
                    assert (REPO / part).exists(), f"{part}: not in the repository ({line})"
        if "monai.bundle" in words and "run" in words:
            args = words[words.index("run") + 1 :]
            overrides = command_line_overrides(args)
            files = [f for f in _as_files(overrides["config_file"]) if f.startswith("bundles/")]
            if files:  # an unzipped exported bundle (/opt/bundles/...) is checked in tests/bundle/test_export.py
                check_overrides(overrides, [str(REPO / f) for f in files])
