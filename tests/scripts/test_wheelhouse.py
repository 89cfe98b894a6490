"""`scripts/wheelhouse.py`: the wheels a PyTorch machine without a registry needs for the server, the client and the
GPU run's tests, checked against what those actually import (no download: `--dry-run`)."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.dtype("none")  # lists packages: no model numerics

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "wheelhouse.py"
# what the server, a training student and the CUDA tests import (alembic: the ledger's migrations)
IMPORTS = (
    "teacher_server.cli.main",
    "teacher_server.service.server",
    "teacher_server.ledger.database",
    "alembic.command",
    "student_client.cli",
    "student_client.training.train_loop",
    "benchmarks.gpu.script",
    "pytest_asyncio",
    "pytest_timeout",
)


# imported when present, not needed: `import grpc` tries grpc_tools, pytest loads the xdist plugin
OPTIONAL = {"grpcio-tools", "pytest-xdist", "execnet"}


def requirements_of(names: set[str]) -> set[str]:
    """Everything `names` require, transitively, markers ignored (a superset): it rides with them."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:  # under a marker that does not hold here
            continue
        for req in requires:
            name = canonicalize_name(Requirement(req).name)
            if name not in found:
                found.add(name)
                todo.append(name)
    return found


def listed(*args: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", "unused", "--dry-run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("==") for line in out.split())


def imported_distributions(modules: tuple[str, ...]) -> set[str]:
    """The distributions whose top-level modules a fresh interpreter holds after importing `modules` and collecting
    the GPU run's CUDA tests (its conftest and test kits included)."""
    code = (
        "import importlib, importlib.metadata as md, sys, pytest\n"
        "from benchmarks.gpu.plan import CUDA_TEST_FILES\n"
        f"for module in {modules!r}: importlib.import_module(module)\n"
        "pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-k', 'cuda', *CUDA_TEST_FILES])\n"
        "dists = md.packages_distributions()\n"
        "print('DISTS', *sorted({d for m in list(sys.modules) for d in dists.get(m.split('.')[0], [])}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "DISTS", done.stdout[-2000:]
    return {canonicalize_name(d) for d in last[1:]}


def test_the_wheels_cover_every_distribution_the_server_and_the_client_import() -> None:
    wheels = listed()
    have = {"torch", "torchvision", "triton", "numpy", "pillow"}  # the script's default --have
    assert not have & set(wheels)
    for name, version in wheels.items():  # the versions installed here (the pinned ones)
        assert metadata.version(name) == version, name
    imported = imported_distributions(IMPORTS)
    missing = imported - set(wheels) - have - requirements_of(have) - OPTIONAL - {"maskedkd-service"}
    assert not missing, f"imported but neither carried nor on the machine: {sorted(missing)}"
    assert {"grpcio", "protobuf", "sqlalchemy", "alembic", "blake3", "pytest-asyncio"} <= set(wheels)


def test_what_the_machine_has_is_left_out_with_what_only_it_requires() -> None:
    wheels = listed("--have", "torch,torchvision,triton,numpy,pillow,timm")
    assert "timm" not in wheels and "huggingface-hub" not in wheels  # timm's own requirement
    assert "grpcio" in wheels
