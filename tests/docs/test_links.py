"""Every relative link in the README, docs/*.md and the other READMEs reaches a file of the repository, and every
`#anchor` a heading of its target (GitHub's anchors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_testkit import REPO, Link, anchors, links

pytestmark = pytest.mark.dtype("none")  # no model numerics

# the folders' READMEs, not those of hidden folders (pytest's own cache writes .pytest_cache/README.md)
FOLDER_READMES = [path for path in REPO.glob("*/README.md") if not path.parent.name.startswith(".")]
DOCUMENTS = sorted({REPO / "README.md", *(REPO / "docs").glob("*.md"), *FOLDER_READMES})
EXTERNAL = ("http://", "https://", "mailto:")


def broken(link: Link, root: Path = REPO) -> str | None:
    """Why the link does not resolve inside `root`, or None."""
    if link.target.startswith(EXTERNAL):
        return None
    path_part, _, fragment = link.target.partition("#")
    target = (link.path.parent / path_part).resolve() if path_part else link.path
    if not target.is_relative_to(root):
        return f"{link.target} leaves the repository"
    if not target.exists():
        return f"{link.target}: no such file"
    if fragment:
        if target.suffix != ".md":
            return f"{link.target}: an anchor into a file that is not Markdown"
        if fragment not in anchors(target):
            return f"{link.target}: no heading with anchor #{fragment} in {target.relative_to(root)}"
    return None


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(document: Path) -> None:
    problems = [
        f"{link.path.relative_to(REPO)}:{link.line}: {why}"
        for link in links(document)
        if (why := broken(link)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_link_checker_catches_what_it_should(tmp_path: Path) -> None:
    """The checker against a small repository with known good and bad links."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# Project\n\n## Training a student\n")
    (root / "docs" / "dashboard.png").write_bytes(b"")
    (tmp_path / "outside.md").write_text("# Outside\n")
    doc = root / "docs" / "guide.md"
    doc.write_text(
        "# A heading, with `code`!\n\n## Twice\n\n## Twice\n\n"
        "[ok](../README.md) [ok](#a-heading-with-code) [ok](#twice-1) [ok](https://example.com/x)\n"
        "![ok](dashboard.png) [ok](../README.md#training-a-student)\n"
        "[bad](missing.md) [bad](#nowhere) [bad](../README.md#no-such-section) [bad](../../outside.md)\n"
        "`[not a link](missing-in-code.md)`\n[ref]: missing-ref.md\n\n"
        "```bash\n[not a link](missing-in-a-block.md)\n```\n"
    )
    found = links(doc)
    assert len(found) == 11
    assert [link.target for link in found if broken(link, root)] == [
        "missing.md",
        "#nowhere",
        "../README.md#no-such-section",
        "../../outside.md",
        "missing-ref.md",
    ]
