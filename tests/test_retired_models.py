"""No retired upstream model is named anywhere an admin or the code could use it.

OpenAI removed these on a published schedule (developers.openai.com/api/docs/
deprecations, via ../shared/reference/backends.md). A line may still name one when the
line (or the sentence it is part of) says it was retired; anything else is a model a new
deployment would call and get ``model_not_found`` from.
"""

from __future__ import annotations

import re
from pathlib import Path

from support import ROOT

# dall-e-2 is not in the list: it stays the *contract's* model name (clients send it and
# it means "the route"; another instance of this gateway takes it as an upstream model).
RETIRED = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest")
NAME = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(m) for m in RETIRED)
                  + r")(?![\w.-]*\d)(?![\w-])")
ABOUT_RETIREMENT = re.compile(r"retir|shut ?down|removed|deprecat|gone|died|dead",
                              re.IGNORECASE)
PLACES = ("config", "deploy", "gateway", "README.md", "docs")


def _files() -> list[Path]:
    found: list[Path] = []
    for place in PLACES:
        path = ROOT / place
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and p.suffix in (
                ".py", ".yaml", ".yml", ".json", ".md", ".conf", ".service", ".txt", "")]
    return found


def offending_lines(text: str) -> list[str]:
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        if not NAME.search(line):
            continue
        context = " ".join(lines[max(0, i - 1): i + 2])  # a sentence may wrap
        if not ABOUT_RETIREMENT.search(context):
            bad.append(f"{i + 1}: {line.strip()}")
    return bad


def test_the_checker_finds_a_retired_model_and_spares_a_sentence_about_it() -> None:
    assert offending_lines("    model: gpt-image-1-mini\n")
    assert offending_lines("model = 'gpt-image-1'")
    assert not offending_lines("gpt-image-1 was retired on 2026-10-23")
    assert not offending_lines("model: gpt-image-2")
    assert not offending_lines("model: gpt-image-2.6-flare")


def test_no_retired_model_where_it_could_be_used() -> None:
    problems = {str(p.relative_to(ROOT)): bad for p in _files()
                if (bad := offending_lines(p.read_text(encoding="utf-8", errors="replace")))}
    assert not problems, problems

