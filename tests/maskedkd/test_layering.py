"""The package layers: `maskedkd` (the core) imports neither side; `student_client` never imports `teacher_server`;
inside `teacher_server`, the rooms import downwards only (the ledger and the engine know nothing of the service, the CLI
or the dashboard; the dashboard knows the ledger and the settings, not the engine or the transport; inside the engine,
the rows know nothing of the teacher, and neither of the micro-batcher; inside the service, the wire and the accounting
know neither each other nor the servicer); inside `student_client` as well (the transport knows nothing of the KD step,
the KD step nothing of the run, the run nothing of the entry points); and no modules of the three packages import each
other in a circle.

Read twice: statically (every import statement in the source, also the lazy ones inside functions) and at run time
(a fresh interpreter imports every module of the package and reports which top-level packages got loaded).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"maskedkd": {"teacher_server", "student_client"}, "student_client": {"teacher_server"}}
# teacher_server's rooms: what each may not import (its own room and the shared settings, errors, metrics are fine)
_UPPER_ROOMS = {
    "teacher_server.service",
    "teacher_server.cli",
    "teacher_server.dashboard",
    "teacher_server.testing",
    "teacher_server.launcher",
}
ROOMS = {
    "teacher_server/ledger": _UPPER_ROOMS | {"teacher_server.engine"},
    "teacher_server/engine": _UPPER_ROOMS | {"teacher_server.ledger"},
    "teacher_server/dashboard": {"teacher_server.engine", "teacher_server.service", "teacher_server.testing"},
    # the service may start the dashboard's app beside it (--dashboard-port), never the other way round
    "teacher_server/service": {"teacher_server.cli", "teacher_server.testing"},
}
# the engine's rooms: a request's rows under the teacher as served under the micro-batcher, served_model.py on top
_SERVED = "teacher_server.engine.served_model"
ROOMS |= {
    "teacher_server/engine/rows": {_SERVED, "teacher_server.engine.teacher", "teacher_server.engine.batching"},
    "teacher_server/engine/teacher": {_SERVED, "teacher_server.engine.batching"},
    "teacher_server/engine/batching": {_SERVED},
}
# the service's rooms: the request's bytes and the caller's account, each beside the other, under the servicer
_SERVICE_TOP = {  # the modules directly in service/
    f"teacher_server.service.{path.stem}" for path in (REPO / "teacher_server" / "service").glob("*.py")
} - {"teacher_server.service.__init__"}
ROOMS |= {
    "teacher_server/service/wire": _SERVICE_TOP | {"teacher_server.service.accounting"},
    "teacher_server/service/accounting": _SERVICE_TOP | {"teacher_server.service.wire"},
}
# student_client's rooms: the transport under the KD step under the run, the entries (and the settings) on top
_ENTRIES = {"student_client.api", "student_client.cli", "student_client.command"}
ROOMS |= {
    "student_client/transport": _ENTRIES
    | {"student_client.config", "student_client.distill", "student_client.training"},
    "student_client/distill": _ENTRIES | {"student_client.config", "student_client.training"},
    "student_client/training": _ENTRIES,
}
PACKAGES = ("maskedkd", "teacher_server", "student_client")


def _modules(package: str) -> list[str]:
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_packages(source: str) -> set[str]:
    """Top-level packages named by the import statements anywhere in `source` (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def imported_modules(source: str) -> set[str]:
    """Dotted names of every absolute import in `source` (`from a.b import c` gives a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_the_scan_sees_lazy_imports() -> None:
    """The scan can fail: an import inside a function body counts."""
    source = "def f():\n    from teacher_server.checkpoints import x\n    import teacher_server.cli\n"
    assert imported_packages(source) == {"teacher_server"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_higher_layer(package: str) -> None:
    offenders = {}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_packages(path.read_text()) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_no_higher_layer(package: str) -> None:
    modules = _modules(package)
    assert len(modules) > 3
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert package in loaded
    assert not loaded & FORBIDDEN[package], f"importing {package} loaded {sorted(loaded & FORBIDDEN[package])}"


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_rooms_import_downwards(room: str) -> None:
    offenders = {}
    for path in sorted((REPO / room).rglob("*.py")):
        if path.name == "__main__.py":  # `python -m teacher_server.dashboard` is the CLI's entry, not the app
            continue
        bad = {m for m in imported_modules(path.read_text()) for f in ROOMS[room] if m == f or m.startswith(f + ".")}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"{room} must not import {sorted(ROOMS[room])}: {offenders}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports (a submodule's import of its own package's __init__ left out)."""
    paths = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "maskedkd/v1" in path.as_posix():  # generated stubs
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = {module_of(m) for m in imported_modules(path.read_text())}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 100
    assert cycles(graph) == []
