"""Every test states the dtype and device it checks: `pytest.mark.dtype(NAME, device="cpu")` on the test or its module.

- `float32`: compares with float32 references; `--dtype auto` / `--precision auto` resolve to float32 in the test
  and in every process it starts (MASKEDKD_FORCE_CPU_BF16=0), on any CPU.
- `bfloat16`: checks bf16 behaviour; auto resolves to bf16 (MASKEDKD_FORCE_CPU_BF16=1: emulated, slowly, where the
  CPU has no bf16 instructions; tiny models keep it fast).
- `auto`: must pass in whatever auto picks on this machine (bf16 on a CPU with fast native bf16, else float32). Each
  such CPU test runs twice, `[auto]` as this machine resolves it and `[auto-other]` forced to the answer it does not
  pick, so both are covered on every machine in one run. `pytest --force-dtype bfloat16|float32|other` runs only
  these tests, once each, with auto forced that way.
- `both`: the test forces each answer itself (monkeypatch) and checks both.
- `none`: no model numerics (ledger, CLI text, manifests, docs).

`device="cuda"` tests are skipped where torch sees no CUDA device. A test without a mark fails collection.
"""

from __future__ import annotations

import os

import pytest

from maskedkd.precision import FORCE_CPU_BF16_ENV, detected_cpu_bf16

DTYPES = ("float32", "bfloat16", "auto", "both", "none")
AUTO_VARIANT = "auto_variant"  # the autouse fixture (conftest.py) an `auto` CPU test is parametrized over
AUTO_VARIANTS = ("auto", "auto-other")  # ids that do not depend on what this machine measures (xdist compares them)
DEVICES = ("cpu", "cuda")
FORCED = {"float32": "0", "bfloat16": "1"}  # MASKEDKD_FORCE_CPU_BF16 per pinned dtype
_MACHINE_ENV = os.environ.get(FORCE_CPU_BF16_ENV)  # what the caller set, kept for `auto` tests


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(
        "--force-dtype",
        choices=(*FORCED, "other"),
        default=None,
        help="run only the tests marked dtype('auto'), with auto precision forced to this dtype "
        "(other: the one auto does not pick on this machine)",
    )


def configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "dtype(name, device='cpu'): the dtype (float32|bfloat16|auto|both|none) and "
        "device (cpu|cuda) the test checks; see tests/dtype_marks.py",
    )


def machine_dtype() -> tuple[str, str]:
    """(what auto resolves to on this CPU without a forced answer, why)."""
    if _MACHINE_ENV in ("0", "1"):
        return ("bfloat16" if _MACHINE_ENV == "1" else "float32"), f"{FORCE_CPU_BF16_ENV}={_MACHINE_ENV}"
    native, why = detected_cpu_bf16()  # not cpu_bf16_support(): that reads the precision the last test forced
    return ("bfloat16" if native else "float32"), why


def other_dtype() -> str:
    """The answer auto does not pick on this machine."""
    return "float32" if machine_dtype()[0] == "bfloat16" else "bfloat16"


def forced_dtype(config: pytest.Config) -> str | None:
    """--force-dtype, with `other` resolved against this machine."""
    forced = config.getoption("--force-dtype")
    return other_dtype() if forced == "other" else forced


def header(config: pytest.Config) -> str:
    dtype, why = machine_dtype()
    forced = forced_dtype(config)
    extra = f"; this run: only dtype('auto') tests, forced to {forced}" if forced else ""
    return f"dtype: auto resolves to {dtype} on this CPU ({why}){extra}"


def parametrize(metafunc: pytest.Metafunc) -> None:
    """Without --force-dtype, a CPU test marked `auto` runs as both AUTO_VARIANTS."""
    mark = metafunc.definition.get_closest_marker("dtype")
    if metafunc.config.getoption("--force-dtype") or mark is None or mark.args[:1] != ("auto",):
        return
    if mark.kwargs.get("device", "cpu") == "cpu":
        metafunc.parametrize(AUTO_VARIANT, AUTO_VARIANTS)


def mark_of(item: pytest.Item) -> tuple[str, str]:
    mark = item.get_closest_marker("dtype")
    if mark is None:
        raise pytest.UsageError(f"{item.nodeid}: no dtype mark; add pytest.mark.dtype(...) (tests/dtype_marks.py)")
    name = mark.args[0] if mark.args else ""
    device = mark.kwargs.get("device", "cpu")
    if name not in DTYPES or device not in DEVICES:
        raise pytest.UsageError(
            f"{item.nodeid}: dtype mark {mark.args} {mark.kwargs} is not one of {DTYPES} on {DEVICES}"
        )
    return name, device


def select(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every item's mark; with --force-dtype keep only the `auto` ones."""
    marks = {item.nodeid: mark_of(item) for item in items}
    forced = forced_dtype(config)
    if forced is None:
        return
    keep = [item for item in items if marks[item.nodeid][0] == "auto"]
    config.hook.pytest_deselected(items=[item for item in items if marks[item.nodeid][0] != "auto"])
    items[:] = keep


def apply(item: pytest.Item) -> None:
    """Set MASKEDKD_FORCE_CPU_BF16 for the test (and what it starts); skip CUDA tests without CUDA."""
    name, device = mark_of(item)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
    forced = forced_dtype(item.config)
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get(AUTO_VARIANT) == "auto-other":
        forced = other_dtype()
    value = FORCED.get(name) or (FORCED[forced] if forced and name == "auto" else _MACHINE_ENV)
    if value is None:
        os.environ.pop(FORCE_CPU_BF16_ENV, None)
    else:
        os.environ[FORCE_CPU_BF16_ENV] = value


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: no MASKEDKD_* settings of the caller's, except the precision the
    test's dtype mark chose (so the child resolves auto as the test expects), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKEDKD_") or k == FORCE_CPU_BF16_ENV}
    return {**env, **extra}
