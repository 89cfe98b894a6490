"""Wheels for a GPU machine that has PyTorch but no package registry: the project's server and client dependencies at
the versions `constraints.txt` pins, for that machine's Python, in one folder to copy there.

    python scripts/wheelhouse.py --out .whl                      # CPython 3.12, manylinux x86-64
    python scripts/wheelhouse.py --out .whl --python-version 3.11 --have torch,torchvision,numpy,pillow,timm

Then on that machine, from a checkout of this repository:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m benchmarks --gpu --out OUT/gpu.md

What goes in: the requirements of the `server` and `client` extras and of the base (and `--also`, by default the
test runner the GPU run's CUDA tests need), with what they require in turn, read from the packages installed here
(`make install` installs the pinned set), each at its installed version; not what `--have` names, which the machine
has (by default PyTorch's own stack: torch, torchvision, triton, numpy, pillow), nor their requirements. Each wheel is
fetched with `pip download --no-deps` for the target interpreter and platform; a version with no such wheel stops
the script in one line.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ("server", "client")
HAVE = ("torch", "torchvision", "triton", "numpy", "pillow")  # a CUDA PyTorch image's own stack
ALSO = ("pytest", "pytest-timeout", "pytest-asyncio")  # the GPU run's CUDA tests (benchmarks/gpu/script.py)
PLATFORMS = (  # manylinux tags pip matches exactly, newest first
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def named_requirements(extras: tuple[str, ...], also: tuple[str, ...]) -> list[Requirement]:
    """The base requirements, those of `extras` (pyproject.toml), and `also`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    named = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        named += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return named + [Requirement(name) for name in also]


def closure(named: list[Requirement], have: set[str], python_version: str) -> dict[str, str]:
    """{distribution: installed version} of `named` and what they require in turn (markers read for the target
    Python), leaving out the project itself and what `have` names."""
    environment = {**default_environment(), "python_version": python_version, "python_full_version": python_version}
    project = canonicalize_name("maskedkd-service")
    found: dict[str, str] = {}
    todo = list(named)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in have or name in found:
            continue
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": ""}):
            continue
        if name == project:  # a self-reference ("maskedkd-service[server]"): its extras are named already
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: error: {req.name} is not installed here; run `make install` first") from None
        found[name] = dist.version
        for extra in req.extras:
            todo += [r for r in map(Requirement, dist.requires or []) if _for_extra(r, extra, environment)]
        todo += [r for r in map(Requirement, dist.requires or []) if _for_extra(r, "", environment)]
    return found


def _for_extra(req: Requirement, extra: str, environment: dict[str, str]) -> bool:
    """Whether `req` applies with `extra` asked ("" for none): a requirement under another extra does not."""
    if req.marker is None:
        return extra == ""
    return req.marker.evaluate({**environment, "extra": extra}) and (
        extra == "" or not req.marker.evaluate({**environment, "extra": ""})
    )


def download(pins: dict[str, str], out: Path, python_version: str) -> None:
    """Each pinned wheel for the target interpreter and platform into `out` (no dependencies resolved)."""
    out.mkdir(parents=True, exist_ok=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    for name, version in sorted(pins.items()):
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", python_version, "--implementation", "cp", *platforms]
        command += ["-d", str(out), f"{name}=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SystemExit(f"wheelhouse: error: no wheel of {name}=={version} for CPython {python_version}: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/wheelhouse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder the wheels go to")
    parser.add_argument("--python-version", default="3.12", help="the target machine's Python (default 3.12)")
    parser.add_argument("--have", default=",".join(HAVE), help="distributions the machine has (comma-separated)")
    parser.add_argument("--also", default=",".join(ALSO), help="more distributions to carry (comma-separated)")
    parser.add_argument("--dry-run", action="store_true", help="list the wheels and versions, download nothing")
    args = parser.parse_args(argv)
    have = {canonicalize_name(n) for n in args.have.split(",") if n.strip()}
    also = tuple(n.strip() for n in args.also.split(",") if n.strip())
    pins = closure(named_requirements(EXTRAS, also), have, args.python_version)
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
    if args.dry_run:
        return 0
    download(pins, args.out, args.python_version)
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
