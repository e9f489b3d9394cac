"""The documentation: a short README, links that resolve, nothing that points outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 320
# the pages the README must link: each concern has its own page under docs/
README_LINKS = [
    "docs/methods.md",
    "docs/speed.md",
    "docs/data.md",
    "docs/reliability.md",
    "docs/clusters.md",
    "docs/evidence.md",
    "docs/finetuning.md",
    "docs/write_a_method.md",
]
SETUP_COMMANDS = ["make demo", "make test"]
OUTSIDE = ["../shared", "/work/shared", "/tmp/"]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where a bracket is code, not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link, the file it names, its anchor) for every link to a file of the repository."""
    out = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s)://, mailto: ...; a link to an anchor of the same page
        file_part, _, anchor = target.partition("#")
        out.append((target, (path.parent / file_part).resolve(), anchor))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the visible text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def section(text: str, title_words: tuple[str, ...]) -> str:
    """The body of the first level-2 section whose title starts with one of ``title_words``."""
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        title = part.splitlines()[0].lower()
        if title.startswith(title_words):
            return part
    return ""


def test_the_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail into a page under docs/ and link it"
    )


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_of_the_repository(page):
    broken = [target for target, file, _ in relative_links(page) if not file.exists()]
    outside = [target for target, file, _ in relative_links(page) if not file.is_relative_to(ROOT)]
    assert not broken, f"{page.relative_to(ROOT)} links files that do not exist: {broken}"
    assert not outside, f"{page.relative_to(ROOT)} links files outside the repository: {outside}"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_into_a_page_exists(page):
    missing = [
        target
        for target, file, anchor in relative_links(page)
        if anchor and file.suffix == ".md" and file.exists() and anchor not in anchors(file)
    ]
    assert not missing, f"{page.relative_to(ROOT)} links headings that are not there: {missing}"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    found = [(n, word) for n, line in enumerate(text.splitlines(), 1) for word in OUTSIDE if word in line]
    assert not found, (
        f"{page.relative_to(ROOT)} refers to files outside the repository (line, text): {found}; "
        "say what the source says, or cite the paper or the official repository by name"
    )


def test_the_setup_section_gives_exactly_make_demo_and_make_test():
    body = section(README.read_text(encoding="utf-8"), ("set-up", "setup"))
    assert body, "README.md has no '## Set-up' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", body, re.M | re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert commands == SETUP_COMMANDS, f"the set-up section's commands are {commands}, not {SETUP_COMMANDS}"


def test_the_readme_links_every_concern():
    linked = {str(file.relative_to(ROOT)) for _, file, _ in relative_links(README) if file.is_relative_to(ROOT)}
    missing = [page for page in README_LINKS if page not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_every_page_is_reachable_from_the_readme():
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        todo += [file for _, file, _ in relative_links(page) if file.suffix == ".md" and file.exists()]
    orphans = [str(p.relative_to(ROOT)) for p in doc_files() if p.resolve() not in reached]
    assert not orphans, f"pages no link leads to from README.md: {orphans}"
