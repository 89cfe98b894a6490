"""The README test's extractor finds every shell fence (bash, sh, shell, console) and nothing else, joins
continuation lines, and keeps only the `$ ` lines of a console block."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_testkit import command_blocks, fenced_blocks, runnable_text, shell_commands

pytestmark = pytest.mark.dtype("none")  # no model numerics

DOC = """# Title

```bash
make demo   # a comment
            # more comment
teacher-server serve --a 1 \\
    --b 2 &
```

## Second

```sh
echo sh
```

```console
$ echo console
console output
```

~~~shell
echo tilde
~~~

```python
print("not a shell block")
```

```
a diagram
```

````bash
```
echo nested fence
````
"""


def test_every_shell_fence_is_found_with_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    assert [b.lang for b in fenced_blocks(doc)] == ["bash", "sh", "console", "shell", "python", "", "bash"]
    blocks = command_blocks(doc)
    assert [(b.lang, b.section, b.line) for b in blocks] == [
        ("bash", "Title", 3),
        ("sh", "Second", 12),
        ("console", "Second", 16),
        ("shell", "Second", 21),
        ("bash", "Second", 33),
    ]
    assert shell_commands(blocks[0]) == ["make demo # a comment", "teacher-server serve --a 1 --b 2 &"]
    assert shell_commands(blocks[2]) == ["echo console"]
    assert runnable_text(blocks[2]) == "echo console"
    assert runnable_text(blocks[4]) == "```\necho nested fence"
