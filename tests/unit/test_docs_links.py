"""The documentation holds together: every relative link in README.md, CHANGELOG.md and
docs/*.md resolves (the file exists; an ``#anchor`` names a heading of its target, by
GitHub's slug rules), and nothing points outside the repository (issue 21: the README sent
readers to a contract file a clone does not have).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`+[^`]*`+")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *docs]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``#`` there is a shell comment)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to
    hyphens (letters, digits, ``_`` and ``-`` kept)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    out = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        out.extend(LINK.findall(CODE_SPAN.sub("", line)))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(path):
        if SCHEME.match(target):
            continue  # http(s), mailto: not ours to check offline
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
            continue
        try:
            dest.relative_to(root)
        except ValueError:
            problems.append(f"{target}: points outside the repository")
            continue
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    assert doc.is_file(), f"{doc} is missing"
    assert links(doc) or doc.name == "CHANGELOG.md", f"{doc.name} links nowhere"
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_document_points_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for outside in ("../shared", "shared/CONTRACT", "shared/lazyfs", "/work/"):
        assert outside not in text, f"{doc.name} mentions {outside!r}"


def test_the_readme_links_every_document_and_the_runbook_first() -> None:
    readme = links(ROOT / "README.md")
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in {t.partition("#")[0] for t in readme}, doc.name
    assert readme[0] == "docs/runbook.md", readme[:3]


def test_the_checker_catches_a_broken_link_and_a_missing_anchor(tmp_path: Path) -> None:
    """The checker itself fails on what it is for (and handles code and duplicates)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "other.md").write_text("# Other\n\n## Same\n\n## Same\n\n## `GET /x/{y}` and z\n")
    page = repo / "page.md"
    page.write_text(
        "[a](other.md#same-1) [b](other.md#get-xy-and-z) [c](#top)\n# Top\n"
        "```sh\n# not a heading\n[x](nowhere.md)\n```\n`[y](nowhere.md)`\n"
    )
    assert broken_links(page, repo) == []
    page.write_text(
        "[a](missing.md) [b](other.md#same-2) [c](#not-a-heading)\n```\n# not-a-heading\n```\n"
    )
    assert len(broken_links(page, repo)) == 3, broken_links(page, repo)
    (tmp_path / "outside.md").touch()
    page.write_text("[up](../outside.md)\n")
    assert broken_links(page, repo) == ["../outside.md: points outside the repository"]


def test_the_readme_shows_the_ci_command_verbatim() -> None:
    """.ci/run evals the README's second set-up line; a drift would fail CI at its start."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (assignment,) = [line for line in ci.splitlines() if line.startswith("cmd=")]
    cmd = shlex.split(assignment[len("cmd=") :])[0]
    assert cmd in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
