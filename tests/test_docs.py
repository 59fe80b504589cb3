"""The documentation holds together: a short README that reaches every docs/ page, and
no relative link or anchor in README.md or docs/*.md that points at nothing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml
from doclinks import DOCS, ROOT, anchors, broken_links, links, pages
from tls_certs import make_test_ca

from gateway.config import Config, parse_config

README = ROOT / "README.md"


def test_the_readme_is_a_front_page_not_a_manual() -> None:
    """Issue 20: about 250 lines; the rest lives in docs/."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve()
              for t in links(README.read_text(encoding="utf-8")) if t.partition("#")[0]}
    docs = sorted(DOCS.glob("*.md"))
    assert len(docs) >= 6
    assert [p.name for p in docs if p.resolve() not in linked] == []


def test_every_relative_link_resolves() -> None:
    problems = {p.name: bad for p in pages() if (bad := broken_links(p))}
    assert problems == {}


def test_every_picture_in_docs_is_shown_somewhere() -> None:
    shown = {(p.parent / t).resolve() for p in pages()
             for t in links(p.read_text(encoding="utf-8")) if t.endswith(".png")}
    assert [p.name for p in DOCS.glob("*.png") if p.resolve() not in shown] == []


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Second, part 2\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Twice\n\n## Twice\n\n"
        "[ok](other.md#second-part-2) [ok](#twice-1) [ok](#page) "
        "[web](https://example.com/x.md#nope)\n\n"
        "[gone](missing.md) [bad](other.md#third) [bad](#twice-2)\n\n"
        "```sh\n# not a heading\n[not](a-link.md)\n```\n")
    assert anchors(page.read_text()) == {"page", "twice", "twice-1"}
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#third: no heading #third in other.md",
                                  "#twice-2: no heading #twice-2 in page.md"]


def test_no_page_points_at_the_old_readme_sections() -> None:
    """Sections that moved to docs/ are not linked as README anchors any more."""
    readme_anchors = anchors(README.read_text(encoding="utf-8"))
    for page in pages():
        for target in re.findall(r"README\.md#([\w-]+)", page.read_text(encoding="utf-8")):
            assert target in readme_anchors, (page.name, target)


def test_every_whole_config_in_the_docs_loads(tmp_path: Path) -> None:
    """A YAML block made of top-level config keys is a config a reader may paste: it
    must load as written (an option renamed or removed shows here). Fragments (one
    backend's settings, indented) are left out. The TLS example names files that exist
    only on a real box: a test certificate stands in for them."""
    top = {f.name for f in dataclasses.fields(Config)}
    ca = make_test_ca(tmp_path / "tls")
    env = dict.fromkeys(("OPENAI_API_KEY", "XINFERENCE_KEY", "UPSTREAM_KEY",
                         "SDWEBUI_PASSWORD", "COMFY_PROXY_TOKEN", "AUDIT_DB_PASSWORD"), "secret")
    checked = []
    for page in pages():
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            loaded = yaml.safe_load(block)
            if not isinstance(loaded, dict) or not set(loaded) <= top:
                continue
            text = re.sub(r"/etc/\S+/fullchain\.pem", str(ca.cert), block)
            text = re.sub(r"/etc/\S+/privkey\.pem", str(ca.key), text)
            text = text.replace("config/comfyui-workflow.json",
                                str(ROOT / "config" / "comfyui-workflow.json"))
            parse_config(text, env)
            checked.append((page.name, sorted(loaded)))
    assert len(checked) >= 10, checked
