"""The documentation stays inside the repository: every relative link of README.md and docs/*.md resolves.

A link (or image) must point at a file or folder that exists in the tree, must not leave the repository root, and
an anchor into a Markdown file must name one of its headings (GitHub's slugs). No page may refer to design notes
outside the repository (``../shared``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REQUIRED = ("method.md", "architecture.md", "cloud.md", "results.md")
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target "title") and ![alt](target); the text may hold one level of brackets
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", re.MULTILINE)
_HTML_ID = re.compile(r"<[^>]+\b(?:id|name)=[\"']([^\"']+)[\"']")


def _prose(text: str) -> str:
    """The text without fenced code blocks; code spans become a neutral word (they may sit inside link text)."""
    return _CODE_SPAN.sub("code", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every inline, image and reference-definition link target of a Markdown text, in order."""
    prose = _prose(text)
    found = [m.group(1) for m in _INLINE.finditer(prose)] + [m.group(1) for m in _REFERENCE.finditer(prose)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file defines (repeated headings get -1, -2, ... as on GitHub)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set(_HTML_ID.findall(text))
    for match in _HEADING.finditer(text):
        base = slug(match.group(1))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def link_problem(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) is broken, or None for a good or external link."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # http(s), mailto: not checked here
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part.startswith("/"):
        return "absolute path: use a link relative to the page"
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.is_relative_to(ROOT):
        return "leaves the repository"
    if not dest.exists():
        return "no such file or folder"
    if fragment and dest.is_file() and dest.suffix == ".md" and unquote(fragment).lower() not in anchors(dest):
        return f"no heading with anchor #{fragment} in {dest.relative_to(ROOT)}"
    return None


def test_the_docs_folder_has_its_pages():
    missing = [name for name in REQUIRED if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    problems = [f"{target}: {why}" for target in links(page.read_text(encoding="utf-8"))
                if (why := link_problem(page, target))]
    assert not problems, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    lines = [n for n, line in enumerate(text.splitlines(), 1) if "../shared" in line]
    assert not lines, f"{page.relative_to(ROOT)} mentions ../shared on line(s) {lines}"


def test_the_link_checker_itself():
    text = ("See [a](docs/x.md#part), ![img](<pic one.png> \"t\"), [`code`](../y), [ext](https://e.org/a)\n"
            "```\n[not](a/link)\n```\n[ref]: ./z.md\n")
    assert links(text) == ["docs/x.md#part", "pic one.png", "../y", "https://e.org/a", "./z.md"]
    readme = ROOT / "README.md"
    assert link_problem(readme, "../shared/design/SCIENCE.md") == "leaves the repository"
    assert link_problem(readme, "docs/no-such-page.md") == "no such file or folder"
    assert link_problem(readme, "sdpo/objectives/") is None
    assert link_problem(readme, "https://example.org") is None
    assert slug("Where we differ from the public code, and why") == "where-we-differ-from-the-public-code-and-why"
    assert slug("The `batch` mode: (official) parity") == "the-batch-mode-official-parity"
