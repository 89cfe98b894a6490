"""docs/reproduction.md is written by two scripts (the reproduction and the fidelity probe); each owns one section
between markers and leaves the rest of the file alone."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = (
    "# Reproduction of MaskedKD on CIFAR-10 and MNIST\n\nWritten by the scripts in `experiments/` (see its README).\n"
)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the section `name` of `path` with `body` (appended when absent; the file is created when missing)."""
    begin, end = _markers(name)
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_section(path: Path, name: str) -> str | None:
    if not path.exists():
        return None
    begin, end = _markers(name)
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), path.read_text(), re.DOTALL)
    return match.group(1) if match else None
