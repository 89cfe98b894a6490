"""pyproject.toml's extras and constraints.txt: what `pip install maskedkd-service[client]` pulls in, and the pins;
the Python the Makefile installs them with.

The closure is resolved offline from the installed distributions' own metadata (their Requires-Dist with markers and
extras), starting from the requirements pyproject.toml names for an extra.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])
SERVER_ONLY = {"ray", "fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn"}


def project_requirements(extras: set[str]) -> list[Requirement]:
    """The base dependencies plus those of `extras`, self-references (`maskedkd-service[client]`) expanded."""
    reqs, seen, todo = [Requirement(r) for r in PROJECT["dependencies"]], set(), set(extras)
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for line in PROJECT["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == SELF:
                todo |= req.extras - seen
            else:
                reqs.append(req)
    return reqs


def closure(extras: set[str]) -> set[str]:
    """Every distribution (canonical name) installing the project with `extras` brings in."""
    found: set[str] = set()
    todo: list[tuple[Requirement, str]] = [(r, "") for r in project_requirements(extras)]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        wanted = {(name, e) for e in req.extras | {""}}
        if all(key in found for key in wanted):
            continue
        found |= wanted
        dist = md.distribution(req.name)  # PackageNotFoundError: an extra names something not installed here
        for e in req.extras | {""}:
            todo += [(Requirement(line), e) for line in dist.requires or []]
    return {name for name, _ in found}


def test_the_resolver_sees_through_extras() -> None:
    """The closure can fail: ray[train] is reached through the train extra's self-reference and ray's own extras."""
    train = closure({"train"})
    assert {"ray", "torch", "grpcio", "pyarrow"} <= train  # pyarrow only via ray's `train` extra's markers
    assert "fastapi" in closure({"dashboard"}) and "starlette" in closure({"dashboard"})


def test_the_client_extra_pulls_no_server_or_ray() -> None:
    client = closure({"client"})
    assert {"torch", "timm", "grpcio", "protobuf", "numpy", "torchvision", "pillow", "grpcio-status"} <= client
    assert not client & SERVER_ONLY, f"the client extra pulls {sorted(client & SERVER_ONLY)}"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("extra", sorted(PROJECT["optional-dependencies"]))
def test_every_named_dependency_is_pinned_within_its_range(extra: str) -> None:
    pins = _constraints()
    for req in project_requirements({extra}):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} ({extra}) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt {name}=={pins[name]} is outside pyproject's {req}"
        )
        assert str(req.specifier), f"{req}: pyproject.toml gives a version range for every dependency"


def test_the_pins_are_what_is_installed_here() -> None:
    """constraints.txt holds versions seen working: this environment's (the suite runs on them)."""
    drift = {
        name: (version, md.version(name)) for name, version in _constraints().items() if md.version(name) != version
    }
    assert not drift, f"constraints.txt differs from the installed versions (pinned, installed): {drift}"


def _make(args: list[str], path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    env = {"PATH": path, "HOME": str(tmp_path)}
    return subprocess.run([make, "-s", "-C", str(REPO), *args], env=env, capture_output=True, text=True, timeout=60)


def _fake_python(path: Path, exit_code: int) -> Path:
    """An executable that fails as a pyenv shim of a version not installed does (or an older Python's check)."""
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(0o755)
    return path


def test_make_takes_the_first_python_on_path_that_runs_as_a_supported_version(tmp_path: Path) -> None:
    """A fresh machine's Python: python3.11 on PATH that does not run is passed over for python3.12 (here the suite's
    own interpreter, a 3.11, 3.12 or 3.13 itself, linked under that name)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_python(bin_dir / "python3.11", 127)
    (bin_dir / "python3.12").symlink_to(sys.executable)
    done = _make(["-p", "-n", "install", f"VENV={tmp_path / 'venv'}"], f"{bin_dir}:/usr/bin:/bin", tmp_path)
    chosen = [line for line in done.stdout.splitlines() if line.startswith("PYTHON := ")]
    assert chosen == [f"PYTHON := {bin_dir / 'python3.12'}"], done.stderr[-2000:]


def test_make_refuses_another_python_in_one_line_before_making_a_venv(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path / "python3.10", 1)
    venv = tmp_path / "venv"
    done = _make(["install", f"PYTHON={fake}", f"VENV={venv}"], "/usr/bin:/bin", tmp_path)
    assert done.returncode != 0 and not venv.exists()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: make needs Python 3.11, 3.12 or 3.13 (python3.11, python3.12, python3.13 or python3 on PATH, or "
        "PYTHON=...); "
        f"{fake} is missing or another version"
    ]


def test_make_installs_the_venv_package_a_debian_python_lacks_when_root(tmp_path: Path) -> None:
    """Debian and Ubuntu ship ensurepip apart from Python (python3.X-venv); a fresh machine has none, and as root
    `make` installs it as it installs chromium. The Python, `id` and `apt-get` here are stand-ins on PATH (apt-get
    records its arguments and "installs" ensurepip); the stand-in Python then fails to make the venv, ending make."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    installed, calls = tmp_path / "ensurepip-installed", tmp_path / "apt-get.calls"
    python = bin_dir / "python3.12"
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f"  *ensurepip*) test -f {installed} ;;\n"
        "  *print*version_info*) echo 3.12 ;;\n"
        "  *version_info*) exit 0 ;;\n"
        "  *) exit 3 ;;\n"
        "esac\n"
    )
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\ntouch {installed}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = _make(["install", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}"], f"{bin_dir}:/usr/bin:/bin", tmp_path)
    assert done.returncode != 0  # the stand-in cannot make a venv
    assert calls.read_text().splitlines() == ["update -q", "install -y -q python3.12-venv"], done.stderr[-2000:]
    calls.unlink()
    _make(["install", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}"], f"{bin_dir}:/usr/bin:/bin", tmp_path)
    assert not calls.exists()  # ensurepip is there now: nothing installed again
