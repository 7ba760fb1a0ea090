"""The documents a reader follows: every relative link resolves, code cites only what exists.

Links between the Markdown files (README.md, docs/, bench/README.md, CHANGELOG.md) must name a
file of the repository and, after `#`, one of its headings; so must the references to docs/
(a path, an anchor) in code comments. The contract the code was first written against is not in the
repository, so no reference to its numbered sections may come back.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [
    "README.md",
    "CHANGELOG.md",
    "bench/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]
#: the README stays a newcomer's document; the reference lives in docs/
README_MAX_LINES = 350

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_REFERENCE = re.compile(r"\b(docs/[\w./-]+\.md)(#[\w-]+)?")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in _prose(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:  # GitHub numbers repeated headings
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def _check(source: str, target: str, anchor: str | None) -> str | None:
    """What is wrong with a reference from `source` to repository path `target`, else None."""
    path = ROOT / target
    if not path.exists():
        return f"{source}: {target} does not exist"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"{source}: {target} has no heading #{anchor}"
    return None


def _links(document: str) -> list[tuple[str, str | None]]:
    links = []
    for line in _prose(ROOT / document):
        for url in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", url):  # http:, https:, mailto:
                continue
            target, _, anchor = url.partition("#")
            resolved = (ROOT / document).parent / target if target else ROOT / document
            links.append((str(resolved.resolve().relative_to(ROOT)), anchor or None))
    return links


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_resolves(document):
    problems = [_check(document, target, anchor) for target, anchor in _links(document)]
    assert [p for p in problems if p] == []


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def _text(name: str) -> str | None:
    try:
        return (ROOT / name).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a binary file (the dashboard's screenshot)


def test_code_comments_cite_documents_that_exist():
    problems = []
    for name in _tracked_files():
        if name.endswith(".md") or (text := _text(name)) is None:
            continue
        for target, anchor in CODE_REFERENCE.findall(text):
            problem = _check(name, target, anchor.lstrip("#") or None)
            if problem:
                problems.append(problem)
    assert problems == []


def test_no_reference_to_a_contract_outside_the_repository():
    needle = "SPEC " + chr(0xA7)  # spelled so that this file does not match itself
    found = [name for name in _tracked_files() if needle in (_text(name) or "")]
    assert found == [], "cite docs/design.md (or say why in words) instead"


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES
