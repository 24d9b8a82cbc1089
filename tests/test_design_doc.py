"""docs/design.md exists, and every design section the repository cites is one of its headings.

Code and docs cite the design as ``docs/design.md §5c`` (older text: ``DESIGN §5c``, which
means the same file). In these files ``§`` is only ever used for design sections, so every
``§N`` / ``§Nx`` token counts as a citation: that also covers lists such as
``design §4, §5, §5b`` and bare back-references such as ``(§10)``. A section exists when
docs/design.md has a markdown heading starting with its token, e.g. ``## §5c The ...``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SECTION = re.compile(r"§[0-9]+[a-z]?")
HEADING = re.compile(r"^#{1,6}[ \t]+(§[0-9]+[a-z]?)(?![0-9A-Za-z])", re.MULTILINE)
# Where citations live; docs/design.md itself is included (its cross-references count too).
SCANNED_DIRS = ("src", "benchmarks", "tests")
SCANNED_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".cfg", ".yaml", ".yml"}
# The sections every citation so far has used; keep them even when nothing cites one.
REQUIRED = {f"§{n}" for n in range(1, 11)} | {"§5b", "§5c"}


def _repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (build outputs are ignored); pathlib fallback."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        paths = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for d in SCANNED_DIRS for p in (ROOT / d).rglob("*") if "egg-info" not in str(p)]
        paths += [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    return sorted({p for p in paths if p.is_file()})


def _in_scope(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    if path.resolve() == Path(__file__).resolve():
        return False
    if rel == Path("README.md") or (rel.parent == Path("docs") and rel.suffix == ".md"):
        return True
    return rel.parts[0] in SCANNED_DIRS and path.suffix in SCANNED_SUFFIXES


def _citations() -> dict[str, list[str]]:
    """Cited section -> ``file:line`` places that cite it."""
    cited: dict[str, list[str]] = {}
    for path in _repo_files():
        if not _in_scope(path):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\\u00a7", "§")  # JSON files escape the sign
        for lineno, line in enumerate(text.splitlines(), start=1):
            for token in SECTION.findall(line):
                cited.setdefault(token, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return cited


def _headings() -> list[str]:
    return HEADING.findall(DESIGN.read_text(encoding="utf-8"))


def test_design_doc_exists() -> None:
    assert DESIGN.is_file(), "docs/design.md is missing"
    assert _headings(), "docs/design.md has no '## §N ...' section headings"


def test_every_cited_section_is_a_heading() -> None:
    cited = _citations()
    assert cited, "found no design citations at all: the scan is broken"
    headings = set(_headings())
    missing = {token: places for token, places in cited.items() if token not in headings}
    assert not missing, "cited sections without a heading in docs/design.md: " + "; ".join(
        f"{token} ({', '.join(places[:3])}{', ...' if len(places) > 3 else ''})"
        for token, places in sorted(missing.items())
    )


def test_section_headings_are_unique_and_complete() -> None:
    headings = _headings()
    repeated = sorted({h for h in headings if headings.count(h) > 1})
    assert not repeated, f"docs/design.md repeats section headings: {repeated}"
    absent = sorted(REQUIRED - set(headings), key=lambda s: (int(re.sub(r"\D", "", s)), s))
    assert not absent, f"docs/design.md lacks sections: {absent}"
