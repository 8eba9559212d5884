"""The docs stand on their own: every relative link in README.md and docs/ resolves (file and
heading anchor), the README stays a front door, and nothing cites a document outside the repo."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile("DESIGN " + "\u00a7" + r"|\.\./shared")  # spelled so this file does not match itself
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if m := re.match(r"^#{1,6} (.*)", line):
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            out.add(text.replace(" ", "-"))
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad](#nowhere)\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: #nowhere (no such heading)"]


def test_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_no_file_cites_a_document_outside_the_repository():
    cited = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml"}
             and ".venv" not in p.parts and "work_dirs" not in p.parts and OUTSIDE.search(p.read_text(errors="ignore"))]
    assert cited == []
