"""Reads Markdown the way a reader of the repository meets it: fenced code blocks (with the heading they sit under),
headings as GitHub anchors, and links outside code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND_LANGS = frozenset({"bash", "sh", "shell", "console"})  # fences whose contents a reader pastes into a shell

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title") or the closing parenthesis
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


@dataclass(frozen=True)
class FencedBlock:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str  # first word of the info string, lower case ("" when none)
    text: str  # the block's contents, without the fences
    section: str  # the nearest heading above it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} ({self.section})"


@dataclass(frozen=True)
class Link:
    path: Path
    line: int
    target: str


def _scan(path: Path) -> tuple[list[FencedBlock], list[tuple[int, str]], list[tuple[int, str]]]:
    """One pass: fenced blocks, (line, heading text) and (line, prose line) outside the blocks."""
    blocks: list[FencedBlock] = []
    headings: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []
    open_fence: re.Match[str] | None = None
    start, body, section = 0, [], ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if open_fence is not None:
            closing = _FENCE.match(line)
            if (
                closing
                and closing["fence"][0] == open_fence["fence"][0]
                and len(closing["fence"]) >= len(open_fence["fence"])
                and not closing["info"].strip()
            ):
                info = open_fence["info"].strip().split()
                blocks.append(FencedBlock(path, start, info[0].lower() if info else "", "\n".join(body), section))
                open_fence = None
            else:
                body.append(line)
            continue
        opening = _FENCE.match(line)
        if opening:
            open_fence, start, body = opening, number, []
            continue
        heading = _HEADING.match(line)
        if heading:
            section = heading[2]
            headings.append((number, section))
        prose.append((number, line))
    assert open_fence is None, f"{path}:{start}: a code fence is never closed"
    return blocks, headings, prose


def fenced_blocks(path: Path) -> list[FencedBlock]:
    return _scan(path)[0]


def command_blocks(path: Path) -> list[FencedBlock]:
    return [b for b in fenced_blocks(path) if b.lang in COMMAND_LANGS]


def anchor_of(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, heading in _scan(path)[1]:
        base = anchor_of(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[Link]:
    """Inline links, images and reference definitions outside code blocks and inline code."""
    found: list[Link] = []
    for number, line in _scan(path)[2]:
        text = _INLINE_CODE.sub("", line)
        found += [Link(path, number, m[1]) for m in _LINK.finditer(text)]
        reference = _REFERENCE_DEF.match(line)
        if reference:
            found.append(Link(path, number, reference[1]))
    return found


def shell_commands(block: FencedBlock) -> list[str]:
    """The commands of a shell block: continuation lines joined, comment-only lines dropped; in a `console` block
    only the `$ ` lines (the rest is output)."""
    lines = block.text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands: list[str] = []
    pending = ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        commands.append(" ".join((pending + line).split()))
        pending = ""
    if pending:
        commands.append(" ".join(pending.split()))
    return commands


def runnable_text(block: FencedBlock) -> str:
    """What a reader pastes: the block itself, or a console block's `$ ` lines."""
    if block.lang != "console":
        return block.text
    return "\n".join(line[2:] for line in block.text.splitlines() if line.startswith("$ "))
