"""Reading the Markdown documentation: its pages, their headings' anchors, their links.

The README is short and points into ``docs/``; these helpers let tests check that every
page is reachable from it and that no relative link or ``#anchor`` points at nothing.
Anchors follow GitHub's rule: the heading lower-cased, every character other than a
letter, digit, space, ``-`` or ``_`` dropped, spaces made ``-``, and a repeated
heading suffixed ``-1``, ``-2``...
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def pages() -> list[Path]:
    """The README and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a shell block is no
    heading, and a ``[x](y)`` in a code sample is no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(text):
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    """The relative link targets of a Markdown text (``path``, ``path#anchor``,
    ``#anchor``), in order; absolute URLs are left out."""
    return [target for line in _prose(text) for target in LINK.findall(line)
            if not EXTERNAL.match(target)]


def broken_links(page: Path) -> list[str]:
    """The links of ``page`` that name no file, or no heading of the file they name."""
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md"
                         or anchor not in anchors(dest.read_text(encoding="utf-8"))):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad
